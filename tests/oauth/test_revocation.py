"""Token revocation (RFC 7009): who may revoke what, and what the answers are."""

from __future__ import annotations

from authlib.integrations.requests_client import OAuth2Session

from oauthenv import (
    ALICE,
    BOB,
    CLIENT_ASSERTION,
    CRM,
    CRM_VERIFIER,
    GATEWAY,
    MCP_VERIFIER,
    TOKEN_EXCHANGE,
    TT_ACCESS,
    TT_JWT,
    VAULT,
    VAULT_VERIFIER,
    OAuthBroker,
    expect_error,
)


def test_owner_revokes_with_authlib_over_mtls(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    assert broker.introspect(tok["access_token"], MCP_VERIFIER)["active"] is True
    # RFC 8705 §2: a tls_client_auth client names itself with client_id.
    with OAuth2Session(client_id=ALICE, revocation_endpoint_auth_method="none") as s:
        s.trust_env = False  # else REQUESTS_CA_BUNDLE in the environment replaces s.verify
        s.verify = broker.bundle
        s.cert = broker.cert(ALICE)
        r = s.revoke_token(broker.revocation_endpoint, token=tok["access_token"],
                           token_type_hint="access_token")
    assert r.status_code == 200, r.text
    assert broker.introspect(tok["access_token"], MCP_VERIFIER) == {"active": False}
    # Revoking again is still 200 (RFC 7009 §2.2: an invalid token is not an error).
    r = broker.post(broker.revocation_endpoint, {"token": tok["access_token"]},
                    cert=broker.cert(ALICE))
    assert r.status_code == 200, r.text


def test_owner_revokes_with_a_client_assertion(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, VAULT, "secrets:read")
    r = broker.post(broker.revocation_endpoint, {
        "token": tok["access_token"], "client_assertion_type": CLIENT_ASSERTION,
        "client_assertion": broker.jwt_svid(ALICE, broker.revocation_endpoint)})
    assert r.status_code == 200, r.text
    assert broker.introspect(tok["access_token"], VAULT_VERIFIER) == {"active": False}


def test_unknown_token_is_200(broker: OAuthBroker) -> None:
    for token in ("nope", "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"):
        r = broker.post(broker.revocation_endpoint, {"token": token}, cert=broker.cert(BOB))
        assert r.status_code == 200, (token, r.text)


def test_someone_elses_token_is_refused(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    r = broker.post(broker.revocation_endpoint, {"token": tok["access_token"]},
                    cert=broker.cert(BOB))
    expect_error(r, 400, "unauthorized_client")
    # Another resource's verifier is someone else too.
    r = broker.post(broker.revocation_endpoint, {"token": tok["access_token"]},
                    cert=broker.cert(CRM_VERIFIER))
    expect_error(r, 400, "unauthorized_client")
    assert broker.introspect(tok["access_token"], MCP_VERIFIER)["active"] is True


def test_verifier_and_actor_may_revoke(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    r = broker.post(broker.revocation_endpoint, {"token": tok["access_token"]},
                    cert=broker.cert(MCP_VERIFIER))
    assert r.status_code == 200, r.text
    assert broker.introspect(tok["access_token"], MCP_VERIFIER) == {"active": False}

    task = broker.grpc(ALICE).start_task("exchange then revoke", [
        ("tickets-mcp", "tickets:read"), ("crm", "crm:read")], ttl=600)
    try:
        subject = broker.token(ALICE, broker.mcp_url, task_id=task.task_id)
        r = broker.post(broker.token_endpoint, {
            "grant_type": TOKEN_EXCHANGE, "subject_token": subject["access_token"],
            "subject_token_type": TT_ACCESS, "actor_token": broker.jwt_svid(GATEWAY),
            "actor_token_type": TT_JWT, "resource": CRM, "scope": "crm:read"})
        assert r.status_code == 200, r.text
        exchanged = r.json()["access_token"]
        r = broker.post(broker.revocation_endpoint, {"token": exchanged},
                        cert=broker.cert(GATEWAY))
        assert r.status_code == 200, r.text
        assert broker.introspect(exchanged, CRM_VERIFIER) == {"active": False}
        # The subject token is not the actor's to end.
        assert broker.introspect(subject["access_token"], MCP_VERIFIER)["active"] is True
    finally:
        task.complete()


def test_unauthenticated_revocation_is_401(broker: OAuthBroker) -> None:
    tok = broker.token(ALICE, broker.mcp_url, "tickets:read")
    r = broker.post(broker.revocation_endpoint, {"token": tok["access_token"]})
    expect_error(r, 401, "invalid_client")
    assert broker.introspect(tok["access_token"], MCP_VERIFIER)["active"] is True


def test_missing_token_parameter(broker: OAuthBroker) -> None:
    r = broker.post(broker.revocation_endpoint, {}, cert=broker.cert(ALICE))
    expect_error(r, 400, "invalid_request")
