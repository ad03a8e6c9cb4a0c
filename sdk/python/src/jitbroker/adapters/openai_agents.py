"""OpenAI Agents SDK: ``RunHooks`` whose ``on_tool_start`` fetches each tool call's credentials.

The SDK runs ``on_tool_start`` in an asyncio task of its own, beside (not around) the tool, so a
context variable set there would never reach the tool. The hook hands the credentials to the
active jitbroker task instead, under the tool call's id, and ``on_tool_end`` takes them back;
:func:`jitbroker.credential` inside the tool finds them there (run the agent inside
``async with broker.task(...)``). :func:`tool_credential` reads them by the call's own
``ToolContext`` when a tool takes one.

    result = await Runner.run(agent, "…", hooks=JitbrokerRunHooks({"read_ticket": [...]}))
"""

from __future__ import annotations

from typing import Any

from agents import RunHooks

from ..context import current_task
from ..errors import NoCredentialInScope
from ..types import Credential, Grant
from . import GrantsByTool, _task, acredentials_for, grants_for_tool

__all__ = ["JitbrokerRunHooks", "tool_credential"]


def _call_id(context: Any, tool: Any) -> str:
    return str(getattr(context, "tool_call_id", None) or f"tool:{getattr(tool, 'name', '?')}")


class JitbrokerRunHooks(RunHooks[Any]):
    """``grants`` maps tool names to the grants their calls need; ``task`` defaults to the
    active ``broker.task(...)``."""

    def __init__(self, grants: GrantsByTool, *, task: Any = None,
                 approval_timeout: float | None = None) -> None:
        self.grants = dict(grants)
        self.task = task
        self.approval_timeout = approval_timeout

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        needed = grants_for_tool(self.grants, getattr(tool, "name", ""))
        if not needed:
            return
        t = _task(self.task)
        creds = await acredentials_for(t, needed, self.approval_timeout)
        t._delivered.put(_call_id(context, tool), creds)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: object) -> None:
        if not grants_for_tool(self.grants, getattr(tool, "name", "")):
            return
        _task(self.task)._delivered.take(_call_id(context, tool))


def tool_credential(context: Any, resource: str, action: str) -> Credential:
    """The credential ``on_tool_start`` fetched for this very call (``context`` is the tool's
    ``ToolContext``)."""
    t = current_task()
    creds = t._delivered.get(str(context.tool_call_id)) if t is not None else None
    if not creds or Grant(resource, action) not in creds:
        raise NoCredentialInScope(f"no credential for ({resource}, {action}) in tool call "
                                  f"{context.tool_call_id}")
    cred: Credential = creds[Grant(resource, action)]
    return cred
