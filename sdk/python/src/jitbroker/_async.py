"""The asyncio client, the same shape as the blocking one: ``async with broker.task(...)``."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from . import context as _ctx
from ._channels import (
    TRANSIENT,
    RetryPolicy,
    _Slot,
    channel_credentials,
    channel_options,
    current_material,
)
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
    from_rpc_error,
)
from .identity import FilesSource, IdentitySource, JwtSvidCache, JwtSvidProvider, SvidMaterial
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

__all__ = ["AsyncAdmin", "AsyncBroker", "AsyncTask", "AsyncTaskScope", "AsyncVerifier"]

# Completions started on cancellation run to the end even if nobody awaits them any more.
_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    t = asyncio.ensure_future(coro)
    _background.add(t)
    t.add_done_callback(_background.discard)
    return t


class AsyncChannelPool:
    """The asyncio form of :class:`jitbroker._channels.ChannelPool` (one event loop)."""

    def __init__(self, target: str, source: IdentitySource, *, server_name: str | None = None,
                 grace: float = 5.0) -> None:
        self.target = target
        self.source = source
        self.server_name = server_name
        self.grace = grace
        self._generation = 0
        self._current: _Slot | None = None
        self._retired: list[_Slot] = []
        self._closed = False
        self._expiry_state: dict[str, float] = {}
        self.swaps = 0

    @property
    def generation(self) -> int:
        return self._generation

    def acquire(self) -> _Slot:
        m: SvidMaterial = current_material(self.source, self._expiry_state)
        if self._closed:
            raise JitbrokerError("this client is closed")
        cur = self._current
        if cur is None or cur.material is not m:
            self._generation += 1
            ch = grpc.aio.secure_channel(self.target, channel_credentials(m),
                                         options=channel_options(self.server_name))
            new = _Slot(self._generation, m, ch)
            if cur is not None:
                self.swaps += 1
                _log.info("identity rotated (%s): new channel to %s", m.spiffe_id, self.target)
                cur.retired = True
                self._retired.append(cur)
                if cur.inflight == 0:
                    self._close_later(cur)
            self._current = cur = new
        cur.inflight += 1
        return cur

    def _close_later(self, slot: _Slot) -> None:
        async def close() -> None:
            await asyncio.sleep(self.grace)
            if slot.closed or slot.inflight:
                return
            slot.closed = True
            if slot in self._retired:
                self._retired.remove(slot)
            await slot.channel.close()

        _spawn(close())

    def release(self, slot: _Slot) -> None:
        slot.inflight -= 1
        if slot.retired and slot.inflight == 0 and not slot.closed:
            self._close_later(slot)

    def live_channels(self) -> int:
        return (1 if self._current else 0) + len([s for s in self._retired if not s.closed])

    async def close(self) -> None:
        self._closed = True
        slots = ([self._current] if self._current else []) + self._retired
        self._current = None
        self._retired = []
        for s in slots:
            s.closed = True
            await s.channel.close()


class AsyncTransport:
    def __init__(self, pool: AsyncChannelPool, *, retry: RetryPolicy,
                 jwt: JwtSvidCache | None = None) -> None:
        self.pool = pool
        self.retry = retry
        self.jwt = jwt

    def who(self) -> str | None:
        try:
            return self.pool.source.material().spiffe_id
        except JitbrokerError:
            return None

    async def call(self, pick: Callable[[_Slot], Any], request: Any, *, idempotent: bool,
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
                # The token cache may call a provider that blocks (a file, the Workload API).
                token = await asyncio.to_thread(self.jwt.token)
                md = (("authorization", f"Bearer {token}"),)
            slot = self.pool.acquire()
            try:
                left = deadline - time.monotonic()
                return await pick(slot)(request, timeout=max(0.05, min(per_attempt, left)),
                                        metadata=md)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                swapped = self.pool.generation != slot.generation
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
                if idempotent and code in TRANSIENT and attempt < policy.attempts:
                    pause = policy.backoff(attempt)
                    if time.monotonic() + pause < deadline:
                        await asyncio.sleep(pause)
                        continue
                raise err from None
            finally:
                self.pool.release(slot)


class _AsyncClient:
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
        pool = AsyncChannelPool(target, source, server_name=server_name, grace=rotation_grace)
        jwt = JwtSvidCache(jwt_svid, jwt_audience) if jwt_svid is not None else None
        self._t = AsyncTransport(pool, retry=retry or RetryPolicy(), jwt=jwt)

    @property
    def spiffe_id(self) -> str | None:
        return self.source.material().spiffe_id

    async def close(self) -> None:
        await self._t.pool.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncBroker(_AsyncClient):
    """The asyncio form of :class:`jitbroker.Broker`."""

    @classmethod
    def from_env(cls, **kw: Any) -> AsyncBroker:
        return cls(os.environ.get("JITBROKER_ADDR", "localhost:8443"), source_from_env(), **kw)

    @classmethod
    def from_files(cls, target: str, directory: str | os.PathLike[str],
                   **kw: Any) -> AsyncBroker:
        return cls(target, FilesSource(directory), **kw)

    def task(self, purpose: str, grants: Iterable[GrantLike], ttl: int | None = None, *,
             labels: Mapping[str, str] | None = None, strict: bool = True) -> AsyncTaskScope:
        """``async with broker.task(...) as task:``; completed on exit, on an exception and on
        cancellation alike (the completion is shielded and finishes even if the block's task
        is cancelled again)."""
        return AsyncTaskScope(self, purpose, grants_of(grants), ttl, labels or {}, strict)

    async def start_task(self, purpose: str, grants: Iterable[GrantLike], ttl: int | None = None,
                         *, labels: Mapping[str, str] | None = None,
                         idempotency_key: str | None = None) -> AsyncTask:
        req = broker_pb2.StartTaskRequest(
            purpose=purpose, grants=_pb_grants(grants), ttl_seconds=ttl or 0,
            labels=dict(labels or {}), idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        pb = await self._t.call(lambda s: s.broker.StartTask, req, idempotent=True)
        return AsyncTask(self, TaskInfo._from_pb(pb))

    async def attach(self, task_id: str) -> AsyncTask:
        return AsyncTask(self, await self.get_task(task_id))

    async def get_task(self, task_id: str) -> TaskInfo:
        req = broker_pb2.GetTaskRequest(task_id=task_id)
        return TaskInfo._from_pb(
            await self._t.call(lambda s: s.broker.GetTask, req, idempotent=True))


class AsyncTask:
    """The asyncio form of :class:`jitbroker.Task`."""

    def __init__(self, broker: AsyncBroker, info: TaskInfo, *,
                 renew_fraction: float = 0.25) -> None:
        self._broker = broker
        self.info = info
        self._cache = CredentialCache(renew_fraction)
        self._locks: dict[tuple[Grant, int | None], asyncio.Lock] = {}
        self._delivered = DeliveryBoard()
        self.completed = False

    @property
    def task_id(self) -> str:
        return self.info.task_id

    def __repr__(self) -> str:
        return (f"AsyncTask({self.task_id!r}, purpose={self.info.purpose!r}, "
                f"state={self.info.state})")

    async def credential(self, resource: str, action: str, ttl: int | None = None, *,
                         fresh: bool = False) -> Credential:
        grant = Grant(resource, action)
        key = (grant, ttl)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if not fresh:
                hit = self._cache.get(key)
                if hit is not None:
                    return hit
            req = broker_pb2.IssueCredentialRequest(
                task_id=self.task_id, resource=resource, action=action, ttl_seconds=ttl or 0,
                idempotency_key=uuid.uuid4().hex,
            )
            try:
                pb = await self._broker._t.call(lambda s: s.broker.IssueCredential, req,
                                                idempotent=True)
            except ApprovalPending as e:
                e._aretry = lambda: self.credential(resource, action, ttl, fresh=True)
                raise
            cred = Credential._from_pb(pb)
            self._cache.put(key, cred)
            return cred

    async def revoke(self, credential: Credential) -> None:
        req = broker_pb2.RevokeCredentialRequest(credential_id=credential.credential_id)
        await self._broker._t.call(lambda s: s.broker.RevokeCredential, req, idempotent=True)
        self._cache.drop(credential.credential_id)

    async def delegate(self, spiffe_id: str, grants: Iterable[GrantLike], ttl: int | None = None,
                       *, purpose: str | None = None) -> TaskInfo:
        req = broker_pb2.DelegateTaskRequest(
            parent_task_id=self.task_id, delegate_spiffe_id=spiffe_id,
            purpose=purpose or self.info.purpose, grants=_pb_grants(grants),
            ttl_seconds=ttl or 0,
        )
        return TaskInfo._from_pb(
            await self._broker._t.call(lambda s: s.broker.DelegateTask, req, idempotent=False))

    async def refresh(self) -> TaskInfo:
        self.info = await self._broker.get_task(self.task_id)
        return self.info

    async def complete(self) -> list[str]:
        req = broker_pb2.CompleteTaskRequest(task_id=self.task_id)
        try:
            resp = await self._broker._t.call(lambda s: s.broker.CompleteTask, req,
                                              idempotent=True)
        except TaskNotActive:
            self.completed = True
            return []
        self.completed = True
        self._cache.clear()
        return list(resp.revoked_credential_ids)


class AsyncTaskScope:
    def __init__(self, broker: AsyncBroker, purpose: str, grants: list[Grant], ttl: int | None,
                 labels: Mapping[str, str], strict: bool) -> None:
        self._broker = broker
        self._args = (purpose, grants, ttl, labels)
        self._strict = strict
        self._task: AsyncTask | None = None
        self._token: Any = None

    async def __aenter__(self) -> AsyncTask:
        purpose, grants, ttl, labels = self._args
        key = uuid.uuid4().hex
        start = _spawn(self._broker.start_task(purpose, grants, ttl, labels=labels,
                                               idempotency_key=key))
        try:
            task: AsyncTask = await asyncio.shield(start)
        except asyncio.CancelledError:
            # Cancelled while the broker may already have started the task: let the start
            # finish (the idempotency key makes a retry return the same task) and end it.
            _spawn(self._complete_when_started(start))
            raise
        self._task = task
        if self._strict:
            denied = [g for g in task.info.grants if g.decision == "DENIED"]
            if denied:
                await self._complete(None)
                raise denied_error(task.task_id, denied)
        self._token = _ctx._current_task.set(task)
        return task

    @staticmethod
    async def _complete_when_started(start: asyncio.Task[AsyncTask]) -> None:
        try:
            task = await start
        except (JitbrokerError, asyncio.CancelledError):
            return
        try:
            await task.complete()
        except JitbrokerError as e:
            _log.warning("could not complete task %s after cancellation: %s", task.task_id, e)

    async def _complete(self, exc: BaseException | None) -> None:
        assert self._task is not None
        task = self._task
        done = _spawn(task.complete())
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # Cancelled again while completing: the completion goes on in the background.
            raise
        except JitbrokerError as e:
            if exc is None:
                raise
            _log.warning("could not complete task %s (%s); it expires at %s", task.task_id, e,
                         task.info.expires_at)

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._token is not None:
            try:
                _ctx._current_task.reset(self._token)
            except ValueError:
                # Entered in another context (e.g. an anyio task group moved us): just clear.
                _ctx._current_task.set(None)
            self._token = None
        await self._complete(exc)


async def await_approval(pending: ApprovalPending, retry: Callable[[], Awaitable[Credential]],
                         timeout: float, poll_interval: float) -> Credential:
    end = time.monotonic() + timeout
    # Each poll is a policy decision in the broker's audit trail: back off to at most 5 s.
    pause = poll_interval
    while True:
        try:
            return await retry()
        except ApprovalPending as again:
            if again.approval_id != pending.approval_id:
                raise ApprovalDenied(
                    f"approval {pending.approval_id} was denied or lapsed; the broker opened "
                    f"{again.approval_id} for the next attempt", policy_ids=again.policy_ids
                ) from None
            if time.monotonic() + pause > end:
                raise again from None
        except PermissionDenied as e:
            raise ApprovalDenied(f"approval {pending.approval_id} was not granted: {e.message}",
                                 policy_ids=e.policy_ids) from None
        await asyncio.sleep(pause)
        pause = min(pause * 1.5, max(poll_interval, 5.0))


class AsyncVerifier(_AsyncClient):
    def __init__(self, target: str, source: IdentitySource, **kw: Any) -> None:
        super().__init__(target, source, **kw)
        self._jwks: dict[str, Any] = {}
        self._jwks_at = 0.0
        self._jwks_lock = asyncio.Lock()

    async def introspect(self, secret: Any, resource: str) -> Introspection:
        value = secret.reveal() if hasattr(secret, "reveal") else str(secret)
        req = verifier_pb2.IntrospectRequest(secret=value, resource=resource)
        return Introspection._from_pb(
            await self._t.call(lambda s: s.verifier.Introspect, req, idempotent=True))

    async def jwks_json(self) -> str:
        resp = await self._t.call(lambda s: s.verifier.GetJwks, verifier_pb2.GetJwksRequest(),
                                  idempotent=True)
        return str(resp.jwks_json)

    async def x509_authorities_pem(self) -> str:
        resp = await self._t.call(lambda s: s.verifier.GetX509Authorities,
                                  verifier_pb2.GetX509AuthoritiesRequest(), idempotent=True)
        return str(resp.pem)

    async def verify_jwt(self, token: Any, resource: str, *, issuer: str | None = None,
                         leeway: float = 5.0, min_refresh: float = 5.0) -> dict[str, Any]:
        value = token.reveal() if hasattr(token, "reveal") else str(token)
        try:
            import jwt as pyjwt

            kid = pyjwt.get_unverified_header(value).get("kid", "")
        except Exception:
            kid = ""
        async with self._jwks_lock:
            if kid not in self._jwks and time.monotonic() - self._jwks_at >= min_refresh:
                self._jwks = parse_jwks(await self.jwks_json())
                self._jwks_at = time.monotonic()
            keys = dict(self._jwks)
        return jwt_verify(value, resource, keys.get, issuer=issuer, leeway=leeway)


class AsyncAdmin(_AsyncClient):
    async def list_tasks(self, spiffe_id: str = "", state: str = "") -> list[TaskInfo]:
        st = broker_pb2.TaskState.Value(state) if state else broker_pb2.TASK_STATE_UNSPECIFIED
        out: list[TaskInfo] = []
        token = ""
        while True:
            req = admin_pb2.ListTasksRequest(spiffe_id=spiffe_id, state=st, page_size=500,
                                             page_token=token)
            resp = await self._t.call(lambda s: s.admin.ListTasks, req, idempotent=True)
            out.extend(TaskInfo._from_pb(t) for t in resp.tasks)
            token = resp.next_page_token
            if not token:
                return out

    async def list_approvals(self, state: str = "") -> list[Approval]:
        resp = await self._t.call(lambda s: s.admin.ListApprovals,
                                  admin_pb2.ListApprovalsRequest(state=state), idempotent=True)
        return [Approval._from_pb(a) for a in resp.approvals]

    async def approve(self, approval_id: str, reason: str) -> Approval:
        req = admin_pb2.ApproveRequest(approval_id=approval_id, reason=reason)
        return Approval._from_pb(
            await self._t.call(lambda s: s.admin.Approve, req, idempotent=False))

    async def deny(self, approval_id: str, reason: str) -> Approval:
        req = admin_pb2.DenyRequest(approval_id=approval_id, reason=reason)
        return Approval._from_pb(await self._t.call(lambda s: s.admin.Deny, req, idempotent=False))
