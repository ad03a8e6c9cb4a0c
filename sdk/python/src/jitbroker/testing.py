"""A real ``jitbroker dev`` for tests and examples: started on free loopback ports in a
directory of its own, with the configuration and policy you give it, stopped on exit.

>>> with DevBroker(binary="target/release/jitbroker") as dev:
...     broker = Broker(dev.target, FilesSource(dev.svid_dir("agent")))

DEV MODE ONLY: the dev CA key sits in plaintext in the data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

__all__ = ["DevBroker", "free_port"]

TRUST_DOMAIN = "jitbroker.dev"

DEFAULT_POLICY = """\
@id("dev-agents-demo")
permit(principal, action in [Action::"read", Action::"write"], resource)
when {
  principal.spiffe_id like "spiffe://jitbroker.dev/agent/*" &&
  (resource == Resource::"demo-token" || resource == Resource::"demo-jwt")
};
"""

DEFAULT_RESOURCES = """\
[resources.demo-token]
kind = "token"
actions = ["read", "write"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]

[resources.demo-jwt]
kind = "jwt"
actions = ["read", "write"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
"""


class _PortTaken(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_binary() -> str:
    env = os.environ.get("JITBROKER_BIN")
    if env:
        return env
    found = shutil.which("jitbroker")
    if found:
        return found
    raise FileNotFoundError("set JITBROKER_BIN to the jitbroker binary")


class DevBroker:
    """``jitbroker dev`` in ``data_dir`` (a fresh temporary directory by default).

    ``resources`` (TOML ``[resources.*]`` tables), ``policy`` (Cedar) and ``extra`` (top-level
    TOML keys) shape the configuration written before the first start. ``jwt_audience`` turns
    on JWT-SVID callers."""

    def __init__(
        self,
        *,
        binary: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        resources: str = DEFAULT_RESOURCES,
        policy: str = DEFAULT_POLICY,
        extra: str = "",
        jwt_audience: str | None = "jitbroker",
        log_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.binary = binary or default_binary()
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="jitbroker-dev-")).resolve()
        self.resources = resources
        self.policy = policy
        self.extra = extra
        self.jwt_audience = jwt_audience
        self.log_path = Path(log_file) if log_file else self.data_dir / "broker.log"
        self.port = 0
        self.ops_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "jitbroker.toml"

    def _write_config(self) -> None:
        d = self.data_dir
        d.mkdir(parents=True, exist_ok=True)
        if self.config_path.exists():
            return
        jwt = f'jwt_audience = "{self.jwt_audience}"\n' if self.jwt_audience else ""
        self.config_path.write_text(
            f'listen = "127.0.0.1:0"\nops_listen = "127.0.0.1:0"\n'
            f'data_dir = "{d}"\nkek_file = "{d}/kek"\npolicy_file = "{d}/policy.cedar"\n'
            'admin_ids = ["spiffe://jitbroker.dev/operator"]\n'
            'approver_ids = ["spiffe://jitbroker.dev/approver"]\n'
            'log_format = "json"\n'
            f"{self.extra}\n"
            f'[identity]\nsource = "dev"\ntrust_domain = "{TRUST_DOMAIN}"\n{jwt}\n'
            f"{self.resources}"
        )
        (d / "policy.cedar").write_text(self.policy)

    def start(self, timeout: float = 30.0) -> DevBroker:
        self._write_config()
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                # Another process took a port between our probe and the broker's bind.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> DevBroker:
        self.port, self.ops_port = free_port(), free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self._proc = subprocess.Popen(
            [self.binary, "dev", "--data-dir", str(self.data_dir),
             "--listen", self.target, "--ops-listen", f"127.0.0.1:{self.ops_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                self._proc = None
                if "cannot listen" in self.log_tail():
                    raise _PortTaken(self.log_tail())
                raise RuntimeError("jitbroker dev exited; "
                                   f"log: {self.log_path}\n{self.log_tail()}")
            try:
                url = f"http://127.0.0.1:{self.ops_port}/readyz"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"jitbroker dev was not ready in {timeout}s\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        p = self._proc
        if p is None:
            return
        self._proc = None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def svid_dir(self, name: str) -> Path:
        """The demo SVIDs ``jitbroker dev`` mints: agent, tool, operator, approver."""
        return self.data_dir / "dev" / "svids" / name

    def mint(self, spiffe_id: str, out: str | os.PathLike[str] | None = None,
             ttl_seconds: int = 86_400) -> Path:
        """An X.509-SVID for ``spiffe_id`` from the dev CA, written to ``out``."""
        dest = Path(out) if out else self.data_dir / "svids" / spiffe_id.rsplit("/", 1)[-1]
        subprocess.run(
            [self.binary, "dev-svid", "--data-dir", str(self.data_dir), "--spiffe-id", spiffe_id,
             "--out", str(dest), "--ttl-seconds", str(ttl_seconds)],
            check=True, capture_output=True,
        )
        return dest

    def jwt_svid(self, spiffe_id: str, audience: str = "jitbroker", ttl_seconds: int = 300) -> str:
        out = subprocess.run(
            [self.binary, "dev-svid", "--data-dir", str(self.data_dir), "--spiffe-id", spiffe_id,
             "--jwt-audience", audience, "--ttl-seconds", str(ttl_seconds)],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def audit_export(self) -> list[dict[str, object]]:
        """Every audit entry (the broker must be stopped: the store is single-writer)."""
        import json

        if self._proc is not None:
            raise RuntimeError("stop the broker before exporting its audit trail")
        out = subprocess.run(
            [self.binary, "audit", "export", "--config", str(self.config_path)],
            check=True, capture_output=True, text=True,
        )
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def __enter__(self) -> DevBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
