"""client_credentials with mutual-TLS client authentication and certificate-bound tokens
(RFC 8705), with requests and httpx as the clients."""

from __future__ import annotations

import ssl

import httpx

from oauthenv import ALICE, BOB, CRM, MCP_VERIFIER, OAuthBroker, expect_error, oauth_error, x5t_s256


def test_mtls_client_credentials_binds_the_token_to_the_certificate(broker: OAuthBroker) -> None:
    cert = broker.cert(ALICE)
    r = broker.post(broker.token_endpoint, {
        "grant_type": "client_credentials", "resource": broker.mcp_url, "scope": "tickets:read",
        "purpose": "mtls client"}, cert=cert)
    assert r.status_code == 200, r.text
    tok = r.json()
    assert tok["token_type"].lower() == "bearer" and tok["scope"] == "tickets:read"
    claims = broker.verify(tok["access_token"], broker.mcp_url)
    assert claims["sub"] == ALICE and claims["client_id"] == ALICE
    thumb = x5t_s256(broker.svid(ALICE) / "svid.pem")
    assert claims["cnf"] == {"x5t#S256": thumb}
    # The same confirmation in introspection (RFC 8705 §3.2).
    info = broker.introspect(tok["access_token"], MCP_VERIFIER)
    assert info["active"] is True
    assert info["cnf"] == {"x5t#S256": thumb}


def test_httpx_with_client_certificate_and_matching_client_id(broker: OAuthBroker) -> None:
    ctx = ssl.create_default_context(cafile=broker.bundle)
    pem, key = broker.cert(BOB)
    ctx.load_cert_chain(pem, key)
    with httpx.Client(verify=ctx, timeout=10) as c:
        r = c.post(broker.token_endpoint, data={
            "grant_type": "client_credentials", "client_id": BOB, "resource": CRM,
            "scope": "crm:read", "purpose": "httpx mtls"})
        assert r.status_code == 200, r.text
        claims = broker.verify(r.json()["access_token"], CRM)
        assert claims["sub"] == BOB
        assert claims["cnf"]["x5t#S256"] == x5t_s256(broker.svid(BOB) / "svid.pem")

        # RFC 8705 §2 / RFC 6749 §5.2: a client_id that is not the certificate's subject is a
        # failed client authentication.
        r = c.post(broker.token_endpoint, data={
            "grant_type": "client_credentials", "client_id": ALICE, "resource": CRM,
            "scope": "crm:read", "purpose": "wrong client id"})
        assert r.status_code in (400, 401), r.text
        assert r.json()["error"] == "invalid_client", r.text


def test_client_credentials_without_a_certificate_is_invalid_client(broker: OAuthBroker) -> None:
    r = broker.post(broker.token_endpoint, {
        "grant_type": "client_credentials", "resource": broker.mcp_url, "scope": "tickets:read",
        "purpose": "no cert"})
    status, error, _ = oauth_error(r)
    assert (status, error) == (401, "invalid_client")
    # The same with a client_id claiming to be the agent.
    r = broker.post(broker.token_endpoint, {
        "grant_type": "client_credentials", "client_id": ALICE, "resource": broker.mcp_url,
        "scope": "tickets:read", "purpose": "no cert"})
    expect_error(r, 401, "invalid_client")


def test_jwt_bearer_over_an_mtls_connection_is_not_bound_to_another_identity(
        broker: OAuthBroker) -> None:
    """A jwt-bearer grant is issued to the assertion's subject; presenting a client certificate
    of another identity on the same connection must not mix the two."""
    r = broker.post(broker.token_endpoint, {
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "assertion": broker.jwt_svid(ALICE), "resource": broker.mcp_url,
        "scope": "tickets:read", "purpose": "mixed"}, cert=broker.cert(BOB))
    if r.status_code == 200:
        claims = broker.verify(r.json()["access_token"], broker.mcp_url)
        assert claims["sub"] == ALICE
        cnf = claims.get("cnf")
        assert cnf is None or cnf["x5t#S256"] != x5t_s256(broker.svid(BOB) / "svid.pem")
    else:
        expect_error(r, r.status_code, "invalid_request", "invalid_client", "invalid_grant")
