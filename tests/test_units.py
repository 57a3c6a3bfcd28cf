"""Sizes, rates and durations: one convention, QEMU's (palm_net/units.py)."""

import pytest

from palm_net.hypervisor.vmspec import WorkloadError, check_workload, parse_workload, validate_policy
from palm_net.units import exact_size, format_duration, has_unit, parse_memory, parse_rate, parse_size


@pytest.mark.parametrize(("text", "size"), [("2G", 2 << 30), ("512M", 512 << 20), ("1g", 1 << 30),
                                             ("512mb", 512 << 20), ("2gb", 2 << 30), ("2GiB", 2 << 30),
                                             ("64K", 64 << 10), ("4096B", 4096), ("1.5G", 3 << 29)])
def test_units_are_binary_whatever_the_spelling(text, size):
    assert parse_size(text) == size == parse_memory(text)
    assert has_unit(text)


def test_a_bare_number_of_memory_is_mib_as_qemu_reads_m():
    assert parse_memory("4096") == 4 << 30 and parse_memory("512") == 512 << 20
    assert parse_size("4096") == 4096 and not has_unit("4096")  # the API and the wire: bytes
    for bad in ("12XB", "2 GB/s", "G", "-1M", "1.5B"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_exact_sizes_and_rates_and_durations():
    assert [exact_size(n) for n in (4 << 30, 1536 << 20, 4097, 64 << 10)] == ["4GiB", "1536MiB", "4097B", "64KiB"]
    assert parse_memory(exact_size(3 << 30)) == 3 << 30
    assert parse_rate("1Gbit") == 125e6 and parse_rate("100MiB/s") == parse_rate("100M/s") == 100 << 20
    assert [format_duration(x) for x in (0.0418, 0.528, 12.43, 754, None)] == \
        ["41.8 ms", "528 ms", "12.4 s", "12 min 34 s", "-"]


# Red-team review of the security fixes, F8 (high): a peer's CPU state named a workload whose size overflowed; the
# destination agent died after COMMIT, and again at every restart.


def test_sizes_and_workloads_that_overflow_are_refused_as_bad_input():
    with pytest.raises(ValueError, match="too large"):
        parse_size("9" * 400)
    for bad in ("hotset:" + "9" * 400 + ":5", "random:inf", "random:nan", "random:1e400"):
        with pytest.raises(WorkloadError):
            parse_workload(bad)
    for bad in ("idle+\x1b]0;pwned\x07", "x" * 300, 7):
        with pytest.raises(ValueError):
            check_workload(bad)
    with pytest.raises(ValueError):
        validate_policy("agents:b,\x1b[2J")
