"""The low items of issue 25, each in one line: what an operator reads fits, says sizes, and agrees."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from palm_net.agent.client import CANCELLED
from palm_net.agent.limits import Admission
from palm_net.agent.progress import ETA_AFTER, ProgressMeter
from palm_net.cli.cluster import drain_summary
from palm_net.cli.progress import ProgressView
from palm_net.errors import MigrationFailure
from palm_net.hostfs import CONTROL_DIR, UnsafePathError, verify_dir
from palm_net.migration.params import MigrationStats, Phase

MiB = 1 << 20
MID = "b948312d23eaac9023d3df12fff6c852"


def test_the_migration_header_fits_80_columns_with_the_short_id():
    out = io.StringIO()
    view = ProgressView("plain", out=out)
    view.to_name = "host-b"
    view({"event": "started", "migration_id": MID, "vm": "web-frontend-01", "to": "192.168.100.200:7400"})
    view._last_plain = 0.0  # the header comes with the first progress line
    view({"view": {"phase": "round", "round": 0, "sent": 0}})
    header = out.getvalue().splitlines()[0]
    assert header == "palm: migration b948312d: web-frontend-01 to host-b (192.168.100.200:7400)"
    assert len(header) <= 80 and MID not in header


def test_no_time_left_before_the_rate_spans_a_second():
    meter = ProgressMeter(bytes.fromhex(MID), started=0.0)
    st = MigrationStats(phase=Phase.ROUND, round_pages=65536, remaining=65000, transferred=0)
    meter.view(st, 0.0)
    st.transferred, st.remaining = 4 * MiB, 64000
    early = meter.view(st, 0.3)
    assert early["rate"] is not None and early["eta"] is None  # a rate, but no "4:14 left" from 0.3 s of it
    st.transferred, st.remaining = 64 * MiB, 49000
    later = meter.view(st, ETA_AFTER + 0.1)
    assert later["eta"] is not None and later["eta"] > 0


def test_the_control_socket_hint_is_a_directory_of_its_own(tmp_path: Path):
    wide = tmp_path / "work"
    wide.mkdir()
    os.chmod(wide, 0o755)
    with pytest.raises(UnsafePathError) as exc:
        verify_dir(wide, CONTROL_DIR)
    msg = str(exc.value)
    assert "chmod" not in msg and "mkdir -m 700 DIR, then --control DIR/control.sock" in msg
    with pytest.raises(UnsafePathError, match="chmod 700"):  # other directories: the agent's own, chmod is right
        verify_dir(wide, "state directory")


def test_an_incoming_refusal_for_memory_says_the_sizes():
    adm = Admission(max_sessions=10, max_memory=1000 * MiB, max_per_peer=10, max_memory_per_peer=300 * MiB)
    adm.admit(b"p" * 32, 200 * MiB)
    with pytest.raises(MigrationFailure) as exc:
        adm.admit(b"p" * 32, 256 * MiB)
    assert "200 MiB reserved" in str(exc.value) and "256 MiB more" in str(exc.value) and "300 MiB" in str(exc.value)


def test_one_wording_for_a_cancel():
    assert CANCELLED == "cancelled by the operator"
    from palm_net.agent import outgoing

    assert outgoing.LiveMigration.__dataclass_fields__["cancel_reason"].default is None


@pytest.mark.parametrize(("dests", "word"), [(["b"], "moved to 1 agent in"), (["b", "c"], "moved to 2 agents in")])
def test_the_drain_summary_says_agent_for_one(dests, word):
    vms = {f"vm{i}": SimpleNamespace(state="moved", to=d, error="") for i, d in enumerate(dests)}
    counts = {"moved": len(vms), "waiting": 0, "migrating": 0, "failed": 0, "unplaceable": 0}
    st = SimpleNamespace(host="a", state="done", vms=vms, started=0.0, finished=2.0, updated=2.0, max_parallel=2,
                         counts=lambda: counts)
    assert word in drain_summary(st, SimpleNamespace(max_cluster=8, max_source=2), wrap=False)
