"""Every safety check has a test that fails without it, kept true (issue 27, part 3).

Each mutant below removes or weakens one safety check of the code as it
stands (a guard of the handoff, a signature check, the order of a durable
write and the message it announces, a bound).  The `mutation` tier (in
`.ci/run`) copies the tree, applies a seeded sample of them one at a time and
runs the tests named for each: they must fail.  A test weakened later, or a
check refactored so that its test no longer reaches it, shows up here.  The
default suite only checks that every mutant still applies to the code (so the
list cannot go stale); the whole mutmut run is docs/MUTATION.md.

Two of issue 21's guards are left out on purpose: each has a second layer that
keeps one copy without it (settling a session from its row: the engine's own
outcome now follows the row, and a restart activates from it; the checkpoint
before the hand-off: every handed-off row is recovered however its migration
ended), so removing one alone fails no test.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = int(os.environ.get("PALM_MUTATION_SAMPLE", "6"))
SEED = int(os.environ.get("PALM_MUTATION_SEED", "27"))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # in the tree
    old: str  # exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: what must fail


SAFETY = "tests/test_safety_checks.py"
CHANNELS = "tests/test_channels.py"
POSTCOPY = "tests/test_postcopy.py"
RELAY = "tests/test_relay.py"
ABANDON = "tests/test_postcopy_abandon.py"
MUTANTS = [
    Mutant("certificate signature not checked", "palm_net/crypto/identity.py",
           "            VerifyKey(authority_pub).verify(CERT_DOMAIN + self.body, self.signature)\n",
           "            pass\n", (SAFETY, "-k", "forged_certificate or did_not_sign")),
    Mutant("COMMIT sent before the hand-off is durable", "palm_net/migration/source.py",
           "        return self._request(Step.HANDING_OFF, HandOff(), HandedOff)\n",
           "        return self._commit(0.0) + self._request(Step.HANDING_OFF, HandOff(), HandedOff)\n",
           (SAFETY, "-k", "hand_off_is_durable or crash_right_after_commit")),
    Mutant("recovery believes any certified agent", "palm_net/migration/orchestrate.py",
           "        if not row.is_peer(channel.result.peer.static_pub):\n",
           "        if False:\n", (SAFETY, "-k", "recovery_believes_only")),
    Mutant("an abort after COMMIT resumes without a valid token", "palm_net/migration/source.py",
           "            if check_abort_token(self.peer_sign_pub, self.mid, body.token):\n",
           "            if True:\n", (SAFETY, "-k", "abort_after_commit_needs")),
    Mutant("a clear record accepted on the message path", "palm_net/channel/transport.py",
           "                    if not rec.authenticated:\n",
           "                    if False:\n", (SAFETY, "-k", "clear_record_on_the_message_path")),
    Mutant("a secure sender seals a clear record", "palm_net/channel/records.py",
           "        if clear and not self.plain:\n",
           "        if False:\n", (SAFETY, "-k", "never_seals_a_clear_record")),
    Mutant("max_incoming not enforced", "palm_net/agent/limits.py",
           "            if self.sessions >= self.max_sessions:\n",
           "            if False:\n", (SAFETY, "-k", "max_incoming")),
    Mutant("the destination may scrub a committed VM", "palm_net/migration/handoff.py",
           "    return state in (None, HandoffState.ABORTED, HandoffState.ABANDONED)\n",
           "    return True\n", ("tests/test_handoff_model.py", "-k", "safe_and_live")),
    Mutant("an in-doubt source resumes without a token", "palm_net/migration/handoff.py",
           "        return token_ok or override\n",
           "        return True\n", ("tests/test_handoff_model.py", "-k", "safe_and_live")),
    Mutant("a gfn accepted on another channel than its own", "palm_net/migration/destination.py",
           "            if elsewhere.any():\n",
           "            if False:\n", (CHANNELS, "-k", "own_channel")),
    Mutant("an older copy of a protected page taken", "palm_net/migration/applied.py",
           "        if older.any():\n", "        if False:\n",
           ("tests/test_destination_engine.py", "-k", "older-version-of-a-page")),
    Mutant("a zero or normal page of another version than its round taken", "palm_net/migration/applied.py",
           "        if bool((plain != round_no).any()):\n", "        if False:\n",
           ("tests/test_destination_engine.py", "-k", "version_is_not_its_round")),
    Mutant("a page's round going back on its channel taken", "palm_net/migration/destination.py",
           "        if p.round < last_round:\n", "        if False:\n", (CHANNELS, "-k", "never_goes_back")),
    Mutant("a page of the wrong kind for its gfn left to the hypervisor", "palm_net/migration/applied.py",
           "        if misplaced.any():\n", "        if False:\n",
           ("tests/test_destination_engine.py", "-k", "wrong_kind")),
    Mutant("a data session joins a migration of another agent", "palm_net/agent/incoming.py",
           "and hmac.compare_digest(r.host.peer.static_pub, key)), None)",
           "and True), None)", (CHANNELS, "-k", "cannot_join")),
    Mutant("pages sent on a data session to another agent", "palm_net/migration/runner.py",
           "            if not hmac.compare_digest(ch.result.peer.static_pub, peer):\n",
           "            if False:\n", (CHANNELS, "-k", "must_reach")),
    Mutant("READY (or a stream's load) before every data session's COMPLETE", "palm_net/migration/destination.py",
           "        return sum(lane.complete for lane in self.lanes.values()) >= self.channels - 1\n",
           "        return True\n", (CHANNELS, "-k", "ready_waits or loads_once_every_channel")),
    Mutant("a data session's page count not bound by its COMPLETE", "palm_net/migration/destination.py",
           "        if c.page_records != lane.page_records:\n",
           "        if False:\n", (CHANNELS, "-k", "ready_waits")),
    Mutant("a migration stream taken from another process than the VM's QEMU", "palm_net/hypervisor/qemu.py",
           "        if pid != self.pid:\n",
           "        if False:\n", ("tests/test_host_security.py", "-k", "not_from_its_qemu or only_to_its_qemu")),
    Mutant("a second loader file= let through", "palm_net/hypervisor/qemu.py",
           "        if key in seen:",
           "        if False:", ("tests/test_host_security.py", "-k", "second_file_property")),
    Mutant("a migration cancelled before the hand-off leaves the VM paused", "palm_net/migration/orchestrate.py",
           '                store.abort_and_resume(mid, vm, "cancelled: migration cancelled")\n',
           "                pass\n", (SAFETY, "-k", "cancelled_from_outside")),
    Mutant("a DONE not recorded reported completed", "palm_net/migration/orchestrate.py",
           "            if store.state_of(mid) in IN_DOUBT:\n",
           "            if False:\n", (SAFETY, "-k", "failure_after_done")),
    Mutant("QEMU streams queued behind one another at the destination", "palm_net/migration/runner.py",
           "        index = lane.index if lane is not None and stream else 0\n",
           "        index = 0\n", (CHANNELS, "-k", "writes_each_stream_on_its_own")),
    # Post-copy (proto 7.9)
    Mutant("a post-copy page taken twice", "palm_net/migration/postcopy.py",
           "        if not known.all() or self.taken[idx].any():\n",
           "        if not known.all():\n", (POSTCOPY, "-k", "puller_takes_only")),
    Mutant("a post-copy page of another version than announced taken", "palm_net/migration/postcopy.py",
           "        if not bool((self.vers[idx] == batch.vers).all()):\n",
           "        if False:\n", (POSTCOPY, "-k", "puller_takes_only")),
    Mutant("a post-copy page of another version filled", "palm_net/hypervisor/model_postcopy.py",
           "            if bool((vers != expected).any()):\n",
           "            if False:\n", ("tests/test_postcopy_vm.py", "-k", "refused_whole")),
    Mutant("a pulling destination answers a query as aborted", "palm_net/migration/orchestrate.py",
           "    if row is not None and row.state is HandoffState.PULLING:  # (never aborted: the VM ran here)\n",
           "    if False:\n", (POSTCOPY, "-k", "pulling_destination")),
    Mutant("a PULLED believed with pages never sent", "palm_net/migration/postcopy_source.py",
           "    if eng.server.unsent:  # it cannot have pages never sent: its word is not taken\n",
           "    if False:\n", (POSTCOPY, "-k", "pulled_before")),
    Mutant("a pulling VM is not the destination's to run", "palm_net/migration/handoff.py",
           "        return state in (HandoffState.COMMITTED, HandoffState.PULLING)\n",
           "        return state is HandoffState.COMMITTED\n", (POSTCOPY, "-k", "between_the_two_engines")),
    Mutant("a VM still pulling its pages handed to the operator", "palm_net/agent/registry.py",
           "        if isinstance(vm, ModelVM) and (vm.missing_count() or any(\n",
           "        if False and (vm.missing_count() or any(\n", ("tests/test_postcopy_vm.py", "-k", "pulling_is_no")),
    Mutant("a VM created --no-postcopy migrated by post-copy", "palm_net/agent/outgoing.py",
           '        if params.postcopy and not getattr(vm, "postcopy_allowed", True):\n',
           "        if False:\n", ("tests/test_postcopy_e2e.py", "-k", "created_without")),
    Mutant("a page an earlier MISSING named taken again (until the CPU state)",
           "palm_net/migration/postcopy_destination.py",
           "    if bool(eng._named[gfns].any()):  # (two ascending runs: before the pause and after it)\n",
           "    if False:\n", (POSTCOPY, "-k", "does_not_fit")),
    Mutant("a MISSING's protected page its bitmap does not name taken", "palm_net/migration/postcopy_destination.py",
           "    named = bool((at < len(gfns)).all()) and bool((gfns[np.minimum(at, len(gfns) - 1)] == pgfns).all())\n",
           "    named = True\n", (POSTCOPY, "-k", "does_not_fit")),
    Mutant("a MISSING's page no protected process owns taken as protected",
           "palm_net/migration/postcopy_destination.py",
           "    if bool((slots < 0).any()):\n", "    if False:\n", (POSTCOPY, "-k", "no_protected_process_owns")),
    Mutant("a MISSING taken on more channels than one", "palm_net/migration/postcopy_destination.py",
           "    if not eng.keys_imported or eng.channels > 1:\n",
           "    if not eng.keys_imported:\n", (POSTCOPY, "-k", "does_not_fit")),
    Mutant("a restarted agent's guest reads a missing page's stale copy", "palm_net/hypervisor/model_postcopy.py",
           "                self._missing = self._postcopy.bits\n",
           "                self._missing = None\n", ("tests/test_postcopy_vm.py", "-k", "restarted_agent")),
    # Protected pages (proto 7.3)
    Mutant("the blob's digest of the final versions and MACs not checked", "palm_net/hypervisor/model.py",
           "            if not hmac.compare_digest(self._metadata_digest(i), digest):\n",
           "            if False:\n", ("tests/test_destination_engine.py", "-k", "short_of_its_final_version")),
    Mutant("a page sealed for sending under a version already used", "palm_net/hypervisor/model_guest.py",
           "            version = a.versions[g] + 1\n",
           "            version = a.versions[g] + 0\n", ("tests/test_protected_pages.py", "-k", "sealed_for_sending")),
    Mutant("a page sealed again after the final state was exported", "palm_net/hypervisor/model_guest.py",
           "        if len(gfns) and not self._reads_seal:",
           "        if False:", ("tests/test_protected_pages.py", "-k", "not_sealed_again")),
    # The operator's abandon (proto 7.5, 7.9 item 7)
    Mutant("an in-doubt (handed-off) copy abandoned", "palm_net/migration/handoff.py",
           "    (SOURCE, HandoffState.SERVING, Step.ABANDON): HandoffState.ABANDONED,\n",
           "    (SOURCE, HandoffState.HANDED_OFF, Step.ABANDON): HandoffState.ABANDONED,\n",
           ("tests/test_handoff_model.py", "-k", "safe_and_live")),
    Mutant("an abandoned serving copy recorded aborted (runnable)", "palm_net/migration/handoff.py",
           "    (SOURCE, HandoffState.SERVING, Step.ABANDON): HandoffState.ABANDONED,\n",
           "    (SOURCE, HandoffState.SERVING, Step.ABANDON): HandoffState.ABORTED,\n",
           ("tests/test_handoff_model.py", "-k", "safe_and_live")),
    Mutant("an abandoned copy scrubbed while its pages are still served", "palm_net/agent/abandon.py",
           "        await outgoing.end_readers(row.mid)",
           "        pass", ("tests/test_postcopy_abandon.py", "-k", "still_serves")),
    Mutant("a VM abandoned without a reason", "palm_net/agent/abandon.py",
           "    if not reason.strip():\n",
           "    if False:\n", ("tests/test_postcopy_abandon.py", "-k", "without_a_reason")),
    Mutant("an abandoned VM left running by a restart", "palm_net/agent/registry.py",
           "        self._scrub_abandoned()\n",
           "        pass\n", ("tests/test_postcopy_abandon.py", "-k", "restart_finishes")),
    Mutant("a session sends a message of its own beside its stream's lease", "palm_net/wire/protocol.py",
           "        if self._lease is not None:\n            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "
           "\"our STREAM messages are leased out\")\n", "", (RELAY, "-k", "sends_nothing_of_its_own")),
    Mutant("a STREAM lease in a page migration's session", "palm_net/wire/protocol.py",
           "if self.mid is None or not self.stream or TRANSITIONS.get", "if self.mid is None or TRANSITIONS.get",
           (RELAY, "-k", "no_lease_where")),
    Mutant("a data session lent to its relay still takes records in the engine", "palm_net/migration/destination.py",
           "        if lane.lent:\n", "        if False:\n", (RELAY, "-k", "lent_to_its_relay")),
    Mutant("a destination relay writes data records its lane's protocol never checked", "palm_net/migration/relay.py",
           "                    ev = proto.receive(rec.data, rec.authenticated)\n",
           "                    ev = Data(rec.data, 0, False) if proto.data_due else proto.receive(rec.data, "
           "rec.authenticated)\n", (RELAY, "-k", "destination_relay")),
    Mutant("a relay's late abort writes to a descriptor its sender closed", "palm_net/channel/transport.py",
           "            self._wake_r = self._wake_w = -1\n", "", (RELAY, "-k", "aborted_after_it_is_closed")),
    Mutant("the destination's abandon scrubs before its sessions have ended", "palm_net/agent/incoming.py",
           "        await self._settled.until(lambda: not any(of_mid(key) for key in self._live))\n", "",
           (ABANDON, "-k", "session_still_pulls")),
    Mutant("the source's abandon scrubs a copy something may still read", "palm_net/agent/outgoing.py",
           "        await self._ended.until(", "        return\n        await self._ended.until(",
           (ABANDON, "-k", "stops_serving_before_its_scrub")),
]


def test_every_mutant_still_applies_to_the_code():
    """The list cannot go stale: each mutant's line is in its file, exactly once."""
    for m in MUTANTS:
        text = (ROOT / m.path).read_text()
        assert text.count(m.old) == 1, f"{m.name}: its line is not (once) in {m.path}: update MUTANTS"
        assert (ROOT / m.tests[0]).exists(), f"{m.name}: no {m.tests[0]}"
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


def _tree(dst: Path) -> Path:
    """What the tests need, copied (not the venv, not git, not earlier mutants)."""
    for part in ("palm_net", "tests", "proto", "deploy", "scripts", "setup.cfg", "Dockerfile", "README.md", "docs"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dst / part, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        elif src.exists():
            shutil.copy2(src, dst / part)
    return dst


@pytest.mark.mutation
@pytest.mark.parametrize("mutant", random.Random(SEED).sample(MUTANTS, min(SAMPLE, len(MUTANTS))),
                         ids=lambda m: m.name.replace(" ", "-"))
def test_a_sampled_safety_check_removed_fails_its_tests(mutant, tmp_path):
    tree = _tree(tmp_path / "tree")
    target = tree / mutant.path
    target.write_text(target.read_text().replace(mutant.old, mutant.new, 1))
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "-m", "not slow", *mutant.tests], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 1, (f"{mutant.name}: its tests did not fail (exit {p.returncode}); the check has no "
                               f"test that notices it gone\n{p.stdout[-2000:]}\n{p.stderr[-1000:]}")
