"""Each adapter driven by its framework's own test model (no network, no LLM): the tool gets a
live credential for its grant through the framework's hook, reaches a helpdesk API that checks
it with Introspect, and the secret appears nowhere in what the model saw."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from agents import RunContextWrapper

import jitbroker
from jitbroker import AsyncBroker, Broker, NoCredentialInScope
from jitbroker.adapters.httpx import JitbrokerAuth

GRANTS = {"read_ticket": [("tickets", "read")]}
READ = [("tickets", "read")]


def helpdesk(verifier: jitbroker.Verifier, seen: list[str]) -> httpx.MockTransport:
    """The tool server: answers only requests whose bearer token the broker says is active."""

    def handle(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ")
        info = verifier.introspect(token, "tickets")
        if not info.active:
            return httpx.Response(401, json={"error": "inactive credential"})
        seen.append(token)
        ticket = request.url.path.rsplit("/", 1)[-1]
        return httpx.Response(200, json={"ticket": ticket, "subject": "printer on fire",
                                         "task": info.task_id})

    return httpx.MockTransport(handle)


def make_read_ticket(transport: httpx.MockTransport) -> Callable[[str], str]:
    def read_ticket(ticket_id: str) -> str:
        """Read a support ticket by id."""
        cred = jitbroker.credential("tickets", "read")
        with httpx.Client(transport=transport, headers=cred.authorization_header()) as c:
            r = c.get(f"https://helpdesk.invalid/tickets/{ticket_id}")
        r.raise_for_status()
        return json.dumps(r.json())

    return read_ticket


def make_aread_ticket(transport: httpx.MockTransport) -> Callable[[str], Any]:
    async def read_ticket(ticket_id: str) -> str:
        """Read a support ticket by id."""
        # JitbrokerAuth takes this tool call's credential from the adapter.
        async with httpx.AsyncClient(transport=transport,
                                     auth=JitbrokerAuth("tickets", "read")) as c:
            r = await c.get(f"https://helpdesk.invalid/tickets/{ticket_id}")
        r.raise_for_status()
        return json.dumps(r.json())

    return read_ticket


# --- Pydantic AI -----------------------------------------------------------------------------


async def test_pydantic_ai(abroker: AsyncBroker, verifier: jitbroker.Verifier) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessagesTypeAdapter
    from pydantic_ai.models.test import TestModel

    from jitbroker.adapters.pydantic_ai import JitbrokerCapability

    seen: list[str] = []
    agent = Agent(TestModel(call_tools=["read_ticket"]),
                  capabilities=[JitbrokerCapability(GRANTS)])
    agent.tool_plain(make_aread_ticket(helpdesk(verifier, seen)))
    async with abroker.task("summarise ticket 42", grants=READ) as task:
        result = await agent.run("Summarise ticket 42")
    assert len(seen) == 1
    assert task.task_id in result.output  # the tool's answer reached the model...
    transcript = ModelMessagesTypeAdapter.dump_json(result.all_messages()).decode()
    assert seen[0] not in transcript  # ...the secret did not
    assert not verifier.introspect(seen[0], "tickets").active  # completed with the task


def test_pydantic_ai_sync_task_and_undeclared_tool(broker: Broker,
                                                   verifier: jitbroker.Verifier) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    from jitbroker.adapters.pydantic_ai import JitbrokerCapability

    seen: list[str] = []
    agent = Agent(TestModel(call_tools=["read_ticket", "sneaky"]),
                  capabilities=[JitbrokerCapability(GRANTS)])
    agent.tool_plain(make_read_ticket(helpdesk(verifier, seen)))
    errors: list[Exception] = []

    @agent.tool_plain
    def sneaky(x: str) -> str:
        """A tool the policy author did not give any grant."""
        try:
            jitbroker.credential("tickets", "read")
        except NoCredentialInScope as e:
            errors.append(e)
        return "nothing"

    with broker.task("summarise ticket 42", grants=READ):
        agent.run_sync("Summarise ticket 42")
    assert len(seen) == 1
    assert len(errors) == 1


async def test_pydantic_ai_run_as_task(dev: Any, verifier: jitbroker.Verifier) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    from jitbroker.adapters.pydantic_ai import JitbrokerCapability

    seen: list[str] = []
    async with AsyncBroker.from_files(dev.target, dev.svid_dir("agent")) as b:
        cap = JitbrokerCapability(GRANTS, broker=b, purpose="answer a customer", ttl=300)
        agent = Agent(TestModel(call_tools=["read_ticket"]), capabilities=[cap])
        agent.tool_plain(make_aread_ticket(helpdesk(verifier, seen)))
        result = await agent.run("Summarise ticket 42")
        task_id = json.loads(json.loads(result.output)["read_ticket"])["task"]
        assert (await b.get_task(task_id)).state == "COMPLETED"
        assert (await b.get_task(task_id)).purpose == "answer a customer"


# --- LangChain v1 ----------------------------------------------------------------------------


def _scripted_chat(steps: list[Any]) -> Any:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    class ScriptedChat(GenericFakeChatModel):
        """LangChain's fake chat model; create_agent binds tools, which it ignores."""

        def bind_tools(self, tools: Any, **kw: Any) -> Any:
            return self

    return ScriptedChat(messages=iter(steps))


def _lc_steps() -> list[Any]:
    from langchain_core.messages import AIMessage

    return [
        AIMessage(content="", tool_calls=[{"name": "read_ticket", "args": {"ticket_id": "42"},
                                           "id": "call_1", "type": "tool_call"}]),
        AIMessage(content="Ticket 42: the printer is on fire."),
    ]


async def test_langchain_async(abroker: AsyncBroker, verifier: jitbroker.Verifier) -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import StructuredTool

    from jitbroker.adapters.langchain import JitbrokerMiddleware

    seen: list[str] = []
    tool = StructuredTool.from_function(coroutine=make_aread_ticket(helpdesk(verifier, seen)))
    agent = create_agent(_scripted_chat(_lc_steps()), tools=[tool],
                         middleware=[JitbrokerMiddleware(GRANTS)])
    async with abroker.task("summarise ticket 42", grants=READ) as task:
        out = await agent.ainvoke({"messages": [{"role": "user", "content": "ticket 42?"}]})
    assert len(seen) == 1
    shown = repr(out["messages"])
    assert task.task_id in shown and seen[0] not in shown


def test_langchain_sync(broker: Broker, verifier: jitbroker.Verifier) -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import StructuredTool

    from jitbroker.adapters.langchain import JitbrokerMiddleware

    seen: list[str] = []
    tool = StructuredTool.from_function(make_read_ticket(helpdesk(verifier, seen)))
    agent = create_agent(_scripted_chat(_lc_steps()), tools=[tool],
                         middleware=[JitbrokerMiddleware(GRANTS)])
    with broker.task("summarise ticket 42", grants=READ):
        out = agent.invoke({"messages": [{"role": "user", "content": "ticket 42?"}]})
    assert len(seen) == 1 and seen[0] not in repr(out["messages"])


# --- OpenAI Agents SDK -----------------------------------------------------------------------


async def test_openai_agents(abroker: AsyncBroker, verifier: jitbroker.Verifier) -> None:
    from agents import Agent, Runner, function_tool, set_tracing_disabled
    from agents.testing import ScriptedModel, assistant_message, function_call

    from jitbroker.adapters.openai_agents import JitbrokerRunHooks

    set_tracing_disabled(True)
    seen: list[str] = []
    model = ScriptedModel([
        [function_call("read_ticket", {"ticket_id": "42"}, call_id="call_1")],
        [assistant_message("Ticket 42: the printer is on fire.")],
    ])
    tool = function_tool(make_aread_ticket(helpdesk(verifier, seen)))
    agent = Agent(name="support", model=model, tools=[tool])
    async with abroker.task("summarise ticket 42", grants=READ) as task:
        result = await Runner.run(agent, "Summarise ticket 42", hooks=JitbrokerRunHooks(GRANTS))
        assert task._delivered.lookup(jitbroker.Grant("tickets", "read")) is None  # taken back
    assert result.final_output == "Ticket 42: the printer is on fire."
    assert len(seen) == 1
    inputs = repr([c.input for c in model.calls])
    assert task.task_id in inputs and seen[0] not in inputs


async def test_openai_agents_tool_context(abroker: AsyncBroker,
                                          verifier: jitbroker.Verifier) -> None:
    from agents import Agent, Runner, function_tool, set_tracing_disabled
    from agents.testing import ScriptedModel, assistant_message, function_call

    from jitbroker.adapters.openai_agents import JitbrokerRunHooks, tool_credential

    set_tracing_disabled(True)
    got: list[str] = []

    @function_tool
    def read_ticket(ctx: RunContextWrapper[Any], ticket_id: str) -> str:
        """Read a support ticket by id."""
        got.append(tool_credential(ctx, "tickets", "read").credential_id)
        return "printer on fire"

    model = ScriptedModel([
        [function_call("read_ticket", {"ticket_id": "42"}, call_id="c1"),
         function_call("read_ticket", {"ticket_id": "43"}, call_id="c2")],
        [assistant_message("done")],
    ])
    agent = Agent(name="support", model=model, tools=[read_ticket])
    async with abroker.task("two tickets", grants=READ):
        await Runner.run(agent, "tickets 42 and 43", hooks=JitbrokerRunHooks(GRANTS))
    assert len(got) == 2 and got[0] == got[1]  # one cached credential for the task


# --- httpx -----------------------------------------------------------------------------------


def test_httpx_auth_renews_on_401(broker: Broker, verifier: jitbroker.Verifier) -> None:
    seen: list[str] = []
    with broker.task("http tool", grants=READ) as t, httpx.Client(
        transport=helpdesk(verifier, seen), auth=JitbrokerAuth("tickets", "read")
    ) as client:
        assert client.get("https://helpdesk.invalid/tickets/1").status_code == 200
        # Revoked behind the client's back: the 401 gets one retry with a fresh credential.
        t.revoke(t.credential("tickets", "read"))
        assert client.get("https://helpdesk.invalid/tickets/2").status_code == 200
    assert len(seen) == 2 and seen[0] != seen[1]


def test_httpx_auth_outside_a_task() -> None:
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)),
                      auth=JitbrokerAuth("tickets", "read")) as client, \
            pytest.raises(jitbroker.JitbrokerError, match=r"broker\.task"):
        client.get("https://helpdesk.invalid/")
