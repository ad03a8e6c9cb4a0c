"""One real ``jitbroker dev`` for the session (JITBROKER_BIN), on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import jitbroker
from jitbroker.testing import DevBroker

RESOURCES = """\
[resources.demo-token]
kind = "token"
actions = ["read", "write"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]

[resources.demo-jwt]
kind = "jwt"
actions = ["read", "write"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]

[resources.tickets]
kind = "token"
actions = ["read", "draft"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]

[resources.payments]
kind = "token"
actions = ["refund:issue"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
max_ttl_seconds = 300

[resources.accounts]
kind = "jwt"
actions = ["read", "accounts:export"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
"""

POLICY = """\
@id("dev-agents-demo")
permit(principal, action in [Action::"read", Action::"write"], resource)
when {
  principal.spiffe_id like "spiffe://jitbroker.dev/agent/*" &&
  (resource == Resource::"demo-token" || resource == Resource::"demo-jwt")
};

@id("agents-tickets")
permit(principal, action in [Action::"read", Action::"draft"], resource == Resource::"tickets")
when { principal.path like "/agent/*" };

@id("agents-read-accounts")
permit(principal, action == Action::"read", resource == Resource::"accounts")
when { principal.path like "/agent/*" };

@id("refunds-need-approval")
@approval("required")
permit(principal, action == Action::"refund:issue", resource == Resource::"payments")
when { principal.path like "/agent/*" && context.requested_ttl_seconds <= 300 };

@id("no-account-exports")
forbid(principal, action == Action::"accounts:export", resource == Resource::"accounts");

@id("everyone-may-ask-exports")
permit(principal, action == Action::"accounts:export", resource == Resource::"accounts");
"""

EXTRA = "max_credentials_per_task = 8\n"

# The rotation tests keep many calls in flight from one identity; the broker's per-identity
# and per-address request rates (their own subject, tested with the broker) would refuse
# them as a flood.
SERVER = (
    "\n[server]\nrequests_per_identity_per_second = 100000\n"
    "requests_per_remote_per_second = 100000\n"
)


@pytest.fixture(scope="session")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBroker]:
    d = tmp_path_factory.mktemp("broker")
    broker = DevBroker(data_dir=d, resources=RESOURCES + SERVER, policy=POLICY, extra=EXTRA)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        if os.environ.get("JITBROKER_TEST_SHOW_LOG"):
            print(broker.log_tail(200))


@pytest.fixture(scope="session")
def agent_dir(dev: DevBroker) -> Path:
    return dev.svid_dir("agent")


@pytest.fixture
def broker(dev: DevBroker) -> Iterator[jitbroker.Broker]:
    b = jitbroker.Broker.from_files(dev.target, dev.svid_dir("agent"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
async def abroker(dev: DevBroker) -> jitbroker.AsyncBroker:
    b = jitbroker.AsyncBroker.from_files(dev.target, dev.svid_dir("agent"))
    try:
        yield b  # type: ignore[misc]
    finally:
        await b.close()


@pytest.fixture(scope="session")
def verifier(dev: DevBroker) -> Iterator[jitbroker.Verifier]:
    v = jitbroker.Verifier.from_files(dev.target, dev.svid_dir("tool"))
    try:
        yield v
    finally:
        v.close()


@pytest.fixture(scope="session")
def admin(dev: DevBroker) -> Iterator[jitbroker.Admin]:
    a = jitbroker.Admin(dev.target, jitbroker.FilesSource(dev.svid_dir("operator")))
    try:
        yield a
    finally:
        a.close()


@pytest.fixture(scope="session")
def approver(dev: DevBroker) -> Iterator[jitbroker.Admin]:
    a = jitbroker.Admin(dev.target, jitbroker.FilesSource(dev.svid_dir("approver")))
    try:
        yield a
    finally:
        a.close()


_counter = iter(range(1_000_000))


@pytest.fixture
def fresh_agent(dev: DevBroker, tmp_path: Path) -> tuple[str, Path]:
    """A new agent identity of its own (so task listings see only this test's tasks)."""
    sid = f"spiffe://jitbroker.dev/agent/t{os.getpid()}-{next(_counter)}"
    return sid, dev.mint(sid, tmp_path / "svid")
