"""A real ``jitbroker dev`` with its OAuth surface on, and the helpers the conformance tests share.

The tests speak to the broker only through independent clients (requests, authlib, PyJWT, httpx,
the MCP SDK); the jitbroker SDK is used only to start and complete tasks over gRPC and to approve.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jitbroker
import jwt
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jitbroker.testing import DevBroker, free_port

TD = "spiffe://jitbroker.dev"
ALICE = f"{TD}/agent/alice"
BOB = f"{TD}/agent/bob"
GATEWAY = f"{TD}/gateway"
SIDECAR = f"{TD}/mesh/sidecar"
ROGUE = f"{TD}/rogue/proxy"
MCP_VERIFIER = f"{TD}/mcp/tickets"
CRM_VERIFIER = f"{TD}/svc/crm"
VAULT_VERIFIER = f"{TD}/svc/vault"
APPROVER = f"{TD}/approver"

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
CLIENT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TT_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"

CRM = "https://crm.example.test/api"
VAULT = "https://vault.example.test/v1"
PAYMENTS = "https://payments.example.test/api"
ACCOUNTS = "https://accounts.example.test/api"


def resources(mcp_url: str) -> str:
    return f"""\
[resources.tickets-mcp]
kind = "jwt"
actions = ["tickets:read", "tickets:write"]
verifiers = ["{MCP_VERIFIER}"]
oauth_resource = "{mcp_url}"

[resources.crm]
kind = "jwt"
actions = ["crm:read", "crm:write"]
verifiers = ["{CRM_VERIFIER}"]
oauth_resource = "{CRM}"

[resources.vault]
kind = "token"
actions = ["secrets:read"]
verifiers = ["{VAULT_VERIFIER}"]
oauth_resource = "{VAULT}"
max_ttl_seconds = 120

[resources.payments]
kind = "jwt"
actions = ["refund:issue"]
verifiers = ["{CRM_VERIFIER}"]
oauth_resource = "{PAYMENTS}"

[resources.accounts]
kind = "jwt"
actions = ["read", "accounts:export"]
verifiers = ["{CRM_VERIFIER}"]
oauth_resource = "{ACCOUNTS}"
"""


POLICY = """\
@id("agents-tickets")
permit(principal, action in [Action::"tickets:read", Action::"tickets:write"],
       resource == Resource::"tickets-mcp")
when { principal.path like "/agent/*" };

@id("agents-crm")
permit(principal, action in [Action::"crm:read", Action::"crm:write"], resource == Resource::"crm")
when { principal.path like "/agent/*" };

@id("agents-vault")
permit(principal, action == Action::"secrets:read", resource == Resource::"vault")
when { principal.path like "/agent/*" };

@id("refunds-need-approval")
@approval("required")
permit(principal, action == Action::"refund:issue", resource == Resource::"payments")
when { principal.path like "/agent/*" };

@id("agents-read-accounts")
permit(principal, action == Action::"read", resource == Resource::"accounts")
when { principal.path like "/agent/*" };

@id("everyone-may-ask-exports")
permit(principal, action == Action::"accounts:export", resource == Resource::"accounts");

@id("no-account-exports")
forbid(principal, action == Action::"accounts:export", resource == Resource::"accounts");
"""

# Many token requests come from one identity in a short time: the broker's flood limits (their own
# subject, tested elsewhere) are lifted.
SERVER = """
[server]
requests_per_identity_per_second = 100000
requests_per_remote_per_second = 100000
"""


def oauth_section(port: int, issuer: str) -> str:
    return f"""
[oauth]
listen = "127.0.0.1:{port}"
issuer = "{issuer}"
access_token_ttl_seconds = 300
token_exchange_actors = ["{GATEWAY}", "{SIDECAR}"]
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def x5t_s256(cert_pem: Path) -> str:
    """RFC 8705 §3.1: base64url(SHA-256(DER of the certificate))."""
    cert = x509.load_pem_x509_certificates(cert_pem.read_bytes())[0]
    return b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def oauth_error(r: requests.Response) -> tuple[int, str, str]:
    """(status, error, error_description) of an RFC 6749 §5.2 error answer."""
    assert r.headers.get("content-type", "").startswith("application/json"), (
        r.status_code, r.headers, r.text)
    body = r.json()
    assert isinstance(body, dict) and "error" in body, (r.status_code, r.text)
    return r.status_code, str(body["error"]), str(body.get("error_description", ""))


def expect_error(r: requests.Response, status: int, *errors: str) -> str:
    """Asserts an error answer with this status and one of these codes; returns the
    description. The failure message shows the request and the whole answer."""
    body = r.request.body
    sent = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    got = oauth_error(r)
    assert got[0] == status and got[1] in errors, (
        f"expected {status} {' or '.join(errors)}, got {r.status_code} {r.text} "
        f"for {r.request.method} {r.request.url} {sent[:300]}")
    return got[2]


@dataclass
class OAuthBroker:
    """One ``jitbroker dev`` with ``[oauth]``; ``issuer`` is ``https://127.0.0.1:PORT[path]``."""

    dev: DevBroker
    issuer: str
    mcp_port: int
    mcp_url: str
    _svids: dict[str, Path] = field(default_factory=dict)
    _clients: list[jitbroker.Broker] = field(default_factory=list)

    # -- addresses ------------------------------------------------------------------------------
    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.issuer}/introspect"

    @property
    def revocation_endpoint(self) -> str:
        return f"{self.issuer}/revoke"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks.json"

    @property
    def bundle(self) -> str:
        """The dev trust bundle: the CA of the broker's server certificate."""
        return str(self.dev.svid_dir("agent") / "bundle.pem")

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.bundle)

    # -- identities -----------------------------------------------------------------------------
    def svid(self, spiffe_id: str) -> Path:
        """A directory with svid.pem, svid.key and bundle.pem for ``spiffe_id`` (X.509-SVID)."""
        if spiffe_id not in self._svids:
            out = self.dev.data_dir / "oauth-svids" / spiffe_id.removeprefix(TD + "/").replace(
                "/", "_")
            self._svids[spiffe_id] = self.dev.mint(spiffe_id, out)
        return self._svids[spiffe_id]

    def cert(self, spiffe_id: str) -> tuple[str, str]:
        d = self.svid(spiffe_id)
        return str(d / "svid.pem"), str(d / "svid.key")

    def jwt_svid(self, spiffe_id: str, audience: str | None = None, ttl_seconds: int = 300) -> str:
        """A JWT-SVID minted by ``jitbroker dev-svid`` (audience: the token endpoint)."""
        return self.dev.jwt_svid(spiffe_id, audience or self.token_endpoint, ttl_seconds)

    def forge_svid(self, claims: Mapping[str, Any], *, foreign_key: bool = False) -> str:
        """A JWT-SVID with arbitrary claims, signed by the dev JWT key (or by a key the broker
        does not know): for expired, multi-audience or otherwise hostile assertions."""
        if foreign_key:
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            loaded = serialization.load_pem_private_key(
                (self.dev.data_dir / "dev" / "jwt.key").read_bytes(), password=None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            key = loaded
        point = key.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
        kid = hashlib.sha256(point).digest()[:8].hex()
        return jwt.encode(dict(claims), key, algorithm="ES256",
                          headers={"kid": kid, "typ": "JWT"})

    def grpc(self, spiffe_id: str) -> jitbroker.Broker:
        """The jitbroker SDK's gRPC client as ``spiffe_id`` (to start and complete tasks)."""
        b = jitbroker.Broker.from_files(self.dev.target, self.svid(spiffe_id))
        self._clients.append(b)
        return b

    def admin(self, name: str = "approver") -> jitbroker.Admin:
        return jitbroker.Admin(self.dev.target, jitbroker.FilesSource(self.dev.svid_dir(name)))

    # -- HTTP -----------------------------------------------------------------------------------
    def post(self, url: str, data: Mapping[str, str] | list[tuple[str, str]], *,
             cert: tuple[str, str] | None = None) -> requests.Response:
        """A form POST over TLS trusting the dev bundle (``cert``: the client certificate)."""
        return requests.post(url, data=data, cert=cert, verify=self.bundle, timeout=10)

    def get(self, url: str) -> requests.Response:
        return requests.get(url, verify=self.bundle, timeout=10)

    def jwt_bearer(self, spiffe_id: str, resource: str, scope: str | None = None, *,
                   purpose: str | None = None, task_id: str | None = None,
                   **extra: str) -> requests.Response:
        """``grant_type=jwt-bearer`` with a fresh JWT-SVID of ``spiffe_id`` (RFC 7523 §2.1)."""
        data = {"grant_type": JWT_BEARER, "assertion": self.jwt_svid(spiffe_id),
                "resource": resource}
        if scope is not None:
            data["scope"] = scope
        if task_id is not None:
            data["task_id"] = task_id
        if purpose is not None:
            data["purpose"] = purpose
        elif task_id is None:
            data["purpose"] = f"conformance {uuid.uuid4().hex[:8]}"
        data.update(extra)
        return self.post(self.token_endpoint, data)

    def token(self, spiffe_id: str, resource: str, scope: str | None = None, *,
              purpose: str | None = None, task_id: str | None = None) -> dict[str, Any]:
        """A successful jwt-bearer answer (asserted)."""
        r = self.jwt_bearer(spiffe_id, resource, scope, purpose=purpose, task_id=task_id)
        assert r.status_code == 200, (r.status_code, r.text)
        body = r.json()
        assert isinstance(body, dict)
        return body

    def introspect(self, token: str, verifier: str) -> dict[str, Any]:
        """RFC 7662 introspection, authenticated by the verifier's X.509-SVID over mTLS."""
        r = self.post(self.introspection_endpoint, {"token": token}, cert=self.cert(verifier))
        assert r.status_code == 200, (r.status_code, r.text)
        body = r.json()
        assert isinstance(body, dict)
        return body

    # -- JWT access tokens ------------------------------------------------------------------------
    def jwks_client(self) -> jwt.PyJWKClient:
        return jwt.PyJWKClient(self.jwks_uri, ssl_context=self.ssl_context())

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        """PyJWT verification against the keys at jwks_uri (RFC 9068 §4)."""
        key = self.jwks_client().get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=["ES256"], audience=audience, issuer=self.issuer,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]})
        return claims

    def close(self) -> None:
        for c in self._clients:
            c.close()


def wait_for_https(url: str, bundle: str, timeout: float = 15.0) -> None:
    """Polls (bounded) until the OAuth listener answers; the ops /readyz may come first."""
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            requests.get(url, verify=bundle, timeout=2)
            return
        except requests.RequestException as e:
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"the OAuth listener at {url} did not answer: {last}")


@contextmanager
def oauth_broker(binary: str | None, data_dir: Path, *, issuer_path: str = "") -> Iterator[
        OAuthBroker]:
    port, mcp_port = free_port(), free_port()
    issuer = f"https://127.0.0.1:{port}{issuer_path}"
    mcp_url = f"http://127.0.0.1:{mcp_port}/mcp"
    dev = DevBroker(binary=binary, data_dir=data_dir, resources=resources(mcp_url) + SERVER
                    + oauth_section(port, issuer), policy=POLICY, jwt_audience="jitbroker")
    dev.start()
    env = OAuthBroker(dev=dev, issuer=issuer, mcp_port=mcp_port, mcp_url=mcp_url)
    try:
        wait_for_https(f"https://127.0.0.1:{port}/.well-known/oauth-authorization-server"
                       f"{issuer_path}", env.bundle)
        yield env
    finally:
        env.close()
        dev.stop()

