"""The structure a reader relies on: one error vocabulary equal to proto/ 8,
layers that import only downwards, no import cycles, the handoff table equal
to proto/ 7.5, one message class per type of proto/ 6."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from palm_net.crypto.identity import RejectReason
from palm_net.migration.handoff import MOVES, HandoffState, Step
from palm_net.wire import messages
from palm_net.wire.errors import ErrorCode
from palm_net.wire.protocol import Role

ROOT = Path(__file__).resolve().parent.parent
PROTO = (ROOT / "proto" / "PROTOCOL.md").read_text()
PKG = ROOT / "palm_net"
# crypto -> wire -> channel -> hypervisor -> migration -> agent -> cli (STYLE.md "Layers"); the
# helpers below every layer import nothing of palm_net; testing/ may use anything.
LAYERS = ["hostfs", "units", "trioutil", "logs", "faults", "crypto", "wire", "channel", "hypervisor", "migration",
          "cluster",
          "agent", "cli"]


def section(number: str) -> str:
    start = PROTO.index(f"## {number}.")
    end = PROTO.index("\n## ", start + 3)
    return PROTO[start:end]


def test_error_codes_are_proto_section_8():
    table = [ln for ln in section("8").splitlines() if ln.startswith("| ") and not ln.startswith("| code")]
    on_wire = {c.strip() for ln in table for c in ln.split("|")[1].split(",")}
    local = set(re.findall(r"`([a-z-]+)` \(", section("8").split("never on the wire")[1]))
    assert on_wire | local == {c.value for c in ErrorCode}
    assert {r.value for r in RejectReason} <= {c.value for c in ErrorCode}


def test_message_types_are_proto_section_6():
    table = [ln for ln in section("6").split("### 6.1")[0].splitlines() if re.match(r"\| [A-Z_]+ \| [SD]", ln)]
    assert {ln.split("|")[1].strip() for ln in table} == set(messages.TYPES)
    for cls in messages.TYPES.values():
        assert messages.schema_fields_match(cls), cls


def test_handoff_moves_are_proto_section_7_5():
    """Every (state, step) pair: exactly the moves proto 7.5 allows, nothing else."""
    allowed = {
        (Role.SOURCE, None, Step.OPEN): HandoffState.SENDING,
        (Role.SOURCE, HandoffState.SENDING, Step.HAND_OFF): HandoffState.HANDED_OFF,
        (Role.SOURCE, HandoffState.HANDED_OFF, Step.CONFIRM): HandoffState.DONE,
        (Role.SOURCE, HandoffState.SENDING, Step.ABORT): HandoffState.ABORTED,
        (Role.SOURCE, HandoffState.HANDED_OFF, Step.ABORT): HandoffState.ABORTED,
        (Role.DESTINATION, None, Step.OPEN): HandoffState.RECEIVING,
        (Role.DESTINATION, HandoffState.RECEIVING, Step.PREPARE): HandoffState.PREPARED,
        (Role.DESTINATION, HandoffState.PREPARED, Step.COMMIT): HandoffState.COMMITTED,
        (Role.DESTINATION, HandoffState.RECEIVING, Step.ABORT): HandoffState.ABORTED,
        (Role.DESTINATION, HandoffState.PREPARED, Step.ABORT): HandoffState.ABORTED,
        (Role.DESTINATION, None, Step.ABORT): HandoffState.ABORTED,
    }
    for side in Role:
        for state in (None, *HandoffState):
            for step in Step:
                assert MOVES.get((side, state, step)) == allowed.get((side, state, step)), (side, state, step)
    # Nothing ever leaves a final state; a committed migration is never aborted.
    for state in (HandoffState.DONE, HandoffState.COMMITTED, HandoffState.ABORTED):
        assert not any(s is state for (_, s, _) in MOVES)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "palm_net":  # from palm_net import logs
            out |= {f"palm_net.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("palm_net"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("palm_net")}
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return "cli" if name == "demo" else name  # the demo is a `palm` command


def test_layers_import_only_downwards_and_without_cycles():
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[mod] = _imports(path)
    for mod, deps in graph.items():
        layer = _layer(mod)
        if layer in ("testing", ""):
            continue
        assert layer in LAYERS, f"{mod}: unknown layer {layer!r} (add it to LAYERS)"
        for dep in deps:
            dl = _layer(dep)
            assert dl != "testing", f"{mod} imports test tooling {dep}"
            assert LAYERS.index(dl) <= LAYERS.index(layer), f"{mod} imports upwards: {dep}"
    # no cycles among modules
    seen: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        if seen.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*stack, m]))
        if seen.get(m) == 2:
            return
        seen[m] = 1
        for d in graph.get(m, ()):
            if d in graph:
                visit(d, [*stack, m])
        seen[m] = 2

    for m in graph:
        visit(m, [])


def test_the_engines_import_no_io():
    """The sans-IO cores (both engines, the handoff's table, the wire, the record layer)
    load in a fresh interpreter without trio, and no palm_net module they load imports
    socket (structlog, the logging library every module uses, loads it for itself)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import palm_net.migration.source, palm_net.migration.destination, palm_net.migration.handoff\n"
        "import palm_net.wire, palm_net.channel.records\n"
        "mods = [m for m in sys.modules if m.startswith('palm_net')]\n"
        "print('trio' in sys.modules, sorted(m for m in mods if 'socket' in vars(sys.modules[m])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False []", out.stdout + out.stderr
