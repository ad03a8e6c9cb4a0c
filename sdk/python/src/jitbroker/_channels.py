"""gRPC channels that follow the SVID.

grpcio fixes a channel's client certificate when the channel is made, so a rotated SVID needs
a new channel. Before every call the pool asks the identity source for its material; when that
is a new object it builds a new channel (its own subchannel pool, so a fresh TLS handshake with
the new certificate), sends new calls there, and closes the old channel once its in-flight calls
are done and a grace period has passed. A call that fails because its channel was swapped under
it is retried on the new one; a rotation never fails a call.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from .errors import JitbrokerError, from_rpc_error
from .identity import IdentitySource, JwtSvidCache, SvidMaterial
from .v1 import admin_pb2_grpc, broker_pb2_grpc, verifier_pb2_grpc

_log = logging.getLogger("jitbroker")

T = TypeVar("T")

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent calls on transient failures (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``),
    with exponential backoff and full jitter. ``timeout`` is each attempt's deadline;
    ``total_timeout`` bounds all attempts together."""

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    timeout: float = 10.0
    total_timeout: float = 30.0

    def backoff(self, attempt: int) -> float:
        cap = min(self.max_backoff, self.initial_backoff * (2 ** (attempt - 1)))
        return random.uniform(0, cap)  # noqa: S311 - jitter, not a secret


def channel_options(server_name: str | None) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        # A fresh connection (and so a handshake with the new certificate) per channel: the
        # global subchannel pool would hand a new channel the old channel's connection.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def channel_credentials(m: SvidMaterial) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=m.bundle_pem,
        private_key=m.private_key_pem,
        certificate_chain=m.cert_chain_pem,
    )


EXPIRY_MARGIN = 30.0
"""Seconds before an SVID's expiry from which every call first asks the source for a new one."""


def current_material(source: IdentitySource, state: dict[str, float]) -> SvidMaterial:
    """The source's material; close to expiry, after asking the source to look again now, and
    with a warning (at most every 30 s) when nothing newer has come."""
    m = source.material()
    if m.not_after is None:
        return m
    left = m.not_after.timestamp() - time.time()
    if left > EXPIRY_MARGIN:
        return m
    refresh = getattr(source, "refresh", None)
    if callable(refresh):
        refresh()
        m = source.material()
        if m.not_after is not None:
            left = m.not_after.timestamp() - time.time()
    now = time.monotonic()
    if left <= EXPIRY_MARGIN and now - state.get("warned", -1e9) > 30:
        state["warned"] = now
        _log.warning(
            "the SVID of %s %s at %s and no new one has arrived; is the SPIRE agent (or "
            "spiffe-helper) running and rotating it?", m.spiffe_id,
            "expired" if left <= 0 else "expires", m.not_after)
    return m


class _Slot:
    """One channel, the material it was built from, and its calls in flight."""

    def __init__(self, generation: int, material: SvidMaterial, channel: Any) -> None:
        self.generation = generation
        self.material = material
        self.channel = channel
        self.inflight = 0
        self.retired = False
        self.closed = False
        self.broker = broker_pb2_grpc.BrokerStub(channel)
        self.verifier = verifier_pb2_grpc.VerifierStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)


class ChannelPool:
    """The sync pool: one live channel, retired ones closed after their calls and ``grace``."""

    def __init__(self, target: str, source: IdentitySource, *, server_name: str | None = None,
                 grace: float = 5.0) -> None:
        self.target = target
        self.source = source
        self.server_name = server_name
        self.grace = grace
        self._lock = threading.Lock()
        self._generation = 0
        self._current: _Slot | None = None
        self._retired: list[_Slot] = []
        self._closed = False
        self._expiry_state: dict[str, float] = {}
        self.swaps = 0

    @property
    def generation(self) -> int:
        return self._generation

    def _build(self, m: SvidMaterial) -> _Slot:
        self._generation += 1
        ch = grpc.secure_channel(self.target, channel_credentials(m),
                                 options=channel_options(self.server_name))
        return _Slot(self._generation, m, ch)

    def acquire(self) -> _Slot:
        m = current_material(self.source, self._expiry_state)
        with self._lock:
            if self._closed:
                raise JitbrokerError("this client is closed")
            cur = self._current
            if cur is None or cur.material is not m:
                new = self._build(m)
                if cur is not None:
                    self.swaps += 1
                    _log.info("identity rotated (%s): new channel to %s", m.spiffe_id, self.target)
                    self._retire(cur)
                self._current = cur = new
            cur.inflight += 1
            return cur

    def _retire(self, slot: _Slot) -> None:
        slot.retired = True
        self._retired.append(slot)
        if slot.inflight == 0:
            self._close_later(slot)

    def _close_later(self, slot: _Slot) -> None:
        t = threading.Timer(self.grace, self._close_slot, args=(slot,))
        t.daemon = True
        t.start()

    def _close_slot(self, slot: _Slot) -> None:
        with self._lock:
            if slot.closed or slot.inflight:
                return
            slot.closed = True
            if slot in self._retired:
                self._retired.remove(slot)
        slot.channel.close()

    def release(self, slot: _Slot) -> None:
        with self._lock:
            slot.inflight -= 1
            done = slot.retired and slot.inflight == 0 and not slot.closed
        if done:
            self._close_later(slot)

    def live_channels(self) -> int:
        with self._lock:
            return (1 if self._current else 0) + len([s for s in self._retired if not s.closed])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            slots = ([self._current] if self._current else []) + self._retired
            self._current = None
            self._retired = []
        for s in slots:
            s.closed = True
            s.channel.close()


class Transport:
    """Runs one RPC with a deadline, retries, JWT-SVID metadata and error mapping."""

    def __init__(self, pool: ChannelPool, *, retry: RetryPolicy,
                 jwt: JwtSvidCache | None = None) -> None:
        self.pool = pool
        self.retry = retry
        self.jwt = jwt

    def who(self) -> str | None:
        try:
            return self.pool.source.material().spiffe_id
        except JitbrokerError:
            return None

    def call(self, pick: Callable[[_Slot], Any], request: Any, *, idempotent: bool,
             timeout: float | None = None) -> Any:
        policy = self.retry
        per_attempt = timeout if timeout is not None else policy.timeout
        deadline = time.monotonic() + max(policy.total_timeout, per_attempt)
        attempt = 0
        jwt_retried = False
        while True:
            attempt += 1
            md = None
            if self.jwt is not None:
                md = (("authorization", f"Bearer {self.jwt.token()}"),)
            slot = self.pool.acquire()
            try:
                left = deadline - time.monotonic()
                return pick(slot)(request, timeout=max(0.05, min(per_attempt, left)),
                                  metadata=md)
            except grpc.RpcError as e:
                code = e.code()
                swapped = self.pool.generation != slot.generation
                # A call that raced a rotation goes again on the new channel.
                # Only when it cannot have been served twice: an idempotent call, or one the
                # broker refused before serving it.
                if swapped and attempt < 10 and (
                        code == grpc.StatusCode.UNAUTHENTICATED
                        or (idempotent and code in (grpc.StatusCode.UNAVAILABLE,
                                                    grpc.StatusCode.CANCELLED))):
                    continue
                if (code == grpc.StatusCode.UNAUTHENTICATED and self.jwt is not None
                        and not jwt_retried):
                    jwt_retried = True
                    self.jwt.invalidate()
                    continue
                err = from_rpc_error(e, who=self.who(), target=self.pool.target)
                if (idempotent and code in TRANSIENT and attempt < policy.attempts):
                    pause = policy.backoff(attempt)
                    if time.monotonic() + pause < deadline:
                        _log.debug("transient %s, retry %d in %.2fs", code.name, attempt, pause)
                        time.sleep(pause)
                        continue
                raise err from None
            finally:
                self.pool.release(slot)
