"""``httpx2.Auth`` (the HTTP client of the MCP Python SDK's transports) with the flows of
:class:`jitbroker.adapters.httpx.JitbrokerAuth`.

    http = httpx2.AsyncClient(auth=JitbrokerAuth("tickets", "read"))
    async with streamable_http_client(url, http_client=http) as streams: ...
"""

from __future__ import annotations

import httpx2

from .httpx import AuthFlows

__all__ = ["JitbrokerAuth"]


class JitbrokerAuth(AuthFlows, httpx2.Auth):
    """``auth=JitbrokerAuth(resource, action)``: the task's credential as a bearer token."""
