"""An MCP client (the MCP Python SDK's streamable HTTP transport) calling a tool server that
accepts only active jitbroker credentials: ``JitbrokerAuth`` for httpx2 supplies them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp.client import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer

import jitbroker
from jitbroker import AsyncBroker
from jitbroker.adapters.httpx2 import JitbrokerAuth
from jitbroker.testing import DevBroker, free_port


def helpdesk_mcp(verifier: jitbroker.Verifier, seen: list[str]) -> Any:
    server = MCPServer("helpdesk")

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        """Read a support ticket."""
        return f"ticket {ticket_id}: printer on fire"

    app = server.streamable_http_app(stateless_http=True, json_response=True)

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        # The resource server's side: every HTTP request carries an active credential.
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode()
            token = auth.removeprefix("Bearer ")
            active = bool(token) and (
                await asyncio.to_thread(verifier.introspect, token, "tickets")).active
            if not active:
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"inactive credential"})
                return
            seen.append(token)
        await app(scope, receive, send)

    return guarded


@pytest.fixture
def mcp_url(verifier: jitbroker.Verifier) -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(helpdesk_mcp(verifier, seen), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    end = time.monotonic() + 10
    while not server.started and time.monotonic() < end:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}/mcp", seen
    finally:
        server.should_exit = True
        th.join(5)


async def test_mcp_client_with_jitbroker_auth(dev: DevBroker, abroker: AsyncBroker,
                                              mcp_url: tuple[str, list[str]]) -> None:
    url, seen = mcp_url
    async with abroker.task("read ticket 42 over MCP", grants=[("tickets", "read")]) as t, \
            httpx2.AsyncClient(auth=JitbrokerAuth("tickets", "read")) as http, \
            streamable_http_client(url, http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        r = await session.call_tool("read_ticket", {"ticket_id": "42"})
        assert not r.is_error and "printer on fire" in r.content[0].text  # type: ignore[union-attr]
        first = await t.credential("tickets", "read")
        # Revoked mid-session: the 401 makes the auth flow fetch a fresh credential.
        await t.revoke(first)
        r = await session.call_tool("read_ticket", {"ticket_id": "43"})
        assert not r.is_error
    assert seen[0] == first.secret.reveal()
    assert seen[-1] != first.secret.reveal()
    # Without a credential, the server refuses.
    async with httpx2.AsyncClient() as bare:
        assert (await bare.post(url, json={})).status_code == 401
