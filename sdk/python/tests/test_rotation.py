"""SVID rotation mid-run with calls in flight: a new channel per SVID, no call fails, the old
channels close after their calls and the grace period."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fake_workload_api import FakeWorkloadApi, response_from_dir

import jitbroker
from jitbroker import AsyncBroker, Broker, FilesSource, WorkloadApiSource
from jitbroker.testing import DevBroker

AGENT = "spiffe://jitbroker.dev/agent/rotating"
READ = [("tickets", "read")]


def _install(src: Path, dst: Path) -> None:
    """Writes the files one by one, as spiffe-helper does (the set is briefly mixed)."""
    for name in ("svid.pem", "svid.key", "bundle.pem"):
        tmp = dst / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)


def test_files_rotation_with_calls_in_flight(dev: DevBroker, tmp_path: Path) -> None:
    live = tmp_path / "live"
    # The first SVID lives 4 s: calls keep working past its expiry only through rotation.
    first = dev.mint(AGENT, tmp_path / "gen0", ttl_seconds=4)
    live.mkdir()
    _install(first, live)
    src = FilesSource(live, check_interval=0.05)
    errors: list[BaseException] = []
    done = threading.Event()
    calls = [0]
    with Broker(dev.target, src, rotation_grace=0.3) as b, b.task("rotate", grants=READ) as t:
        def worker() -> None:
            while not done.is_set():
                try:
                    b.get_task(t.task_id)
                    t.credential("tickets", "read")
                    calls[0] += 1
                except BaseException as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for th in threads:
            th.start()
        for gen in range(1, 4):
            time.sleep(0.5)
            _install(dev.mint(AGENT, tmp_path / f"gen{gen}"), live)
        # Past the first SVID's expiry.
        time.sleep(3.0)
        done.set()
        for th in threads:
            th.join()
        assert not errors, errors
        assert calls[0] > 20
        pool = b._t.pool
        assert pool.swaps >= 3
        # A fresh handshake with the current SVID works after the first one expired.
        b.get_task(t.task_id)
        time.sleep(0.6)
        assert pool.live_channels() == 1


def test_files_source_ignores_a_half_written_set(tmp_path: Path, dev: DevBroker) -> None:
    a = dev.mint(AGENT, tmp_path / "a")
    b = dev.mint(AGENT, tmp_path / "b")
    live = tmp_path / "live"
    live.mkdir()
    _install(a, live)
    src = FilesSource(live, check_interval=0)
    m1 = src.material()
    shutil.copyfile(b / "svid.pem", live / "svid.pem")  # certificate of b, key still of a
    assert src.material() is m1
    shutil.copyfile(b / "svid.key", live / "svid.key")
    m2 = src.material()
    assert m2 is not m1 and m2.cert_chain_pem == (b / "svid.pem").read_bytes()


def test_missing_files_say_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(jitbroker.IdentityError, match="spiffe-helper"):
        FilesSource(tmp_path)


def test_workload_api_unreachable_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(jitbroker.IdentityError, match="SPIRE agent running"):
        WorkloadApiSource(f"unix:{tmp_path}/nothing.sock", timeout=1)


@pytest.fixture
def short_dir() -> Path:
    # unix socket paths are limited to ~100 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="jbwl-", dir="/tmp"))
    yield d  # type: ignore[misc]
    shutil.rmtree(d, ignore_errors=True)


async def test_workload_api_rotation_with_calls_in_flight(dev: DevBroker, tmp_path: Path,
                                                          short_dir: Path) -> None:
    fake = FakeWorkloadApi(short_dir / "agent.sock",
                           response_from_dir(dev.mint(AGENT, tmp_path / "g0"), AGENT)).start()
    src = await asyncio.to_thread(WorkloadApiSource, fake.address, timeout=5)
    try:
        first = src.material()
        assert first.spiffe_id == AGENT
        async with AsyncBroker(dev.target, src, rotation_grace=0.3) as b, \
                b.task("rotate via the Workload API", grants=READ) as t:
            stop = asyncio.Event()
            count = [0]

            async def worker() -> None:
                while not stop.is_set():
                    await b.get_task(t.task_id)
                    await t.credential("tickets", "read")
                    count[0] += 1

            workers = [asyncio.create_task(worker()) for _ in range(4)]
            for gen in range(1, 4):
                await asyncio.sleep(0.4)
                d = await asyncio.to_thread(dev.mint, AGENT, tmp_path / f"g{gen}")
                before = src.material()
                fake.rotate(response_from_dir(d, AGENT))
                for _ in range(250):
                    if src.material() is not before:
                        break
                    await asyncio.sleep(0.02)
                assert src.material() is not before, "the Workload API update never arrived"
            await asyncio.sleep(0.4)
            stop.set()
            await asyncio.gather(*workers)  # any failed call fails the test here
            assert count[0] > 10
            pool = b._t.pool
            assert pool.swaps >= 3
            assert src.material() is not first
            await asyncio.sleep(0.8)
            assert pool.live_channels() == 1
    finally:
        src.close()
        await asyncio.to_thread(fake.stop)


def test_close_to_expiry_the_files_are_checked_at_once(dev: DevBroker, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    live = tmp_path / "live"
    live.mkdir()
    _install(dev.mint(AGENT, tmp_path / "short", ttl_seconds=20), live)
    # Left alone, this source would not look at its files again for an hour.
    src = FilesSource(live, check_interval=3600)
    with Broker(dev.target, src, rotation_grace=0.1) as b, b.task("expiring", grants=READ) as t:
        with caplog.at_level("WARNING", logger="jitbroker"):
            b.get_task(t.task_id)
        assert "no new one has arrived" in caplog.text
        _install(dev.mint(AGENT, tmp_path / "long"), live)
        b.get_task(t.task_id)
        assert b._t.pool.swaps == 1
        assert src.material().cert_chain_pem == (tmp_path / "long" / "svid.pem").read_bytes()
