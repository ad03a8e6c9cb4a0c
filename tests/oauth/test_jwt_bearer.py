"""The JWT-SVID assertion grant (RFC 7523 §2.1) driven by authlib's OAuth 2 client, and the
RFC 9068 access token checked with PyJWT against the JWKS."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from oauthenv import ALICE, BOB, CRM, JWT_BEARER, VAULT, OAuthBroker, expect_error


def authlib_session(broker: OAuthBroker, client_id: str) -> Any:
    """authlib's requests client: a public client (auth method ``none``) trusting the dev CA."""
    s = OAuth2Session(client_id=client_id, token_endpoint_auth_method="none")
    s.trust_env = False  # else REQUESTS_CA_BUNDLE in the environment replaces s.verify
    s.verify = broker.bundle
    return s


def test_jwt_bearer_with_authlib_gives_an_rfc9068_token(broker: OAuthBroker) -> None:
    with authlib_session(broker, ALICE) as s:
        before = int(time.time())
        tok = s.fetch_token(broker.token_endpoint, grant_type=JWT_BEARER,
                            assertion=broker.jwt_svid(ALICE), resource=broker.mcp_url,
                            scope="tickets:read", purpose="answer ticket 4711")
    assert tok["token_type"].lower() == "bearer"
    assert tok["scope"] == "tickets:read"
    assert isinstance(tok["expires_in"], int) and 0 < tok["expires_in"] <= 300
    assert tok["task_id"]
    assert "refresh_token" not in tok

    access = tok["access_token"]
    header = jwt.get_unverified_header(access)
    assert header["typ"] == "at+jwt"  # RFC 9068 §2.1
    assert header["alg"] == "ES256"
    assert header["kid"] in {k.key_id for k in broker.jwks_client().get_signing_keys()}

    claims = broker.verify(access, broker.mcp_url)
    assert claims["iss"] == broker.issuer
    assert claims["sub"] == ALICE
    assert claims["aud"] in (broker.mcp_url, [broker.mcp_url])
    assert claims["scope"] == "tickets:read"
    assert claims["client_id"] == ALICE
    assert claims["task_id"] == tok["task_id"]
    assert claims["exp"] > time.time()
    assert before - 5 <= claims["iat"] <= time.time() + 5
    assert claims["nbf"] <= time.time() + 5
    assert claims["jti"]
    assert abs(claims["exp"] - claims["iat"] - tok["expires_in"]) <= 5
    assert "act" not in claims and "cnf" not in claims


def test_audience_binding(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    key = broker.jwks_client().get_signing_key_from_jwt(tok["access_token"])
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(tok["access_token"], key, algorithms=["ES256"], audience=CRM)
    with pytest.raises(jwt.InvalidIssuerError):
        jwt.decode(tok["access_token"], key, algorithms=["ES256"], audience=broker.mcp_url,
                   issuer="https://elsewhere.example")
    # One token, one resource: a token for another indicator carries that one.
    other = broker.token(ALICE, CRM, "crm:read")
    assert broker.verify(other["access_token"], CRM)["aud"] in (CRM, [CRM])


def test_jwt_bearer_for_an_existing_task(broker: OAuthBroker) -> None:
    task = broker.grpc(ALICE).start_task(
        "triage the queue", [("tickets-mcp", "tickets:read"), ("crm", "crm:read")], ttl=600)
    try:
        with authlib_session(broker, ALICE) as s:
            # Without scope: the one action the task asked for on that resource.
            tok = s.fetch_token(broker.token_endpoint, grant_type=JWT_BEARER,
                                assertion=broker.jwt_svid(ALICE), resource=broker.mcp_url,
                                task_id=task.task_id)
        assert tok["task_id"] == task.task_id
        assert tok["scope"] == "tickets:read"
        claims = broker.verify(tok["access_token"], broker.mcp_url)
        assert claims["task_id"] == task.task_id and claims["scope"] == "tickets:read"
        # The token ends no later than its task.
        assert task.info.expires_at is None or claims["exp"] <= task.info.expires_at.timestamp() + 1

        # A grant the task did not ask for is refused (tickets:write), one it asked for is not.
        r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:write", task_id=task.task_id)
        assert r.status_code == 400 and r.json()["error"] == "invalid_scope", r.text
        assert broker.jwt_bearer(ALICE, CRM, task_id=task.task_id).status_code == 200

        # Another agent cannot use this task.
        r = broker.jwt_bearer(BOB, broker.mcp_url, "tickets:read", task_id=task.task_id)
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant", r.text
    finally:
        task.complete()
    # An ended task issues nothing.
    r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant", r.text


def test_purpose_starts_a_task_that_completing_ends(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read", purpose="one-shot lookup")
    info = broker.grpc(ALICE).get_task(tok["task_id"])
    assert info.purpose == "one-shot lookup"
    assert info.state.endswith("ACTIVE"), info.state
    assert broker.introspect(tok["access_token"], "spiffe://jitbroker.dev/mcp/tickets")["active"]
    broker.grpc(ALICE).attach(tok["task_id"]).complete()
    assert broker.introspect(tok["access_token"], "spiffe://jitbroker.dev/mcp/tickets") == {
        "active": False}


def test_assertion_audience_may_be_the_issuer(broker: OAuthBroker) -> None:
    r = broker.post(broker.token_endpoint, {
        "grant_type": JWT_BEARER, "assertion": broker.jwt_svid(ALICE, broker.issuer),
        "resource": broker.mcp_url, "scope": "tickets:read", "purpose": "aud = issuer"})
    assert r.status_code == 200, r.text


def test_token_answer_headers(broker: OAuthBroker) -> None:
    r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:read")
    assert r.status_code == 200
    # RFC 6749 §5.1
    assert r.headers["content-type"].startswith("application/json")
    assert "no-store" in r.headers.get("cache-control", "")


def test_opaque_token_kind(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, VAULT)  # the resource's only action is the default scope
    assert tok["scope"] == "secrets:read"
    assert tok["token_type"].lower() == "bearer"
    with pytest.raises(jwt.DecodeError):
        jwt.get_unverified_header(tok["access_token"])


def test_authlib_raises_the_oauth_error(broker: OAuthBroker) -> None:
    with authlib_session(broker, ALICE) as s, pytest.raises(OAuthError) as e:
        s.fetch_token(broker.token_endpoint, grant_type=JWT_BEARER, assertion="not-a-jwt",
                      resource=broker.mcp_url, scope="tickets:read", purpose="garbage")
    assert e.value.error == "invalid_grant"


def test_token_life_is_capped_by_task_and_resource(broker: OAuthBroker) -> None:
    """docs/oauth.md: access_token_ttl_seconds (300 here) is capped by the resource and the task."""
    task = broker.grpc(ALICE).start_task("short task", [("crm", "crm:read")], ttl=20)
    try:
        tok = broker.token(ALICE, CRM, task_id=task.task_id)
        assert 0 < tok["expires_in"] <= 20, tok
        claims = broker.verify(tok["access_token"], CRM)
        assert claims["exp"] - claims["iat"] <= 20
    finally:
        task.complete()
    tok = broker.token(ALICE, VAULT)  # [resources.vault] max_ttl_seconds = 120
    assert 0 < tok["expires_in"] <= 120, tok


def test_client_id_must_be_the_assertion_subject(broker: OAuthBroker) -> None:
    r = broker.jwt_bearer(ALICE, CRM, "crm:read", client_id=BOB)
    expect_error(r, 401, "invalid_client")
    assert broker.jwt_bearer(ALICE, CRM, "crm:read", client_id=ALICE).status_code == 200
