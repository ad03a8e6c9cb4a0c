"""LangChain v1: an ``AgentMiddleware`` whose ``wrap_tool_call`` / ``awrap_tool_call`` gives each
tool call its credentials.

    agent = create_agent(model, tools, middleware=[JitbrokerMiddleware({"read_ticket": [...]})])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from langchain.agents.middleware import AgentMiddleware

from ..context import tool_credentials
from . import GrantsByTool, acredentials_for, credentials_for, grants_for_tool

__all__ = ["JitbrokerMiddleware"]


class JitbrokerMiddleware(AgentMiddleware[Any, Any, Any]):
    """``grants`` maps tool names to the grants their calls need; ``task`` defaults to the
    active ``broker.task(...)``. Use a ``Task`` with ``invoke`` and either kind with
    ``ainvoke``."""

    def __init__(self, grants: GrantsByTool, *, task: Any = None,
                 approval_timeout: float | None = None) -> None:
        super().__init__()
        self.grants = dict(grants)
        self.task = task
        self.approval_timeout = approval_timeout

    @property
    def name(self) -> str:
        return "JitbrokerMiddleware"

    def wrap_tool_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        needed = grants_for_tool(self.grants, request.tool_call["name"])
        if not needed:
            return handler(request)
        with tool_credentials(credentials_for(self.task, needed, self.approval_timeout)):
            return handler(request)

    async def awrap_tool_call(self, request: Any,
                              handler: Callable[[Any], Awaitable[Any]]) -> Any:
        needed = grants_for_tool(self.grants, request.tool_call["name"])
        if not needed:
            return await handler(request)
        with tool_credentials(await acredentials_for(self.task, needed, self.approval_timeout)):
            return await handler(request)
