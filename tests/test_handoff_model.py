"""The handoff, checked exhaustively (issue 21, point 6): palm_net.testing.handoff_model.

Every state of one migration reachable within the bound (pre-copy or
post-copy, the source's choice at the pause; messages lost, duplicated,
reordered, delayed; crashes and restarts of either side at every step;
recovery queries, post-copy's serving again; the operator, its abandon
included) is explored breadth first, and on each: never two runnable copies,
never no copy (post-copy: the destination's running copy and the source's
paused one, both, until PULLED; unless the operator abandoned it there,
counted apart); from each, recovery alone settles on exactly one running copy,
and brings a side that abandoned to its end.  The model
takes its rules from the code (handoff.MOVES / leaving / may_resume / may_scrub
/ may_run and orchestrate.IN_DOUBT, looked up at call time, and
VmRegistry.operable), so the mutation tests below break one rule of the code
with monkeypatch and expect the checker to find a counterexample.
"""

from __future__ import annotations

import pytest

from palm_net.agent.registry import VmRegistry
from palm_net.migration import handoff, orchestrate
from palm_net.migration.handoff import DESTINATION, SOURCE, HandoffState, Step
from palm_net.testing import handoff_model as hm
from tests.conftest import FUZZ_COUNTS


def explore(bounds: hm.Bounds | None = None, **kw) -> hm.Result:
    result = hm.explore(bounds, **kw)
    print(result.summary())  # shown with -s; the count is also in the assertion messages and properties
    return result


@pytest.fixture(scope="module")
def checked() -> hm.Result:
    """The suite's bound (hm.Bounds()), explored once for the tests that read it."""
    return explore()


def test_the_handoff_is_safe_and_live(checked, record_property):
    result = checked
    record_property("handoff_model_states", result.states)
    record_property("handoff_model_bound", result.bounds.describe())
    FUZZ_COUNTS["handoff model states"] += result.states  # in the run's summary line, with or without -s
    postcopy = sum(s.postcopy for s in result.seen)
    record_property("handoff_model_postcopy_states", postcopy)
    assert not result.violations, f"{result.summary()}\n{result.violations[0]}"
    # The bound is the one stated in docs/SECURITY.md; a collapse of the state space would be a bug of the model.
    assert result.bounds.postcopy and result.states > 50000 and postcopy > 30000, (result.summary(), postcopy)
    assert result.cpu < 60, result.summary()


@pytest.mark.deep
def test_the_handoff_at_a_deeper_bound():
    """3 copies of each message in flight, 4 crashes, 2 forged messages, the abandon: about
    340,000 states, a minute or two of CPU (run with -m deep)."""
    result = explore(hm.Bounds(copies=3, crashes=4, forged=2))
    assert not result.violations, f"{result.summary()}\n{result.violations[0]}"
    assert result.states > 250000, result.summary()


def test_the_model_reaches_what_matters(checked):
    """Not a vacuous pass: the runs the properties are about are all explored."""
    seen = {(s.src_row, s.src_vm, s.dst_row, s.dst_vm) for s in checked.seen}
    V = hm.Vm
    assert (HandoffState.DONE, V.SCRUBBED, HandoffState.COMMITTED, V.RUNNING) in seen  # migrated
    assert (HandoffState.ABORTED, V.RUNNING, HandoffState.ABORTED, V.SCRUBBED) in seen  # aborted, resumed at the source
    assert (HandoffState.ABORTED, V.RUNNING, None, V.NONE) in seen  # failed before BEGIN arrived
    assert (HandoffState.HANDED_OFF, V.PAUSED, HandoffState.COMMITTED, V.RUNNING) in seen  # in doubt, committed
    assert (HandoffState.HANDED_OFF, V.PAUSED, HandoffState.ABORTED, V.SCRUBBED) in seen  # in doubt, aborted
    # committed, activation failed: the only copy
    assert (HandoffState.DONE, V.SCRUBBED, HandoffState.COMMITTED, V.INCOMING) in seen


def test_the_model_reaches_what_matters_in_postcopy(checked):
    """Post-copy's runs: switched, served, pulled; RUNNING lost and the source asking;
    served again by a recovery session; a pulling VM that does not run; a crash with
    every page in but COMMITTED not yet written."""
    S, D, V = hm.SrcPc, hm.DstPc, hm.Vm
    pc = [s for s in checked.seen if s.postcopy and not s.destroyed]
    seen = {(s.src_row, s.src_vm, s.dst_row, s.dst_vm, s.dst_missing) for s in pc}
    assert (HandoffState.DONE, V.SCRUBBED, HandoffState.COMMITTED, V.RUNNING, False) in seen  # migrated
    assert (HandoffState.SERVING, V.PAUSED, HandoffState.PULLING, V.RUNNING, True) in seen  # serving
    assert (HandoffState.HANDED_OFF, V.PAUSED, HandoffState.PULLING, V.RUNNING, True) in seen  # RUNNING lost
    assert (HandoffState.SERVING, V.PAUSED, HandoffState.PULLING, V.INCOMING, True) in seen  # activation failed
    assert (HandoffState.SERVING, V.PAUSED, HandoffState.COMMITTED, V.RUNNING, False) in seen  # PULLED lost
    assert (HandoffState.ABORTED, V.RUNNING, HandoffState.ABORTED, V.SCRUBBED, True) in seen  # aborted before COMMIT
    assert any(s.src_pc is S.SERVING and s.dst_pc is D.PULL_AGAIN for s in pc)  # a recovery session serves
    assert any(s.src_row is HandoffState.HANDED_OFF and s.src_pc is S.IN_DOUBT and s.msgs[hm.Msg.OUT_POSTCOPY]
               for s in pc)  # "postcopy" on its way to a source that never had RUNNING
    assert any(s.dst_row is HandoffState.PULLING and not s.dst_missing and not s.dst_up for s in pc)
    assert any(s.src_row is HandoffState.SERVING and not s.src_up for s in pc)  # restarted serving


def test_an_override_may_fork_and_only_an_override():
    """--override is the documented, loud exception: it forks the VM if the destination
    committed; every fork the checker finds has an override in its trace."""
    result = explore(hm.Bounds(override=True, crashes=1))  # (post-copy too: the override of a handed-off one)
    assert not result.violations, f"{result.summary()}\n{result.violations[0]}"
    assert result.overridden, "the override never forked: the model lost the case it exists for"
    for fork in result.overridden:
        assert any(step.startswith("OPERATOR OVERRIDE") for step in fork.trace), str(fork)
    print(f"{len(result.overridden)} forks, each after an override, e.g.\n{result.overridden[0]}")


def test_the_operator_is_asked_through_operable():
    """The model's operator goes through the real VmRegistry.operable."""
    ask = hm.Operable()
    assert not ask(SOURCE, HandoffState.HANDED_OFF, "paused", True, False)  # in doubt: --resolve only
    assert not ask(SOURCE, HandoffState.SENDING, "running", True, True)  # migrating
    assert ask(SOURCE, HandoffState.ABORTED, "running", False, False)
    # committed, not running: not the operator's
    assert not ask(DESTINATION, HandoffState.COMMITTED, "incoming", True, False)
    assert ask(DESTINATION, HandoffState.COMMITTED, "running", False, False)
    # post-copy: a serving copy never runs again; a pulling VM is not the operator's while pages are missing
    assert not ask(SOURCE, HandoffState.SERVING, "paused", True, False)
    assert not ask(DESTINATION, HandoffState.PULLING, "running", False, False, True)
    assert not ask(DESTINATION, HandoffState.PULLING, "running", False, False, False)  # nor until COMMITTED
    assert ask(DESTINATION, HandoffState.COMMITTED, "running", False, False, False)


def test_the_model_uses_the_codes_rules(monkeypatch):
    """Each rule is looked up at call time (so the mutations below reach the model)."""
    calls: dict[str, int] = {}
    for name in ("may_resume", "may_scrub", "may_run", "leaving"):
        real = getattr(handoff, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **kw)

        monkeypatch.setattr(handoff, name, spy)
    explore(hm.Bounds(crashes=1, postcopy=False), liveness=False)
    assert set(calls) == {"may_resume", "may_scrub", "may_run", "leaving"}, calls


# --------------------------------------------------------------------------
# Mutations: one guard of the code dropped; the checker must find a counterexample.


def counterexample(bounds: hm.Bounds | None = None, kind: str | None = None) -> hm.Violation:
    result = explore(bounds, stop_at_first=True)
    assert result.violations, f"no counterexample: {result.summary()}"
    found = result.violations[0]
    print(found)
    if kind is not None:
        assert found.kind == kind, str(found)
    return found


def test_mutation_resume_without_token_after_handoff_is_caught(monkeypatch):
    real = handoff.may_resume

    def may_resume(state, *, token_ok=False, override=False):
        return state is HandoffState.HANDED_OFF or real(state, token_ok=token_ok, override=override)

    monkeypatch.setattr(handoff, "may_resume", may_resume)
    found = counterexample(kind="fork")
    assert any("OUT_BAD" in step or "ABORT_BAD" in step for step in found.trace)  # a token that does not verify


def test_mutation_destination_scrubs_a_committed_vm_is_caught(monkeypatch):
    real = handoff.may_scrub
    monkeypatch.setattr(handoff, "may_scrub", lambda side, state: real(side, state) or state is HandoffState.COMMITTED)
    counterexample(kind="loss")


def test_mutation_token_no_longer_resumes_is_caught_by_liveness(monkeypatch):
    """Safe but stuck: an in-doubt source that the destination's token cannot resume
    stays paused forever once the destination aborted (the liveness check's own test)."""
    real = handoff.may_resume
    monkeypatch.setattr(handoff, "may_resume", lambda state, *, token_ok=False, override=False:
                        state is not HandoffState.HANDED_OFF and real(state))
    found = explore(hm.Bounds(postcopy=False))
    assert [v.kind for v in found.violations] == ["stuck"], found.summary()
    print(found.violations[0])
    assert found.violations[0].state.src_row is HandoffState.HANDED_OFF


def test_mutation_commit_after_abort_is_caught(monkeypatch):
    monkeypatch.setitem(handoff.MOVES, (DESTINATION, HandoffState.ABORTED, Step.COMMIT), HandoffState.COMMITTED)
    assert HandoffState.ABORTED in handoff.leaving(DESTINATION, Step.COMMIT)
    counterexample(kind="fork")


def test_mutation_commit_sent_before_the_handoff_is_durable_is_caught():
    counterexample(hm.Bounds(commit_before_handoff=True), kind="fork")


def test_mutation_operator_resumes_an_in_doubt_vm_is_caught(monkeypatch):
    monkeypatch.setattr(VmRegistry, "operable", lambda self, name: self.get(name))
    counterexample(kind="fork")


def test_settling_a_session_by_its_outcome_loses_a_committed_vm():
    """What palm_net/agent/incoming.py ``_settle`` does today: a session that ends
    with the engine's outcome not "committed" has its VM scrubbed, whatever the row
    says.  If commit_and_activate raises past the engine after the COMMITTED move
    (an exception activate_committed does not catch, a SQLite error reading the
    row back), the committed VM is scrubbed and the in-doubt source, told
    "committed", scrubs too: the VM is lost.  The suite's model settles by the row
    (may_scrub); this test keeps the counterexample in view until the code does too."""
    counterexample(hm.Bounds(settle_by_outcome=True), kind="loss")



# --------------------------------------------------------------------------
# Post-copy's mutations (proto 7.9): the source's copy kept, paused, until PULLED.


def test_mutation_source_scrubs_a_serving_copy_is_caught(monkeypatch):
    """(a) A serving source may scrub: the destination's VM loses the pages only it held."""
    real = handoff.may_scrub
    monkeypatch.setattr(handoff, "may_scrub",
                        lambda side, state: real(side, state) or (side is SOURCE and state is HandoffState.SERVING))
    found = counterexample(kind="loss")
    assert found.state.dst_row is HandoffState.PULLING and found.state.src_vm is hm.Vm.SCRUBBED, str(found)


def test_mutation_switch_straight_to_committed_is_caught(monkeypatch):
    """(b) SWITCH moves prepared -> committed: a query is answered "committed" while
    pages are missing, and the source confirms and scrubs too early."""
    monkeypatch.setitem(handoff.MOVES, (DESTINATION, HandoffState.PREPARED, Step.SWITCH), HandoffState.COMMITTED)
    found = counterexample(kind="loss")
    assert found.state.dst_missing and found.state.src_row is HandoffState.DONE, str(found)


def test_mutation_pulling_answered_committed_is_caught():
    """(b) answer_query says "committed" for a pulling row: the source scrubs too early."""
    found = counterexample(hm.Bounds(answer_pulling_committed=True), kind="loss")
    assert found.state.dst_row is HandoffState.PULLING and found.state.src_row is HandoffState.DONE, str(found)
    assert "source gets OUT_COMMITTED" in found.trace, str(found)


def test_mutation_serving_source_resumes_is_caught(monkeypatch):
    """(c) may_resume lets a serving source resume (with the table's abort move it needs):
    its copy runs beside the destination's.  The operator's --override cannot reach a
    serving row (--resolve and override_resume take a handed_off one only): a forged
    OUTCOME is what the model finds."""
    real = handoff.may_resume
    monkeypatch.setattr(handoff, "may_resume", lambda state, *, token_ok=False, override=False:
                        state is HandoffState.SERVING or real(state, token_ok=token_ok, override=override))
    monkeypatch.setitem(handoff.MOVES, (SOURCE, HandoffState.SERVING, Step.ABORT), HandoffState.ABORTED)
    found = counterexample(kind="fork")
    assert found.state.dst_row is HandoffState.PULLING, str(found)


def test_mutation_abort_from_serving_in_the_table_is_caught(monkeypatch):
    """(c) The table alone: an abort move from serving is enough, since may_resume
    guards handed_off only and lets any other state the table lets ABORT leave resume."""
    monkeypatch.setitem(handoff.MOVES, (SOURCE, HandoffState.SERVING, Step.ABORT), HandoffState.ABORTED)
    counterexample(kind="fork")


def test_mutation_abort_from_pulling_in_the_table_is_caught(monkeypatch):
    """A pulling row that can be aborted (answer_query's abort_forever) hands out a token
    while the VM runs at the destination."""
    monkeypatch.setitem(handoff.MOVES, (DESTINATION, HandoffState.PULLING, Step.ABORT), HandoffState.ABORTED)
    counterexample(kind="fork")


def test_mutation_serving_source_may_run_is_caught(monkeypatch):
    """may_run(SOURCE, serving): the outgoing service's _settle resumes the paused copy."""
    real = handoff.may_run
    monkeypatch.setattr(handoff, "may_run",
                        lambda side, state: real(side, state) or (side is SOURCE and state is HandoffState.SERVING))
    counterexample(kind="fork")


def test_mutation_destination_scrubs_a_pulling_vm_is_caught(monkeypatch):
    """The destination's copy ran: scrubbing it loses the VM (the source's copy is stale)."""
    real = handoff.may_scrub
    monkeypatch.setattr(handoff, "may_scrub", lambda side, state:
                        real(side, state) or (side is DESTINATION and state is HandoffState.PULLING))
    counterexample(kind="loss")


def test_mutation_operator_resumes_a_serving_vm_is_caught(monkeypatch):
    """operable without its serving guard: the operator's vm resume runs the stale copy."""
    real = VmRegistry.operable

    def operable(self, name):
        vm = self.get(name)
        row = self.store.get(vm.migration) if vm.migration else None
        return vm if row is not None and row.state is HandoffState.SERVING else real(self, name)

    monkeypatch.setattr(VmRegistry, "operable", operable)
    found = counterexample(kind="fork")
    assert "operator: vm resume (source)" in found.trace, str(found)


def test_mutation_serving_not_in_doubt_is_caught_by_liveness(monkeypatch):
    """orchestrate.IN_DOUBT without serving: a serving source whose session broke off
    (or that restarted) is never asked about, and the destination pulls forever."""
    monkeypatch.setattr(orchestrate, "IN_DOUBT", (HandoffState.HANDED_OFF,))
    found = explore(hm.Bounds(crashes=0, forged=0, operator=False))
    assert [v.kind for v in found.violations] == ["stuck"], found.summary()
    print(found.violations[0])
    assert found.violations[0].state.src_row is HandoffState.SERVING


# --------------------------------------------------------------------------
# The operator's abandon (proto 7.5's last column, 7.9 item 7): post-copy's way out once a
# host is lost.  It may lose the VM only where post-copy risks it; it never forks it.


def test_an_abandon_loses_the_vm_only_where_post_copy_risks_it(checked):
    """In the suite's bound (Bounds().abandon): the operator abandons on either side wherever
    the table allows it (serving, pulling), before or after the other side, with crashes
    between its row and its scrub.  No fork; the VM is lost only after an abandon taken while
    the destination ran the VM with pages missing (counted apart, never a violation); and
    each abandoning side ends done with it (its copy scrubbed, nothing asked or served)."""
    assert checked.bounds.abandon and not checked.violations
    example = checked.abandoned_example
    assert checked.abandoned > 0 and example is not None, "no abandon lost the VM: the model lost the case"
    assert any(step.startswith("OPERATOR ABANDON") for step in example.trace), str(example)
    print(f"{checked.abandoned} states lost by an abandon, e.g.\n{example}")
    abandoned = [s for s in checked.seen if HandoffState.ABANDONED in (s.src_row, s.dst_row)]
    assert all(s.postcopy for s in abandoned)
    # not at risk: only a source abandoning after the destination committed (PULLED lost), which loses nothing
    assert all(s.dst_row is HandoffState.COMMITTED and s.src_row is HandoffState.ABANDONED
               for s in abandoned if s.needless)
    V, D, S = hm.Vm, hm.DstPc, hm.SrcPc
    both = [s for s in abandoned if s.src_row is s.dst_row is HandoffState.ABANDONED]
    assert any(s.src_vm is s.dst_vm is V.SCRUBBED and s.src_pc is S.IDLE and s.dst_pc is D.IDLE for s in both)
    # a crash between the row and the scrub: the restart scrubs (registry.load)
    assert any(s.src_row is HandoffState.ABANDONED and s.src_vm is V.PAUSED and not s.src_up for s in abandoned)
    assert any(s.dst_row is HandoffState.ABANDONED and s.dst_vm is V.RUNNING and not s.dst_up for s in abandoned)
    # the source abandoned after the destination committed (PULLED lost): nothing lost, it settles
    assert any(s.src_row is HandoffState.ABANDONED and s.dst_row is HandoffState.COMMITTED
               and s.dst_vm is V.RUNNING and hm.settled(s) for s in abandoned)


def test_the_abandon_never_runs_a_copy_and_its_moves_are_the_operators_only():
    """MOVES: abandon leaves serving and pulling only, into abandoned, which is final and
    lets no copy run; no other step (none a message takes) reaches abandoned."""
    assert {(side, s) for (side, s, step) in handoff.MOVES if step is Step.ABANDON} == {
        (SOURCE, HandoffState.SERVING), (DESTINATION, HandoffState.PULLING)}
    assert {step for (_, _, step), after in handoff.MOVES.items() if after is HandoffState.ABANDONED} == {
        Step.ABANDON}
    assert HandoffState.ABANDONED in handoff.FINAL
    for side in (SOURCE, DESTINATION):
        assert not handoff.may_run(side, HandoffState.ABANDONED) and handoff.may_scrub(side, HandoffState.ABANDONED)
    assert not handoff.may_resume(HandoffState.ABANDONED, token_ok=True, override=True)


def test_mutation_abandon_from_handed_off_is_caught(monkeypatch):
    """An abandon from handed_off (in doubt, not past a post-copy switch): the source scrubs
    a copy that was the whole VM (the destination had not committed, or aborted): a loss
    no post-copy risk allows."""
    monkeypatch.setitem(handoff.MOVES, (SOURCE, HandoffState.HANDED_OFF, Step.ABANDON), HandoffState.ABANDONED)
    found = counterexample(kind="loss")
    assert "OPERATOR ABANDON (source)" in found.trace and found.state.needless, str(found)


def test_mutation_abandon_from_prepared_is_caught(monkeypatch):
    """An abandon from prepared: the destination scrubs a VM that never ran there, the
    source's copy still whole (it then waits in doubt for ever: no token for an abandoned row)."""
    monkeypatch.setitem(handoff.MOVES, (DESTINATION, HandoffState.PREPARED, Step.ABANDON), HandoffState.ABANDONED)
    found = counterexample(kind="loss")
    assert "OPERATOR ABANDON (destination)" in found.trace and found.state.needless, str(found)


def test_mutation_abandon_into_aborted_at_the_source_is_caught(monkeypatch):
    """Why abandoned is a state of its own (proto 7.5): a serving copy recorded aborted may
    run again (the operator's resume, a restart before its scrub) beside the destination's VM."""
    monkeypatch.setitem(handoff.MOVES, (SOURCE, HandoffState.SERVING, Step.ABANDON), HandoffState.ABORTED)
    found = counterexample(kind="fork")
    assert "OPERATOR ABANDON (source)" in found.trace, str(found)


def test_mutation_abandon_into_aborted_at_the_destination_is_caught(monkeypatch):
    """The same at the destination: an aborted row hands a source still handed_off an abort
    token, and its copy resumes (here before the abandoned VM is even scrubbed: a fork)."""
    monkeypatch.setitem(handoff.MOVES, (DESTINATION, HandoffState.PULLING, Step.ABANDON), HandoffState.ABORTED)
    found = counterexample(kind="fork")
    assert "source gets OUT_ABORTED" in found.trace, str(found)


def test_mutation_an_abandoned_copy_never_scrubbed_is_caught_by_liveness(monkeypatch):
    """may_scrub without abandoned: the row says abandoned and the copy stays for ever."""
    real = handoff.may_scrub
    monkeypatch.setattr(handoff, "may_scrub", lambda side, state: state is not HandoffState.ABANDONED
                        and real(side, state))
    found = explore(hm.Bounds(crashes=1, forged=0))
    assert {v.kind for v in found.violations} == {"stuck"}, found.summary()
    print(found.violations[0])
    assert HandoffState.ABANDONED in (found.violations[0].state.src_row, found.violations[0].state.dst_row)
