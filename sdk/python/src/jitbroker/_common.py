"""Logic shared by the blocking and asyncio clients (no I/O here)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jwt as pyjwt

from .errors import IdentityError, JitbrokerError, PermissionDenied
from .identity import FilesSource, IdentitySource, WorkloadApiSource
from .types import Credential, Grant, GrantDecision


class InvalidToken(JitbrokerError):
    """A JWT credential failed offline verification (signature, expiry, audience, key id)."""


class CredentialCache:
    """Credentials by key, handed out again while more than ``renew_fraction`` of their
    life (and at least 5 s) is left."""

    def __init__(self, renew_fraction: float = 0.25, min_left: float = 5.0) -> None:
        self._renew_fraction = renew_fraction
        self._min_left = min_left
        self._lock = threading.Lock()
        self._items: dict[Hashable, Credential] = {}

    def get(self, key: Hashable) -> Credential | None:
        with self._lock:
            c = self._items.get(key)
        if c is None:
            return None
        margin = max(self._min_left, self._renew_fraction * min(c.lifetime(), 86_400))
        if c.seconds_left() <= margin:
            return None
        return c

    def put(self, key: Hashable, c: Credential) -> None:
        with self._lock:
            self._items[key] = c

    def drop(self, credential_id: str) -> None:
        with self._lock:
            for k, c in list(self._items.items()):
                if c.credential_id == credential_id:
                    del self._items[k]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class DeliveryBoard:
    """Credentials handed to tool calls by hooks that run in another asyncio task than the tool
    (the OpenAI Agents SDK's ``on_tool_start``): kept per tool call id, found by grant."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_call: dict[str, dict[Grant, Credential]] = {}

    def put(self, call_id: str, creds: dict[Grant, Credential]) -> None:
        with self._lock:
            self._by_call[call_id] = creds

    def take(self, call_id: str) -> None:
        with self._lock:
            self._by_call.pop(call_id, None)

    def get(self, call_id: str) -> dict[Grant, Credential] | None:
        with self._lock:
            return self._by_call.get(call_id)

    def lookup(self, grant: Grant) -> Credential | None:
        with self._lock:
            for creds in self._by_call.values():
                if grant in creds:
                    return creds[grant]
        return None


def denied_error(task_id: str, denied: Sequence[GrantDecision]) -> PermissionDenied:
    ids: list[str] = []
    for d in denied:
        ids.extend(p for p in d.policy_ids if p not in ids)
    what = "; ".join(f"({d.grant.resource}, {d.grant.action}): {d.reason}" for d in denied)
    return PermissionDenied(f"policy denied at the start of task {task_id}: {what}",
                            policy_ids=ids)


def source_from_env() -> IdentitySource:
    d = os.environ.get("JITBROKER_SVID_DIR")
    if d:
        return FilesSource(d)
    if os.environ.get("SPIFFE_ENDPOINT_SOCKET"):
        return WorkloadApiSource()
    raise IdentityError(
        "no identity: set JITBROKER_SVID_DIR (a directory with svid.pem, svid.key, bundle.pem) "
        "or SPIFFE_ENDPOINT_SOCKET (the SPIFFE Workload API)"
    )


def parse_jwks(text: str) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for jwk in json.loads(text).get("keys", []):
        kid = jwk.get("kid")
        if kid:
            keys[kid] = pyjwt.PyJWK(jwk, algorithm=jwk.get("alg", "ES256")).key
    return keys


def jwt_verify(token: str, resource: str, key_for: Callable[[str], Any], *,
               issuer: str | None, leeway: float) -> dict[str, Any]:
    try:
        header = pyjwt.get_unverified_header(token)
    except pyjwt.PyJWTError as e:
        raise InvalidToken(f"not a JWT: {e}") from None
    kid = header.get("kid")
    if not kid:
        raise InvalidToken("the JWT names no key id (kid)")
    key = key_for(kid)
    if key is None:
        raise InvalidToken(f"no key {kid!r} in the broker's JWKS")
    opts = {"require": ["exp", "aud", "sub", "jti"]}
    try:
        claims: dict[str, Any] = pyjwt.decode(
            token, key, algorithms=["ES256"], audience=resource, issuer=issuer,
            leeway=leeway, options=opts,  # type: ignore[arg-type]
        )
    except pyjwt.PyJWTError as e:
        raise InvalidToken(f"JWT rejected: {e}") from None
    return claims
