"""twistd plugin discovery, options and the shape of the service tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage

from imageshare.tap import Options, makeService


def test_plugin_is_discovered() -> None:
    """getPlugins(IServiceMaker) includes the imageshare tap."""
    assert "imageshare" in [p.tapname for p in getPlugins(IServiceMaker)]


def test_twistd_help_lists_imageshare() -> None:
    """The installed twistd lists the imageshare command."""
    twistd = Path(sys.executable).parent / "twistd"
    out = subprocess.run([str(twistd), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert any(line.split()[:1] == ["imageshare"] for line in out.stdout.splitlines())


def test_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    """A bad value surfaces as a UsageError naming the section and key."""
    f = tmp_path / "bad.ini"
    f.write_text("[transcode]\nworkers = lots\n")
    with pytest.raises(usage.UsageError, match=r"\[transcode\] workers"):
        Options().parseOptions(["--config", str(f)])


def test_make_service_tree(config_file) -> None:
    """makeService builds named children without listening (MemoryReactor)."""
    options = Options()
    options.parseOptions(["--config", str(config_file())])
    service = makeService(options, reactor=MemoryReactorClock())
    names = {s.name for s in service}
    assert {"dicom", "http", "transcoder", "transcode-pool", "catalog-pool"} <= names
    service.catalog.close()


def test_http_port_in_use_fails_start(config_file) -> None:
    """If the HTTP endpoint cannot listen, starting the service raises instead of running without it."""
    import socket

    from imageshare.config import load
    from imageshare.service import make_service
    from twisted.internet import reactor

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        service = make_service(load(config_file(http={"listen": f"tcp:{port}:interface=127.0.0.1"})), reactor)
        from twisted.internet.error import CannotListenError

        with pytest.raises(CannotListenError):
            service.http.startService()
        service.catalog.close()
