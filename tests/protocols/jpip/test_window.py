"""Tests of :mod:`imageshare.protocols.jpip.window`.

The decisive evidence is a decoder: a codestream rebuilt from the packets of
the precincts :func:`precincts` selects (every other packet replaced by an
empty one) must decode with ``opj_decompress -r d`` to exactly the pixels of a
full decode at that discard level inside the requested region. The rounding
rules and the region arithmetic are checked with Hypothesis on synthetic
codestreams.
"""

from __future__ import annotations

import functools
import random
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageshare.codestream.index import CodestreamIndex, build_index, compute_precinct_grid
from imageshare.codestream.markers import SIZ, CodingStyle, ImageComponent, Marker
from imageshare.protocols.jpip import window as window_module
from imageshare.protocols.jpip.window import (
    ResolvedWindow,
    Window,
    frame_size,
    max_discard,
    precincts,
    resolve,
    tiles_in_window,
)
from imageshare.transcode import openjpeg
from imageshare.transcode.params import EncodeParams
from tests.codestream.test_markers import (
    cod_segment,
    make_codestream,
    plt_segments,
    qcd_segment,
    siz_segment,
    tile_part,
)

OPJ_TIMEOUT = 60
needs_opj = pytest.mark.skipif(
    shutil.which("opj_decompress") is None or not openjpeg.is_available(),
    reason="OpenJPEG (library >= 2.5 and opj_decompress) is not installed",
)

# --- real codestreams and a decoder ------------------------------------------------


def smooth_noise(height: int, width: int, precision: int, seed: int, channels: int = 0) -> np.ndarray:
    """Smooth random relief plus fine noise, so that every sub-band carries data."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if not channels else (height, width, channels)
    coarse = rng.normal(size=(height // 16 + 2, width // 16 + 2) + shape[2:])
    # Bilinear upsampling of the coarse grid: cheap smoothness without scipy.
    ys = np.linspace(0, coarse.shape[0] - 1.001, height)
    xs = np.linspace(0, coarse.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    if channels:
        fy, fx = fy[..., None], fx[..., None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    relief = top * (1 - fy) + bottom * fy
    relief += 0.15 * rng.normal(size=shape)
    relief = (relief - relief.min()) / (relief.max() - relief.min())
    top_value = (1 << precision) - 1
    return np.round(relief * top_value).astype(np.uint16 if precision > 8 else np.uint8)


@functools.cache
def encoded(name: str) -> tuple[bytes, CodestreamIndex]:
    """The test codestreams, encoded once per session with our encoder."""
    frame, precision, colour, params = {
        # Small precincts: many of them at every resolution of a small image.
        "gray12": (smooth_noise(389, 517, 12, 1), 12, False, EncodeParams(precinct=32, codeblock=(16, 16))),
        "lossy16": (
            smooth_noise(277, 301, 16, 2), 16, False,
            EncodeParams(lossless=False, layer_rates=(60, 30, 15, 8, 4), precinct=32, codeblock=(16, 16)),
        ),
        "rgb8": (smooth_noise(120, 160, 8, 3, channels=3), 8, True, EncodeParams(precinct=32, codeblock=(16, 16))),
        "default": (smooth_noise(450, 600, 12, 4), 12, False, EncodeParams()),
    }[name]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frame.j2k"
        openjpeg.encode(frame, path, precision=precision, signed=False, colour_transform=colour, params=params)
        data = path.read_bytes()
    return data, build_index(data)


def packets_in_file_order(index: CodestreamIndex, t: int) -> list[tuple[int, int, int, int, int, int]]:
    """``(c, r, p, l, offset, length)`` of a tile's packets, in codestream order."""
    return sorted(index.tiles[t].iter_packets(), key=lambda packet: packet[4])


def rebuild(data: bytes, index: CodestreamIndex, keep: set[tuple[int, int, int, int]]) -> bytes:
    """The codestream with every packet of a precinct not in ``keep`` replaced by an empty packet.

    Main header without TLM/PLM, then per tile-part: SOT with a fixed Psot, its
    header segments without PLT, SOD and the packets in codestream order. An
    empty packet is the single byte 0x00 (our encoder writes no SOP/EPH).
    """
    out = bytearray()
    for seg in index.main_segments:
        if seg.marker not in (Marker.TLM, Marker.PLM):
            out += data[seg.offset : seg.offset + seg.length]
    for t, part in index.tile_parts():
        header = b"".join(data[s.offset : s.offset + s.length] for s in part.segments if s.marker != Marker.PLT)
        body = bytearray()
        for c, r, p, _l, offset, length in packets_in_file_order(index, t):
            if part.body_offset <= offset < part.end:
                body += data[offset : offset + length] if (t, c, r, p) in keep else b"\x00"
        psot = 12 + len(header) + 2 + len(body)
        out += data[part.offset : part.offset + 6] + struct.pack(">I", psot)
        out += data[part.offset + 10 : part.offset + 12] + header + b"\xff\x93" + body
    return bytes(out + b"\xff\xd9")


class Decoder:
    """Runs opj_decompress in a temporary directory and counts the runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs = 0

    def decode(self, codestream: bytes, index: CodestreamIndex, discard: int) -> np.ndarray:
        """Decode at discard level ``discard``; returns components x rows x columns."""
        self.runs += 1
        src = self.root / f"{self.runs}.j2k"
        out = self.root / f"{self.runs}.rawl"
        src.write_bytes(codestream)
        done = subprocess.run(
            ["opj_decompress", "-i", str(src), "-o", str(out), "-r", str(discard)],
            capture_output=True, timeout=OPJ_TIMEOUT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
        width, height = frame_size(index, discard)
        dtype = "<u2" if index.components[0].precision > 8 else "u1"
        pixels = np.frombuffer(out.read_bytes(), dtype=dtype)
        return pixels.reshape(index.num_components, height, width)

    @functools.cache  # noqa: B019 - one instance per session
    def full(self, name: str, discard: int) -> np.ndarray:
        """Full decode of a test codestream at a discard level (memoised)."""
        data, index = encoded(name)
        return self.decode(data, index, discard)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Decoder:
    """A module-wide decoder; the test module keeps its opj runs modest."""
    return Decoder(tmp_path_factory.mktemp("window-opj"))


def check_region(decoder: Decoder, name: str, win: Window, *, comps: tuple[int, ...] | None = None) -> ResolvedWindow:
    """Decode only the selected precincts and compare the region with the full decode."""
    data, index = encoded(name)
    resolved = resolve(index, win)
    selected = precincts(index, resolved)
    assert not resolved.empty
    partial = decoder.decode(rebuild(data, index, set(selected)), index, resolved.discard)
    full = decoder.full(name, resolved.discard)
    (ox, oy), (sx, sy) = resolved.roff, resolved.rsiz
    for c in comps if comps is not None else resolved.comps:
        region_partial = partial[c, oy : oy + sy, ox : ox + sx]
        region_full = full[c, oy : oy + sy, ox : ox + sx]
        mismatches = int(np.count_nonzero(region_partial != region_full))
        assert mismatches == 0, f"{mismatches} samples differ in component {c} for {resolved}"
    return resolved


def _random_windows(name: str, count: int, seed: int) -> list[Window]:
    """Random regions at random discard levels, in frames of exactly the level's size."""
    _, index = encoded(name)
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        d = rng.randint(0, min(2, max_discard(index)))
        fx, fy = frame_size(index, d)
        sx, sy = rng.randint(1, max(fx // 3, 1)), rng.randint(1, max(fy // 3, 1))
        out.append(Window(fsiz=(fx, fy), roff=(rng.randint(0, fx - sx), rng.randint(0, fy - sy)), rsiz=(sx, sy)))
    return out


GRAY_CASES = [
    *_random_windows("gray12", 4, seed=7),
    Window(fsiz=(517, 389), roff=(500, 370), rsiz=(17, 19)),  # bottom-right border
    Window(fsiz=(517, 389), roff=(0, 200), rsiz=(5, 3)),  # left border
    Window(fsiz=(517, 389), roff=(96, 64), rsiz=(1, 1)),  # 1x1 on a precinct corner
    Window(fsiz=(200, 150), roff=(33, 47), rsiz=(21, 13)),  # scaled: odd frame, rounds down to d=2
]


@needs_opj
@pytest.mark.parametrize("win", GRAY_CASES, ids=lambda w: f"{w.fsiz}-{w.roff}-{w.rsiz}")
def test_selected_precincts_reconstruct_the_region_lossless(decoder: Decoder, win: Window) -> None:
    """Reversible 5/3, 12-bit, odd size: the selected precincts alone decode the region exactly,
    at random places and levels, at the image border and for a single pixel."""
    resolved = check_region(decoder, "gray12", win)
    _, index = encoded("gray12")
    total = sum(tile.num_packets // tile.layers for tile in index.tiles)
    assert len(precincts(index, resolved)) < total


@needs_opj
@pytest.mark.parametrize(
    "win",
    [
        *_random_windows("lossy16", 2, seed=11),
        Window(fsiz=(301, 277), roff=(290, 0), rsiz=(11, 9)),  # top-right border
        Window(fsiz=(151, 139), roff=(64, 64), rsiz=(1, 1)),  # 1x1 at d=1 on a precinct corner
    ],
    ids=lambda w: f"{w.fsiz}-{w.roff}-{w.rsiz}",
)
def test_selected_precincts_reconstruct_the_region_irreversible(decoder: Decoder, win: Window) -> None:
    """Irreversible 9/7, 16-bit: the wider synthesis support is covered too."""
    check_region(decoder, "lossy16", win)


@needs_opj
def test_component_transform_pulls_in_the_other_components(decoder: Decoder) -> None:
    """With RCT, asking for component 1 alone still reconstructs it exactly: the inverse transform
    needs components 0 and 2 at the same place, so their precincts are selected as well."""
    win = Window(fsiz=(160, 120), roff=(40, 30), rsiz=(30, 20), comps=((1, 1),))
    resolved = check_region(decoder, "rgb8", win, comps=(1,))
    assert resolved.comps == (1,)
    _, index = encoded("rgb8")
    assert {c for _, c, _, _ in precincts(index, resolved)} == {0, 1, 2}


@needs_opj
def test_default_encoder_layout(decoder: Decoder) -> None:
    """With the production parameters (128x128 precincts), a region crossing precinct borders."""
    check_region(decoder, "default", Window(fsiz=(600, 450), roff=(120, 250), rsiz=(20, 20)))


@needs_opj
@pytest.mark.parametrize(
    ("name", "margin", "corner"),
    [("gray12", 0, 64), ("lossy16", 2, 67)],
    ids=["5/3-without-margin", "9/7-with-5/3-margin"],
)
def test_the_margin_is_needed(
    decoder: Decoder, monkeypatch: pytest.MonkeyPatch, name: str, margin: int, corner: int
) -> None:
    """The decode test can fail: with a smaller synthesis margin than the filter needs, a region just
    right of a precinct border (64, 32x32 precincts) is no longer reconstructed exactly; for the 9/7
    wavelet the 5/3 margin of 2 is too small."""
    monkeypatch.setattr(window_module, "synthesis_margin", lambda reversible: margin)
    _, index = encoded(name)
    fx, fy = frame_size(index, 0)
    with pytest.raises(AssertionError, match="samples differ"):
        check_region(decoder, name, Window(fsiz=(fx, fy), roff=(corner, corner), rsiz=(8, 8)))


@needs_opj
def test_dropped_precincts_do_change_the_picture(decoder: Decoder) -> None:
    """Sanity of the method: outside a small region the rebuilt codestream does decode differently."""
    data, index = encoded("gray12")
    resolved = resolve(index, Window(fsiz=(517, 389), roff=(200, 150), rsiz=(10, 10)))
    partial = decoder.decode(rebuild(data, index, set(precincts(index, resolved))), index, 0)
    assert np.count_nonzero(partial != decoder.full("gray12", 0)) > 0.5 * partial.size


@needs_opj
def test_opj_runs_stay_modest(decoder: Decoder) -> None:
    """The decode checks above stay within the budget of opj_decompress runs."""
    assert decoder.runs < 40


# --- synthetic codestreams: geometry without a decoder -------------------------------


def synthetic_index(
    xsiz: int, ysiz: int, xosiz: int = 0, yosiz: int = 0, levels: int = 3, layers: int = 3,
    components: int = 1, tile: tuple[int, int] | None = None, tile_origin: tuple[int, int] = (0, 0),
    precincts_exp: int | None = None,
) -> CodestreamIndex:  # fmt: skip
    """An indexed codestream of the given geometry whose packets are all 1 byte."""
    comps = [(8, False, 1, 1)] * components
    xtsiz, ytsiz = tile if tile is not None else (xsiz, ysiz)
    siz = siz_segment(xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, *tile_origin, components=comps)
    pp = None if precincts_exp is None else [(precincts_exp, precincts_exp)] * (levels + 1)
    main = siz + cod_segment(layers=layers, levels=levels, precincts=pp) + qcd_segment(levels)
    style = CodingStyle(levels, 4, 4, 0, 1, tuple(pp) if pp else ((15, 15),) * (levels + 1))
    geometry = SIZ(0, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, *tile_origin, tuple(ImageComponent(*c) for c in comps))
    parts = []
    for t in range(geometry.num_tiles):
        grid = compute_precinct_grid(geometry.tile_bounds(t), geometry.components[0], style)
        count = sum(cols * rows for cols, rows in grid) * layers * components
        parts.append(tile_part(t, plt_segments([1] * count), bytes(count)))
    return build_index(make_codestream(main, parts))


def test_full_window_selects_every_precinct_of_the_kept_resolutions() -> None:
    """The whole frame at discard level d needs every precinct of resolutions 0..NL-d, and no other."""
    index = synthetic_index(300, 200, levels=3, precincts_exp=5, components=2)
    for d in range(4):
        resolved = resolve(index, Window(fsiz=frame_size(index, d)))
        got = precincts(index, resolved)
        want = [
            (0, c, r, p)
            for c in range(2)
            for r in range(4 - d)
            for p in range(index.precinct_grid(0, c, r)[0] * index.precinct_grid(0, c, r)[1])
        ]
        assert got == want


def test_headers_only_and_empty_regions() -> None:
    """No fsiz means no view-window; a region outside the frame is empty and selects nothing."""
    index = synthetic_index(100, 80)
    none = resolve(index, Window())
    assert none.empty and precincts(index, none) == [] and tiles_in_window(index, none) == []
    outside = resolve(index, Window(fsiz=(100, 80), roff=(150, 10), rsiz=(10, 10)))
    assert outside.empty and outside.rsiz == (0, 10) and outside.roff == (100, 10)
    assert outside.changed == {"roff", "rsiz"}
    assert precincts(index, outside) == []


def test_rounding_examples() -> None:
    """round-down, round-up and closest pick the documented frames (517x389, NL=3)."""
    index = synthetic_index(517, 389, levels=3)
    assert [frame_size(index, d) for d in range(4)] == [(517, 389), (259, 195), (130, 98), (65, 49)]
    assert resolve(index, Window(fsiz=(300, 300))).discard == 1
    assert resolve(index, Window(fsiz=(10, 10))).discard == 3  # nothing fits: the smallest
    assert resolve(index, Window(fsiz=(300, 300), round="round-up")).discard == 0
    assert resolve(index, Window(fsiz=(5000, 10), round="round-up")).discard == 0  # nothing covers
    assert resolve(index, Window(fsiz=(130, 98), round="round-up")).discard == 2
    assert resolve(index, Window(fsiz=(200, 150), round="closest")).discard == 2
    exact = resolve(index, Window(fsiz=(259, 195), roff=(3, 4), rsiz=(5, 6), layers=9, comps=((0, None),)))
    assert exact.changed == {"layers"} and exact.layers == 3 and exact.comps == (0,)
    assert resolve(index, Window(fsiz=(259, 195), comps=((0, 2),))).changed == {"comps"}


def test_scaling_rounds_outwards() -> None:
    """A region of a requested frame that is not available is scaled with floor/ceil and reported."""
    index = synthetic_index(517, 389, levels=3)
    got = resolve(index, Window(fsiz=(200, 150), roff=(33, 47), rsiz=(21, 13)))
    assert got.fsiz == (130, 98)
    assert got.roff == (33 * 130 // 200, 47 * 98 // 150)
    assert got.rsiz == (-(-54 * 130 // 200) - 21, -(-60 * 98 // 150) - 30)
    assert got.changed == {"fsiz", "roff", "rsiz"}


def test_invalid_windows_are_refused() -> None:
    """Nonsense values raise ValueError when the Window is made."""
    for kwargs in ({"fsiz": (0, 5)}, {"round": "sideways"}, {"roff": (-1, 0)}, {"comps": ((3, 2),)}, {"layers": -1}):
        with pytest.raises(ValueError):
            Window(**kwargs)  # type: ignore[arg-type]


@st.composite
def geometry_and_window(draw: st.DrawFn) -> tuple[CodestreamIndex, Window]:
    """A synthetic image (with origin offsets) and an arbitrary, valid view-window."""
    xosiz, yosiz = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    xsiz, ysiz = xosiz + draw(st.integers(1, 300)), yosiz + draw(st.integers(1, 300))
    index = _cached_index(xsiz, ysiz, xosiz, yosiz, draw(st.integers(0, 5)), draw(st.integers(1, 4)))
    fsiz = (draw(st.integers(1, 600)), draw(st.integers(1, 600)))
    roff = draw(st.none() | st.tuples(st.integers(0, 700), st.integers(0, 700)))
    rsiz = draw(st.none() | st.tuples(st.integers(0, 700), st.integers(0, 700)))
    comps = draw(st.none() | st.lists(st.tuples(st.integers(0, 3), st.none() | st.integers(0, 3)).filter(
        lambda pair: pair[1] is None or pair[1] >= pair[0]), min_size=1, max_size=3).map(tuple))  # fmt: skip
    layers = draw(st.none() | st.integers(0, 6))
    mode = draw(st.sampled_from(window_module.ROUND_MODES))
    return index, Window(fsiz=fsiz, round=mode, roff=roff, rsiz=rsiz, comps=comps, layers=layers)


@functools.cache
def _cached_index(xsiz: int, ysiz: int, xosiz: int, yosiz: int, levels: int, layers: int) -> CodestreamIndex:
    return synthetic_index(xsiz, ysiz, xosiz, yosiz, levels=levels, layers=layers, components=2)


@given(geometry_and_window())
def test_resolve_properties(case: tuple[CodestreamIndex, Window]) -> None:
    """The actual region always lies inside the actual frame, the frame obeys the rounding rule,
    the region covers the scaled request, and ``changed`` names exactly the values that differ."""
    index, win = case
    got = resolve(index, win)
    assert win.fsiz is not None
    top = max_discard(index)
    sizes = [frame_size(index, d) for d in range(top + 1)]
    assert 0 <= got.discard <= top and got.fsiz == sizes[got.discard]
    # Region inside the frame.
    for axis in (0, 1):
        assert 0 <= got.roff[axis] and got.rsiz[axis] >= 0
        assert got.roff[axis] + got.rsiz[axis] <= got.fsiz[axis]
    # Rounding rule.
    fx, fy = win.fsiz
    fits = [d for d, (w, h) in enumerate(sizes) if w <= fx and h <= fy]
    covers = [d for d, (w, h) in enumerate(sizes) if w >= fx and h >= fy]
    if win.round == "round-down":
        assert got.discard == (min(fits) if fits else top)
    elif win.round == "round-up":
        assert got.discard == (max(covers) if covers else 0)
    else:
        distance = [abs(w * h - fx * fy) for w, h in sizes]
        assert got.discard == distance.index(min(distance))
    # Coverage: the requested region, scaled to the actual frame and clipped, lies inside the actual one.
    roff = win.roff or (0, 0)
    for axis in (0, 1):
        frame, asked = got.fsiz[axis], win.fsiz[axis]
        lo = roff[axis] * frame / asked
        hi = frame if win.rsiz is None else (roff[axis] + win.rsiz[axis]) * frame / asked
        if min(hi, frame) > lo:
            assert got.roff[axis] <= lo and got.roff[axis] + got.rsiz[axis] >= min(hi, frame)
    # changed.
    count = index.num_components
    # An open range "lo-" names at least lo itself.
    asked_comps = None if win.comps is None else {
        c for lo_c, hi_c in win.comps for c in range(lo_c, max(count - 1 if hi_c is None else hi_c, lo_c) + 1)
    }  # fmt: skip
    expected = set()
    if got.fsiz != win.fsiz:
        expected.add("fsiz")
    if got.roff != roff:
        expected.add("roff")
    if win.rsiz is not None and got.rsiz != win.rsiz:
        expected.add("rsiz")
    if asked_comps is not None and asked_comps != set(got.comps):
        expected.add("comps")
    if win.layers is not None and win.layers != got.layers:
        expected.add("layers")
    assert got.changed == expected
    assert got.layers == min(win.layers if win.layers is not None else 99, index.layers)
    assert set(got.comps) == (set(range(count)) if asked_comps is None else asked_comps & set(range(count)))
    # When nothing about the frame changed, the region is the request clipped to it.
    if "fsiz" not in got.changed and win.rsiz is not None:
        for axis in (0, 1):
            far = min(roff[axis] + win.rsiz[axis], got.fsiz[axis])
            assert got.roff[axis] == min(roff[axis], got.fsiz[axis])
            assert got.rsiz[axis] == max(far - got.roff[axis], 0)


@given(
    st.integers(0, 30), st.integers(0, 30), st.integers(1, 200), st.integers(1, 200),
    st.integers(20, 80), st.integers(20, 80), st.integers(0, 3),
    st.tuples(st.integers(0, 250), st.integers(0, 250), st.integers(1, 250), st.integers(1, 250)),
)  # fmt: skip
def test_tiles_in_window_matches_brute_force(
    xosiz: int, yosiz: int, width: int, height: int, xtsiz: int, ytsiz: int, d: int,
    region: tuple[int, int, int, int],
) -> None:  # fmt: skip
    """tiles_in_window() finds exactly the tiles with samples in the region at level d,
    with image and tile-grid origins, without looking at every tile."""
    origin = (xosiz // 2, yosiz // 2)
    index = _tiled_index(xosiz, yosiz, width, height, xtsiz, ytsiz, origin)
    d = min(d, max_discard(index))
    fx, fy = frame_size(index, d)
    resolved = resolve(index, Window(fsiz=(fx, fy), roff=region[:2], rsiz=region[2:]))
    scale = 1 << d
    x0 = -(-index.siz.xosiz // scale) + resolved.roff[0]
    y0 = -(-index.siz.yosiz // scale) + resolved.roff[1]
    x1, y1 = x0 + resolved.rsiz[0], y0 + resolved.rsiz[1]
    want = []
    for t in range(index.num_tiles):
        tx0, ty0, tx1, ty1 = (-(-v // scale) for v in index.siz.tile_bounds(t))
        if max(tx0, x0) < min(tx1, x1) and max(ty0, y0) < min(ty1, y1):
            want.append(t)
    assert tiles_in_window(index, resolved) == want
    # Every selected precinct belongs to one of those tiles.
    assert {t for t, *_ in precincts(index, resolved)} <= set(want)


@functools.cache
def _tiled_index(
    xosiz: int, yosiz: int, width: int, height: int, xtsiz: int, ytsiz: int, origin: tuple[int, int]
) -> CodestreamIndex:
    return synthetic_index(xosiz + width, yosiz + height, xosiz, yosiz, levels=2, layers=1,
                           tile=(xtsiz, ytsiz), tile_origin=origin)  # fmt: skip
