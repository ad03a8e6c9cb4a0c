"""examples/support_agent end to end: the refund waited for a human, and the audit trail shows
the intent, the decisions and the actions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "support_agent" / "support_agent.py"


def test_support_agent(capsys: object) -> None:
    spec = importlib.util.spec_from_file_location("support_agent", EXAMPLE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(quiet_audit=True)
    assert out["answer"].startswith("Refunded order A-1001 (rf_0001)")
    audit = [e for e in out["audit"] if e.get("spiffe_id") == mod.AGENT_ID]
    kinds = [e["kind"] for e in audit]
    # Intent: the task and every decision carry the declared purpose.
    started = next(e for e in audit if e["kind"] == "task_started")
    assert started["purpose"] == mod.PURPOSE
    # Decisions: reading allowed; the refund needed approval, a human granted it, it was used.
    # A decision that issued a credential is carried by that issuance's entry.
    decisions = [(e["resource"], e.get("decision"), tuple(e.get("policies", [])))
                 for e in audit if e["kind"] in ("decision", "credential_issued")]
    assert ("tickets", "ALLOWED", ("support-read-tickets",)) in decisions
    assert ("payments", "NEEDS_APPROVAL", ("refunds-need-approval",)) in decisions
    assert ("payments", "ALLOWED", ("refunds-need-approval",)) in decisions
    granted = next(e for e in out["audit"] if e["kind"] == "approval_granted")
    assert "approved" in granted["reason"]
    # Actions: both credentials issued (the refund's only after the approval), then revoked.
    issued = [e["resource"] for e in audit if e["kind"] == "credential_issued"]
    assert issued == ["tickets", "payments"]
    assert kinds.index("approval_used") < len(kinds) - kinds[::-1].index("credential_issued")
    assert granted["seq"] < next(e["seq"] for e in audit if e["kind"] == "credential_issued"
                                 and e["resource"] == "payments")
    assert [e.get("reason") for e in audit if e["kind"] == "credential_ended"] == [
        "completed", "completed"]
    assert kinds[-1] == "task_ended"
    # No secret anywhere in the trail.
    assert "jbt_" not in repr(out["audit"])
