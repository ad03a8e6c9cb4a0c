"""The blocking client: :class:`Broker`, :class:`Task`, :class:`Verifier`, :class:`Admin`."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from . import context as _ctx
from ._channels import ChannelPool, RetryPolicy, Transport
from ._common import (
    CredentialCache,
    DeliveryBoard,
    denied_error,
    jwt_verify,
    parse_jwks,
    source_from_env,
)
from .errors import (
    ApprovalDenied,
    ApprovalPending,
    JitbrokerError,
    PermissionDenied,
    TaskNotActive,
)
from .identity import FilesSource, IdentitySource, JwtSvidCache, JwtSvidProvider
from .types import (
    Approval,
    Credential,
    Grant,
    GrantLike,
    Introspection,
    TaskInfo,
    _pb_grants,
    grants_of,
)
from .v1 import admin_pb2, broker_pb2, verifier_pb2

_log = logging.getLogger("jitbroker")

__all__ = ["Admin", "Broker", "Task", "TaskScope", "Verifier"]


class _Client:
    def __init__(
        self,
        target: str,
        source: IdentitySource,
        *,
        jwt_svid: JwtSvidProvider | None = None,
        jwt_audience: str = "jitbroker",
        server_name: str | None = None,
        retry: RetryPolicy | None = None,
        rotation_grace: float = 5.0,
    ) -> None:
        self.target = target
        self.source = source
        pool = ChannelPool(target, source, server_name=server_name, grace=rotation_grace)
        jwt = JwtSvidCache(jwt_svid, jwt_audience) if jwt_svid is not None else None
        self._t = Transport(pool, retry=retry or RetryPolicy(), jwt=jwt)

    @property
    def spiffe_id(self) -> str | None:
        return self.source.material().spiffe_id

    def close(self) -> None:
        self._t.pool.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Broker(_Client):
    """An agent's connection to the broker.

    ``target`` is ``host:port``; ``source`` an :class:`~jitbroker.identity.IdentitySource`
    (files, the Workload API, or a bundle alone with ``jwt_svid``). Every call has a deadline
    (``retry.timeout``); calls that are safe to repeat are retried on transient failures, with
    idempotency keys where the broker takes them.
    """

    @classmethod
    def from_env(cls, **kw: Any) -> Broker:
        """``JITBROKER_ADDR`` (default ``localhost:8443``) and the identity from
        ``JITBROKER_SVID_DIR`` (files) or else ``SPIFFE_ENDPOINT_SOCKET`` (Workload API)."""
        return cls(os.environ.get("JITBROKER_ADDR", "localhost:8443"), source_from_env(), **kw)

    @classmethod
    def from_files(cls, target: str, directory: str | os.PathLike[str], **kw: Any) -> Broker:
        return cls(target, FilesSource(directory), **kw)

    def task(
        self,
        purpose: str,
        grants: Iterable[GrantLike],
        ttl: int | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        strict: bool = True,
    ) -> TaskScope:
        """``with broker.task(purpose, grants, ttl) as task:`` starts a task and completes it
        when the block ends, however it ends. With ``strict`` (the default) a grant that policy
        DENIED at start ends the task at once and raises :class:`PermissionDenied`."""
        return TaskScope(self, purpose, grants_of(grants), ttl, labels or {}, strict)

    def start_task(
        self,
        purpose: str,
        grants: Iterable[GrantLike],
        ttl: int | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Starts a task without a ``with`` block: call :meth:`Task.complete` yourself."""
        req = broker_pb2.StartTaskRequest(
            purpose=purpose,
            grants=_pb_grants(grants),
            ttl_seconds=ttl or 0,
            labels=dict(labels or {}),
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        info = TaskInfo._from_pb(self._t.call(lambda s: s.broker.StartTask, req, idempotent=True))
        return Task(self, info)

    def attach(self, task_id: str) -> Task:
        """A task started elsewhere (e.g. one delegated to this identity)."""
        return Task(self, self.get_task(task_id))

    def get_task(self, task_id: str) -> TaskInfo:
        req = broker_pb2.GetTaskRequest(task_id=task_id)
        return TaskInfo._from_pb(self._t.call(lambda s: s.broker.GetTask, req, idempotent=True))


class Task:
    """One active task of this identity: credentials, delegation, completion."""

    def __init__(self, broker: Broker, info: TaskInfo, *, renew_fraction: float = 0.25) -> None:
        self._broker = broker
        self.info = info
        self._cache = CredentialCache(renew_fraction)
        self._locks: dict[tuple[Grant, int | None], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._delivered = DeliveryBoard()
        self.completed = False

    @property
    def task_id(self) -> str:
        return self.info.task_id

    def __repr__(self) -> str:
        return f"Task({self.task_id!r}, purpose={self.info.purpose!r}, state={self.info.state})"

    def _lock(self, key: tuple[Grant, int | None]) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def credential(self, resource: str, action: str, ttl: int | None = None, *,
                   fresh: bool = False) -> Credential:
        """A credential for (resource, action): the cached one while it has life left, a new
        one shortly before it expires. Raises :class:`ApprovalPending` (with
        ``wait_for_approval``) when an approver must say yes first."""
        grant = Grant(resource, action)
        key = (grant, ttl)
        with self._lock(key):
            if not fresh:
                hit = self._cache.get(key)
                if hit is not None:
                    return hit
            cred = self._issue(grant, ttl)
            self._cache.put(key, cred)
            return cred

    def _issue(self, grant: Grant, ttl: int | None) -> Credential:
        req = broker_pb2.IssueCredentialRequest(
            task_id=self.task_id, resource=grant.resource, action=grant.action,
            ttl_seconds=ttl or 0, idempotency_key=uuid.uuid4().hex,
        )
        try:
            pb = self._broker._t.call(lambda s: s.broker.IssueCredential, req, idempotent=True)
        except ApprovalPending as e:
            e._retry = lambda: self.credential(grant.resource, grant.action, ttl, fresh=True)
            raise
        return Credential._from_pb(pb)

    def revoke(self, credential: Credential) -> None:
        """Revokes one credential of this task now."""
        req = broker_pb2.RevokeCredentialRequest(credential_id=credential.credential_id)
        self._broker._t.call(lambda s: s.broker.RevokeCredential, req, idempotent=True)
        self._cache.drop(credential.credential_id)

    def delegate(self, spiffe_id: str, grants: Iterable[GrantLike], ttl: int | None = None, *,
                 purpose: str | None = None) -> TaskInfo:
        """Hands ``spiffe_id`` a subset of this task's allowed grants, for at most ``ttl``
        seconds (never longer than this task has left). It ends when this task ends."""
        req = broker_pb2.DelegateTaskRequest(
            parent_task_id=self.task_id, delegate_spiffe_id=spiffe_id,
            purpose=purpose or self.info.purpose, grants=_pb_grants(grants),
            ttl_seconds=ttl or 0,
        )
        # Not retried: the broker takes no idempotency key for delegation yet, and a repeat
        # would hand out a second delegated task.
        return TaskInfo._from_pb(
            self._broker._t.call(lambda s: s.broker.DelegateTask, req, idempotent=False))

    def refresh(self) -> TaskInfo:
        self.info = self._broker.get_task(self.task_id)
        return self.info

    def complete(self) -> list[str]:
        """Ends the task; the broker revokes its credentials and its delegates'. Returns the
        revoked credential ids. Completing a task that already ended is not an error."""
        req = broker_pb2.CompleteTaskRequest(task_id=self.task_id)
        try:
            resp = self._broker._t.call(lambda s: s.broker.CompleteTask, req, idempotent=True)
        except TaskNotActive:
            self.completed = True
            return []
        self.completed = True
        self._cache.clear()
        return list(resp.revoked_credential_ids)


class TaskScope:
    """The ``with`` block of :meth:`Broker.task`."""

    def __init__(self, broker: Broker, purpose: str, grants: list[Grant], ttl: int | None,
                 labels: Mapping[str, str], strict: bool) -> None:
        self._broker = broker
        self._args = (purpose, grants, ttl, labels)
        self._strict = strict
        self._task: Task | None = None
        self._token: Any = None

    def __enter__(self) -> Task:
        purpose, grants, ttl, labels = self._args
        task = self._broker.start_task(purpose, grants, ttl, labels=labels)
        self._task = task
        if self._strict:
            denied = [g for g in task.info.grants if g.decision == "DENIED"]
            if denied:
                self._safe_complete(None)
                raise denied_error(task.task_id, denied)
        self._token = _ctx._current_task.set(task)
        return task

    def _safe_complete(self, exc: BaseException | None) -> None:
        assert self._task is not None
        try:
            self._task.complete()
        except JitbrokerError as e:
            if exc is None:
                raise
            _log.warning("could not complete task %s (%s); it expires at %s", self._task.task_id,
                         e, self._task.info.expires_at)

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._token is not None:
            _ctx._current_task.reset(self._token)
            self._token = None
        self._safe_complete(exc)


def wait_for_approval(pending: ApprovalPending, retry: Callable[[], Credential],
                      timeout: float, poll_interval: float) -> Credential:
    end = time.monotonic() + timeout
    # Each poll is a policy decision in the broker's audit trail: back off to at most 5 s.
    pause = poll_interval
    while True:
        try:
            return retry()
        except ApprovalPending as again:
            if again.approval_id != pending.approval_id:
                # Ours was decided without being used (denied, or it lapsed): a new request
                # started. Waiting on would wait for a decision nobody was asked for.
                raise ApprovalDenied(
                    f"approval {pending.approval_id} was denied or lapsed; the broker opened "
                    f"{again.approval_id} for the next attempt", policy_ids=again.policy_ids
                ) from None
            if time.monotonic() + pause > end:
                raise again from None
        except PermissionDenied as e:
            raise ApprovalDenied(f"approval {pending.approval_id} was not granted: {e.message}",
                                 policy_ids=e.policy_ids) from None
        time.sleep(pause)
        pause = min(pause * 1.5, max(poll_interval, 5.0))


class Verifier(_Client):
    """The tool side: is this credential active, and offline JWT checks."""

    def __init__(self, target: str, source: IdentitySource, **kw: Any) -> None:
        super().__init__(target, source, **kw)
        self._jwks_lock = threading.Lock()
        self._jwks: dict[str, Any] = {}
        self._jwks_at = 0.0

    @classmethod
    def from_files(cls, target: str, directory: str | os.PathLike[str], **kw: Any) -> Verifier:
        return cls(target, FilesSource(directory), **kw)

    def introspect(self, secret: Any, resource: str) -> Introspection:
        """``secret`` is the presented token (a ``str`` or a :class:`Secret`)."""
        value = secret.reveal() if hasattr(secret, "reveal") else str(secret)
        req = verifier_pb2.IntrospectRequest(secret=value, resource=resource)
        return Introspection._from_pb(
            self._t.call(lambda s: s.verifier.Introspect, req, idempotent=True))

    def jwks_json(self) -> str:
        resp = self._t.call(lambda s: s.verifier.GetJwks, verifier_pb2.GetJwksRequest(),
                            idempotent=True)
        return str(resp.jwks_json)

    def x509_authorities_pem(self) -> str:
        resp = self._t.call(lambda s: s.verifier.GetX509Authorities,
                            verifier_pb2.GetX509AuthoritiesRequest(), idempotent=True)
        return str(resp.pem)

    def _key(self, kid: str, min_refresh: float) -> Any:
        with self._jwks_lock:
            if kid not in self._jwks and time.monotonic() - self._jwks_at >= min_refresh:
                self._jwks = parse_jwks(self.jwks_json())
                self._jwks_at = time.monotonic()
            return self._jwks.get(kid)

    def verify_jwt(self, token: Any, resource: str, *, issuer: str | None = None,
                   leeway: float = 5.0, min_refresh: float = 5.0) -> dict[str, Any]:
        """Checks a JWT credential offline (signature, ``exp``, ``aud`` = resource) with keys
        from ``GetJwks``, cached, fetched again when a token names an unknown ``kid``. Offline
        checks cannot see a revocation before ``exp``: call :meth:`introspect` for that."""
        value = token.reveal() if hasattr(token, "reveal") else str(token)
        return jwt_verify(value, resource, lambda kid: self._key(kid, min_refresh),
                          issuer=issuer, leeway=leeway)


class Admin(_Client):
    """Operator calls (the caller's SPIFFE ID must be in ``admin_ids``/``approver_ids``)."""

    def list_approvals(self, state: str = "") -> list[Approval]:
        resp = self._t.call(lambda s: s.admin.ListApprovals,
                            admin_pb2.ListApprovalsRequest(state=state), idempotent=True)
        return [Approval._from_pb(a) for a in resp.approvals]

    def approve(self, approval_id: str, reason: str) -> Approval:
        req = admin_pb2.ApproveRequest(approval_id=approval_id, reason=reason)
        return Approval._from_pb(self._t.call(lambda s: s.admin.Approve, req, idempotent=False))

    def deny(self, approval_id: str, reason: str) -> Approval:
        req = admin_pb2.DenyRequest(approval_id=approval_id, reason=reason)
        return Approval._from_pb(self._t.call(lambda s: s.admin.Deny, req, idempotent=False))

    def status(self) -> admin_pb2.StatusResponse:
        return self._t.call(lambda s: s.admin.Status, admin_pb2.StatusRequest(),  # type: ignore[no-any-return]
                            idempotent=True)

    def verify_audit(self) -> admin_pb2.VerifyAuditResponse:
        return self._t.call(lambda s: s.admin.VerifyAudit,  # type: ignore[no-any-return]
                            admin_pb2.VerifyAuditRequest(), idempotent=True)

    def list_tasks(self, spiffe_id: str = "", state: str = "") -> list[TaskInfo]:
        """Every task (all pages), optionally of one owner and in one state (e.g. ``ACTIVE``)."""
        st = broker_pb2.TaskState.Value(state) if state else broker_pb2.TASK_STATE_UNSPECIFIED
        out: list[TaskInfo] = []
        token = ""
        while True:
            req = admin_pb2.ListTasksRequest(spiffe_id=spiffe_id, state=st, page_size=500,
                                             page_token=token)
            resp = self._t.call(lambda s: s.admin.ListTasks, req, idempotent=True)
            out.extend(TaskInfo._from_pb(t) for t in resp.tasks)
            token = resp.next_page_token
            if not token:
                return out

    def revoke_task(self, task_id: str, reason: str) -> list[str]:
        req = admin_pb2.RevokeTaskRequest(task_id=task_id, reason=reason)
        resp = self._t.call(lambda s: s.admin.RevokeTask, req, idempotent=True)
        return list(resp.revoked_credential_ids)
