"""Typed errors, mapped once from the broker's gRPC status codes (see the README's "Status codes").

Every error says what to check. None carries a secret: the broker never puts one in a status
message, and the SDK never adds one.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from .types import Credential

__all__ = [
    "ApprovalDenied",
    "ApprovalPending",
    "BrokerUnavailable",
    "FailedPrecondition",
    "IdentityError",
    "InvalidArgument",
    "JitbrokerError",
    "NoCredentialInScope",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "TaskNotActive",
    "Unauthenticated",
    "from_rpc_error",
]


class JitbrokerError(Exception):
    """Base of every error the SDK raises."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class IdentityError(JitbrokerError):
    """The caller's own SVID could not be loaded (files, Workload API)."""


class Unauthenticated(JitbrokerError):
    """The broker did not accept the caller's identity."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(JitbrokerError):
    """Policy said no, or the caller is not a verifier/operator, or it is blocked.

    ``policy_ids`` names the deciding Cedar policies (empty for a default deny)."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, *, policy_ids: list[str] | None = None,
                 code: grpc.StatusCode | None = None) -> None:
        super().__init__(message, code=code)
        self.policy_ids = policy_ids if policy_ids is not None else parse_policy_ids(message)


class NotFound(JitbrokerError):
    """The task or credential is unknown, or not the caller's (the broker does not tell which)."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(JitbrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class TaskNotActive(FailedPrecondition):
    """The task was completed, expired or revoked."""


class ApprovalPending(FailedPrecondition):
    """The grant needs a human's approval first (``approval_id``); see :meth:`wait_for_approval`."""

    def __init__(self, message: str, *, approval_id: str, policy_ids: list[str] | None = None,
                 code: grpc.StatusCode | None = None) -> None:
        super().__init__(message, code=code)
        self.approval_id = approval_id
        self.policy_ids = policy_ids if policy_ids is not None else parse_policy_ids(message)
        # Set by the task that asked: retries the same issuance.
        self._retry: Callable[[], Credential] | None = None
        self._aretry: Callable[[], Awaitable[Credential]] | None = None

    def wait_for_approval(self, timeout: float = 300.0, poll_interval: float = 1.0) -> Credential:
        """Asks again (every ``poll_interval``, backing off to 5 s) until an approver approves
        (returns the credential), denies (:class:`ApprovalDenied`) or ``timeout`` seconds pass
        (this error again)."""
        if self._retry is None:
            raise RuntimeError("this ApprovalPending was not raised by Task.credential")
        from ._sync import wait_for_approval

        return wait_for_approval(self, self._retry, timeout, poll_interval)

    async def await_approval(self, timeout: float = 300.0,
                             poll_interval: float = 1.0) -> Credential:
        """The asyncio form of :meth:`wait_for_approval`."""
        if self._aretry is None:
            raise RuntimeError("this ApprovalPending was not raised by AsyncTask.credential")
        from ._async import await_approval

        return await await_approval(self, self._aretry, timeout, poll_interval)


class ApprovalDenied(PermissionDenied):
    """An approver denied the request (or it lapsed) while we waited."""


class InvalidArgument(JitbrokerError):
    """Malformed input; ``field`` is the request field the broker named."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message, code=code)
        self.field = message.split(":", 1)[0] if ":" in message else None


class QuotaExceeded(JitbrokerError):
    """A quota: active tasks per identity, or credentials per task."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BrokerUnavailable(JitbrokerError):
    """The broker could not be reached (or did not answer in time) after every retry."""


class NoCredentialInScope(JitbrokerError):
    """:func:`jitbroker.credential` was called outside a tool call that was given that grant."""


_POLICY_RE = re.compile(r"by polic(?:y|ies) ([A-Za-z0-9_.:\-]+(?:, [A-Za-z0-9_.:\-]+)*)")
_APPROVAL_RE = re.compile(r"approval_id=([A-Za-z0-9_\-]+)")


def parse_policy_ids(message: str) -> list[str]:
    """The Cedar policy ids a broker message names ("… by policy a, b")."""
    out: list[str] = []
    for m in _POLICY_RE.finditer(message):
        out.extend(p for p in m.group(1).split(", ") if p not in out)
    return out


def _unauthenticated_hint(detail: str, who: str | None) -> str:
    me = f" (this client is {who})" if who else ""
    return (
        f"the broker refused this caller's identity{me}: {detail}. Check that the SVID is "
        "current (not expired), that its trust domain is in the broker's "
        "authorized_trust_domains and its bundle is the one the broker trusts, and, for a "
        "JWT-SVID, that its audience is the broker's identity.jwt_audience"
    )


def from_rpc_error(err: grpc.RpcError, *, who: str | None = None,
                   target: str | None = None) -> JitbrokerError:
    """Maps one gRPC failure to its typed error."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail: str = (err.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(_unauthenticated_hint(detail, who), code=code)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(detail, code=code)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(detail, code=code)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        m = _APPROVAL_RE.search(detail)
        if m:
            return ApprovalPending(detail, approval_id=m.group(1), code=code)
        if re.search(r"\bis (COMPLETED|EXPIRED|REVOKED)\b|no longer active", detail):
            return TaskNotActive(detail, code=code)
        return FailedPrecondition(detail, code=code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(detail, code=code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return QuotaExceeded(detail, code=code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        where = f" at {target}" if target else ""
        me = f" ({who})" if who else ""
        if "CERTIFICATE_VERIFY_FAILED" in detail or "Tls handshake failed" in detail:
            return BrokerUnavailable(
                f"TLS handshake with the broker{where} failed ({detail}); check that this "
                "client's trust bundle holds the CA of the broker's trust domain and that the "
                "address (or server_name) is a DNS or IP SAN of the broker's certificate",
                code=code,
            )
        if "TSI_DATA_CORRUPTED" in detail or "CERTIFICATE_EXPIRED" in detail:
            return Unauthenticated(_unauthenticated_hint(
                f"the TLS session was refused after the handshake ({detail}); the broker "
                f"rejected this client's certificate{me}", None), code=code)
        return BrokerUnavailable(
            f"the broker{where} did not answer ({code.name}: {detail}); is it running, and does "
            "its certificate carry this address as a DNS or IP SAN (or set server_name)?",
            code=code,
        )
    return JitbrokerError(f"{code.name}: {detail}", code=code)
