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
