"""The token endpoint's error answers (RFC 6749 §5.2 and docs/oauth.md), exactly."""

from __future__ import annotations

import time

import pytest

from oauthenv import (
    ACCOUNTS,
    ALICE,
    APPROVER,
    BOB,
    CLIENT_ASSERTION,
    CRM,
    JWT_BEARER,
    PAYMENTS,
    OAuthBroker,
    expect_error,
    oauth_error,
)


def test_unsupported_grant_type(broker: OAuthBroker) -> None:
    for grant in ("password", "authorization_code", "refresh_token", "urn:example:nope"):
        r = broker.post(broker.token_endpoint, {"grant_type": grant, "resource": broker.mcp_url,
                                                "purpose": "x"})
        expect_error(r, 400, "unsupported_grant_type")


def test_missing_grant_type(broker: OAuthBroker) -> None:
    r = broker.post(broker.token_endpoint, {"resource": broker.mcp_url, "purpose": "x"})
    expect_error(r, 400, "invalid_request")


def test_missing_resource(broker: OAuthBroker) -> None:
    """docs/oauth.md: a missing parameter is invalid_request; RFC 8707 §2 also names
    invalid_target for a missing resource. Either, but the same for an empty one, which RFC 6749
    §3.2 says is treated as omitted."""
    r = broker.post(broker.token_endpoint, {"grant_type": JWT_BEARER,
                                            "assertion": broker.jwt_svid(ALICE),
                                            "scope": "tickets:read", "purpose": "no resource"})
    expect_error(r, 400, "invalid_request", "invalid_target")
    missing = r.json()["error"]
    r = broker.jwt_bearer(ALICE, "", "tickets:read")
    expect_error(r, 400, missing)


def test_missing_assertion(broker: OAuthBroker) -> None:
    r = broker.post(broker.token_endpoint, {"grant_type": JWT_BEARER, "resource": broker.mcp_url,
                                            "scope": "tickets:read", "purpose": "x"})
    expect_error(r, 400, "invalid_request")


def test_task_id_and_purpose_exactly_one(broker: OAuthBroker) -> None:
    task = broker.grpc(ALICE).start_task("both", [("tickets-mcp", "tickets:read")], ttl=300)
    try:
        r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id,
                              purpose="and a purpose")
        expect_error(r, 400, "invalid_request")
    finally:
        task.complete()
    r = broker.post(broker.token_endpoint, {"grant_type": JWT_BEARER,
                                            "assertion": broker.jwt_svid(ALICE),
                                            "resource": broker.mcp_url, "scope": "tickets:read"})
    expect_error(r, 400, "invalid_request")


def test_repeated_parameter(broker: OAuthBroker) -> None:
    """RFC 6749 §3.2: parameters MUST NOT be included more than once."""
    base = [("grant_type", JWT_BEARER), ("assertion", broker.jwt_svid(ALICE)),
            ("resource", broker.mcp_url), ("scope", "tickets:read"), ("purpose", "repeat")]
    for name, value in (("scope", "tickets:read"), ("grant_type", JWT_BEARER),
                        ("purpose", "again")):
        r = broker.post(broker.token_endpoint, [*base, (name, value)])
        expect_error(r, 400, "invalid_request")
    # RFC 8707 allows several resource parameters; one token per resource here, so two are
    # refused (as a repeated parameter, or as a target it cannot serve).
    r = broker.post(broker.token_endpoint, [*base, ("resource", ACCOUNTS)])
    expect_error(r, 400, "invalid_request", "invalid_target")


def test_invalid_target(broker: OAuthBroker) -> None:
    for resource in ("https://unknown.example.test/api", "tickets-mcp",
                     broker.mcp_url + "/", broker.mcp_url + "#frag"):
        r = broker.jwt_bearer(ALICE, resource, "tickets:read")
        expect_error(r, 400, "invalid_target")


def test_invalid_scope(broker: OAuthBroker) -> None:
    r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:delete")
    expect_error(r, 400, "invalid_scope")
    # Two scopes in one request: one scope per token.
    r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:read tickets:write")
    expect_error(r, 400, "invalid_scope")
    # No scope, no task naming one, and the resource has two actions: the choices are listed.
    r = broker.jwt_bearer(ALICE, broker.mcp_url)
    status, error, description = oauth_error(r)
    assert (status, error) == (400, "invalid_scope")
    assert "tickets:read" in description and "tickets:write" in description


def test_policy_forbidden_scope_names_the_policy(broker: OAuthBroker) -> None:
    r = broker.jwt_bearer(ALICE, ACCOUNTS, "accounts:export")
    status, error, description = oauth_error(r)
    assert (status, error) == (400, "invalid_scope")
    assert "no-account-exports" in description
    # The permitted action on the same resource is fine.
    assert broker.jwt_bearer(ALICE, ACCOUNTS, "read").status_code == 200


def test_invalid_grant_assertions(broker: OAuthBroker) -> None:
    now = int(time.time())
    token_ep = broker.token_endpoint
    good = {"sub": ALICE, "aud": [token_ep], "iat": now, "exp": now + 300}
    hostile = {
        "expired": broker.forge_svid(dict(good, iat=now - 1200, exp=now - 600)),
        "foreign audience": broker.jwt_svid(ALICE, "https://elsewhere.example/token"),
        "jitbroker gRPC audience": broker.jwt_svid(ALICE, "jitbroker"),
        "two audiences": broker.forge_svid(dict(good, aud=[token_ep, "https://x.example"])),
        "unknown key": broker.forge_svid(good, foreign_key=True),
        "other trust domain": broker.forge_svid(dict(good, sub="spiffe://evil.example/agent/a")),
        "no exp": broker.forge_svid({k: v for k, v in good.items() if k != "exp"}),
        "garbage": "eyJhbGciOiJFUzI1NiJ9.bm9wZQ.bm9wZQ",
        "alg none": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
                    "eyJzdWIiOiJzcGlmZmU6Ly9qaXRicm9rZXIuZGV2L2FnZW50L2FsaWNlIn0.",
    }
    for name, assertion in hostile.items():
        r = broker.post(token_ep, {"grant_type": JWT_BEARER, "assertion": assertion,
                                   "resource": broker.mcp_url, "scope": "tickets:read",
                                   "purpose": name})
        expect_error(r, 400, "invalid_grant")
    # The forged-but-well-formed one verifies: the hostile ones failed for their flaw.
    r = broker.post(token_ep, {"grant_type": JWT_BEARER, "assertion": broker.forge_svid(good),
                               "resource": broker.mcp_url, "scope": "tickets:read",
                               "purpose": "control"})
    assert r.status_code == 200, r.text


def test_another_agents_task_is_invalid_grant(broker: OAuthBroker) -> None:
    task = broker.grpc(BOB).start_task("bob's", [("tickets-mcp", "tickets:read")], ttl=300)
    try:
        r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id)
        expect_error(r, 400, "invalid_grant")
        r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:read", task_id="tsk_nope")
        expect_error(r, 400, "invalid_grant")
    finally:
        task.complete()


def test_approval_required_is_authorization_pending(broker: OAuthBroker) -> None:
    r = broker.jwt_bearer(ALICE, PAYMENTS, "refund:issue", purpose="refund order 17")
    description = expect_error(r, 400, "authorization_pending")
    assert "refunds-need-approval" in description
    pending = r.json()
    assert pending["approval_id"]
    # With purpose, a retry can only name the task the request started: it comes back too.
    assert pending["task_id"]
    with broker.admin() as admin:
        admin.approve(pending["approval_id"], "refund 17 verified")
    r = broker.jwt_bearer(ALICE, PAYMENTS, "refund:issue", task_id=pending["task_id"])
    assert r.status_code == 200, r.text
    broker.grpc(ALICE).attach(pending["task_id"]).complete()

    # With a task of its own: approve, then the same request succeeds.
    task = broker.grpc(ALICE).start_task("refund order 18", [("payments", "refund:issue")],
                                         ttl=600)
    try:
        r = broker.jwt_bearer(ALICE, PAYMENTS, task_id=task.task_id)
        expect_error(r, 400, "authorization_pending")
        approval_id = r.json()["approval_id"]
        assert isinstance(approval_id, str) and approval_id
        with broker.admin() as admin:
            approved = admin.approve(approval_id, "refund verified by a human")
        assert approved.decided_by == APPROVER, approved
        assert approved.requester == ALICE and approved.task_id == task.task_id
        assert approved.grant == ("payments", "refund:issue")
        r = broker.jwt_bearer(ALICE, PAYMENTS, task_id=task.task_id)
        assert r.status_code == 200, r.text
        claims = broker.verify(r.json()["access_token"], PAYMENTS)
        assert claims["scope"] == "refund:issue" and claims["task_id"] == task.task_id
    finally:
        task.complete()


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_non_form_bodies_are_refused(broker: OAuthBroker, content_type: str) -> None:
    import requests

    r = requests.post(broker.token_endpoint, data=b'{"grant_type":"client_credentials"}',
                      headers={"content-type": content_type}, verify=broker.bundle, timeout=10)
    assert r.status_code in (400, 415), r.text
    if r.status_code == 400:
        assert r.json()["error"] == "invalid_request"


def test_a_client_assertion_that_does_not_verify_is_invalid_client(broker: OAuthBroker) -> None:
    """docs/oauth.md: invalid_client (401) for "a client assertion that does not verify";
    RFC 7523 §3.2: an invalid client JWT is answered invalid_client, whatever the grant."""
    for assertion in ("garbage",
                      broker.jwt_svid(ALICE, "https://elsewhere.example/token"),
                      broker.forge_svid({"sub": ALICE, "aud": [broker.token_endpoint],
                                         "iat": int(time.time()), "exp": int(time.time()) + 60},
                                        foreign_key=True)):
        r = broker.jwt_bearer(ALICE, broker.mcp_url, "tickets:read",
                              client_assertion_type=CLIENT_ASSERTION, client_assertion=assertion)
        expect_error(r, 401, "invalid_client")


def test_http_basic_is_refused_with_a_basic_challenge(broker: OAuthBroker) -> None:
    """No client secrets exist. RFC 6749 §5.2: a client that tried the Authorization header gets
    401 with a WWW-Authenticate challenge of the scheme it used."""
    import requests

    r = requests.post(broker.token_endpoint, data={
        "grant_type": JWT_BEARER, "assertion": broker.jwt_svid(ALICE), "resource": CRM,
        "scope": "crm:read", "purpose": "basic"}, auth=(ALICE, "secret"), verify=broker.bundle,
        timeout=10)
    expect_error(r, 401, "invalid_client")
    assert r.headers.get("www-authenticate", "").lower().startswith("basic"), r.headers
