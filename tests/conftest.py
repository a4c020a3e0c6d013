"""Shared fixtures. The reactor is never imported at module level (pytest-twisted installs it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def reactor():
    """The global reactor, imported lazily (after pytest-twisted installed it)."""
    from twisted.internet import reactor as r

    return r


@pytest.fixture
def config_file(tmp_path: Path):
    """Write an INI file whose listeners bind port 0 on loopback; return a writer."""

    def write(extra: str = "", **sections: dict[str, str]) -> Path:
        base = {
            "storage": {"data_dir": "var"},
            "dicom": {"listen": "tcp:0:interface=127.0.0.1"},
            "http": {"listen": "tcp:0:interface=127.0.0.1"},
            "jpip": {"tcp_listen": "tcp:0:interface=127.0.0.1"},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        lines = []
        for name, values in base.items():
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {v}" for k, v in values.items())
        path = tmp_path / "imageshare.ini"
        path.write_text("\n".join(lines) + "\n" + extra)
        return path

    return write
