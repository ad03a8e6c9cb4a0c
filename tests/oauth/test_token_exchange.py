"""Token exchange (RFC 8693): a gateway trades an agent's token for a narrower downstream one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from jitbroker import Task

from oauthenv import (
    ALICE,
    BOB,
    CRM,
    CRM_VERIFIER,
    GATEWAY,
    MCP_VERIFIER,
    ROGUE,
    SIDECAR,
    TOKEN_EXCHANGE,
    TT_ACCESS,
    TT_JWT,
    OAuthBroker,
    expect_error,
)


@pytest.fixture
def task(broker: OAuthBroker) -> Iterator[Task]:
    t = broker.grpc(ALICE).start_task("sync the CRM", [
        ("tickets-mcp", "tickets:read"), ("tickets-mcp", "tickets:write"), ("crm", "crm:read")],
        ttl=600)
    try:
        yield t
    finally:
        t.complete()


def exchange(broker: OAuthBroker, subject: str, resource: str, scope: str | None, *,
             actor: str | None = GATEWAY, mtls: str | None = None,
             subject_type: str = TT_ACCESS) -> requests.Response:
    data = {"grant_type": TOKEN_EXCHANGE, "subject_token": subject,
            "subject_token_type": subject_type, "resource": resource}
    if scope:
        data["scope"] = scope
    if actor:
        data["actor_token"] = broker.jwt_svid(actor)
        data["actor_token_type"] = TT_JWT
    return broker.post(broker.token_endpoint, data, cert=broker.cert(mtls) if mtls else None)


def ok(r: requests.Response) -> dict[str, Any]:
    assert r.status_code == 200, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body, dict)
    return body


def test_gateway_exchanges_with_its_jwt_svid(broker: OAuthBroker, task: Task) -> None:
    subject = broker.token(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id)
    sub_claims = broker.verify(subject["access_token"], broker.mcp_url)
    out = ok(exchange(broker, subject["access_token"], CRM, "crm:read"))
    assert out["issued_token_type"] == TT_ACCESS  # RFC 8693 §2.2.1
    assert out["token_type"].lower() == "bearer"
    assert out["scope"] == "crm:read"
    claims = broker.verify(out["access_token"], CRM)
    assert claims["sub"] == ALICE
    assert claims["task_id"] == task.task_id
    assert claims["act"] == {"sub": GATEWAY}  # RFC 8693 §4.1
    assert claims["client_id"] == GATEWAY
    assert claims["scope"] == "crm:read"
    assert claims["exp"] <= sub_claims["exp"]
    assert out["expires_in"] <= subject["expires_in"]
    # Introspection shows the actor too.
    info = broker.introspect(out["access_token"], CRM_VERIFIER)
    assert info["active"] is True and info["act"] == {"sub": GATEWAY}
    assert info["sub"] == ALICE


def test_gateway_exchanges_over_mtls_and_a_second_actor_nests(broker: OAuthBroker,
                                                              task: Task) -> None:
    subject = broker.token(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id)
    first = ok(exchange(broker, subject["access_token"], CRM, "crm:read", actor=None,
                        mtls=GATEWAY, subject_type=TT_JWT))
    c1 = broker.verify(first["access_token"], CRM)
    assert c1["act"] == {"sub": GATEWAY}
    # The sidecar exchanges the gateway's token again: the earlier actor nests inside.
    second = ok(exchange(broker, first["access_token"], CRM, "crm:read", actor=SIDECAR))
    c2 = broker.verify(second["access_token"], CRM)
    assert c2["act"] == {"sub": SIDECAR, "act": {"sub": GATEWAY}}
    assert c2["sub"] == ALICE and c2["task_id"] == task.task_id
    assert c2["exp"] <= c1["exp"]
    # Completing the task ends every token of the chain.
    task.complete()
    for t in (subject["access_token"], first["access_token"], second["access_token"]):
        aud_verifier = CRM_VERIFIER if t != subject["access_token"] else \
            "spiffe://jitbroker.dev/mcp/tickets"
        assert broker.introspect(t, aud_verifier) == {"active": False}


def test_exchange_never_widens(broker: OAuthBroker, task: Task) -> None:
    subject = broker.token(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id)
    # Same resource, another scope (which the task did ask for): a widening.
    r = exchange(broker, subject["access_token"], broker.mcp_url, "tickets:write")
    expect_error(r, 400, "invalid_scope")
    # Same resource, same scope: allowed.
    ok(exchange(broker, subject["access_token"], broker.mcp_url, "tickets:read"))
    # Another resource, a scope the task did not ask for.
    r = exchange(broker, subject["access_token"], CRM, "crm:write")
    expect_error(r, 400, "invalid_scope")


def test_actor_must_be_allowed(broker: OAuthBroker, task: Task) -> None:
    subject = broker.token(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id)
    for actor in (ROGUE, BOB):
        r = exchange(broker, subject["access_token"], CRM, "crm:read", actor=actor)
        expect_error(r, 400, "unauthorized_client")
    r = exchange(broker, subject["access_token"], CRM, "crm:read", actor=None, mtls=ROGUE)
    expect_error(r, 400, "unauthorized_client")


# RFC 8693 §2.2.2: "If ... either the subject_token or actor_token are invalid for any reason,
# or are unacceptable based on policy, ... The value of the error parameter MUST be the
# invalid_request error code." (docs/oauth.md's table says invalid_grant; the RFC's MUST wins.)
INVALID_TOKEN = "invalid_request"


def test_subject_token_must_be_active(broker: OAuthBroker, task: Task) -> None:
    subject = broker.token(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id)
    r = broker.post(broker.revocation_endpoint, {"token": subject["access_token"]},
                    cert=broker.cert(ALICE))
    assert r.status_code == 200, r.text
    r = exchange(broker, subject["access_token"], CRM, "crm:read")
    expect_error(r, 400, INVALID_TOKEN)
    r = exchange(broker, "not-a-token", CRM, "crm:read")
    expect_error(r, 400, INVALID_TOKEN)


def test_subject_token_of_an_ended_task(broker: OAuthBroker) -> None:
    subject = broker.token(ALICE, broker.mcp_url, "tickets:read", purpose="ends soon")
    broker.grpc(ALICE).attach(subject["task_id"]).complete()
    r = exchange(broker, subject["access_token"], CRM, "crm:read")
    expect_error(r, 400, INVALID_TOKEN)


def test_exchange_request_errors(broker: OAuthBroker, task: Task) -> None:
    subject = broker.token(ALICE, broker.mcp_url, "tickets:read", task_id=task.task_id)
    base = {"grant_type": TOKEN_EXCHANGE, "subject_token": subject["access_token"],
            "subject_token_type": TT_ACCESS, "resource": CRM, "scope": "crm:read",
            "actor_token": broker.jwt_svid(GATEWAY), "actor_token_type": TT_JWT}
    for missing in ("subject_token", "subject_token_type"):
        data = {k: v for k, v in base.items() if k != missing}
        expect_error(broker.post(broker.token_endpoint, data), 400, "invalid_request")
    # RFC 8693 §2.1: actor_token_type is required when actor_token is present.
    data = {k: v for k, v in base.items() if k != "actor_token_type"}
    expect_error(broker.post(broker.token_endpoint, data), 400, "invalid_request")
    # An actor assertion for another audience does not verify.
    data = dict(base, actor_token=broker.jwt_svid(GATEWAY, "https://elsewhere.example/token"))
    expect_error(broker.post(broker.token_endpoint, data), 400, INVALID_TOKEN)
    # Unknown downstream resource.
    data = dict(base, resource="https://unknown.example.test/")
    expect_error(broker.post(broker.token_endpoint, data), 400, "invalid_target")


def test_delegators_nest_inside_act(broker: OAuthBroker, task: Task) -> None:
    """docs/oauth.md: the act claim names the actor "with earlier actors and delegators nested
    inside"; introspection carries act "when it applies", the same as the JWT."""
    delegated = task.delegate(BOB, [("tickets-mcp", "tickets:read"), ("crm", "crm:read")],
                              ttl=300)
    own = broker.token(BOB, broker.mcp_url, "tickets:read", task_id=delegated.task_id)
    c0 = broker.verify(own["access_token"], broker.mcp_url)
    assert c0["sub"] == BOB and c0["task_id"] == delegated.task_id
    assert c0["act"] == {"sub": ALICE}
    out = ok(exchange(broker, own["access_token"], CRM, "crm:read"))
    c1 = broker.verify(out["access_token"], CRM)
    assert c1["act"] == {"sub": GATEWAY, "act": {"sub": ALICE}}
    assert c1["sub"] == BOB
    # Introspection tells the resource server the same chain.
    seen = (broker.introspect(own["access_token"], MCP_VERIFIER).get("act"),
            broker.introspect(out["access_token"], CRM_VERIFIER).get("act"))
    assert seen == (c0["act"], c1["act"]), "introspection's act differs from the JWT's"
    # Ending the delegator's task ends the delegate's tokens, exchanged ones too.
    task.complete()
    assert broker.introspect(out["access_token"], CRM_VERIFIER) == {"active": False}
    assert broker.introspect(own["access_token"], MCP_VERIFIER) == {"active": False}


def test_exchange_is_decided_by_cedar_now(broker: OAuthBroker) -> None:
    """The downstream grant must be one the task asked for and Cedar allows now: a forbidden one
    is invalid_scope naming the policy."""
    t = broker.grpc(ALICE).start_task("export accounts", [
        ("tickets-mcp", "tickets:read"), ("accounts", "accounts:export")], ttl=300)
    try:
        subject = broker.token(ALICE, broker.mcp_url, "tickets:read", task_id=t.task_id)
        r = exchange(broker, subject["access_token"], "https://accounts.example.test/api",
                     "accounts:export")
        assert "no-account-exports" in expect_error(r, 400, "invalid_scope")
    finally:
        t.complete()
