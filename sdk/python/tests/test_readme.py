"""Every quick start in sdk/python/README.md, run as written against the live dev broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jitbroker.testing import DevBroker

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- quickstart: ([\w-]+) -->\n```python\n(.*?)```", re.S)
QUICKSTARTS = dict(BLOCK.findall(README.read_text()))


def test_every_framework_has_a_quick_start() -> None:
    assert set(QUICKSTARTS) == {"sync", "asyncio", "pydantic-ai", "langchain", "openai-agents",
                                "httpx"}
    for name, code in QUICKSTARTS.items():
        # Short: what a reader copies, not a program. The LangChain one spends lines on
        # scripting its test model.
        assert len(code.strip().splitlines()) <= 22, name


@pytest.mark.parametrize("name", sorted(QUICKSTARTS))
def test_quick_start(name: str, dev: DevBroker, tmp_path: Path) -> None:
    # The README's paths are those of `jitbroker dev` run in the current directory.
    (tmp_path / "jitbroker-dev").symlink_to(dev.data_dir)
    script = tmp_path / f"quickstart_{name.replace('-', '_')}.py"
    script.write_text(QUICKSTARTS[name])
    env = {**os.environ, "JITBROKER_ADDR": dev.target,
           "JITBROKER_SVID_DIR": "jitbroker-dev/dev/svids/agent",
           "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    env.pop("SPIFFE_ENDPOINT_SOCKET", None)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr}"
    expected = {
        "sync": r"Credential\(credential_id='crd_.*secret=Secret\('\*+'\)",
        "asyncio": r"^False\nspiffe://jitbroker\.dev/agent/demo$",
        "pydantic-ai": r"read a as crd_",
        "langchain": r"^read 1 as crd_",
        "openai-agents": r"^done$",
        "httpx": r"^200$",
    }[name]
    assert re.search(expected, out.stdout.strip(), re.M), out.stdout
    assert "jbt_" not in out.stdout  # no secret printed by any quick start
