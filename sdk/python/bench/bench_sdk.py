"""What the Python SDK costs over the raw gRPC call, against a real ``jitbroker dev``.

    JITBROKER_BIN=target/release/jitbroker python sdk/python/bench/bench_sdk.py [N]

Measures, on one connection, one caller at a time (latency, not throughput), N rounds each,
interleaved so that drift hits both sides alike:
  issue   IssueCredential: the raw generated stub vs ``task.credential(..., fresh=True)``
          (idempotency key, deadline, retry wrapper, channel check, typed result)
  cached  ``task.credential(...)`` answered from the task's cache (no RPC)
  layer   ``task.credential(fresh=True)`` with the stub answering at once: the SDK alone
  task    a whole task: StartTask + IssueCredential + CompleteTask, raw vs
          ``with broker.task(...) as t: t.credential(...)``, and the same with asyncio
Prints a Markdown table (median and p99 per operation).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import grpc

from jitbroker import AsyncBroker, Broker, FilesSource
from jitbroker._channels import channel_credentials
from jitbroker.testing import DevBroker
from jitbroker.v1 import broker_pb2, broker_pb2_grpc

GRANT = [("demo-token", "read")]


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def row(name: str, xs: list[float]) -> str:
    return f"| {name} | {statistics.median(xs) * 1e3:.3f} | {pct(xs, 0.99) * 1e3:.3f} |"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(n: int) -> None:
    extra = "max_credentials_per_task = 100000\nmax_active_tasks_per_identity = 100000\n"
    with DevBroker(extra=extra) as dev:
        agent = dev.svid_dir("agent")
        src = FilesSource(agent)
        ch = grpc.secure_channel(dev.target, channel_credentials(src.material()),
                                 options=[("grpc.use_local_subchannel_pool", 1)])
        stub = broker_pb2_grpc.BrokerStub(ch)
        pb_grants = [broker_pb2.Grant(resource=r, action=a) for r, a in GRANT]
        broker = Broker(dev.target, src)

        def raw_issue(task_id: str) -> None:
            stub.IssueCredential(broker_pb2.IssueCredentialRequest(
                task_id=task_id, resource="demo-token", action="read",
                idempotency_key=uuid.uuid4().hex), timeout=10)

        def raw_task() -> None:
            t = stub.StartTask(broker_pb2.StartTaskRequest(
                purpose="bench", grants=pb_grants, ttl_seconds=600,
                idempotency_key=uuid.uuid4().hex), timeout=10)
            raw_issue(t.task_id)
            stub.CompleteTask(broker_pb2.CompleteTaskRequest(task_id=t.task_id), timeout=10)

        def sdk_task() -> None:
            with broker.task("bench", grants=GRANT, ttl=600) as t:
                t.credential("demo-token", "read")

        raw_i: list[float] = []
        sdk_i: list[float] = []
        hit: list[float] = []
        raw_t: list[float] = []
        sdk_t: list[float] = []
        # Fresh tasks every 500 issuances keep the per-task credential index small.
        for chunk in range(0, n, 500):
            with broker.task("bench issue", grants=GRANT, ttl=3600) as task:
                for _ in range(min(10, n)):  # warm-up
                    raw_issue(task.task_id)
                    task.credential("demo-token", "read", fresh=True)
                for _ in range(min(500, n - chunk)):
                    raw_i.append(timed(lambda: raw_issue(task.task_id)))
                    sdk_i.append(timed(lambda: task.credential("demo-token", "read",
                                                               fresh=True)))
                    hit.append(timed(lambda: task.credential("demo-token", "read")))
        # The SDK's own layer, the broker taken out: the stub answers at once with a canned
        # credential, so what is left is key generation, channel check, deadline, retry
        # wrapper and the typed result.
        layer: list[float] = []
        with broker.task("bench layer", grants=GRANT, ttl=3600) as task:
            canned = stub.IssueCredential(broker_pb2.IssueCredentialRequest(
                task_id=task.task_id, resource="demo-token", action="read",
                idempotency_key=uuid.uuid4().hex), timeout=10)
            slot = broker._t.pool.acquire()
            broker._t.pool.release(slot)
            real_stub = slot.broker

            class Canned:
                @staticmethod
                def IssueCredential(req: object, **kw: object) -> object:
                    return canned

            slot.broker = Canned
            for _ in range(n):
                layer.append(timed(lambda: task.credential("demo-token", "read", fresh=True)))
            slot.broker = real_stub
        rounds = max(1, n // 4)
        for _ in range(min(5, rounds)):
            raw_task()
            sdk_task()
        for _ in range(rounds):
            raw_t.append(timed(raw_task))
            sdk_t.append(timed(sdk_task))

        async def async_tasks() -> list[float]:
            out = []
            async with AsyncBroker(dev.target, src) as ab:
                for i in range(rounds + 5):
                    t0 = time.perf_counter()
                    async with ab.task("bench", grants=GRANT, ttl=600) as t:
                        await t.credential("demo-token", "read")
                    if i >= 5:
                        out.append(time.perf_counter() - t0)
            return out

        async_t = asyncio.run(async_tasks())
        broker.close()
        ch.close()

    print(f"\n{n} credential rounds, {rounds} task rounds, one caller, loopback, "
          f"jitbroker dev\n")
    print("| operation | median ms | p99 ms |")
    print("| --- | --- | --- |")
    print(row("IssueCredential, raw stub", raw_i))
    print(row("IssueCredential, `task.credential(fresh=True)`", sdk_i))
    print(row("`task.credential()` from the cache", hit))
    print(row("`task.credential(fresh=True)`, SDK layer alone (canned stub)", layer))
    print(row("task lifecycle, raw stubs (start, issue, complete)", raw_t))
    print(row("task lifecycle, `with broker.task(...)`", sdk_t))
    print(row("task lifecycle, `async with broker.task(...)`", async_t))
    over = statistics.median(sdk_i) - statistics.median(raw_i)
    print(f"\nSDK overhead per credential call (median): {over * 1e6:.0f} µs; "
          f"per task lifecycle: "
          f"{(statistics.median(sdk_t) - statistics.median(raw_t)) * 1e6:.0f} µs")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
