"""SIGKILL during ingest loses no acknowledged instance; a restart resumes all pending work."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.helpers import make_instances

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
]

_SENDING = re.compile(r"Sending file: (\S+)")
_SUCCESS = "Received Store Response (Success)"


def acknowledged(storescu_output: str) -> set[str]:
    """The files storescu saw a Success response for (its -v log pairs them in order)."""
    acked, current = set(), None
    for line in storescu_output.splitlines():
        m = _SENDING.search(line)
        if m:
            current = m.group(1)
        elif _SUCCESS in line and current is not None:
            acked.add(current)
            current = None
    return acked


def _children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the transcoder's workers, for twistd)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def _alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    alive = []
    for p in pids:
        try:
            if "State:\tZ" not in Path(f"/proc/{p}/status").read_text():
                alive.append(p)
        except OSError:
            pass
    return alive


def test_sigkill_while_receiving(twistd, tmp_path: Path) -> None:
    """Kill -9 the server mid-transfer of 100 instances, restart: every acked one is there and transcoded."""
    make_instances(tmp_path / "in", 100, seed="crash")
    server = twistd().start()
    env = dict(os.environ, TCP_NODELAY="1")
    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", "IMAGESHARE", "127.0.0.1", str(server.ports["dicom"]), "+sd", str(tmp_path / "in")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    assert sender.stdout is not None
    output: list[str] = []
    workers: list[int] = []
    deadline = time.monotonic() + 120
    # Kill once a good part has been acknowledged, while the transfer is still going.
    while time.monotonic() < deadline:
        line = sender.stdout.readline()
        if not line:
            break
        output.append(line)
        if sum(_SUCCESS in l for l in output) >= 37:
            workers = _children_of(server.proc.pid)
            server.kill()
            break
    rest, _ = sender.communicate(timeout=60)
    # The transcoder's worker processes die with the server instead of running on.
    assert workers, "the transcoder had no worker processes"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(workers):
        time.sleep(0.1)
    assert _alive(workers) == []
    output.append(rest)
    acked = acknowledged("".join(output))
    assert 37 <= len(acked) < 100, "the kill did not land mid-transfer"

    data_dir = tmp_path / "var"
    server = twistd().start()  # recovery runs before anything listens
    status = server.wait_status(lambda s: s["transcode_pending"] == 0, timeout=180)
    assert list((data_dir / "archive" / "incoming").iterdir()) == []
    db = sqlite3.connect(data_dir / "catalog.sqlite3")
    rows = dict(db.execute("SELECT sop_instance_uid, state FROM instances"))
    paths = dict(db.execute("SELECT sop_instance_uid, path FROM instances"))
    db.close()
    for f in acked:
        uid = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert rows.get(uid) == "streamable", (f, rows.get(uid))
        archived = dcmread(data_dir / "archive" / paths[uid])
        assert archived.PixelData == dcmread(f).PixelData
    assert status["instances"] == len(rows) >= len(acked)
    assert status["transcode_failed"] == 0
    # twistd re-raises the SIGTERM it handled once it has shut down cleanly.
    assert server.stop() in (0, -15)
    assert "ImageShare stopped" in server.log_path.read_text()
