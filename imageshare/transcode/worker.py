"""
The process side of the transcode pool.

Each worker process opens its own catalog connection and archive on start
(:func:`initialize`), then runs :func:`transcode` for the instances the parent sends it.
Only the SOP Instance UID crosses the process boundary; everything else is read from disk.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

from imageshare.logbridge import quiet_value_warnings
from imageshare.store.archive import Archive
from imageshare.store.catalog import SqliteCatalog
from imageshare.transcode.job import TranscodeJob
from imageshare.transcode.params import EncodeParams

_job: TranscodeJob | None = None
_PR_SET_PDEATHSIG = 1


def initialize(data_dir: str, params: EncodeParams, nice: int, stopping: Any) -> None:
    """Set up this worker process (``ProcessPoolExecutor`` initializer)."""
    global _job
    _die_with_parent()
    quiet_value_warnings()
    if nice:
        # Background work: acknowledgements and HTTP answers get the CPU first.
        try:
            os.nice(nice)
        except OSError:
            pass
    root = Path(data_dir)
    _job = TranscodeJob(root, Archive(root / "archive"), SqliteCatalog(root / "catalog.sqlite3"), params, stopping)


def _die_with_parent() -> None:
    # If the server is killed (SIGKILL leaves no time to stop the pool), an orphaned
    # worker must not go on writing codestreams next to the restarted server's workers.
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def transcode(sop_instance_uid: str) -> str:
    """Transcode one instance in this worker; see :class:`TranscodeJob`."""
    if _job is None:
        raise RuntimeError("worker not initialized")
    return _job(sop_instance_uid)
