"""palm_net: security-preserving live migration of VMs with VMM-protected processes."""

import sys as _sys

# structlog imports rich when it is installed (3.6 MiB of an agent's memory,
# for console features the agent never uses: its logs and tracebacks are
# plain, palm_net.logs).  Keep rich out while structlog loads; the `palm`
# command imports rich itself for its progress line.
if "structlog" not in _sys.modules and "rich" not in _sys.modules:
    _sys.modules["rich"] = None  # type: ignore[assignment]  # import rich: ImportError, for now
    try:
        import structlog as _structlog  # noqa: F401
    finally:
        del _sys.modules["rich"]
