"""twistd stops cleanly on SIGTERM: no process, semaphore or shared-memory object is left behind."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import make_instances, scu_store

pytestmark = pytest.mark.integration


def test_sigterm_leaves_no_leaked_semaphores(twistd, tmp_path: Path) -> None:
    """After the transcoder's worker processes have done work, SIGTERM ends twistd within
    60 s, and neither its log nor its stderr (the same file) has multiprocessing's
    resource_tracker warning about leaked semaphores (or any other leaked object)."""
    paths = make_instances(tmp_path / "in", 2, seed="shutdown")
    server = twistd().start()
    assert scu_store(server.ports["dicom"], paths) == [0, 0]
    # Both transcoded: the worker processes ran and touched the shared stop Event.
    server.wait_status(lambda s: s["transcode_pending"] == 0 and s["instances"] == 2, timeout=120)
    assert server.proc is not None
    trackers = _trackers_of(server.proc.pid)
    started = time.monotonic()
    try:
        code = server.stop(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("twistd did not exit within 60 s of SIGTERM")
    # twistd re-raises the SIGTERM it handled once it has shut down cleanly.
    assert code in (0, -15)
    # The resource tracker is a separate process that writes after twistd exits: give it
    # a moment (bounded) to say whatever it has to say.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(p) for p in trackers):
        time.sleep(0.1)
    text = server.log_path.read_text(errors="replace")
    assert "ImageShare stopped" in text
    # (The test's own name is in the log's paths: look for the tracker's wording.)
    assert "leaked semaphore" not in text, text[-3000:]
    assert "resource_tracker:" not in text, text[-3000:]
    assert time.monotonic() - started < 65


def _trackers_of(pid: int) -> list[int]:
    """The multiprocessing resource trackers ``pid`` started (one, once it spawned workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status and b"resource_tracker" in cmdline:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has finished)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
