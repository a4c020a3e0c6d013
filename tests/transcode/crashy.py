"""Jobs for the process-pool tests (importable by spawned worker processes)."""

from __future__ import annotations

import os


def job(uid: str) -> str:
    """Kill the worker process, as a native decoder crashing on hostile data would."""
    if uid.startswith("crash"):
        os.abort()
    return f"done {uid}"
