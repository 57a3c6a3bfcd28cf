"""Operator-facing errors of the agent."""

from __future__ import annotations


class AgentError(Exception):
    """An operator-facing error: one line, no traceback."""
