"""Discovery: RFC 8414 metadata, OpenID discovery, and the JWKS (RFC 7517), read with authlib."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from oauthenv import (
    JWT_BEARER,
    TOKEN_EXCHANGE,
    OAuthBroker,
    oauth_broker,
)


def metadata(broker: OAuthBroker, url: str) -> dict[str, Any]:
    r = broker.get(url)
    assert r.status_code == 200, (url, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def as_metadata(broker: OAuthBroker) -> dict[str, Any]:
    # RFC 8414 §3: the issuer has no path, so the well-known suffix goes at the root.
    return metadata(broker, f"{broker.issuer}/.well-known/oauth-authorization-server")


def test_rfc8414_document_validates_with_authlib(broker: OAuthBroker,
                                                 as_metadata: dict[str, Any]) -> None:
    AuthorizationServerMetadata(as_metadata).validate()
    # RFC 8414 §3.3: the issuer in the document is exactly the one the client asked.
    assert as_metadata["issuer"] == broker.issuer
    assert as_metadata["token_endpoint"] == broker.token_endpoint
    assert as_metadata["jwks_uri"] == broker.jwks_uri
    assert as_metadata["introspection_endpoint"] == broker.introspection_endpoint
    assert as_metadata["revocation_endpoint"] == broker.revocation_endpoint
    assert "authorization_endpoint" not in as_metadata
    assert as_metadata["response_types_supported"] == ["none"]


def test_rfc8414_grants_and_auth_methods(as_metadata: dict[str, Any]) -> None:
    assert {JWT_BEARER, "client_credentials", TOKEN_EXCHANGE} <= set(
        as_metadata["grant_types_supported"])
    assert "authorization_code" not in as_metadata["grant_types_supported"]
    assert {"tls_client_auth", "private_key_jwt", "none"} <= set(
        as_metadata["token_endpoint_auth_methods_supported"])
    for endpoint in ("introspection", "revocation"):
        methods = set(as_metadata[f"{endpoint}_endpoint_auth_methods_supported"])
        assert {"tls_client_auth", "private_key_jwt"} <= methods, endpoint
        # RFC 8414 §2: private_key_jwt needs the signing algorithms listed, and "none" never.
        algs = as_metadata.get(f"{endpoint}_endpoint_auth_signing_alg_values_supported")
        assert algs and "ES256" in algs and "none" not in algs, (endpoint, algs)
    algs = as_metadata.get("token_endpoint_auth_signing_alg_values_supported")
    assert algs and "ES256" in algs and "none" not in algs
    assert as_metadata["tls_client_certificate_bound_access_tokens"] is True
    scopes = set(as_metadata["scopes_supported"])
    assert {"tickets:read", "tickets:write", "crm:read", "secrets:read"} <= scopes
    assert as_metadata["id_token_signing_alg_values_supported"] == ["ES256"]
    assert as_metadata["subject_types_supported"]


def test_openid_discovery_is_the_same_document(broker: OAuthBroker,
                                               as_metadata: dict[str, Any]) -> None:
    oidc = metadata(broker, f"{broker.issuer}/.well-known/openid-configuration")
    assert oidc == as_metadata
    assert oidc["issuer"] == broker.issuer
    # What OpenID verifiers read to accept ES256-signed JWTs from this issuer.
    assert oidc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert oidc["subject_types_supported"]


def test_jwks_is_a_valid_es256_key_set(broker: OAuthBroker, as_metadata: dict[str, Any]) -> None:
    r = broker.get(as_metadata["jwks_uri"])
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(("application/json", "application/jwk-set+json"))
    keys = r.json()["keys"]
    assert keys, "the JWKS has no keys"
    kids = [k["kid"] for k in keys]
    assert len(set(kids)) == len(kids), "kids must be unique"
    for k in keys:
        assert k["kty"] == "EC" and k["crv"] == "P-256", k
        assert k.get("alg", "ES256") == "ES256", k
        assert k.get("use", "sig") == "sig", k
        assert "d" not in k, "a private key is published"
        pub = ECAlgorithm.from_jwk(k)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert pub.curve.name == "secp256r1"
    # PyJWT's own JWKS client reads it too.
    assert broker.jwks_client().get_signing_keys()


def test_metadata_is_served_over_tls_only_to_the_right_paths(broker: OAuthBroker) -> None:
    assert broker.get(f"{broker.issuer}/.well-known/oauth-authorization-server/nope"
                      ).status_code == 404
    # The token endpoint takes POST only (RFC 6749 §3.2).
    assert broker.get(broker.token_endpoint).status_code in (404, 405)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{broker.issuer}/jwks.json", timeout=5)  # no trust in the dev CA


@pytest.fixture(scope="module")
def path_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthBroker]:
    import os

    with oauth_broker(os.environ.get("JITBROKER_BIN"), Path(tmp_path_factory.mktemp("pathiss")),
                      issuer_path="/tenant/a") as env:
        yield env


def test_issuer_with_a_path(path_broker: OAuthBroker) -> None:
    """RFC 8414 §3.1: for issuer https://h/p the document is at /.well-known/…/p; OpenID
    discovery appends to the issuer; the endpoints live under the issuer."""
    b = path_broker
    origin = b.issuer.removesuffix("/tenant/a")
    doc = metadata(b, f"{origin}/.well-known/oauth-authorization-server/tenant/a")
    assert doc["issuer"] == b.issuer
    for name, path in (("token_endpoint", "token"), ("jwks_uri", "jwks.json"),
                       ("introspection_endpoint", "introspect"),
                       ("revocation_endpoint", "revoke")):
        assert doc[name] == f"{b.issuer}/{path}", name
    # The root location is the metadata of the issuer without the path (RFC 8414 §3.3): it must
    # not claim this issuer.
    root = b.get(f"{origin}/.well-known/oauth-authorization-server")
    assert root.status_code == 404 or root.json().get("issuer") == origin, root.text
    assert metadata(b, f"{b.issuer}/.well-known/openid-configuration") == doc
    # And the token endpoint there works.
    tok = b.token("spiffe://jitbroker.dev/agent/alice", b.mcp_url, "tickets:read")
    claims = b.verify(tok["access_token"], b.mcp_url)
    assert claims["iss"] == b.issuer
