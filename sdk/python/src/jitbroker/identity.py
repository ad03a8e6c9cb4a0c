"""Where the caller's identity comes from: an X.509-SVID (and trust bundle) from the SPIFFE
Workload API, from files written by spiffe-helper, or a bundle alone for JWT-SVID callers.

A source only hands out material; :mod:`jitbroker._channels` turns material into gRPC channels
and swaps them when the material changes. Sources are thread-safe and cheap to poll: the
channel pool asks for :meth:`IdentitySource.material` before every call and compares the object
it gets with the one its channel was built from.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .errors import IdentityError

_log = logging.getLogger("jitbroker")

__all__ = [
    "BundleOnlySource",
    "FilesSource",
    "IdentitySource",
    "JwtSvidCache",
    "JwtSvidProvider",
    "SvidMaterial",
    "WorkloadApiSource",
    "jwt_svid_from_file",
]


@dataclass(frozen=True, eq=False)
class SvidMaterial:
    """One X.509-SVID with its trust bundle, PEM-encoded, as gRPC wants it.

    ``cert_chain_pem`` and ``private_key_pem`` are ``None`` for a caller that authenticates with
    a JWT-SVID only. Compared by identity: a new object means the material rotated.
    """

    spiffe_id: str | None
    cert_chain_pem: bytes | None
    private_key_pem: bytes | None = field(repr=False)
    bundle_pem: bytes = field(repr=False)
    not_after: dt.datetime | None

    def __repr__(self) -> str:
        return f"SvidMaterial(spiffe_id={self.spiffe_id!r}, not_after={self.not_after!r})"


@runtime_checkable
class IdentitySource(Protocol):
    """Hands out the current :class:`SvidMaterial`; a new object whenever it rotates."""

    def material(self) -> SvidMaterial: ...

    def close(self) -> None: ...


def _spiffe_id_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound as e:
        raise IdentityError("the SVID's leaf certificate has no subject alternative names") from e
    uris = [u for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise IdentityError(
            f"the SVID's leaf certificate must have exactly one spiffe:// URI SAN, has {len(uris)}"
        )
    return uris[0]


def _not_after(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def material_from_pem(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> SvidMaterial:
    """Checks and wraps PEM material: the chain parses, the key is the leaf's, the bundle parses."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise IdentityError(f"the SVID certificate chain is not valid PEM: {e}") from e
    try:
        x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as e:
        raise IdentityError(f"the trust bundle is not valid PEM: {e}") from e
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"the SVID private key is not an unencrypted PEM key: {e}") from e
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != chain[0].public_key().public_bytes(enc, pub):
        raise IdentityError("the SVID private key does not match its certificate")
    leaf = chain[0]
    return SvidMaterial(
        spiffe_id=_spiffe_id_of(leaf),
        cert_chain_pem=chain_pem,
        private_key_pem=key_pem,
        bundle_pem=bundle_pem,
        not_after=_not_after(leaf),
    )


class FilesSource:
    """An SVID from files, as spiffe-helper writes them: ``svid.pem`` (leaf first),
    ``svid.key`` (PKCS#8) and ``bundle.pem``, re-read when they change.

    The files are checked at most every ``check_interval`` seconds. A half-written set (a key
    that does not match its certificate, a truncated PEM) is ignored until it is whole: the
    previous material stays in use meanwhile.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        svid_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        bundle_file: str | os.PathLike[str] | None = None,
        check_interval: float = 1.0,
    ) -> None:
        base = Path(directory) if directory is not None else None

        def pick(given: str | os.PathLike[str] | None, name: str) -> Path:
            if given is not None:
                return Path(given)
            if base is None:
                raise IdentityError(f"FilesSource needs a directory or an explicit {name} path")
            return base / name

        self._paths = (pick(svid_file, "svid.pem"), pick(key_file, "svid.key"),
                       pick(bundle_file, "bundle.pem"))
        self._interval = check_interval
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._checked = 0.0
        self._material: SvidMaterial | None = None
        self._material = self._reload(initial=True)

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return self._paths

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self._paths:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _reload(self, *, initial: bool = False) -> SvidMaterial | None:
        try:
            stamp = self._stat()
        except OSError as e:
            if initial:
                raise IdentityError(
                    f"cannot read the SVID files ({e}); are svid.pem, svid.key and bundle.pem "
                    f"written to {self._paths[0].parent} (spiffe-helper's cert_dir)?"
                ) from e
            return self._material
        if stamp == self._stamp and self._material is not None:
            return self._material
        try:
            chain, key, bundle = (p.read_bytes() for p in self._paths)
            mat = material_from_pem(chain, key, bundle)
        except (OSError, IdentityError) as e:
            if initial:
                if isinstance(e, IdentityError):
                    raise IdentityError(f"{self._paths[0].parent}: {e}") from e
                raise IdentityError(f"cannot read the SVID files: {e}") from e
            _log.debug("SVID files changed but are not usable yet (%s); keeping the old ones", e)
            return self._material
        self._stamp = stamp
        if self._material is not None:
            _log.info("SVID files changed: %s, valid until %s", mat.spiffe_id, mat.not_after)
        return mat

    def refresh(self) -> None:
        """Checks the files now, whatever the interval (the SVID is about to expire)."""
        with self._lock:
            self._checked = time.monotonic()
            self._material = self._reload()

    def material(self) -> SvidMaterial:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self._interval:
                self._checked = now
                self._material = self._reload()
            assert self._material is not None
            return self._material

    def close(self) -> None:
        pass


class BundleOnlySource:
    """No X.509-SVID, only the trust bundle that verifies the broker: for callers that
    authenticate with a JWT-SVID alone (the broker must set ``identity.jwt_audience``)."""

    def __init__(self, bundle_file: str | os.PathLike[str]) -> None:
        try:
            pem = Path(bundle_file).read_bytes()
            x509.load_pem_x509_certificates(pem)
        except (OSError, ValueError) as e:
            raise IdentityError(f"cannot load the trust bundle {bundle_file}: {e}") from e
        self._material = SvidMaterial(None, None, None, pem, None)

    def material(self) -> SvidMaterial:
        return self._material

    def close(self) -> None:
        pass


class WorkloadApiSource:
    """The X.509-SVID and bundle from the SPIFFE Workload API (``SPIFFE_ENDPOINT_SOCKET`` or
    ``socket_path``), kept current by py-spiffe's streaming :class:`spiffe.X509Source`."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 10.0) -> None:
        from spiffe import WorkloadApiClient, X509Source
        from spiffe.errors import ArgumentError

        where = socket_path or os.environ.get("SPIFFE_ENDPOINT_SOCKET") or "(unset)"
        hint = "is the SPIRE agent running and the socket mounted?"
        try:
            self._client = WorkloadApiClient(socket_path, default_timeout=timeout)
        except ArgumentError as e:
            raise IdentityError(f"SPIFFE Workload API at {where}: {e}; {hint}") from e
        self._lock = threading.Lock()
        self._material: SvidMaterial | None = None
        try:
            self._source = X509Source(workload_api_client=self._client,
                                      timeout_in_seconds=timeout)
        except Exception as e:
            self._client.close()
            raise IdentityError(
                f"timed out after {timeout:g}s fetching an X.509-SVID from the SPIFFE Workload "
                f"API at {where} ({e}); {hint} Is this workload registered?"
            ) from e
        self._source.subscribe_for_updates(self._refresh)
        self._refresh()

    def _refresh(self) -> None:
        ctx = self._source.get_x509_context()
        svid = ctx.default_svid
        pem = serialization.Encoding.PEM
        chain = b"".join(c.public_bytes(pem) for c in svid.cert_chain)
        key = svid.private_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        bundle_obj = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        if bundle_obj is None:
            raise IdentityError(f"the Workload API sent no bundle for {svid.spiffe_id}")
        bundle = b"".join(c.public_bytes(pem) for c in bundle_obj.x509_authorities)
        mat = SvidMaterial(str(svid.spiffe_id), chain, key, bundle, _not_after(svid.leaf))
        with self._lock:
            changed = self._material is not None
            self._material = mat
        if changed:
            _log.info("X.509-SVID rotated: %s, valid until %s", mat.spiffe_id, mat.not_after)

    def material(self) -> SvidMaterial:
        with self._lock:
            assert self._material is not None
            return self._material

    def fetch_jwt_svid(self, audience: str) -> str:
        """A JWT-SVID for ``audience`` from the same Workload API."""
        return str(self._client.fetch_jwt_svid({audience}).token)

    def close(self) -> None:
        self._source.close()
        self._client.close()


JwtSvidProvider = Callable[[str], str]
"""Returns a JWT-SVID (compact JWS) for the given audience."""


def jwt_svid_from_file(path: str | os.PathLike[str]) -> JwtSvidProvider:
    """A provider that reads the token spiffe-helper writes (``jwt_svid_file_name``)."""

    def read(_audience: str) -> str:
        return Path(path).read_text().strip()

    return read


def _jwt_times(token: str) -> tuple[float, float]:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = float(claims["exp"])
        iat = float(claims.get("iat", time.time()))
    except (IndexError, ValueError, KeyError, TypeError) as e:
        raise IdentityError(f"the JWT-SVID is not a JWT with an exp claim: {e}") from e
    return iat, exp


class JwtSvidCache:
    """Caches a JWT-SVID until half its life has passed, then fetches a new one."""

    def __init__(self, provider: JwtSvidProvider, audience: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._provider = provider
        self._audience = audience
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def token(self) -> str:
        with self._lock:
            now = self._clock()
            if self._token is None or now >= self._refresh_at:
                token = self._provider(self._audience)
                iat, exp = _jwt_times(token)
                self._token = token
                self._refresh_at = iat + (exp - iat) / 2
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._token = None
