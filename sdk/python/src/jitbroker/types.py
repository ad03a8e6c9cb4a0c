"""Plain, immutable views of what the broker returns. Secrets live in :class:`Secret`, which
never shows its value in ``repr``, ``str``, f-strings or logs."""

from __future__ import annotations

import datetime as dt
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf.timestamp_pb2 import Timestamp

from .v1 import admin_pb2, broker_pb2, verifier_pb2

__all__ = [
    "Approval",
    "Credential",
    "Grant",
    "GrantDecision",
    "GrantLike",
    "Introspection",
    "Secret",
    "TaskInfo",
]


class Grant(NamedTuple):
    resource: str
    action: str


GrantLike = Grant | tuple[str, str]


def grants_of(grants: Iterable[GrantLike]) -> list[Grant]:
    out = []
    for g in grants:
        resource, action = g
        out.append(Grant(str(resource), str(action)))
    return out


def _pb_grants(grants: Iterable[GrantLike]) -> list[broker_pb2.Grant]:
    return [broker_pb2.Grant(resource=g.resource, action=g.action) for g in grants_of(grants)]


def _ts(t: Timestamp) -> dt.datetime | None:
    if t.seconds == 0 and t.nanos == 0:
        return None
    return dt.datetime.fromtimestamp(t.seconds + t.nanos / 1e9, tz=dt.timezone.utc)


class Secret:
    """A secret value that does not print itself. :meth:`reveal` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(
            other._value.encode(), self._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a jitbroker Secret cannot be pickled")

    def __len__(self) -> int:
        return len(self._value)


_DECISIONS = {
    broker_pb2.ALLOWED: "ALLOWED",
    broker_pb2.NEEDS_APPROVAL: "NEEDS_APPROVAL",
    broker_pb2.DENIED: "DENIED",
}
_STATES = {
    broker_pb2.ACTIVE: "ACTIVE",
    broker_pb2.COMPLETED: "COMPLETED",
    broker_pb2.EXPIRED: "EXPIRED",
    broker_pb2.REVOKED: "REVOKED",
}


@dataclass(frozen=True)
class GrantDecision:
    grant: Grant
    decision: str
    """``ALLOWED``, ``NEEDS_APPROVAL`` or ``DENIED``."""
    reason: str
    approval_id: str | None
    policy_ids: list[str]

    @classmethod
    def _from_pb(cls, g: broker_pb2.GrantDecision) -> GrantDecision:
        from .errors import parse_policy_ids

        return cls(
            grant=Grant(g.grant.resource, g.grant.action),
            decision=_DECISIONS.get(g.decision, "DECISION_UNSPECIFIED"),
            reason=g.reason,
            approval_id=g.approval_id or None,
            policy_ids=parse_policy_ids(g.reason),
        )


@dataclass(frozen=True)
class TaskInfo:
    task_id: str
    spiffe_id: str
    purpose: str
    grants: list[GrantDecision]
    labels: Mapping[str, str]
    state: str
    created_at: dt.datetime | None
    expires_at: dt.datetime | None
    parent_task_id: str | None
    delegation_chain: list[str]

    @classmethod
    def _from_pb(cls, t: broker_pb2.Task) -> TaskInfo:
        return cls(
            task_id=t.task_id,
            spiffe_id=t.spiffe_id,
            purpose=t.purpose,
            grants=[GrantDecision._from_pb(g) for g in t.grants],
            labels=dict(t.labels),
            state=_STATES.get(t.state, "TASK_STATE_UNSPECIFIED"),
            created_at=_ts(t.created_at),
            expires_at=_ts(t.expires_at),
            parent_task_id=t.parent_task_id or None,
            delegation_chain=list(t.delegation_chain),
        )

    def decision(self, resource: str, action: str) -> GrantDecision | None:
        for g in self.grants:
            if g.grant == (resource, action):
                return g
        return None


@dataclass(frozen=True, repr=False)
class Credential:
    """A credential of a task. ``secret`` is a :class:`Secret`: ``credential.secret.reveal()``."""

    credential_id: str
    task_id: str
    resource: str
    action: str
    kind: str
    secret: Secret
    issued_at: dt.datetime | None
    expires_at: dt.datetime | None
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def _from_pb(cls, c: broker_pb2.Credential) -> Credential:
        return cls(
            credential_id=c.credential_id,
            task_id=c.task_id,
            resource=c.resource,
            action=c.action,
            kind=c.kind,
            secret=Secret(c.secret),
            issued_at=_ts(c.issued_at),
            expires_at=_ts(c.expires_at),
            attributes=dict(c.attributes),
        )

    def __repr__(self) -> str:
        return (
            f"Credential(credential_id={self.credential_id!r}, resource={self.resource!r}, "
            f"action={self.action!r}, kind={self.kind!r}, secret=Secret('**********'), "
            f"expires_at={self.expires_at!r})"
        )

    __str__ = __repr__

    def seconds_left(self, now: float | None = None) -> float:
        if self.expires_at is None:
            return float("inf")
        return self.expires_at.timestamp() - (time.time() if now is None else now)

    def lifetime(self) -> float:
        if self.expires_at is None or self.issued_at is None:
            return float("inf")
        return (self.expires_at - self.issued_at).total_seconds()

    def authorization_header(self, scheme: str = "Bearer") -> dict[str, str]:
        """``{"Authorization": "Bearer <secret>"}``: for the HTTP request only, never a prompt."""
        return {"Authorization": f"{scheme} {self.secret.reveal()}"}


@dataclass(frozen=True)
class Introspection:
    """What the broker says about a presented credential. ``active`` is False for unknown,
    revoked and expired credentials alike, and the other fields are then empty."""

    active: bool
    credential_id: str | None = None
    spiffe_id: str | None = None
    task_id: str | None = None
    resource: str | None = None
    action: str | None = None
    expires_at: dt.datetime | None = None
    delegation_chain: Sequence[str] = ()

    @classmethod
    def _from_pb(cls, r: verifier_pb2.IntrospectResponse) -> Introspection:
        if not r.active:
            return cls(active=False)
        return cls(
            active=True,
            credential_id=r.credential_id,
            spiffe_id=r.spiffe_id,
            task_id=r.task_id,
            resource=r.resource,
            action=r.action,
            expires_at=_ts(r.expires_at),
            delegation_chain=tuple(r.delegation_chain),
        )


@dataclass(frozen=True)
class Approval:
    approval_id: str
    task_id: str
    requester: str
    grant: Grant
    purpose: str
    state: str
    created_at: dt.datetime | None
    expires_at: dt.datetime | None
    decided_by: str | None
    reason: str
    policy_ids: list[str]
    delegation_chain: list[str]

    @classmethod
    def _from_pb(cls, a: admin_pb2.Approval) -> Approval:
        return cls(
            approval_id=a.approval_id,
            task_id=a.task_id,
            requester=a.requester,
            grant=Grant(a.grant.resource, a.grant.action),
            purpose=a.purpose,
            state=a.state,
            created_at=_ts(a.created_at),
            expires_at=_ts(a.expires_at),
            decided_by=a.decided_by or None,
            reason=a.reason,
            policy_ids=list(a.policy_ids),
            delegation_chain=list(a.delegation_chain),
        )
