"""An MCP round trip with no static key anywhere: an MCP server of the official ``mcp`` SDK as an
OAuth resource server trusting jitbroker (RFC 9728 metadata, tokens checked with PyJWT against the
JWKS and by introspection), and an MCP client that discovers jitbroker from the server's 401 and
gets its tokens with its JWT-SVID (RFC 7523)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import httpx2
import jwt
import pytest
import uvicorn
from mcp.client import ClientSession
from mcp.client.auth import TokenStorage
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider
from mcp.client.auth.utils import extract_field_from_www_auth
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from oauthenv import ALICE, JWT_BEARER, MCP_VERIFIER, OAuthBroker

TOOL_SCOPES = {"read_ticket": "tickets:read", "close_ticket": "tickets:write"}


# -- the resource server ----------------------------------------------------------------------
class JitbrokerTokenVerifier:
    """The MCP SDK's ``TokenVerifier``: signature, issuer and audience by the JWKS (PyJWT), then
    liveness by introspection as the resource's verifier (mTLS with its X.509-SVID)."""

    def __init__(self, broker: OAuthBroker) -> None:
        self.broker = broker
        self.jwks = broker.jwks_client()
        ctx = ssl.create_default_context(cafile=broker.bundle)
        pem, key = broker.cert(MCP_VERIFIER)
        ctx.load_cert_chain(pem, key)
        self.ctx = ctx
        self.introspected: list[str] = []

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            key = await anyio.to_thread.run_sync(self.jwks.get_signing_key_from_jwt, token)
            claims = jwt.decode(token, key, algorithms=["ES256"], audience=self.broker.mcp_url,
                                issuer=self.broker.issuer)
        except jwt.PyJWTError:
            return None
        async with httpx.AsyncClient(verify=self.ctx, timeout=10) as c:
            r = await c.post(self.broker.introspection_endpoint, data={"token": token})
        self.introspected.append(token)
        if r.status_code != 200 or not r.json().get("active"):
            return None
        info = r.json()
        return AccessToken(token=token, client_id=info["client_id"],
                           scopes=str(info["scope"]).split(), expires_at=int(info["exp"]),
                           resource=self.broker.mcp_url, subject=info["sub"],
                           claims={"iss": claims["iss"], "task_id": claims["task_id"]})


ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def scope_gate(app: ASGIApp, verifier: JitbrokerTokenVerifier, metadata_url: str) -> ASGIApp:
    """Per-tool scopes (MCP authorization, "scope challenge"): a ``tools/call`` of a tool whose
    scope the token lacks is answered 403 ``insufficient_scope`` naming that scope."""

    async def gated(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        messages: list[Any] = []
        body = b""
        while True:
            msg = await receive()
            messages.append(msg)
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        needed = None
        try:
            rpc = json.loads(body)
            if isinstance(rpc, dict) and rpc.get("method") == "tools/call":
                needed = TOOL_SCOPES.get(rpc.get("params", {}).get("name"))
        except ValueError:
            pass
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        if needed and auth.lower().startswith("bearer "):
            token = await verifier.verify_token(auth[7:])
            if token is not None and needed not in token.scopes:
                challenge = (f'Bearer error="insufficient_scope", scope="{needed}", '
                             f'resource_metadata="{metadata_url}", '
                             f'error_description="tool needs {needed}"')
                await send({"type": "http.response.start", "status": 403, "headers": [
                    (b"www-authenticate", challenge.encode()),
                    (b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": json.dumps(
                    {"error": "insufficient_scope", "scope": needed}).encode()})
                return

        async def replay() -> Any:
            if messages:
                return messages.pop(0)
            return await receive()

        await app(scope, replay, send)

    return gated


def tickets_server(broker: OAuthBroker, verifier: JitbrokerTokenVerifier) -> ASGIApp:
    # From strings, so the issuer keeps its exact form (RFC 8414 §3.3 compares it as a string).
    auth = AuthSettings.model_validate({"issuer_url": broker.issuer,
                                        "resource_server_url": broker.mcp_url,
                                        "validate_token_resource": True})
    server = MCPServer("tickets", token_verifier=verifier, auth=auth)

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        """Read a support ticket."""
        tok = get_access_token()
        who = tok.subject if tok else "nobody"
        return f"ticket {ticket_id}: printer on fire (read by {who})"

    @server.tool()
    def close_ticket(ticket_id: str) -> str:
        """Close a support ticket."""
        return f"ticket {ticket_id} closed"

    app = server.streamable_http_app(stateless_http=True, json_response=True)
    origin = broker.mcp_url.removesuffix("/mcp")
    return scope_gate(app, verifier, f"{origin}/.well-known/oauth-protected-resource/mcp")


@dataclass
class McpServer:
    url: str
    verifier: JitbrokerTokenVerifier


@pytest.fixture(scope="module")
def mcp_server(broker: OAuthBroker) -> Iterator[McpServer]:
    verifier = JitbrokerTokenVerifier(broker)
    server = uvicorn.Server(uvicorn.Config(tickets_server(broker, verifier), host="127.0.0.1",
                                           port=broker.mcp_port, log_level="warning",
                                           lifespan="on"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    end = time.monotonic() + 10
    while not server.started and time.monotonic() < end and th.is_alive():
        time.sleep(0.02)
    assert server.started, "the MCP server did not start"
    try:
        yield McpServer(broker.mcp_url, verifier)
    finally:
        server.should_exit = True
        th.join(10)


# -- the client ---------------------------------------------------------------------------------
@dataclass
class MemoryStorage(TokenStorage):
    tokens: OAuthToken | None = None
    client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@dataclass
class Granted:
    scopes: list[str] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)


class JwtSvidAuth(PrivateKeyJWTOAuthProvider):
    """The MCP SDK's OAuth client (discovery from the 401, RFC 9728 then RFC 8414, step-up on
    403) with jitbroker's grant: a JWT-SVID as the RFC 7523 assertion, for the task ``task_id``.

    jitbroker issues one scope per token: the client asks for the scope of the newest challenge,
    else its default one."""

    def __init__(self, server_url: str, issuer: str, task_id: str, default_scope: str,
                 mint: Callable[[str], Awaitable[str]]) -> None:
        super().__init__(server_url=server_url, storage=MemoryStorage(), client_id=ALICE,
                         assertion_provider=mint, issuer=issuer)
        self.task_id = task_id
        self.default_scope = default_scope
        self.challenged: str | None = None
        self.granted = Granted()
        # The RFC 8414 document as fetched by the SDK's discovery. mcp 2.3.0's OAuthMetadata
        # model requires authorization_endpoint, which RFC 8414 §2 does not ask of a server with
        # no grant that uses one (jitbroker has none): the SDK then keeps no metadata, so the
        # token endpoint is taken from the document its discovery fetched.
        self.discovered: dict[str, Any] | None = None

    async def _auth_flow(self, request: httpx2.Request) -> AsyncGenerator[
            httpx2.Request, httpx2.Response]:
        flow = super()._auth_flow(request)
        try:
            outgoing = await flow.__anext__()
            while True:
                response = yield outgoing
                if response.status_code == 403:
                    self.challenged = extract_field_from_www_auth(response, "scope")
                if response.status_code == 200 and "/.well-known/oauth-authorization-server" in \
                        response.request.url.path:
                    self.discovered = json.loads(await response.aread())
                outgoing = await flow.asend(response)
        except StopAsyncIteration:
            return

    async def _perform_authorization(self) -> httpx2.Request:
        metadata = self.context.oauth_metadata
        if metadata is not None:
            token_endpoint = str(metadata.token_endpoint)
        else:
            doc = self.discovered
            assert doc is not None, "no authorization-server metadata discovered"
            # RFC 8414 §3.3: the document must name the issuer the resource metadata named.
            assert doc["issuer"] == self.context.auth_server_url, (doc, self.context)
            token_endpoint = str(doc["token_endpoint"])
        scope = self.challenged or self.default_scope
        data = {"grant_type": JWT_BEARER, "assertion": await self._assertion_provider(
                    token_endpoint),
                "resource": self.context.get_resource_url(), "scope": scope,
                "task_id": self.task_id}
        self.granted.token_requests.append({k: v for k, v in data.items() if k != "assertion"})
        self.granted.scopes.append(scope)
        return httpx2.Request("POST", token_endpoint, data=data,
                              headers={"Content-Type": "application/x-www-form-urlencoded"})


# -- the tests ----------------------------------------------------------------------------------
async def test_unauthenticated_call_points_to_jitbroker(broker: OAuthBroker,
                                                        mcp_server: McpServer) -> None:
    async with httpx2.AsyncClient(verify=broker.ssl_context(), timeout=10) as http:
        r = await http.post(mcp_server.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                            headers={"accept": "application/json, text/event-stream"})
        assert r.status_code == 401
        metadata_url = extract_field_from_www_auth(r, "resource_metadata")
        assert metadata_url, r.headers.get("www-authenticate")
        prm = (await http.get(metadata_url)).json()  # RFC 9728
        assert prm["resource"] == broker.mcp_url
        assert prm["authorization_servers"] == [broker.issuer]
        asm = (await http.get(
            f"{prm['authorization_servers'][0]}/.well-known/oauth-authorization-server")).json()
        assert asm["issuer"] == broker.issuer
        assert asm["token_endpoint"] == broker.token_endpoint


async def test_mcp_round_trip_with_discovery_and_step_up(broker: OAuthBroker,
                                                         mcp_server: McpServer) -> None:
    grpc = broker.grpc(ALICE)
    task = grpc.start_task("work the helpdesk queue", [
        ("tickets-mcp", "tickets:read"), ("tickets-mcp", "tickets:write")], ttl=600)
    seen: list[str] = []

    async def record(request: httpx2.Request) -> None:
        seen.append(f"{request.method} {request.url}")

    async def mint(audience: str) -> str:
        return await anyio.to_thread.run_sync(broker.jwt_svid, ALICE, audience)

    auth = JwtSvidAuth(mcp_server.url, broker.issuer, task.task_id, "tickets:read", mint)
    try:
        async with httpx2.AsyncClient(auth=auth, verify=broker.ssl_context(), timeout=20,
                                      event_hooks={"request": [record]}) as http, \
                streamable_http_client(mcp_server.url, http_client=http) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            r = await session.call_tool("read_ticket", {"ticket_id": "42"})
            assert not r.is_error, r
            text = r.content[0].text  # type: ignore[union-attr]
            assert "printer on fire" in text and ALICE in text

            # The client found the token endpoint through the server's metadata, not a setting.
            joined = "\n".join(seen)
            assert f"GET {broker.mcp_url.removesuffix('/mcp')}/.well-known/oauth-protected-" \
                   "resource/mcp" in joined, joined
            assert f"GET {broker.issuer}/.well-known/oauth-authorization-server" in joined, joined
            assert f"POST {broker.token_endpoint}" in joined, joined
            assert auth.granted.scopes == ["tickets:read"]

            # A tool needing tickets:write: 403 insufficient_scope naming it, a token with that
            # scope, and the retried call succeeds.
            r = await session.call_tool("close_ticket", {"ticket_id": "42"})
            assert not r.is_error, r
            assert "closed" in r.content[0].text  # type: ignore[union-attr]
            assert auth.granted.scopes == ["tickets:read", "tickets:write"]
            assert auth.challenged == "tickets:write"
            for req in auth.granted.token_requests:
                assert req["resource"] == broker.mcp_url and req["task_id"] == task.task_id
            current = auth.context.current_tokens
            assert current is not None
            last_token = current.access_token
            claims = broker.verify(last_token, broker.mcp_url)
            assert claims["scope"] == "tickets:write" and claims["sub"] == ALICE
    finally:
        task.complete()

    # The task is over: the server, which asks jitbroker, refuses its token at once.
    async with httpx2.AsyncClient(timeout=10) as bare:
        after = await bare.post(mcp_server.url, json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
                                headers={"authorization": f"Bearer {last_token}",
                                         "accept": "application/json, text/event-stream"})
        assert after.status_code == 401
        assert extract_field_from_www_auth(after, "error") == "invalid_token"
    assert last_token in mcp_server.verifier.introspected


async def test_insufficient_scope_challenge_names_the_scope(broker: OAuthBroker,
                                                            mcp_server: McpServer) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read", purpose="read only")
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "close_ticket", "arguments": {"ticket_id": "1"}}}
    async with httpx2.AsyncClient(timeout=10) as http:
        r = await http.post(mcp_server.url, json=call, headers={
            "authorization": f"Bearer {tok['access_token']}",
            "accept": "application/json, text/event-stream"})
    assert r.status_code == 403
    assert extract_field_from_www_auth(r, "error") == "insufficient_scope"
    assert extract_field_from_www_auth(r, "scope") == "tickets:write"
    # A token for another resource is refused outright (audience binding at the server).
    other = broker.token(ALICE, "https://crm.example.test/api", "crm:read")
    async with httpx2.AsyncClient(timeout=10) as http:
        r = await http.post(mcp_server.url, json=call, headers={
            "authorization": f"Bearer {other['access_token']}",
            "accept": "application/json, text/event-stream"})
    assert r.status_code == 401
