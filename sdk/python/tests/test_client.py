"""The blocking and asyncio clients against the real broker: lifecycle, completion whatever
happens, caching and renewal, errors, approvals, delegation, retries."""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from pathlib import Path

import grpc
import pytest

import jitbroker
from jitbroker import (
    ApprovalDenied,
    ApprovalPending,
    AsyncBroker,
    Broker,
    FilesSource,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    TaskNotActive,
)
from jitbroker.testing import DevBroker

READ = [("tickets", "read")]


def test_task_lifecycle(broker: Broker, verifier: jitbroker.Verifier) -> None:
    with broker.task("summarise ticket 42", grants=READ, ttl=600, labels={"ticket": "42"}) as t:
        assert t.info.state == "ACTIVE"
        assert t.info.grants[0].decision == "ALLOWED"
        assert t.info.grants[0].policy_ids == ["agents-tickets"]
        assert jitbroker.current_task() is t
        cred = t.credential("tickets", "read")
        assert cred.secret.reveal().startswith("jbt_")
        assert cred.task_id == t.task_id
        # Cached: the same credential, not a second issuance.
        assert t.credential("tickets", "read") is cred
        seen = verifier.introspect(cred.secret, "tickets")
        assert seen.active and seen.task_id == t.task_id and seen.action == "read"
    assert jitbroker.current_task() is None
    assert t.completed
    assert broker.get_task(t.task_id).state == "COMPLETED"
    assert not verifier.introspect(cred.secret, "tickets").active


def test_completed_when_the_block_raises(broker: Broker, verifier: jitbroker.Verifier) -> None:
    with pytest.raises(ZeroDivisionError), broker.task("divide", grants=READ) as t:
        cred = t.credential("tickets", "read")
        _ = 1 / 0
    assert broker.get_task(t.task_id).state == "COMPLETED"
    assert not verifier.introspect(cred.secret, "tickets").active


def test_secret_never_printed(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    with broker.task("print things", grants=READ) as t:
        cred = t.credential("tickets", "read")
        plain = cred.secret.reveal()
        caplog.set_level(logging.DEBUG)
        logging.getLogger("test").info("credential %s / %r / %s", cred, cred, cred.secret)
        for shown in (repr(cred), str(cred), f"{cred}", f"{cred.secret}", str(cred.secret),
                      caplog.text):
            assert plain not in shown
        with pytest.raises(TypeError):
            pickle.dumps(cred.secret)
        assert cred.authorization_header() == {"Authorization": f"Bearer {plain}"}


def test_credential_renewed_before_expiry(broker: Broker) -> None:
    with broker.task("renew", grants=READ) as t:
        first = t.credential("tickets", "read", ttl=7)
        assert t.credential("tickets", "read", ttl=7) is first
        # 7 s of life, renewed when 5 s (the floor) are left.
        time.sleep(2.2)
        second = t.credential("tickets", "read", ttl=7)
        assert second.credential_id != first.credential_id
        assert second.seconds_left() > 6


def test_denied_grant_fails_the_start_and_ends_the_task(
    dev: DevBroker, admin: jitbroker.Admin, fresh_agent: tuple[str, Path]
) -> None:
    sid, d = fresh_agent
    with Broker.from_files(dev.target, d) as b:
        with pytest.raises(PermissionDenied) as e, \
                b.task("export", grants=[("accounts", "read"), ("accounts", "accounts:export")]):
            pytest.fail("the block must not run")
        assert e.value.policy_ids == ["no-account-exports"]
        assert "accounts:export" in str(e.value)
        assert admin.list_tasks(spiffe_id=sid, state="ACTIVE") == []
        # A task with no grant allowed at all is refused by the broker itself.
        with pytest.raises(PermissionDenied) as e3, \
                b.task("export", grants=[("accounts", "accounts:export")], strict=False):
            pytest.fail("the block must not run")
        assert e3.value.policy_ids == ["no-account-exports"]
        # Not strict: the task starts; the denied grant fails when asked for, naming the policy.
        both = [("accounts", "read"), ("accounts", "accounts:export")]
        with b.task("export", grants=both, strict=False) as t:
            assert t.info.grants[1].decision == "DENIED"
            with pytest.raises(PermissionDenied) as e2:
                t.credential("accounts", "accounts:export")
            assert e2.value.policy_ids == ["no-account-exports"]


def test_errors_are_typed(dev: DevBroker, broker: Broker) -> None:
    with pytest.raises(NotFound):
        broker.attach("tsk_0123456789abcdef0123456789abcdef")
    with pytest.raises(InvalidArgument) as e:
        broker.start_task("bad", grants=[("tickets", "delete")])
    assert e.value.field == "grants[0].action"
    # Another identity's task reads as unknown.
    with broker.task("mine", grants=READ) as t, \
            Broker.from_files(dev.target, dev.svid_dir("tool")) as other, \
            pytest.raises(NotFound):
        other.attach(t.task_id)
    t2 = broker.start_task("ended", grants=READ)
    t2.complete()
    with pytest.raises(TaskNotActive):
        t2.credential("tickets", "read")
    assert t2.complete() == []  # completing again is not an error


def test_quota(broker: Broker) -> None:
    with broker.task("many", grants=READ) as t:
        for _ in range(8):
            t.credential("tickets", "read", fresh=True)
        with pytest.raises(QuotaExceeded, match="limit 8"):
            t.credential("tickets", "read", fresh=True)


def test_approval_wait(broker: Broker, approver: jitbroker.Admin,
                       verifier: jitbroker.Verifier) -> None:
    with broker.task("refund order 7", grants=[("payments", "refund:issue")], ttl=300) as t:
        assert t.info.grants[0].decision == "NEEDS_APPROVAL"
        with pytest.raises(ApprovalPending) as e:
            t.credential("payments", "refund:issue")
        pending = e.value
        assert pending.approval_id
        assert pending.policy_ids == ["refunds-need-approval"]
        listed = [a.approval_id for a in approver.list_approvals("PENDING")]
        assert pending.approval_id in listed
        threading.Timer(0.5, approver.approve, args=(pending.approval_id, "ok by test")).start()
        cred = pending.wait_for_approval(timeout=20, poll_interval=0.2)
        assert verifier.introspect(cred.secret, "payments").active
        # Single use: the next issuance asks again.
        with pytest.raises(ApprovalPending):
            t.credential("payments", "refund:issue", fresh=True)


def test_approval_denied(broker: Broker, approver: jitbroker.Admin) -> None:
    with broker.task("refund order 8", grants=[("payments", "refund:issue")], ttl=300) as t:
        with pytest.raises(ApprovalPending) as e:
            t.credential("payments", "refund:issue")
        threading.Timer(0.3, approver.deny, args=(e.value.approval_id, "no")).start()
        with pytest.raises(ApprovalDenied):
            e.value.wait_for_approval(timeout=20, poll_interval=0.2)


def test_approval_times_out(broker: Broker) -> None:
    with broker.task("refund order 9", grants=[("payments", "refund:issue")], ttl=300) as t:
        with pytest.raises(ApprovalPending) as e:
            t.credential("payments", "refund:issue")
        started = time.monotonic()
        with pytest.raises(ApprovalPending):
            e.value.wait_for_approval(timeout=0.6, poll_interval=0.2)
        assert time.monotonic() - started < 5


def test_delegation(dev: DevBroker, broker: Broker, verifier: jitbroker.Verifier,
                    tmp_path: Path) -> None:
    helper_id = "spiffe://jitbroker.dev/agent/helper"
    helper_dir = dev.mint(helper_id, tmp_path / "helper")
    with broker.task("triage", grants=[("tickets", "read"), ("tickets", "draft")]) as t:
        child = t.delegate(helper_id, [("tickets", "read")], ttl=120)
        assert child.parent_task_id == t.task_id
        assert child.delegation_chain == [broker.spiffe_id, helper_id]
        with Broker.from_files(dev.target, helper_dir) as hb:
            ht = hb.attach(child.task_id)
            cred = ht.credential("tickets", "read")
            seen = verifier.introspect(cred.secret, "tickets")
            assert seen.active and list(seen.delegation_chain) == [broker.spiffe_id, helper_id]
            with pytest.raises(PermissionDenied):
                ht.credential("tickets", "draft")  # not delegated
        with pytest.raises(PermissionDenied):
            t.delegate(helper_id, [("payments", "refund:issue")])
    # Ending the parent ended the delegate's credentials.
    assert not verifier.introspect(cred.secret, "tickets").active


def test_jwt_credential_verified_offline(broker: Broker, verifier: jitbroker.Verifier) -> None:
    with broker.task("jwt", grants=[("accounts", "read")]) as t:
        cred = t.credential("accounts", "read")
        assert cred.kind == "jwt"
        claims = verifier.verify_jwt(cred.secret, "accounts")
        assert claims["sub"] == broker.spiffe_id and claims["task_id"] == t.task_id
        with pytest.raises(jitbroker.InvalidToken, match=r"(?i)audience"):
            verifier.verify_jwt(cred.secret, "demo-jwt")
        tampered = cred.secret.reveal()[:-4] + ("AAAA" if not cred.secret.reveal().endswith(
            "AAAA") else "BBBB")
        with pytest.raises(jitbroker.InvalidToken):
            verifier.verify_jwt(tampered, "accounts")
        # An unknown kid makes the verifier fetch the keys again.
        calls = []
        real = verifier.jwks_json

        def counting() -> str:
            calls.append(1)
            return real()

        verifier.jwks_json = counting  # type: ignore[method-assign]
        try:
            verifier._jwks = {}
            assert verifier.verify_jwt(cred.secret, "accounts", min_refresh=0)["jti"]
            assert calls == [1]
            verifier.verify_jwt(cred.secret, "accounts", min_refresh=0)
            assert calls == [1]  # known kid: no fetch
        finally:
            del verifier.jwks_json  # type: ignore[method-assign]


def test_jwt_svid_auth(dev: DevBroker) -> None:
    fetched: list[str] = []

    def provider(aud: str) -> str:
        fetched.append(aud)
        return dev.jwt_svid("spiffe://jitbroker.dev/agent/jwt-only", aud, ttl_seconds=300)

    src = jitbroker.BundleOnlySource(dev.svid_dir("agent") / "bundle.pem")
    with Broker(dev.target, src, jwt_svid=provider) as b:
        with b.task("jwt caller", grants=READ) as t:
            assert t.info.spiffe_id == "spiffe://jitbroker.dev/agent/jwt-only"
            t.credential("tickets", "read")
        assert fetched == ["jitbroker"]  # cached across calls (until half its life)

    def wrong(aud: str) -> str:
        return dev.jwt_svid("spiffe://jitbroker.dev/agent/jwt-only", "someone-else")

    with Broker(dev.target, src, jwt_svid=wrong) as b, \
            pytest.raises(jitbroker.Unauthenticated, match="jwt_audience"):
        b.start_task("x", grants=READ)


def test_jwt_svid_cache_half_life() -> None:
    import base64
    import json

    now = [1000.0]
    issued: list[int] = []

    def provider(aud: str) -> str:
        issued.append(1)
        body = {"sub": "spiffe://td/a", "aud": aud, "iat": now[0], "exp": now[0] + 100}
        p = base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")
        return f"e30.{p}.sig"

    cache = jitbroker.identity.JwtSvidCache(provider, "jitbroker", clock=lambda: now[0])
    cache.token()
    now[0] += 49
    cache.token()
    assert len(issued) == 1
    now[0] += 2
    cache.token()
    assert len(issued) == 2


def test_retry_after_lost_response_reuses_the_idempotency_key(broker: Broker) -> None:
    """The first IssueCredential reaches the broker but its answer is lost: the retry carries
    the same idempotency key, so the broker returns the same credential, not a second one."""
    sent: list[str] = []
    t = broker.start_task("flaky network", grants=READ)
    real_call = broker._t.call

    class Lost(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection reset"

    def flaky_pick(pick):  # type: ignore[no-untyped-def]
        def wrapped(slot):  # type: ignore[no-untyped-def]
            rpc = pick(slot)

            def invoke(req, **kw):  # type: ignore[no-untyped-def]
                sent.append(req.idempotency_key)
                resp = rpc(req, **kw)
                if len(sent) == 1:
                    raise Lost()
                return resp

            return invoke

        return wrapped

    broker._t.call = lambda pick, req, **kw: real_call(flaky_pick(pick), req, **kw)  # type: ignore[method-assign]
    try:
        cred = t.credential("tickets", "read")
    finally:
        del broker._t.call  # type: ignore[method-assign]
    assert len(sent) == 2 and sent[0] == sent[1]
    revoked = t.complete()
    assert revoked == [cred.credential_id]  # one credential, not two


def test_unreachable_broker_is_typed_and_bounded(dev: DevBroker) -> None:
    from jitbroker.testing import free_port

    policy = jitbroker.RetryPolicy(attempts=3, timeout=0.5, total_timeout=2)
    with Broker(f"127.0.0.1:{free_port()}", FilesSource(dev.svid_dir("agent")),
                retry=policy) as b:
        started = time.monotonic()
        with pytest.raises(jitbroker.BrokerUnavailable, match="is it running"):
            b.start_task("x", grants=READ)
        assert time.monotonic() - started < 5


# --- asyncio -------------------------------------------------------------------------------


async def test_async_lifecycle(abroker: AsyncBroker, verifier: jitbroker.Verifier) -> None:
    async with abroker.task("summarise ticket 43", grants=READ, ttl=600) as t:
        assert jitbroker.current_task() is t
        cred = await t.credential("tickets", "read")
        assert await t.credential("tickets", "read") is cred
        assert verifier.introspect(cred.secret, "tickets").active
    assert (await abroker.get_task(t.task_id)).state == "COMPLETED"
    assert not verifier.introspect(cred.secret, "tickets").active


async def test_async_completed_on_exception(abroker: AsyncBroker) -> None:
    with pytest.raises(KeyError):
        async with abroker.task("boom", grants=READ) as t:
            await t.credential("tickets", "read")
            raise KeyError("boom")
    assert (await abroker.get_task(t.task_id)).state == "COMPLETED"


async def test_async_completed_on_cancellation(abroker: AsyncBroker,
                                               verifier: jitbroker.Verifier) -> None:
    started = asyncio.Event()
    box: dict[str, object] = {}

    async def agent() -> None:
        async with abroker.task("long job", grants=READ) as t:
            box["task"] = t
            box["cred"] = await t.credential("tickets", "read")
            started.set()
            await asyncio.sleep(60)

    job = asyncio.create_task(agent())
    await asyncio.wait_for(started.wait(), 10)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    t = box["task"]
    assert isinstance(t, jitbroker.AsyncTask)
    assert (await abroker.get_task(t.task_id)).state == "COMPLETED"
    assert not verifier.introspect(box["cred"], "tickets").active


async def test_async_cancelled_during_start_leaves_no_task(
    dev: DevBroker, admin: jitbroker.Admin, fresh_agent: tuple[str, Path]
) -> None:
    sid, d = fresh_agent
    async with AsyncBroker.from_files(dev.target, d) as b:
        for delay in (0, 0.001, 0.003, 0.01):
            job = asyncio.create_task(_enter_and_wait(b))
            await asyncio.sleep(delay)
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
        for _ in range(100):
            if not await asyncio.to_thread(admin.list_tasks, sid, "ACTIVE"):
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(admin.list_tasks, sid, "ACTIVE") == []


async def _enter_and_wait(b: AsyncBroker) -> None:
    async with b.task("cancel me", grants=READ):
        await asyncio.sleep(60)


async def test_async_approval(abroker: AsyncBroker, approver: jitbroker.Admin) -> None:
    async with abroker.task("refund", grants=[("payments", "refund:issue")], ttl=300) as t:
        with pytest.raises(ApprovalPending) as e:
            await t.credential("payments", "refund:issue")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, lambda: threading.Thread(
            target=approver.approve, args=(e.value.approval_id, "ok")).start())
        cred = await e.value.await_approval(timeout=20, poll_interval=0.2)
        assert cred.resource == "payments"


async def test_async_concurrent_credentials_issue_once(abroker: AsyncBroker) -> None:
    async with abroker.task("fan out", grants=READ) as t:
        creds = await asyncio.gather(*(t.credential("tickets", "read") for _ in range(20)))
        assert len({c.credential_id for c in creds}) == 1
        revoked = await t.complete()
        assert revoked == [creds[0].credential_id]


async def test_async_delegation(dev: DevBroker, abroker: AsyncBroker, tmp_path: Path) -> None:
    helper_id = "spiffe://jitbroker.dev/agent/async-helper"
    helper_dir = dev.mint(helper_id, tmp_path / "helper")
    async with abroker.task("triage", grants=READ) as t:
        child = await t.delegate(helper_id, READ, ttl=60)
        async with AsyncBroker.from_files(dev.target, helper_dir) as hb:
            ht = await hb.attach(child.task_id)
            assert (await ht.credential("tickets", "read")).task_id == child.task_id


def _self_signed_pem(tmp_path: Path) -> Path:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the broker's CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    p = tmp_path / "foreign.pem"
    p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return p


def test_tls_failures_say_what_to_check(dev: DevBroker, tmp_path: Path) -> None:
    once = jitbroker.RetryPolicy(attempts=1, timeout=3)
    agent = dev.svid_dir("agent")
    foreign = FilesSource(svid_file=agent / "svid.pem", key_file=agent / "svid.key",
                          bundle_file=_self_signed_pem(tmp_path))
    with Broker(dev.target, foreign, retry=once) as b, \
            pytest.raises(jitbroker.BrokerUnavailable, match="trust bundle"):
        b.start_task("x", grants=READ)
    short = dev.mint("spiffe://jitbroker.dev/agent/short-lived", tmp_path / "s", ttl_seconds=1)
    src = FilesSource(short)
    time.sleep(max(0.0, src.material().not_after.timestamp() - time.time()) + 1.5)  # type: ignore[union-attr]
    with Broker(dev.target, src, retry=once) as b, \
            pytest.raises(jitbroker.Unauthenticated, match=r"short-lived.*not expired"):
        b.start_task("x", grants=READ)


async def test_async_verifier_and_admin(dev: DevBroker, abroker: AsyncBroker) -> None:
    tool = jitbroker.AsyncVerifier(dev.target, FilesSource(dev.svid_dir("tool")))
    lead = jitbroker.AsyncAdmin(dev.target, FilesSource(dev.svid_dir("approver")))
    try:
        async with abroker.task("async tool side", grants=[("accounts", "read"),
                                                           ("payments", "refund:issue")],
                                  ttl=300) as t:
            cred = await t.credential("accounts", "read")
            assert (await tool.introspect(cred.secret, "accounts")).active
            claims = await tool.verify_jwt(cred.secret, "accounts")
            assert claims["task_id"] == t.task_id
            pending = [a for a in await lead.list_approvals("PENDING") if a.task_id == t.task_id]
            assert len(pending) == 1 and pending[0].grant == ("payments", "refund:issue")
            assert "BEGIN CERTIFICATE" in await tool.x509_authorities_pem()
            denied = await lead.deny(pending[0].approval_id, "not today")
            assert denied.state == "DENIED" and denied.decided_by.endswith("/approver")
    finally:
        await tool.close()
        await lead.close()
