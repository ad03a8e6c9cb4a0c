"""Token introspection (RFC 7662): who may ask, what an active answer says, and when a token
stops being active."""

from __future__ import annotations

from typing import Any

import pytest
from authlib.integrations.requests_client import OAuth2Session

from oauthenv import (
    ALICE,
    CLIENT_ASSERTION,
    CRM_VERIFIER,
    MCP_VERIFIER,
    VAULT,
    VAULT_VERIFIER,
    OAuthBroker,
    expect_error,
)

ACTIVE_FIELDS = {"active", "scope", "client_id", "sub", "aud", "iss", "exp", "iat", "nbf", "jti",
                 "token_type", "task_id"}


def check_active(info: dict[str, Any], broker: OAuthBroker, resource: str,
                 tok: dict[str, Any]) -> None:
    assert info["active"] is True, info
    assert set(info) >= ACTIVE_FIELDS, sorted(ACTIVE_FIELDS - set(info))
    assert info["scope"] == tok["scope"]
    assert info["sub"] == ALICE and info["client_id"] == ALICE
    assert info["aud"] in (resource, [resource])
    assert info["iss"] == broker.issuer
    assert info["task_id"] == tok["task_id"]
    assert info["token_type"].lower() == "bearer"
    assert isinstance(info["exp"], int) and isinstance(info["iat"], int)
    assert info["iat"] <= info["exp"]


def test_verifier_introspects_over_mtls_with_authlib(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    # RFC 8705 §2: a tls_client_auth client names itself with client_id.
    with OAuth2Session(client_id=MCP_VERIFIER, token_endpoint_auth_method="none") as s:
        s.trust_env = False  # else REQUESTS_CA_BUNDLE in the environment replaces s.verify
        s.verify = broker.bundle
        s.cert = broker.cert(MCP_VERIFIER)
        r = s.introspect_token(broker.introspection_endpoint, token=tok["access_token"],
                               token_type_hint="access_token")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    info = r.json()
    check_active(info, broker, broker.mcp_url, tok)
    # The JWT's claims and the introspection answer agree.
    claims = broker.verify(tok["access_token"], broker.mcp_url)
    assert info["jti"] == claims["jti"] and info["exp"] == claims["exp"]


@pytest.mark.parametrize("audience", ["endpoint", "issuer"])
def test_verifier_introspects_with_a_client_assertion(broker: OAuthBroker, audience: str) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    aud = broker.introspection_endpoint if audience == "endpoint" else broker.issuer
    r = broker.post(broker.introspection_endpoint, {
        "token": tok["access_token"], "client_assertion_type": CLIENT_ASSERTION,
        "client_assertion": broker.jwt_svid(MCP_VERIFIER, aud)})
    assert r.status_code == 200, r.text
    check_active(r.json(), broker, broker.mcp_url, tok)


def test_client_assertion_must_verify(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    for assertion in (broker.jwt_svid(MCP_VERIFIER, "https://elsewhere.example/introspect"),
                      broker.jwt_svid(MCP_VERIFIER, broker.token_endpoint + "x"),
                      "garbage"):
        r = broker.post(broker.introspection_endpoint, {
            "token": tok["access_token"], "client_assertion_type": CLIENT_ASSERTION,
            "client_assertion": assertion})
        expect_error(r, 401, "invalid_client")


def test_non_verifier_sees_inactive(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    for caller in (CRM_VERIFIER, ALICE):  # another resource's verifier; the token's own agent
        assert broker.introspect(tok["access_token"], caller) == {"active": False}, caller


def test_unauthenticated_introspection_is_401(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    r = broker.post(broker.introspection_endpoint, {"token": tok["access_token"]})
    expect_error(r, 401, "invalid_client")
    # The token itself is no credential for introspecting (RFC 7662 §2.1 allows a bearer token
    # for the call; jitbroker asks for an SVID).
    import requests

    r = requests.post(broker.introspection_endpoint, data={"token": tok["access_token"]},
                      headers={"authorization": f"Bearer {tok['access_token']}"},
                      verify=broker.bundle, timeout=10)
    assert r.status_code == 401


def test_missing_token_parameter(broker: OAuthBroker) -> None:
    r = broker.post(broker.introspection_endpoint, {}, cert=broker.cert(MCP_VERIFIER))
    expect_error(r, 400, "invalid_request")


def test_unknown_and_garbage_tokens_are_inactive(broker: OAuthBroker) -> None:
    for token in ("nope", "eyJhbGciOiJFUzI1NiJ9.e30.AAAA", "x" * 4000):
        assert broker.introspect(token, MCP_VERIFIER) == {"active": False}


def test_completed_task_makes_tokens_inactive_at_once(broker: OAuthBroker) -> None:
    task = broker.grpc(ALICE).start_task("short job", [("tickets-mcp", "tickets:read"),
                                                       ("vault", "secrets:read")], ttl=600)
    jwt_tok = broker.token(ALICE, broker.mcp_url, task_id=task.task_id)
    opaque = broker.token(ALICE, VAULT, task_id=task.task_id)
    assert broker.introspect(jwt_tok["access_token"], MCP_VERIFIER)["active"] is True
    assert broker.introspect(opaque["access_token"], VAULT_VERIFIER)["active"] is True
    revoked = task.complete()
    assert revoked, "CompleteTask revoked nothing"
    assert broker.introspect(jwt_tok["access_token"], MCP_VERIFIER) == {"active": False}
    assert broker.introspect(opaque["access_token"], VAULT_VERIFIER) == {"active": False}


def test_opaque_tokens_introspect_the_same_way(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, VAULT, "secrets:read")
    info = broker.introspect(tok["access_token"], VAULT_VERIFIER)
    check_active(info, broker, VAULT, tok)
    assert broker.introspect(tok["access_token"], MCP_VERIFIER) == {"active": False}


def test_certificate_bound_token_introspection(broker: OAuthBroker) -> None:
    r = broker.post(broker.token_endpoint, {"grant_type": "client_credentials", "resource": VAULT,
                                            "purpose": "bound opaque"}, cert=broker.cert(ALICE))
    assert r.status_code == 200, r.text
    info = broker.introspect(r.json()["access_token"], VAULT_VERIFIER)
    assert info["active"] is True and "x5t#S256" in info["cnf"]
