"""The configuration rules of docs/oauth.md, checked with ``jitbroker check-config``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from oauthenv import POLICY, resources

BASE = """\
listen = "127.0.0.1:18443"
ops_listen = "127.0.0.1:19090"
data_dir = "{d}"
kek_file = "{d}/kek"
policy_file = "{d}/policy.cedar"
{top}
[identity]
source = "dev"
trust_domain = "jitbroker.dev"
{identity}

[oauth]
listen = "127.0.0.1:18445"
issuer = "{issuer}"
token_exchange_actors = ["spiffe://jitbroker.dev/gateway"]

{resources}
"""

GOOD_RESOURCES = resources("http://127.0.0.1:18446/mcp")


def check(tmp_path: Path, *, top: str = "", identity: str = 'jwt_audience = "jitbroker"',
          issuer: str = "https://127.0.0.1:18445",
          res: str = GOOD_RESOURCES) -> subprocess.CompletedProcess[str]:
    binary = os.environ.get("JITBROKER_BIN")
    if not binary:
        pytest.skip("JITBROKER_BIN is not set")
    (tmp_path / "policy.cedar").write_text(POLICY)
    cfg = tmp_path / "jitbroker.toml"
    cfg.write_text(BASE.format(d=tmp_path, top=top, identity=identity, issuer=issuer,
                               resources=res))
    return subprocess.run([binary, "check-config", "--config", str(cfg)], capture_output=True,
                          text=True, check=False, timeout=30)


def test_a_good_config_passes(tmp_path: Path) -> None:
    r = check(tmp_path)
    assert r.returncode == 0, r.stderr


def test_equal_jwt_issuer_passes(tmp_path: Path) -> None:
    r = check(tmp_path, top='jwt_issuer = "https://127.0.0.1:18445"')
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("case", "kwargs"), [
    ("no jwt_audience", {"identity": ""}),
    ("another jwt_issuer", {"top": 'jwt_issuer = "https://other.example"'}),
    ("http issuer", {"issuer": "http://127.0.0.1:18445"}),
    ("issuer with a query", {"issuer": "https://127.0.0.1:18445?x=1"}),
    ("issuer with a fragment", {"issuer": "https://127.0.0.1:18445#f"}),
    ("relative indicator", {"res": GOOD_RESOURCES.replace(
        '"https://crm.example.test/api"', '"crm/api"')}),
    ("indicator with a fragment", {"res": GOOD_RESOURCES.replace(
        '"https://crm.example.test/api"', '"https://crm.example.test/api#x"')}),
    ("one indicator for two resources", {"res": GOOD_RESOURCES.replace(
        '"https://vault.example.test/v1"', '"https://crm.example.test/api"')}),
])
def test_bad_configs_are_refused(tmp_path: Path, case: str, kwargs: dict[str, str]) -> None:
    r = check(tmp_path, **kwargs)
    assert r.returncode != 0, (case, r.stdout)
