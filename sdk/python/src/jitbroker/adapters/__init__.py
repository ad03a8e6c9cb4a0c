"""Framework adapters. Each hands a tool call its credentials through a context variable set
by the framework's own tool hook, so the secret never enters the model's context or the tool
arguments the model writes; the tool reads it with :func:`jitbroker.credential`.

Each lives in its own module and needs its framework (an optional extra):
``jitbroker.adapters.pydantic_ai`` (``pip install jitbroker[pydantic-ai]``),
``jitbroker.adapters.langchain`` (``[langchain]``), ``jitbroker.adapters.openai_agents``
(``[openai-agents]``), ``jitbroker.adapters.httpx`` (``[httpx]``) and
``jitbroker.adapters.httpx2`` (``[httpx2]``, the client of the MCP Python SDK's transports).

Which tool needs which grant is declared by tool name: ``{"refund": [("payments",
"refund:issue")]}``. A tool not named gets nothing. With ``approval_timeout`` (seconds), a grant
that needs a human's approval makes its tool call wait that long for it; without, the
:class:`~jitbroker.ApprovalPending` error propagates to the agent run.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..context import current_task
from ..errors import ApprovalPending, JitbrokerError
from ..types import Credential, Grant, GrantLike, grants_of

GrantsByTool = Mapping[str, Sequence[GrantLike]]

__all__ = ["GrantsByTool", "acredentials_for", "credentials_for", "grants_for_tool"]


def _task(task: Any) -> Any:
    t = task if task is not None else current_task()
    if t is None:
        raise JitbrokerError(
            "no jitbroker task: run the agent inside `with broker.task(...)` (or `async with`), "
            "or give the adapter a task"
        )
    return t


def grants_for_tool(grants: GrantsByTool, name: str) -> list[Grant]:
    return grants_of(grants.get(name, ()))


def credentials_for(task: Any, grants: Iterable[Grant],
                    approval_timeout: float | None = None) -> dict[Grant, Credential]:
    """The credentials of ``grants`` from a blocking :class:`jitbroker.Task`. With
    ``approval_timeout``, a grant that needs approval waits that long for an approver;
    without, :class:`~jitbroker.ApprovalPending` propagates."""
    t = _task(task)
    if inspect.iscoroutinefunction(t.credential):
        raise JitbrokerError("a synchronous tool hook needs a jitbroker.Task, not an AsyncTask")
    out: dict[Grant, Credential] = {}
    for g in grants:
        try:
            out[g] = t.credential(g.resource, g.action)
        except ApprovalPending as e:
            if approval_timeout is None:
                raise
            out[g] = e.wait_for_approval(approval_timeout)
    return out


async def acredentials_for(task: Any, grants: Iterable[Grant],
                           approval_timeout: float | None = None) -> dict[Grant, Credential]:
    """The credentials of ``grants`` from an :class:`~jitbroker.AsyncTask` (awaited) or a
    :class:`~jitbroker.Task` (in a worker thread, so the event loop does not block)."""
    t = _task(task)
    is_async = inspect.iscoroutinefunction(t.credential)
    out: dict[Grant, Credential] = {}
    for g in grants:
        try:
            if is_async:
                out[g] = await t.credential(g.resource, g.action)
            else:
                out[g] = await asyncio.to_thread(t.credential, g.resource, g.action)
        except ApprovalPending as e:
            if approval_timeout is None:
                raise
            if is_async:
                out[g] = await e.await_approval(approval_timeout)
            else:
                out[g] = await asyncio.to_thread(e.wait_for_approval, approval_timeout)
    return out
