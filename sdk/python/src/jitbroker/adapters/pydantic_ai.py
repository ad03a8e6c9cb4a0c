"""Pydantic AI: a capability whose ``wrap_tool_execute`` gives each tool call its credentials,
and whose ``wrap_run`` can run the whole agent run as one jitbroker task.

    agent = Agent(model, capabilities=[JitbrokerCapability({"read_ticket": [("tickets", "read")]})])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.capabilities.abstract import (
    ValidatedToolArgs,
    WrapRunHandler,
    WrapToolExecuteHandler,
)
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import RunContext, ToolDefinition

from ..context import tool_credentials
from ..types import GrantLike, grants_of
from . import GrantsByTool, acredentials_for, grants_for_tool

__all__ = ["JitbrokerCapability"]


class JitbrokerCapability(AbstractCapability[Any]):
    """``grants`` maps tool names to the grants their calls need (a tool's
    ``metadata={"jitbroker": [...]}`` works too). ``task`` is an explicit task; by default the
    active ``broker.task(...)``. With ``broker`` and ``purpose``, each run is a task of its own
    (started before the run, completed after it, whatever happens)."""

    def __init__(
        self,
        grants: GrantsByTool | None = None,
        *,
        task: Any = None,
        broker: Any = None,
        purpose: str | None = None,
        run_grants: Sequence[GrantLike] | None = None,
        ttl: int | None = None,
        approval_timeout: float | None = None,
    ) -> None:
        self.grants: Mapping[str, Sequence[GrantLike]] = dict(grants or {})
        self.task = task
        self.approval_timeout = approval_timeout
        self.broker = broker
        self.purpose = purpose
        self.ttl = ttl
        every = [g for gs in self.grants.values() for g in grants_of(gs)]
        self.run_grants = grants_of(run_grants) if run_grants is not None else list(
            dict.fromkeys(every))

    async def wrap_run(self, ctx: RunContext[Any], *, handler: WrapRunHandler) -> Any:
        if self.broker is None or self.task is not None:
            return await handler()
        scope = self.broker.task(self.purpose or "agent run", self.run_grants, self.ttl)
        if hasattr(scope, "__aenter__"):
            async with scope:
                return await handler()
        with scope:
            return await handler()

    async def wrap_tool_execute(self, ctx: RunContext[Any], *, call: ToolCallPart,
                                tool_def: ToolDefinition, args: ValidatedToolArgs,
                                handler: WrapToolExecuteHandler) -> Any:
        needed = grants_for_tool(self.grants, tool_def.name)
        if not needed and tool_def.metadata:
            needed = grants_of(tool_def.metadata.get("jitbroker", ()))
        if not needed:
            return await handler(args)
        creds = await acredentials_for(self.task, needed, self.approval_timeout)
        with tool_credentials(creds):
            return await handler(args)
