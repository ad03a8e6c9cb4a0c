"""``httpx.Auth`` that asks the task for a credential per request (cached and renewed by the
task), for plain HTTP tools; :mod:`jitbroker.adapters.httpx2` is the same for ``httpx2``, which
the MCP Python SDK's HTTP transports use. Inside a tool call that an adapter gave the grant, it
uses that call's credential. A 401 gets one retry with a fresh credential.

    httpx.get(url, auth=JitbrokerAuth("tickets", "read"))
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from ..context import _tool_credentials
from ..types import Credential, Grant
from . import _task

__all__ = ["AuthFlows", "JitbrokerAuth"]


class AuthFlows:
    """The flows of :class:`JitbrokerAuth`, for any httpx-shaped ``Auth`` base class."""

    def __init__(self, resource: str, action: str, *, task: Any = None,
                 header: str = "Authorization", scheme: str | None = "Bearer") -> None:
        self.grant = Grant(resource, action)
        self.task = task
        self.header = header
        self.scheme = scheme

    def _in_scope(self) -> Credential | None:
        creds = _tool_credentials.get()
        return creds.get(self.grant) if creds else None

    def _apply(self, request: Any, cred: Credential) -> None:
        value = cred.secret.reveal()
        request.headers[self.header] = f"{self.scheme} {value}" if self.scheme else value

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        cred = self._in_scope() or _task(self.task).credential(*self.grant)
        self._apply(request, cred)
        response = yield request
        if response.status_code == 401:
            self._apply(request, _task(self.task).credential(*self.grant, fresh=True))
            yield request

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        cred = self._in_scope() or await self._acredential(fresh=False)
        self._apply(request, cred)
        response = yield request
        if response.status_code == 401:
            self._apply(request, await self._acredential(fresh=True))
            yield request

    async def _acredential(self, *, fresh: bool) -> Credential:
        t = _task(self.task)
        if inspect.iscoroutinefunction(t.credential):
            return await t.credential(*self.grant, fresh=fresh)  # type: ignore[no-any-return]
        cred: Credential = await asyncio.to_thread(t.credential, *self.grant, fresh=fresh)
        return cred


class JitbrokerAuth(AuthFlows, httpx.Auth):
    """``auth=JitbrokerAuth(resource, action)``: the task's credential as a bearer token."""
