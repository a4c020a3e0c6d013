"""Fixtures that run the real server: in process on the test reactor, or as a twistd process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted

TWISTD = str(Path(sys.executable).parent / "twistd")
_LISTEN = {
    "dicom": re.compile(r"DICOM listener \S+ listening on ([\d.]+):(\d+)"),
    "http": re.compile(r"HTTP listening on ([\d.]+):(\d+)"),
}


class RunningServer:
    """An ImageShare service started in this process, on loopback port 0."""

    def __init__(self, service: Any, http_port: int) -> None:
        self.service = service
        self.dicom_port: int = service.dicom.port
        self.http_port = http_port
        self.ae_title: str = service.config.dicom.ae_title
        self.data_dir: Path = service.config.storage.data_dir

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture
def start_server(reactor, config_file):
    """Start the real service tree in process (``await start_server()``); stopped at teardown."""
    from imageshare.config import load
    from imageshare.service import make_service

    started: list[Any] = []

    async def start(**sections: dict[str, str]) -> RunningServer:
        service = make_service(load(config_file(**sections)), reactor)
        service.startService()
        started.append(service)
        port = await service.http.when_listening()
        return RunningServer(service, port.getHost().port)

    yield start
    for service in reversed(started):
        if service.running:
            pytest_twisted.blockon(service.stopService())


class TwistdProcess:
    """``twistd -n imageshare`` as a child process, with its ports read from its log."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 60) -> "TwistdProcess":
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "imageshare", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.config.parent,
        )
        log.close()
        self.ports = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.ports) < 2:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            for name, pattern in _LISTEN.items():
                found = pattern.findall(text)
                if found:
                    self.ports[name] = int(found[-1][1])
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd exited early:\n{text[-3000:]}")
            time.sleep(0.05)
        if len(self.ports) < 2:
            self.kill()
            raise AssertionError(f"twistd did not start listening:\n{self.log_path.read_text()[-3000:]}")
        return self

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/status", timeout=10) as r:
            return json.load(r)  # type: ignore[no-any-return]

    def wait_status(self, predicate: Any, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status()
            if predicate(last):
                return last
            time.sleep(0.2)
        raise AssertionError(f"status never matched; last: {last}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def twistd(tmp_path: Path, config_file) -> Iterator[Any]:
    """Factory for twistd child processes; every one is killed at teardown."""
    procs: list[TwistdProcess] = []

    def make(**sections: dict[str, str]) -> TwistdProcess:
        p = TwistdProcess(config_file(**sections), tmp_path / "twistd.log")
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


def run_with_deadline(cmd: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk waits on delayed ACKs otherwise
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


