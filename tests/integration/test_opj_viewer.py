"""
A real JPIP client, unchanged: OpenJPEG's Java viewer (``opj_jpip_viewer``, Debian
libopenjpip-viewer) and its decoder (``opj_dec_server``) open a CR from the real server,
headless under Xvfb, and the screen is checked against the DICOM pixels.

The whole scenario runs in a private network and PID namespace (``unshare``, as root)
because the decoder listens on all interfaces at a fixed port: see
``opj_viewer_scenario.py``. The screen check compares grey levels, not bytes: the viewer
shows an 8-bit rendering of the 15-bit image, so its correlation with the source pixels
reduced to the view's size is what must be high.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import make_cr
from tests.integration.opj_viewer_scenario import missing_tools

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# The viewer's first request is fsiz=170,170 (its panel's initial size, ImageViewer.java).
FIRST_REQUEST = (170, 170)
MIN_CORRELATION = 0.9
# The view is drawn at the window's top-left corner; a border or insets (a window manager,
# another look and feel) would move it by a few pixels, which the search allows for.
SEARCH = 6


# -- reading the screen (pure; checked below without a display) ------------------------------


def read_xwd(data: bytes) -> np.ndarray:
    """An ``xwd`` dump (ZPixmap, TrueColor, 24/32 bits per pixel) as an RGB array (rows, cols, 3)."""
    if len(data) < 100:
        raise ValueError("not an XWD file: too short")
    (header_size, version, pixmap_format, _depth, width, height, _xoffset, byte_order, _unit, _bit_order,
     _pad, bits_per_pixel, bytes_per_line, _visual, red, green, blue, _bits_rgb, _entries, ncolors) = \
        struct.unpack(">20I", data[:80])
    if version != 7 or pixmap_format != 2 or bits_per_pixel not in (24, 32):
        raise ValueError(f"unsupported XWD (version {version}, format {pixmap_format}, {bits_per_pixel} bpp)")
    offset = header_size + 12 * ncolors  # colour map entries follow the header
    raw = np.frombuffer(data, np.uint8, count=bytes_per_line * height, offset=offset).reshape(height, bytes_per_line)
    step = bits_per_pixel // 8
    cells = raw[:, : width * step].reshape(height, width, step).astype(np.uint32)
    weights = [1 << (8 * i) for i in range(step)]
    if byte_order == 1:  # MSBFirst
        weights.reverse()
    pixels = (cells * np.array(weights, np.uint32)).sum(axis=2, dtype=np.uint32)

    def channel(mask: int) -> np.ndarray:
        shift = (mask & -mask).bit_length() - 1
        return ((pixels & mask) >> shift).astype(np.uint8)

    return np.stack([channel(red), channel(green), channel(blue)], axis=-1)


def first_view_size(rows: int, cols: int, request: tuple[int, int] = FIRST_REQUEST) -> tuple[int, int]:
    """(width, height) of the largest resolution level within the request (fsiz round-down)."""
    for d in range(32):
        w, h = math.ceil(cols / 2**d), math.ceil(rows / 2**d)
        if w <= request[0] and h <= request[1]:
            return w, h
    raise AssertionError("unreachable")


def reduce_to(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``pixels`` averaged over the areas that become each of ``height`` x ``width`` pixels."""
    rows = np.linspace(0, pixels.shape[0], height + 1).astype(int)[:-1]
    cols = np.linspace(0, pixels.shape[1], width + 1).astype(int)[:-1]
    sums = np.add.reduceat(np.add.reduceat(pixels.astype(np.float64), rows, axis=0), cols, axis=1)
    counts = np.outer(np.diff(np.append(rows, pixels.shape[0])), np.diff(np.append(cols, pixels.shape[1])))
    return sums / counts  # type: ignore[no-any-return]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm else 0.0  # a flat region shows no image


def locate_view(screen: np.ndarray, expected: np.ndarray) -> tuple[float, tuple[int, int]]:
    """
    The best correlation of ``expected`` with the screen where the viewer draws it: at the
    top-left corner of its window (the first pixel that is not the black root window), give
    or take a border of :data:`SEARCH` pixels; and that position (x, y).
    """
    grey = screen.astype(np.float64).mean(axis=2)
    lit = np.argwhere(grey > 0)
    if not len(lit):
        return 0.0, (0, 0)
    y0, x0 = int(lit[:, 0].min()), int(lit[:, 1].min())
    h, w = expected.shape
    best = (0.0, (x0, y0))
    for dy in range(SEARCH + 1):
        for dx in range(SEARCH + 1):
            region = grey[y0 + dy : y0 + dy + h, x0 + dx : x0 + dx + w]
            if region.shape == expected.shape:
                best = max(best, (correlation(region, expected), (x0 + dx, y0 + dy)))
    return best


def _xwd(image: np.ndarray) -> bytes:
    """An XWD dump of an RGB array, as xwd writes one on a little-endian 24-bit screen."""
    h, w, _ = image.shape
    name = b"xwdump\0"
    header = struct.pack(">25I", 100 + len(name), 7, 2, 24, w, h, 0, 0, 32, 0, 32, 32, 4 * w, 4,
                         0xFF0000, 0xFF00, 0xFF, 8, 256, 2, w, h, 0, 0, 0) + name
    colours = b"\0" * 24
    pixels = (image[..., 0].astype("<u4") << 16) | (image[..., 1].astype("<u4") << 8) | image[..., 2]
    return header + colours + pixels.astype("<u4").tobytes()


def test_screen_check_finds_the_view_and_refuses_what_is_not_it(tmp_path: Path) -> None:
    """The check itself (no display): an XWD dump is read back exactly; the expected view
    drawn at a window's corner correlates above the threshold; a blank window, noise, or the
    image upside down do not."""
    rng = np.random.default_rng(3)
    _, pixels = make_cr(tmp_path)
    w, h = first_view_size(*pixels.shape)
    view = reduce_to(pixels, w, h)
    shown = (view - view.min()) / np.ptp(view) * 255
    screen = np.zeros((480, 640, 3), np.uint8)
    screen[50:250, 0:400] = 238  # the window
    screen[52 : 52 + h, 1 : 1 + w] = np.round(shown).astype(np.uint8)[..., None]
    back = read_xwd(_xwd(screen))
    np.testing.assert_array_equal(back, screen)
    score, where = locate_view(back, view)
    assert score > 0.99 and where == (1, 52)
    blank = screen.copy()
    blank[52 : 52 + h, 1 : 1 + w] = 238
    noise = screen.copy()
    noise[52 : 52 + h, 1 : 1 + w] = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
    flipped = screen.copy()
    flipped[52 : 52 + h, 1 : 1 + w] = np.round(shown[::-1, ::-1]).astype(np.uint8)[..., None]
    for wrong in (blank, noise, flipped, np.zeros_like(screen)):
        assert locate_view(wrong, view)[0] < MIN_CORRELATION


# -- the real session -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One viewer session (about 5 s): the scenario's JSON, the CR's pixels, the time it took."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private network namespace (unshare --net)")
    missing = missing_tools() + [t for t in ("unshare",) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make test installs them)")
    work = tmp_path_factory.mktemp("opj-viewer")
    dicom, pixels = make_cr(work)
    started = time.monotonic()
    proc = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--kill-child", "--",
         sys.executable, "-m", "tests.integration.opj_viewer_scenario", str(work), str(dicom), "--timeout", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["pixels"] = pixels
    result["runtime"] = time.monotonic() - started
    return result


def _logs(s: dict[str, Any]) -> str:
    return "\n".join(f"--- {k}\n{s.get(k)}" for k in ("error", "viewer_log", "decoder_log", "twistd_log"))


def test_viewer_gets_the_session_from_the_jpip_headers(session: dict[str, Any]) -> None:
    """The viewer reads JPIP-fsiz, JPIP-cnew and JPIP-tid (it looks them up case-sensitively,
    as 15444-9 spells them): it learns the first view's size and its channel, and hands the
    stream with them to its decoder, which registers it."""
    assert session["error"] is None, _logs(session)
    w, h = first_view_size(*session["pixels"].shape)
    viewer = session["viewer_log"]
    assert f"fw,fh: {w},{h}" in viewer, _logs(session)
    assert re.search(r"cid: JPH_\w+, transport: http\b", viewer), _logs(session)
    assert re.search(r"\ntid: \w+", viewer), _logs(session)
    received = re.search(r"newjpipstream length: (\d+)", session["decoder_log"])
    assert received and int(received.group(1)) > 1000, _logs(session)


def test_viewer_is_served_as_an_openjpeg_client(session: dict[str, Any]) -> None:
    """What the viewer needs besides the headers' spelling: its session gets OpenJPEG's
    tile-header layout by its User-Agent (Java's default, matched by the scenario's
    openjpeg_user_agents = Java/), its <uid>.jp2 target is found, and it learns the region
    it was sent from JPIP-roff/JPIP-rsiz although it asked for none (else it keeps -1);
    the decoder does not crash."""
    assert session["error"] is None, _logs(session)
    layouts = session["layouts"]
    assert layouts and all("sends openjpeg tile headers (User-Agent Java/" in x for x in layouts), layouts
    w, h = first_view_size(*session["pixels"].shape)
    viewer = session["viewer_log"]
    assert "rx,ry: 0,0" in viewer and f"rw,rh: {w},{h}" in viewer, _logs(session)
    assert not re.search(r"(fsiz|roff|rsiz)=[^&\s]*-\d", viewer), _logs(session)  # no -1 region asked with
    assert session["decoder_exit"] is None, _logs(session)  # still running when the scenario ended


def test_first_view_is_on_screen(session: dict[str, Any]) -> None:
    """The first view (the CR at the largest resolution within 170x170) is on screen: its grey
    levels correlate with the source pixels reduced to that size, at the viewer's window
    (the server sends the viewer OpenJPEG's tile-header layout and the region headers; with
    the part9 layout its decoder crashes and nothing is drawn: bench/jpip/opj_viewer_control.py)."""
    assert session.get("screenshot"), _logs(session)
    screen = read_xwd(Path(session["screenshot"]).read_bytes())
    w, h = first_view_size(*session["pixels"].shape)
    score, where = locate_view(screen, reduce_to(session["pixels"], w, h))
    assert score > MIN_CORRELATION, f"correlation {score:.3f} at {where}\n" + _logs(session)
    print(f"first view {w}x{h}: correlation {score:.4f} at {where}, session {session['runtime']:.1f} s")
    assert session["runtime"] < 60
