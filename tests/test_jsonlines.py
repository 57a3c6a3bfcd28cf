"""The bounded JSON-lines reader the control socket, its client and QMP share (palm_net.jsonlines)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palm_net.jsonlines import JsonLines, LineError

OBJECTS = st.lists(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20), max_size=4),
                   min_size=1, max_size=6)


@given(objs=OBJECTS, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_objects_come_out_whole_however_the_bytes_are_cut(objs, cuts):
    data = b"".join(json.dumps(o).encode() + b"\n" for o in objs)
    lines, out, prev = JsonLines(4096), [], 0
    for cut in [*sorted(c for c in cuts if c < len(data)), len(data)]:
        lines.feed(data[prev:cut])
        prev = cut
        while (obj := lines.next()) is not None:
            out.append(obj)
    assert out == objs


def test_a_line_over_the_bound_is_refused_before_it_is_whole():
    lines = JsonLines(100)
    lines.feed(b"{" + b" " * 100)  # no newline yet, already too long
    with pytest.raises(LineError, match="over the limit of 100"):
        lines.next()
    lines = JsonLines(100)
    lines.feed(b'{"a": "' + b"x" * 100 + b'"}\n')
    with pytest.raises(LineError, match="over the limit of 100"):
        lines.next()
    lines = JsonLines(100)
    lines.feed(b'{"a": 1}' + b" " * 92 + b"\n")  # exactly at the bound: taken
    assert lines.next() == {"a": 1}


@pytest.mark.parametrize(("line", "why"), [(b"[1, 2]\n", "not a JSON object"), (b"{nope\n", "not JSON"),
                                           (b"\xff\n", "not JSON")])
def test_a_line_that_is_not_a_json_object_is_refused(line, why):
    lines = JsonLines(100)
    lines.feed(line)
    with pytest.raises(LineError, match=why):
        lines.next()
