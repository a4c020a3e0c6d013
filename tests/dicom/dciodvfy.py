"""Run dicom3tools' dciodvfy and DCMTK's dcmdump as independent validators.

dciodvfy writes everything to stderr: findings are lines ``Error - ...`` / ``Warning - ...``
(for attribute-level problems prefixed by the element, ``(0x0019,0x1060) ... - Error - ...``);
it exits 1 when there are errors and may abort (rc 134) on malformed input. dcmdump exits
non-zero and prints ``E:`` lines when a file does not parse.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

TIMEOUT = 60

requires_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy missing")
requires_dcmdump = pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump missing")

_FINDING = re.compile(r"(?:^|\s)(Error|Warning) - ")


def validate(path: str | Path, profile: str | None = None) -> tuple[list[str], list[str]]:
    """dciodvfy's errors and warnings for a file (optionally against a profile).

    Parameters
    ----------
    path : str or Path
        The Part 10 file.
    profile : str or None
        e.g. ``"IHEXDSIManifest"`` for ``dciodvfy -profile IHEXDSIManifest``.

    Returns
    -------
    (errors, warnings) : tuple of list of str
        The first line of each finding, as printed (continuation lines of multi-line
        values are dropped). An abort is reported as an error.
    """
    command = ["dciodvfy"] + (["-profile", profile] if profile else []) + [str(path)]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=TIMEOUT)
    errors: list[str] = []
    warnings: list[str] = []
    for line in (result.stderr + result.stdout).splitlines():
        match = _FINDING.search(line)
        if match:
            (errors if match.group(1) == "Error" else warnings).append(line.strip())
    if result.returncode not in (0, 1):
        errors.append(f"dciodvfy aborted with status {result.returncode}")
    elif result.returncode == 1 and not errors:
        errors.append("dciodvfy exited 1 without naming an error")
    return errors, warnings


def new_errors(path: str | Path, baseline: str | Path, profile: str | None = None) -> set[str]:
    """Errors dciodvfy reports for ``path`` that it does not report for ``baseline``."""
    return set(validate(path, profile)[0]) - set(validate(baseline, profile)[0])


def dcmdump(path: str | Path, *options: str) -> subprocess.CompletedProcess[str]:
    """dcmdump's result for a file (``+P``-style options pass through)."""
    return subprocess.run(["dcmdump", *options, str(path)], capture_output=True, text=True,
                          errors="replace", timeout=TIMEOUT)


def dcmdump_ok(path: str | Path) -> bool:
    """Whether dcmdump parses the file: status 0 and no ``E:`` line."""
    result = dcmdump(path)
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode == 0 and not any(line.startswith("E:") for line in lines)
