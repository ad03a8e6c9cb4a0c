"""A support agent that reads a ticket and, with a human's approval, refunds the order.

End to end against a real ``jitbroker dev`` (JITBROKER_BIN, or --binary): the agent is a
Pydantic AI agent driven by a scripted model (no LLM, no network); its two tools call a
helpdesk API and a payments API (in-process stand-ins) that accept only credentials the broker
says are active. The refund grant needs approval: the tool call waits while a team lead (the
dev ``approver`` identity) approves it through the Admin API. At the end the broker is stopped
and its audit trail printed: the intent (the task's purpose), the decisions (allowed, needs
approval, approved) and the actions (credentials issued and revoked).

    python examples/support_agent/support_agent.py [--binary target/release/jitbroker]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

import jitbroker
from jitbroker import Admin, AsyncBroker, FilesSource, Verifier
from jitbroker.adapters.httpx import JitbrokerAuth
from jitbroker.adapters.pydantic_ai import JitbrokerCapability
from jitbroker.testing import DevBroker

HERE = Path(__file__).resolve().parent
AGENT_ID = "spiffe://jitbroker.dev/agent/support/alice"
HELPDESK_ID = "spiffe://jitbroker.dev/tool/helpdesk"
PAYMENTS_ID = "spiffe://jitbroker.dev/tool/payments"
PURPOSE = "resolve ticket 42: the customer asks for a refund of order A-1001"
GRANTS = {"read_ticket": [("tickets", "read")], "issue_refund": [("payments", "refund:issue")]}

TICKETS = {"42": {"order": "A-1001", "amount": 25.0,
                  "text": "The kettle arrived broken. Please refund order A-1001."}}


def api(name: str, verifier: Verifier, resource: str, action: str,
        answer: Any, served: threading.Event) -> httpx.MockTransport:
    """A resource server: introspects the bearer token, refuses anything not active for
    (resource, action)."""

    def handle(request: httpx.Request) -> httpx.Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        seen = verifier.introspect(token, resource)
        if not seen.active or seen.action != action:
            return httpx.Response(401, json={"error": f"{name}: credential not active"})
        print(f"  [{name}] {request.method} {request.url.path} by {seen.spiffe_id} "
              f"(task {seen.task_id})")
        served.set()
        return httpx.Response(200, json=answer(request))

    return httpx.MockTransport(handle)


def scripted_model() -> FunctionModel:
    """What a model would decide, one step per turn: read the ticket, refund, answer."""

    def step(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [p for m in messages for p in getattr(m, "parts", [])
                   if isinstance(p, ToolReturnPart)]
        if not returns:
            return ModelResponse(parts=[ToolCallPart("read_ticket", {"ticket_id": "42"})])
        if len(returns) == 1:
            ticket = json.loads(str(returns[0].content))
            return ModelResponse(parts=[ToolCallPart(
                "issue_refund", {"order": ticket["order"], "amount": ticket["amount"]})])
        return ModelResponse(parts=[TextPart(
            f"Refunded order A-1001 ({returns[1].content}). Ticket 42 can be closed.")])

    return FunctionModel(step)


def team_lead(admin: Admin, ticket_read: threading.Event, stop: threading.Event) -> None:
    """The human in the loop: reads the ticket too, then approves the pending refund (the
    agent's refund call waits meanwhile)."""
    ticket_read.wait(30)
    time.sleep(0.5)
    while not stop.is_set():
        for a in admin.list_approvals("PENDING"):
            print(f"  [team lead] approval {a.approval_id}: {a.requester} wants "
                  f"({a.grant.resource}, {a.grant.action}) for {a.purpose!r}; approving")
            admin.approve(a.approval_id, "refund of 25.00 for a broken kettle: approved")
            return
        time.sleep(0.1)


async def run_agent(dev: DevBroker, helpdesk: httpx.MockTransport,
                    payments: httpx.MockTransport) -> str:
    agent = Agent(scripted_model(),
                  capabilities=[JitbrokerCapability(GRANTS, approval_timeout=60)])

    @agent.tool_plain
    async def read_ticket(ticket_id: str) -> str:
        """Read a support ticket."""
        async with httpx.AsyncClient(transport=helpdesk,
                                     auth=JitbrokerAuth("tickets", "read")) as c:
            r = await c.get(f"https://helpdesk.invalid/tickets/{ticket_id}")
        r.raise_for_status()
        return json.dumps(r.json())

    @agent.tool_plain
    async def issue_refund(order: str, amount: float) -> str:
        """Refund an order (needs a team lead's approval)."""
        cred = jitbroker.credential("payments", "refund:issue")
        async with httpx.AsyncClient(transport=payments,
                                     headers=cred.authorization_header()) as c:
            r = await c.post(f"https://payments.invalid/orders/{order}/refunds",
                             json={"amount": amount})
        r.raise_for_status()
        return str(r.json()["refund_id"])

    source = FilesSource(dev.mint(AGENT_ID))
    async with AsyncBroker(dev.target, source) as broker:
        all_grants = [g for gs in GRANTS.values() for g in gs]
        async with broker.task(PURPOSE, grants=all_grants, ttl=300) as task:
            print(f"task {task.task_id}: {PURPOSE}")
            for g in task.info.grants:
                print(f"  policy: ({g.grant.resource}, {g.grant.action}) {g.decision} "
                      f"by {', '.join(g.policy_ids)}")
            result = await agent.run("Please handle ticket 42.")
    return str(result.output)


def main(binary: str | None = None, *, quiet_audit: bool = False) -> dict[str, Any]:
    resources = (HERE / "resources.toml").read_text()
    policy = (HERE / "policy.cedar").read_text()
    with DevBroker(binary=binary, resources=resources, policy=policy, jwt_audience=None) as dev:
        helpdesk_v = Verifier(dev.target, FilesSource(dev.mint(HELPDESK_ID)))
        payments_v = Verifier(dev.target, FilesSource(dev.mint(PAYMENTS_ID)))
        admin = Admin(dev.target, FilesSource(dev.svid_dir("approver")))
        ticket_read, refunded = threading.Event(), threading.Event()
        helpdesk = api("helpdesk", helpdesk_v, "tickets", "read",
                       lambda r: {"ticket": "42", **TICKETS["42"]}, ticket_read)
        payments = api("payments", payments_v, "payments", "refund:issue",
                       lambda r: {"refund_id": "rf_0001", "status": "refunded"}, refunded)
        stop = threading.Event()
        lead = threading.Thread(target=team_lead, args=(admin, ticket_read, stop), daemon=True)
        lead.start()
        try:
            answer = asyncio.run(run_agent(dev, helpdesk, payments))
        finally:
            stop.set()
            lead.join(timeout=5)
            for c in (helpdesk_v, payments_v, admin):
                c.close()
        print(f"agent: {answer}")
        dev.stop()
        audit = dev.audit_export()
    trail = [e for e in audit if e.get("spiffe_id") == AGENT_ID or e.get("kind") in (
        "admin", "approval_requested", "approval_used")]
    if not quiet_audit:
        print("\naudit trail (intent, decisions, actions):")
        for e in trail:
            what = " ".join(str(e[k]) for k in ("resource", "action", "decision", "reason",
                                                "purpose", "detail") if e.get(k))
            print(f"  #{e['seq']:<3} {e['kind']:<20} {what}")
    return {"answer": answer, "audit": audit}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", default=os.environ.get("JITBROKER_BIN"))
    main(p.parse_args().binary)
