"""The end of a QEMU migration stream, kept by both agents (palm_net/hypervisor/qemu.py
StreamTail): what it holds, and that the kvmclock areas are found from its last bytes
as from all of it.  No QEMU needed."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from palm_net.hypervisor import qemu
from palm_net.hypervisor.qemu import StreamTail, kvmclock_areas


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=700), max_size=12), st.integers(min_value=1, max_value=900))
def test_a_stream_tail_keeps_the_streams_last_bytes_whatever_its_reads(reads, limit):
    """The ring holds exactly the stream's last ``limit`` bytes, in order, however the
    reads fall across its end (and reads longer than it)."""
    tail, stream = StreamTail(limit), b""
    for data in reads:
        tail.add(memoryview(data))
        stream += data
        assert tail.bytes() == stream[-limit:] if stream else tail.bytes() == b""
        assert tail.last(5) == stream[-limit:][-5:]


def test_the_tail_finds_the_clock_areas_from_its_end_as_in_the_whole_tail():
    """The parse tried on the last bytes first gives what the whole tail gives: with
    MiBs of stream before the device state, and with a device state wider than the
    first window."""
    def end_of_stream(pad: int) -> bytes:
        cpu = {"name": "cpu", "instance_id": 0, "version": 12,
               "fields": [{"name": "env.regs", "array_len": pad // 8, "type": "uint64", "size": 8},
                          {"name": "env.system_time_msr", "type": "uint64", "size": 8},
                          {"name": "env.wall_clock_msr", "type": "uint64", "size": 8}]}
        desc = json.dumps({"page_size": 4096, "devices": [cpu]}).encode()
        section = (b"\x04\x00\x00\x00\x03\x03cpu\x00\x00\x00\x00\x00\x00\x00\x0c" + bytes(pad)
                   + (0xE8C21).to_bytes(8, "big") + (0x9000).to_bytes(8, "big") + b"\x7e\x00\x00\x00\x03")
        return section + b"\x00\x06" + len(desc).to_bytes(4, "big") + desc

    areas = [(0x9000, 12, "kvmclock wall clock"), (0xE8C20, 32, "kvmclock of vCPU 0")]
    for pad in (16, 600 << 10):  # within the first window; past it (the window grows)
        stream = os.urandom(3 << 20) + end_of_stream(pad)
        tail = StreamTail(qemu.TAIL_BYTES)
        for i in range(0, len(stream), 65263):
            tail.add(stream[i : i + 65263])
        assert tail.clock_areas() == kvmclock_areas(stream) == areas
        short = StreamTail(256 << 10)  # the description does not fit: nothing is trusted
        short.add(stream)
        assert short.clock_areas() is None if pad > 16 else short.clock_areas() == areas


def test_a_description_with_a_negative_size_is_not_trusted():
    """A negative field size or count (QEMU writes none) could point an offset back from
    the end, where a parse of the last bytes reads other bytes than a parse of the whole
    tail: the description is refused, in either."""
    cpu = {"name": "cpu", "instance_id": 0, "version": 12,
           "fields": [{"name": "a", "size": 8, "array_len": -4}, {"name": "b", "size": 8, "array_len": 4},
                      {"name": "env.system_time_msr", "type": "uint64", "size": 8}]}
    desc = json.dumps({"page_size": 4096, "devices": [cpu]}).encode()
    section = (b"\x04\x00\x00\x00\x03\x03cpu\x00\x00\x00\x00\x00\x00\x00\x0c"
               + (0xE8C21).to_bytes(8, "big") + b"\x7e\x00\x00\x00\x03")
    stream = os.urandom(1 << 20) + section + b"\x00\x06" + len(desc).to_bytes(4, "big") + desc
    tail = StreamTail(2 << 20)
    tail.add(stream)
    assert kvmclock_areas(stream) is None
    assert tail.clock_areas() is None


def test_a_stream_tail_takes_bytes_whatever_the_views_items_and_keeps_at_least_one():
    import array

    import pytest

    tail = StreamTail(8)
    tail.add(memoryview(array.array("I", [1, 2, 3])))  # 12 bytes of 4-byte items
    assert tail.bytes() == array.array("I", [1, 2, 3]).tobytes()[-8:]
    with pytest.raises(ValueError):
        StreamTail(0)
