"""Logs never carry key material, also through a traceback."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from palm_net import logs

SECRET = "a3f1c2d4e5b6a7980011223344556677"  # stands for a key held in a local variable


def fail_with_a_key_in_scope() -> None:
    session_key = bytes.fromhex(SECRET)  # noqa: F841 - the local a rich traceback would print
    raise RuntimeError("record failed authentication")


@pytest.fixture
def restore_structlog():
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_tracebacks_are_plain_without_local_variables(fmt, monkeypatch, restore_structlog):
    pytest.importorskip("rich")  # structlog's console default renders locals when rich is installed
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure(fmt, "info")
    try:
        fail_with_a_key_in_scope()
    except RuntimeError:
        structlog.get_logger("t").exception("session failed", session_key=b"\x01" * 32)
    text = out.getvalue()
    assert "Traceback" in text and "record failed authentication" in text and "fail_with_a_key" in text
    assert SECRET not in text and "session_key = " not in text and "\\x01" not in text
    if fmt == "json":
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert len(lines) == 1
        event = json.loads(lines[0])
        assert event["session_key"] == "<redacted>" and "Traceback" in event["exception"]
