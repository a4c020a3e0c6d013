"""twistd start-up fails cleanly when a listener cannot listen."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TWISTD = str(Path(sys.executable).parent / "twistd")


@pytest.mark.parametrize("section,key", [("http", "listen"), ("jpip", "tcp_listen"), ("dicom", "listen")])
def test_port_in_use_stops_twistd(config_file, tmp_path: Path, section: str, key: str) -> None:
    """With any listener's port taken, twistd exits non-zero at once with the reason, rather
    than running without it or hanging on pool threads and worker processes started before."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = config_file(**{section: {key: f"tcp:{port}:interface=127.0.0.1"}})
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "imageshare", "--config", str(config)],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr


def test_unprotected_remote_listener_stops_twistd(config_file, tmp_path: Path) -> None:
    """A DICOM listener on every address with no calling-AE lists (and no client
    certificates) stops twistd at once, with the one-line reason and the way out."""
    config = config_file(dicom={"listen": "tcp:0:interface=0.0.0.0"})
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "imageshare", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "bad configuration: [dicom] listen: listens on 0.0.0.0" in output
    assert "insecure_remote = yes" in output
