"""The OAuth surface and the gRPC API are one broker: a credential issued over gRPC is an OAuth
access token of its resource indicator, and the operator's kill switch holds at the token
endpoint too."""

from __future__ import annotations

import jwt
from jitbroker.v1 import admin_pb2

from oauthenv import CRM, CRM_VERIFIER, TD, OAuthBroker, expect_error


def test_grpc_credentials_carry_the_indicator_and_the_issuer(broker: OAuthBroker) -> None:
    agent = f"{TD}/agent/grpc-interop"
    with broker.grpc(agent).task("read the CRM over gRPC", [("crm", "crm:read")]) as task:
        cred = task.credential("crm", "crm:read")
        token = cred.secret.reveal()
        claims = broker.verify(token, CRM)  # aud = oauth_resource, iss = the OAuth issuer
        assert claims["iss"] == broker.issuer
        assert claims["sub"] == agent
        assert claims["task_id"] == task.task_id
        with_header = jwt.get_unverified_header(token)
        assert with_header["alg"] == "ES256"
        info = broker.introspect(token, CRM_VERIFIER)
        assert info["active"] is True and info["sub"] == agent
    assert broker.introspect(token, CRM_VERIFIER) == {"active": False}


def test_blocked_identity_is_unauthorized_client(broker: OAuthBroker) -> None:
    agent = f"{TD}/agent/to-be-blocked"
    tok = broker.token(agent, CRM, "crm:read")
    assert broker.introspect(tok["access_token"], CRM_VERIFIER)["active"] is True
    with broker.admin("operator") as operator:
        operator._t.call(lambda s: s.admin.RevokeIdentity, admin_pb2.RevokeIdentityRequest(
            spiffe_id=agent, reason="conformance: kill switch", block=True), idempotent=False)
        try:
            # The kill switch ended its tokens, and the token endpoint gives it nothing more.
            assert broker.introspect(tok["access_token"], CRM_VERIFIER) == {"active": False}
            expect_error(broker.jwt_bearer(agent, CRM, "crm:read"), 400, "unauthorized_client")
            r = broker.post(broker.token_endpoint, {
                "grant_type": "client_credentials", "resource": CRM, "scope": "crm:read",
                "purpose": "blocked"}, cert=broker.cert(agent))
            expect_error(r, 400, "unauthorized_client")
        finally:
            operator._t.call(lambda s: s.admin.UnblockIdentity, admin_pb2.UnblockIdentityRequest(
                spiffe_id=agent, reason="conformance: done"), idempotent=False)
    assert broker.jwt_bearer(agent, CRM, "crm:read").status_code == 200
