"""Tests of :mod:`imageshare.codestream.index`.

Three kinds of evidence that the packet index is right:

* real codestreams from ``opj_compress`` (every progression order, precincts,
  layers, tiles, tile-parts, RGB, 4:2:0 subsampling, image/tile offsets, TLM,
  SOP/EPH): the packets must tile the tile-part bodies exactly, the codestream
  must be rebuilt byte for byte from the index, and, decisively, replacing every
  packet of layers >= k by an empty packet must decode (``opj_decompress``) to
  the same image as ``opj_decompress -l k`` of the original;
* synthetic codestreams with random geometry, per-component and per-tile
  coding overrides and interleaved tile-parts, checked against a literal
  transcription of the ISO/IEC 15444-1 B.12 loops over every grid position;
* Hypothesis fuzzing: damaged input raises CodestreamError and nothing else.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageshare.codestream.errors import CodestreamError
from imageshare.codestream.index import (
    MAX_TILE_COMPONENTS,
    CodestreamIndex,
    TileCoding,
    build_index,
    compute_precinct_grid,
)
from imageshare.codestream.markers import SIZ, CodingStyle, ImageComponent, Marker, Progression
from tests.codestream.test_markers import (
    coc_segment,
    cod_segment,
    make_codestream,
    plt_segments,
    qcd_segment,
    segment,
    simple_codestream,
    siz_segment,
    tile_part,
)

OPJ_TIMEOUT = 60
needs_opj = pytest.mark.skipif(
    shutil.which("opj_compress") is None or shutil.which("opj_decompress") is None,
    reason="OpenJPEG tools opj_compress/opj_decompress are not installed",
)

# --- real codestreams ------------------------------------------------------------

#: id -> (image kind, width, height, opj_compress options besides -PLT)
CASES: dict[str, tuple[str, int, int, str]] = {
    "lrcp": ("gray", 200, 150, "-p LRCP -r 40,20,10,1"),
    "rlcp-precincts": ("gray", 200, 150, "-p RLCP -c [64,64],[32,32] -r 40,20,10,1"),
    "rpcl-tiles-rgb": ("rgb", 200, 150, "-p RPCL -t 64,64 -c [32,32] -r 30,10,1"),
    "pcrl-tileparts-r": ("rgb", 200, 150, "-p PCRL -t 64,64 -TP R -c [64,64],[32,32] -r 40,20,10,1"),
    "cprl-offsets-tlm": ("rgb", 199, 151, "-p CPRL -d 5,3 -T 3,2 -t 64,64 -c [32,32] -TLM -TP C -r 20,5,1"),
    "lrcp-tileparts-l-irreversible": ("gray", 131, 97, "-p LRCP -t 64,64 -TP L -I -r 30,10,3"),
    "rpcl-sop-eph": ("gray", 97, 61, "-p RPCL -SOP -EPH -c [16,16] -n 4 -r 10,1"),
    "rpcl-420": ("yuv420", 200, 150, "-p RPCL -c [32,32] -r 20,5,1"),
    "pcrl-420-tiles-offset": ("yuv420", 160, 120, "-p PCRL -d 3,5 -t 64,64 -c [32,32] -r 20,1 -n 4"),
    # Same precinct size at every resolution: partial first precincts start at different places.
    "pcrl-far-offset": ("rgb", 120, 90, "-p PCRL -d 100,70 -c [32,32],[32,32],[32,32],[32,32] -n 4 -r 20,1"),
    "cprl-sub3-offset": ("yuv-3x", 198, 150, "-p CPRL -d 7,5 -c [32,32],[32,32],[32,32] -n 4 -r 20,1"),
    "cprl-420-precincts": ("yuv420", 128, 96, "-p CPRL -c [16,16] -n 4 -r 20,5,1 -b 16,16"),
}


def _image(kind: str, width: int, height: int) -> tuple[str, bytes, list[str]]:
    """A deterministic test picture: file suffix, file bytes, extra opj_compress options."""
    rng = np.random.default_rng(width * 7919 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = ((3 * x + 2 * y) % 256).astype(np.uint8) ^ rng.integers(0, 32, (height, width), dtype=np.uint8)
    if kind == "gray":
        return ".pgm", b"P5\n%d %d\n255\n" % (width, height) + base.tobytes(), []
    if kind == "rgb":
        rgb = np.stack([base, base[::-1], 255 - base], axis=-1)
        return ".ppm", b"P6\n%d %d\n255\n" % (width, height) + rgb.tobytes(), []
    # Raw planar Y, Cb, Cr with chroma subsampled by 2 (4:2:0) or 3 (not a power of two).
    factor = {"yuv420": 2, "yuv-3x": 3}[kind]
    chroma = base[::factor, ::factor]
    raw = base.tobytes() + chroma.tobytes() + (255 - chroma).tobytes()
    return ".raw", raw, ["-F", f"{width},{height},3,8,u@1x1:{factor}x{factor}:{factor}x{factor}"]


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, timeout=OPJ_TIMEOUT, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{args[0]} failed: {done.stdout.decode()} {done.stderr.decode()}")


class Opj:
    """Runs opj_compress/opj_decompress in a session temporary directory, caching encodings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def _path(self, name: str) -> Path:
        self.count += 1
        return self.root / f"{self.count}-{name}"

    @functools.cache  # noqa: B019 - one instance per session
    def encode(self, kind: str, width: int, height: int, options: tuple[str, ...], plt: bool = True) -> bytes:
        """Encode the test picture with the given options; return the codestream."""
        suffix, data, extra = _image(kind, width, height)
        src = self._path("in" + suffix)
        src.write_bytes(data)
        out = self._path("out.j2k")
        _run(["opj_compress", "-i", str(src), "-o", str(out), *extra, *options, *(["-PLT"] if plt else [])])
        return out.read_bytes()

    def decode(self, codestream: bytes, layers: int | None = None) -> bytes:
        """Decode with opj_decompress (only the first ``layers`` layers if given) to PGX, all components."""
        src = self._path("in.j2k")
        src.write_bytes(codestream)
        out = self._path("out.pgx")  # one file per component, whatever the subsampling
        _run(["opj_decompress", "-i", str(src), "-o", str(out), *(["-l", str(layers)] if layers else [])])
        files = sorted(self.root.glob(out.stem + "_*.pgx"), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
        assert files
        return b"".join(f.read_bytes() for f in files)


@pytest.fixture(scope="session")
def opj(tmp_path_factory: pytest.TempPathFactory) -> Opj:
    """Session-wide OpenJPEG runner (`make test` installs the tools: missing ones are an error)."""
    if shutil.which("opj_compress") is None or shutil.which("opj_decompress") is None:
        pytest.fail("OpenJPEG tools are not installed (Debian package libopenjp2-tools)")
    return Opj(tmp_path_factory.mktemp("opj"))


def _case(opj: Opj, name: str) -> bytes:
    kind, width, height, options = CASES[name]
    return opj.encode(kind, width, height, tuple(options.split()))


def _packets_by_part(index: CodestreamIndex) -> dict[int, list[tuple[int, int, int]]]:
    """SOT offset -> [(offset, length, layer)] of the packets in that tile-part, in codestream order."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for tile in index.tiles:
        starts = [part.body_offset for part in tile.parts]
        for _c, _r, _p, layer, offset, length in tile.iter_packets():
            part = next(p for p in reversed(tile.parts) if p.body_offset <= offset)
            assert offset + length <= part.end, "a packet crosses the end of its tile-part"
            out.setdefault(part.offset, []).append((offset, length, layer))
        assert starts == sorted(starts)
    for packets in out.values():
        packets.sort()
    return out


def check_consistency(data: bytes, index: CodestreamIndex) -> None:
    """Counts, sums, exact tiling of the bodies by packets, and byte-exact reassembly."""
    by_part = _packets_by_part(index)
    for tile in index.tiles:
        precincts = sum(cols * rows for res in tile.grid for cols, rows in res)
        assert tile.num_packets == tile.layers * precincts
        assert sum(length for *_, length in tile.iter_packets()) == sum(p.body_length for p in tile.parts)
        for part in tile.parts:
            pos = part.body_offset
            for offset, length, _layer in by_part.get(part.offset, []):
                assert offset == pos, "packets must follow each other with no gap or overlap"
                pos += length
            assert pos == part.end
    main_offset, main_length = index.main_header
    assert main_offset == 0 and data[main_length : main_length + 2] == b"\xff\x90"
    rebuilt = bytearray(data[main_offset:main_length])
    for t, part in index.tile_parts():
        rebuilt += data[part.offset : part.header_offset]  # SOT segment
        for offset, length in index.tile_header_ranges(t):
            if part.header_offset == offset:
                rebuilt += data[offset : offset + length]
        rebuilt += b"\xff\x93"
        for offset, length, _layer in by_part.get(part.offset, []):
            rebuilt += data[offset : offset + length]
    rebuilt += b"\xff\xd9"
    assert bytes(rebuilt) == data


def keep_layers(data: bytes, index: CodestreamIndex, keep: int) -> bytes:
    """The codestream with every packet of layer >= keep replaced by an empty packet.

    An empty packet is a packet header made of a single 0 bit, padded to one
    0x00 byte (preceded by the original SOP segment and followed by EPH when the
    tile uses them). PLT/TLM/PLM are dropped (lengths change) and Psot fixed.
    """
    by_part = _packets_by_part(index)
    out = bytearray()
    for seg in index.main_segments:
        if seg.marker not in (Marker.TLM, Marker.PLM):
            out += data[seg.offset : seg.offset + seg.length]
    for t, part in index.tile_parts():
        coding = index.tiles[t].coding
        kept = [s for s in part.segments if s.marker != Marker.PLT]
        header = b"".join(data[s.offset : s.offset + s.length] for s in kept)
        body = bytearray()
        for offset, length, layer in by_part.get(part.offset, []):
            if layer < keep:
                body += data[offset : offset + length]
            else:
                has_sop = coding.sop and data[offset : offset + 2] == b"\xff\x91"
                sop = data[offset : offset + 6] if has_sop else b""
                body += sop + b"\x00" + (b"\xff\x92" if coding.eph else b"")
        psot = 12 + len(header) + 2 + len(body)
        sot = data[part.offset : part.offset + 6] + struct.pack(">I", psot)
        sot += data[part.offset + 10 : part.offset + 12]
        out += sot + header + b"\xff\x93" + body
    return bytes(out + b"\xff\xd9")


@needs_opj
@pytest.mark.parametrize("name", list(CASES))
def test_real_codestream_packets_tile_the_bodies(opj: Opj, name: str) -> None:
    """For opj_compress output, packet count = layers x precincts, packets tile the tile-part bodies with
    no gap or overlap, the codestream is reassembled byte for byte from the index, and JSON and bin ids
    round-trip."""
    data = _case(opj, name)
    index = build_index(data)
    check_consistency(data, index)
    assert CodestreamIndex.from_json(index.to_json()) == index
    for t, tile in enumerate(index.tiles):
        for c, res in enumerate(tile.grid):
            for r, (cols, rows) in enumerate(res):
                for p in range(cols * rows):
                    assert index.precinct_from_bin_id(index.precinct_bin_id(t, c, r, p)) == (t, c, r, p)


@needs_opj
@pytest.mark.parametrize("name", list(CASES))
def test_real_codestream_layer_boundaries_decode(opj: Opj, name: str) -> None:
    """Replacing the packets of layers >= k by empty packets decodes exactly like opj_decompress -l k:
    the packet boundaries and layers found from PLT and the progression order are exactly right."""
    data = _case(opj, name)
    index = build_index(data)
    keep = 1 if index.layers <= 2 else 2
    truncated = keep_layers(data, index, keep)
    assert len(truncated) < len(data)
    assert opj.decode(truncated) == opj.decode(data, keep)


def reorder(data: bytes, index: CodestreamIndex, progression: Progression) -> bytes:
    """The codestream rewritten in another progression order, one tile-part per tile, from the index alone.

    Packets are moved to the positions the literal B.12 loops give them in the
    new order (COD's progression byte patched, TLM dropped, PLT rewritten). A packet taken
    from the wrong (c, r, p, l) breaks the tag trees of the precinct it lands in.
    """
    comps = [(c.xrsiz, c.yrsiz) for c in index.components]

    def patched(seg_offset: int, seg_length: int, marker: int) -> bytes:
        raw = bytearray(data[seg_offset : seg_offset + seg_length])
        if marker == Marker.COD:
            raw[5] = int(progression)
        return bytes(raw)

    out = bytearray()
    for seg in index.main_segments:
        if seg.marker not in (Marker.TLM, Marker.PLM):
            out += patched(seg.offset, seg.length, seg.marker)
    for t, tile in enumerate(index.tiles):
        kept = [s for part in tile.parts for s in part.segments if s.marker != Marker.PLT]
        header = b"".join(patched(s.offset, s.length, s.marker) for s in kept)
        coding = attrs.evolve(tile.coding, progression=progression, sop=False)
        body = bytearray()
        lengths = []
        for c, r, p, l in reference_sequence(tile.bounds, comps, coding):  # noqa: E741
            offset, length = tile.packet(c, r, p, l)
            body += data[offset : offset + length]
            lengths.append(length)
        header += plt_segments(lengths, list(range(60000, 5 * len(lengths), 60000)))
        out += struct.pack(">HHHIBB", 0xFF90, 10, t, 12 + len(header) + 2 + len(body), 0, 1)
        out += header + b"\xff\x93" + body
    return bytes(out + b"\xff\xd9")


#: case -> progression to rewrite it in (every order is a source and a target).
REORDER = {
    "lrcp": Progression.RPCL,
    "rlcp-precincts": Progression.PCRL,
    "rpcl-tiles-rgb": Progression.CPRL,
    "pcrl-tileparts-r": Progression.LRCP,
    "cprl-offsets-tlm": Progression.RPCL,
    "lrcp-tileparts-l-irreversible": Progression.CPRL,
    "rpcl-420": Progression.PCRL,
    "pcrl-420-tiles-offset": Progression.CPRL,
    "cprl-420-precincts": Progression.RLCP,
    "pcrl-far-offset": Progression.RPCL,
    "cprl-sub3-offset": Progression.PCRL,
}


@needs_opj
@pytest.mark.parametrize("name", list(REORDER))
def test_real_codestream_reordered_decodes_identically(opj: Opj, name: str) -> None:
    """Rewriting the codestream in another progression order from the index decodes to the same image:
    every packet is attributed to the right component, resolution, precinct and layer, and the
    position-driven orders agree with OpenJPEG's decoder, including subsampled components and offsets."""
    data = _case(opj, name)
    index = build_index(data)
    rewritten = reorder(data, index, REORDER[name])
    again = build_index(rewritten)
    assert again.progression is REORDER[name]
    for tile, new_tile in zip(index.tiles, again.tiles, strict=True):
        for (*key, offset, length), (*new_key, new_offset, new_length) in zip(
            tile.iter_packets(), new_tile.iter_packets(), strict=True
        ):
            assert key == new_key
            assert data[offset : offset + length] == rewritten[new_offset : new_offset + new_length]
    assert opj.decode(rewritten) == opj.decode(data)


@needs_opj
def test_real_codestream_geometry(opj: Opj) -> None:
    """Geometry and coding parameters of an offset, tiled, 3-component CPRL codestream come from SIZ/COD."""
    data = _case(opj, "cprl-offsets-tlm")
    index = build_index(data)
    assert (index.width, index.height, index.offset) == (199, 151, (5, 3))
    assert (index.siz.xtsiz, index.siz.ytsiz, index.siz.xtosiz, index.siz.ytosiz) == (64, 64, 3, 2)
    assert index.num_tiles == 4 * 3 and index.num_components == 3
    assert index.components == (ImageComponent(8, False, 1, 1),) * 3
    assert index.progression is Progression.CPRL and index.layers == 3
    assert index.coding.mct == 1 and index.coding.components[0].reversible
    assert index.coding.levels == (5, 5, 5)
    assert all(len(tile.parts) == 3 for tile in index.tiles)  # -TP C: one tile-part per component
    assert index.tiles[0].bounds == (5, 3, 67, 66)
    assert index.component_bounds(0, 0) == (5, 3, 67, 66)
    assert index.resolution_bounds(0, 0, 4) == (3, 2, 34, 33)
    ppx, ppy = index.coding.components[0].precincts[4]
    assert (ppx, ppy) == (4, 4)
    assert index.precinct_grid(0, 0, 4) == (3, 3)


@needs_opj
def test_real_codestream_subsampled_components(opj: Opj) -> None:
    """4:2:0 components get their own tile-component bounds and precinct grids (XRsiz = YRsiz = 2)."""
    index = build_index(_case(opj, "rpcl-420"))
    assert [(c.xrsiz, c.yrsiz) for c in index.components] == [(1, 1), (2, 2), (2, 2)]
    assert index.component_bounds(0, 1) == (0, 0, 100, 75)
    assert index.precinct_grid(0, 0, 5) == (7, 5) and index.precinct_grid(0, 1, 5) == (4, 3)


@needs_opj
def test_real_codestream_without_plt_is_refused(opj: Opj) -> None:
    """A codestream encoded without -PLT raises CodestreamError('no PLT markers: ...')."""
    data = opj.encode("gray", 64, 48, ("-r", "10,1"), plt=False)
    with pytest.raises(CodestreamError, match="^no PLT markers: "):
        build_index(data)


@needs_opj
def test_real_codestream_with_poc_is_refused(opj: Opj) -> None:
    """A codestream with a progression order change (POC) is refused with a clear error."""
    data = opj.encode("gray", 64, 48, ("-r", "10,1", "-POC", "T1=0,0,2,3,1,LRCP/T1=3,0,2,6,1,LRCP"))
    with pytest.raises(CodestreamError, match="POC"):
        build_index(data)


# --- lookups -----------------------------------------------------------------------


def _three_layer_index() -> tuple[bytes, CodestreamIndex]:
    lengths = [5, 1, 300]
    data = simple_codestream(lengths, layers=3)
    return data, build_index(data)


def test_lookups_single_precinct() -> None:
    """packets(), layer_offsets() and the tile header ranges of a one-precinct codestream."""
    data, index = _three_layer_index()
    tile = index.tiles[0]
    body = tile.parts[0].body_offset
    assert index.packets(0, 0, 0, 0) == ((body, 5), (body + 5, 1), (body + 6, 300))
    assert tile.packet(0, 0, 0, 2) == (body + 6, 300)
    assert index.layer_offsets(0, 0, 0, 0) == (0, 5, 6, 306)
    ((offset, length),) = index.tile_header_ranges(0)
    assert data[offset : offset + 2] == b"\xff\x58" and offset + length == body - 2
    assert index.precinct_bin_id(0, 0, 0, 0) == 0 and index.precinct_from_bin_id(0) == (0, 0, 0, 0)


def test_lookups_of_missing_things_raise_key_error() -> None:
    """Coordinates or data-bin ids that do not exist raise KeyError."""
    _, index = _three_layer_index()
    for call in (
        lambda: index.packets(1, 0, 0, 0),
        lambda: index.packets(0, 1, 0, 0),
        lambda: index.packets(0, 0, 1, 0),
        lambda: index.packets(0, 0, 0, 1),
        lambda: index.tiles[0].packet(0, 0, 0, 3),
        lambda: index.precinct_from_bin_id(1),
        lambda: index.precinct_from_bin_id(-1),
        lambda: index.resolution_bounds(0, 0, 1),
    ):
        with pytest.raises(KeyError):
            call()


def test_window_lookup() -> None:
    """precinct_ranges() maps a region of a resolution to precinct columns/rows; iter_precincts() lists
    them."""
    main = siz_segment(100, 60) + cod_segment(levels=1, precincts=[(3, 3), (4, 4)]) + qcd_segment(1)
    # Resolution 0: 50x30 in 8x8 precincts (7x4); resolution 1: 100x60 in 16x16 (7x4).
    count = 2 * 7 * 4
    data = make_codestream(main, [tile_part(0, plt_segments([1] * count), bytes(count))])
    index = build_index(data)
    assert index.precinct_grid(0, 0, 0) == (7, 4) and index.precinct_grid(0, 0, 1) == (7, 4)
    cols, rows = index.precinct_ranges(0, 0, 1, 20, 10, 40, 33)
    assert (cols, rows) == (range(1, 3), range(0, 3))
    assert list(index.tiles[0].iter_precincts(0, 1, cols, rows)) == [1, 2, 8, 9, 15, 16]
    assert index.precinct_ranges(0, 0, 1, 100, 0, 200, 10) == (range(0), range(0))
    assert index.precinct_bounds(0, 0, 1, 27) == (96, 48, 100, 60)
    assert len(list(index.tiles[0].iter_precincts(0, 0))) == 28


# --- synthetic codestreams vs. a literal transcription of B.12 ---------------------


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def brute_grid(
    bounds: tuple[int, int, int, int], xr: int, yr: int, style: CodingStyle
) -> list[tuple[int, int]]:
    """Precinct columns/rows by listing the samples of each resolution and their precinct numbers."""
    tx0, ty0, tx1, ty1 = bounds
    xs = [x for x in range(tx1) if tx0 <= x * xr < tx1]  # tile-component samples
    ys = [y for y in range(ty1) if ty0 <= y * yr < ty1]
    out = []
    for r, (ppx, ppy) in enumerate(style.precincts):
        k = style.levels - r
        rx = [u for u in range(tx1 + 1) if xs and xs[0] <= u << k <= xs[-1]]  # resolution samples
        ry = [v for v in range(ty1 + 1) if ys and ys[0] <= v << k <= ys[-1]]
        out.append((len({u >> ppx for u in rx}), len({v >> ppy for v in ry})))
    return out


def reference_sequence(
    bounds: tuple[int, int, int, int], comps: list[tuple[int, int]], coding: TileCoding
) -> list[tuple[int, int, int, int]]:
    """(c, r, p, l) of each packet in codestream order, straight from ISO/IEC 15444-1 B.12.1.1-B.12.1.5.

    The position-driven orders loop over every reference grid position of the
    tile; "the next precinct" of (c, r) is taken from a counter and checked
    against the precinct that contains the position (OpenJPEG pi.c's formula).
    """
    tx0, ty0, tx1, ty1 = bounds
    info = {}
    for c, ((xr, yr), style) in enumerate(zip(comps, coding.components, strict=True)):
        grid = brute_grid(bounds, xr, yr, style)
        for r in range(style.levels + 1):
            k = style.levels - r
            info[c, r] = (grid[r], style.precincts[r], k, xr, yr)
    layers = range(coding.layers)
    ncomp = len(comps)
    maxres = max(s.levels for s in coding.components) + 1
    out: list[tuple[int, int, int, int]] = []
    counters: dict[tuple[int, int], int] = {}

    def visit(c: int, r: int, x: int, y: int) -> None:
        if (c, r) not in info:
            return
        (cols, rows), (ppx, ppy), k, xr, yr = info[c, r]
        if not cols or not rows:
            return
        trx0, try0 = _ceil(tx0, xr << k), _ceil(ty0, yr << k)
        if not (y % (yr << (ppy + k)) == 0 or (y == ty0 and (try0 << k) % (1 << (ppy + k)))):
            return
        if not (x % (xr << (ppx + k)) == 0 or (x == tx0 and (trx0 << k) % (1 << (ppx + k)))):
            return
        p = counters.get((c, r), 0)
        counters[c, r] = p + 1
        prci = (_ceil(x, xr << k) >> ppx) - (trx0 >> ppx)
        prcj = (_ceil(y, yr << k) >> ppy) - (try0 >> ppy)
        assert p == prci + prcj * cols
        out.extend((c, r, p, l) for l in layers)  # noqa: E741

    def precincts(c: int, r: int) -> int:
        return info[c, r][0][0] * info[c, r][0][1] if (c, r) in info else 0

    progression = coding.progression
    positions = [(y, x) for y in range(ty0, ty1) for x in range(tx0, tx1)]
    if progression == Progression.LRCP:
        out = [(c, r, p, l) for l in layers for r in range(maxres) for c in range(ncomp)  # noqa: E741
               for p in range(precincts(c, r))]  # fmt: skip
    elif progression == Progression.RLCP:
        out = [(c, r, p, l) for r in range(maxres) for l in layers for c in range(ncomp)  # noqa: E741
               for p in range(precincts(c, r))]  # fmt: skip
    elif progression == Progression.RPCL:
        for r in range(maxres):
            for y, x in positions:
                for c in range(ncomp):
                    visit(c, r, x, y)
    elif progression == Progression.PCRL:
        for y, x in positions:
            for c in range(ncomp):
                for r in range(maxres):
                    visit(c, r, x, y)
    else:
        for c in range(ncomp):
            for y, x in positions:
                for r in range(maxres):
                    visit(c, r, x, y)
    if progression >= Progression.RPCL:
        assert all(counters.get(key, 0) == precincts(*key) for key in info), "every precinct visited once"
    return out


SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]

styles_st = st.integers(0, 3).flatmap(
    lambda levels: st.builds(
        CodingStyle,
        st.just(levels),
        st.just(4),
        st.just(4),
        st.just(0),
        st.sampled_from([0, 1]),
        # Exponent 0 is only allowed at resolution 0 (Table A.21); 15 = no precincts.
        st.tuples(*[st.tuples(st.sampled_from(sizes), st.sampled_from(sizes))
                    for sizes in [[0, 1, 2, 3, 15]] + [[1, 2, 3, 15]] * levels]),  # fmt: skip
    )
)


def _style_args(style: CodingStyle) -> dict[str, object]:
    # Maximal precincts everywhere may be coded either way; exercise both.
    implicit = all(pp == (15, 15) for pp in style.precincts) and style.transform == 0
    return {"levels": style.levels, "precincts": None if implicit else list(style.precincts),
            "transform": style.transform}  # fmt: skip


@st.composite
def synthetic(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    """A random small codestream and what its index must contain."""
    ncomp = draw(st.integers(1, 3))
    comps = [(draw(st.integers(1, 4)), draw(st.integers(1, 4))) for _ in range(ncomp)]
    xosiz, yosiz = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    xsiz, ysiz = xosiz + draw(st.integers(1, 36)), yosiz + draw(st.integers(1, 36))
    xtosiz, ytosiz = draw(st.integers(0, xosiz)), draw(st.integers(0, yosiz))
    xtsiz = draw(st.integers(max(xosiz - xtosiz + 1, _ceil(xsiz - xtosiz, 3)), xsiz - xtosiz))
    ytsiz = draw(st.integers(max(yosiz - ytosiz + 1, _ceil(ysiz - ytosiz, 2)), ysiz - ytosiz))
    siz = SIZ(0, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz,
              tuple(ImageComponent(8, False, xr, yr) for xr, yr in comps))  # fmt: skip
    styles = [draw(styles_st) for _ in range(ncomp)]
    progression = draw(st.sampled_from(list(Progression)))
    layers = draw(st.integers(1, 3))
    components = [(8, False, xr, yr) for xr, yr in comps]
    main = siz_segment(xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, components)
    main += cod_segment(progression, layers, **_style_args(styles[0]))  # type: ignore[arg-type]
    for c in range(1, ncomp):
        if styles[c] != styles[0] or draw(st.booleans()):
            main += coc_segment(c, ncomp, **_style_args(styles[c]))  # type: ignore[arg-type]
    main += qcd_segment(styles[0].levels)
    default = TileCoding(progression, layers, 0, False, False, tuple(styles))
    # Tile 0 may override COD (all components) and then COC (component 0): precedence A.6.
    override = b""
    codings = [default] * siz.num_tiles
    if draw(st.booleans()):
        tile_style = draw(styles_st)
        tile_prog, tile_layers = draw(st.sampled_from(list(Progression))), draw(st.integers(1, 3))
        override = cod_segment(tile_prog, tile_layers, **_style_args(tile_style))  # type: ignore[arg-type]
        tile_styles = [tile_style] * ncomp
        if draw(st.booleans()):
            tile_styles[0] = draw(styles_st)
            override += coc_segment(0, ncomp, **_style_args(tile_styles[0]))  # type: ignore[arg-type]
        codings[0] = TileCoding(tile_prog, tile_layers, 0, False, False, tuple(tile_styles))
    rng = random.Random(draw(st.integers(0, 2**32)))
    expected: dict[int, dict[tuple[int, int, int, int], tuple[int, int]]] = {}
    pending: list[list[tuple[int, list[tuple[int, int, int, int]], list[int], int, int]]] = []
    for t in range(siz.num_tiles):
        sequence = reference_sequence(siz.tile_bounds(t), comps, codings[t])
        lengths = [rng.randint(1, 4) for _ in sequence]
        nparts = rng.randint(1, 3)
        cuts = sorted(rng.randint(0, len(sequence)) for _ in range(nparts - 1))
        bounds = [0, *cuts, len(sequence)]
        spans = enumerate(zip(bounds, bounds[1:]))
        pending.append([(t, sequence[a:b], lengths[a:b], i, nparts) for i, (a, b) in spans])
        expected[t] = {}
    # Interleave the tiles' tile-parts, keeping each tile's parts in order.
    parts = []
    pos = 2 + len(main)
    while any(pending):
        queue = rng.choice([q for q in pending if q])
        t, sequence, lengths, i, nparts = queue.pop(0)
        header = override if (t == 0 and i == 0) else b""
        if lengths or rng.random() < 0.3:
            cuts = [rng.randint(0, 3 * len(lengths)) for _ in range(rng.randint(0, 3))]
            header += plt_segments(lengths, cuts)
        body = bytes(rng.randrange(256) for _ in range(sum(lengths)))
        offset = pos + 12 + len(header) + 2
        for key, length in zip(sequence, lengths, strict=True):
            expected[t][key] = (offset, length)
            offset += length
        tp = tile_part(t, header, body, i, rng.choice([0, nparts]))
        parts.append(tp)
        pos += len(tp)
    data = make_codestream(main, parts)
    return data, {"siz": siz, "codings": codings, "expected": expected, "comps": comps}


@given(synthetic())
@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OK)
def test_progression_orders_match_the_standard(case: tuple[bytes, dict[str, object]]) -> None:
    """For random geometry (offsets, tile grid, XRsiz/YRsiz 1..4), per-component and per-tile coding
    overrides, all five progression orders and interleaved tile-parts, every packet (t, c, r, p, l) is found
    at the offset the literal B.12 loops put it, and the precinct grids match a brute-force count."""
    data, info = case
    index = build_index(data)
    siz = info["siz"]
    assert index.siz == siz
    for t, tile in enumerate(index.tiles):
        assert tile.coding == info["codings"][t]  # type: ignore[index]
        found = {(c, r, p, l): (off, n) for c, r, p, l, off, n in tile.iter_packets()}
        assert found == info["expected"][t]  # type: ignore[index]
        for c, (xr, yr) in enumerate(info["comps"]):  # type: ignore[arg-type]
            style = tile.coding.components[c]
            assert list(tile.grid[c]) == brute_grid(tile.bounds, xr, yr, style)
    check_consistency(data, index)


@given(synthetic())
@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK)
def test_json_round_trip_is_exact(case: tuple[bytes, dict[str, object]]) -> None:
    """to_json/from_json reproduce an equal index, and serializing again gives the same bytes."""
    index = build_index(case[0])
    text = index.to_json()
    again = CodestreamIndex.from_json(text)
    assert again == index
    assert again.to_json() == text
    assert json.loads(text)["version"] == 1


@given(synthetic(), st.lists(st.integers(0, 5000), max_size=30))
@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK)
def test_precinct_bin_ids_are_inverse(case: tuple[bytes, dict[str, object]], numbers: list[int]) -> None:
    """precinct_bin_id and precinct_from_bin_id are inverse; ids are distinct, follow I = t + (c + s C) T,
    and any other number either names a precinct whose id it is or raises KeyError."""
    index = build_index(case[0])
    seen = set()
    ntiles, ncomp = index.num_tiles, index.num_components
    for t, tile in enumerate(index.tiles):
        for c, res in enumerate(tile.grid):
            s = 0
            for r, (cols, rows) in enumerate(res):
                for p in range(cols * rows):
                    bin_id = index.precinct_bin_id(t, c, r, p)
                    assert bin_id == t + (c + s * ncomp) * ntiles
                    assert index.precinct_from_bin_id(bin_id) == (t, c, r, p)
                    seen.add(bin_id)
                    s += 1
    for number in numbers:
        if number in seen:
            continue
        with pytest.raises(KeyError):
            index.precinct_from_bin_id(number)


@given(
    st.tuples(st.integers(0, 300), st.integers(0, 300), st.integers(1, 200), st.integers(1, 200)),
    st.integers(1, 5),
    st.integers(1, 5),
    styles_st,
)
@settings(max_examples=200, deadline=None)
def test_precinct_grid_formula_matches_brute_force(
    tile: tuple[int, int, int, int], xr: int, yr: int, style: CodingStyle
) -> None:
    """The B.6 precinct grid formula agrees with counting the precincts that contain resolution samples."""
    x0, y0, w, h = tile
    bounds = (x0, y0, x0 + w, y0 + h)
    assert list(compute_precinct_grid(bounds, ImageComponent(8, False, xr, yr), style)) == brute_grid(
        bounds, xr, yr, style
    )


# --- refusals ------------------------------------------------------------------------


def test_poc_and_ppm_are_refused() -> None:
    """POC in the main or a tile-part header and PPM/PPT are refused with clear errors."""
    main = siz_segment(16, 16) + cod_segment(levels=0) + qcd_segment(0)
    poc = segment(Marker.POC, bytes([0, 0, 0, 1, 1, 1, 0]))
    body = tile_part(0, plt_segments([1]), b"\x00")
    with pytest.raises(CodestreamError, match="POC"):
        build_index(make_codestream(main + poc, [body]))
    with pytest.raises(CodestreamError, match="POC"):
        build_index(make_codestream(main, [tile_part(0, poc + plt_segments([1]), b"\x00")]))
    with pytest.raises(CodestreamError, match="PPM"):
        build_index(make_codestream(main + segment(Marker.PPM, b"\x00\x00"), [body]))
    with pytest.raises(CodestreamError, match="PPT"):
        build_index(make_codestream(main, [tile_part(0, segment(Marker.PPT, b"\x00\x00"), b"\x00")]))


def test_plt_must_match_bodies_and_progression() -> None:
    """PLT lengths must add up to each tile-part body and their number to layers x precincts."""
    with pytest.raises(CodestreamError, match="sum to 6 but the body has 7"):
        build_index(make_codestream(
            siz_segment(16, 16) + cod_segment(levels=0, layers=2) + qcd_segment(0),
            [tile_part(0, plt_segments([3, 3]), bytes(7))],
        ))  # fmt: skip
    with pytest.raises(CodestreamError, match="PLT lists 3 packets but LRCP with 2 layers"):
        build_index(simple_codestream([2, 2, 2], layers=2))
    with pytest.raises(CodestreamError, match="^no PLT markers: "):
        build_index(make_codestream(
            siz_segment(16, 16) + cod_segment(levels=0) + qcd_segment(0), [tile_part(0, b"", bytes(5))]
        ))  # fmt: skip


def test_hostile_counts_fail_fast() -> None:
    """Hostile SIZ/COD values (16384 components x many tiles, 2^62 precincts x 65535 layers) are refused
    quickly without building huge structures."""
    start = time.monotonic()
    comps = [(8, False, 1, 1)] * 16384
    main = siz_segment(200 * 16, 16, xtsiz=16, ytsiz=16, components=comps)
    main += cod_segment(levels=0) + qcd_segment(0)
    assert 200 * 16384 > MAX_TILE_COMPONENTS
    tiles = [tile_part(t, b"", b"") for t in range(200)]
    with pytest.raises(CodestreamError, match="exceeds"):
        build_index(make_codestream(main, tiles))
    huge = siz_segment(0xFFFFFFFF, 0xFFFFFFFF) + qcd_segment(32)
    huge += cod_segment(layers=65535, levels=32, precincts=[(0, 0)] + [(1, 1)] * 32)
    with pytest.raises(CodestreamError, match="PLT lists 1 packets"):
        build_index(make_codestream(huge, [tile_part(0, plt_segments([1]), b"\x00")]))
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format": "something else", "version": 1}',
        b'{"format": "imageshare/j2c-index", "version": 2}',
        b'{"format": "imageshare/j2c-index", "version": 1}',
        b"[" * 100000,
    ],
)
def test_from_json_refuses_garbage(text: bytes) -> None:
    """Anything that is not a valid stored index raises CodestreamError."""
    with pytest.raises(CodestreamError):
        CodestreamIndex.from_json(text)


def _mutate_json(doc: dict[str, object], path: list[object], value: object) -> bytes:
    target: object = doc
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = value  # type: ignore[index]
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["length"], "12"),
        (["length"], 3),  # packets past the end
        (["siz", 1], 0),
        (["siz", 9], [8, 0, 1]),
        (["styles", 0, 0], 40),
        (["coding", 1], 0),
        (["coding", 5], [7]),
        (["tiles"], []),
        (["tiles", 0, 1], []),
        (["packets"], "!!"),
        (["packets"], "AAAA"),
        (["main"], {"a": 1}),
    ],
)
def test_from_json_refuses_inconsistent_documents(path: list[object], value: object) -> None:
    """A stored index whose members are wrong or inconsistent raises CodestreamError, nothing else."""
    _, index = _three_layer_index()
    doc = json.loads(index.to_json())
    with pytest.raises(CodestreamError):
        CodestreamIndex.from_json(_mutate_json(doc, path, value))


# --- fuzzing -------------------------------------------------------------------------


@functools.cache
def _synthetic_base() -> bytes:
    """Two tiles, two components (one subsampled), RPCL with precincts, 2 layers, two tile-parts each."""
    main = (siz_segment(40, 24, 0, 0, 24, 24, components=[(8, False, 1, 1), (8, True, 2, 2)])
            + cod_segment(2, 2, 2, [(1, 1), (2, 2), (3, 3)]) + coc_segment(1, 2, 1) + qcd_segment(2)
            + segment(Marker.COM, b"\x00\x01fuzz"))  # fmt: skip
    index_parts = []
    for t in range(2):
        bounds = (24 * t, 0, min(24 * t + 24, 40), 24)
        styles = (
            CodingStyle(2, 4, 4, 0, 1, ((1, 1), (2, 2), (3, 3))),
            CodingStyle(1, 4, 4, 0, 1, ((15, 15),) * 2),
        )
        coding = TileCoding(Progression.RPCL, 2, 0, False, False, styles)
        n = len(reference_sequence(bounds, [(1, 1), (2, 2)], coding))
        lengths = [1 + (i * 7) % 5 for i in range(n)]
        half = n // 2
        index_parts.append((t, lengths[:half], lengths[half:]))
    parts = []
    for t, first, _ in index_parts:
        parts.append(tile_part(t, plt_segments(first, [3]), bytes(range(sum(first))), 0, 2))
    for t, _, second in index_parts:
        parts.append(tile_part(t, plt_segments(second), bytes(sum(second)), 1, 2))
    data = make_codestream(main, parts)
    build_index(data)  # the base itself must be valid
    return data


@functools.cache
def _opj_base() -> bytes | None:
    if shutil.which("opj_compress") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        options = ("-p", "PCRL", "-t", "32,32", "-TP", "R", "-c", "[16,16]", "-r", "8,1", "-n", "3", "-TLM")
        return Opj(Path(tmp)).encode("rgb", 40, 30, options)


def _bases() -> list[bytes]:
    opj_base = _opj_base()
    return [_synthetic_base()] + ([opj_base] if opj_base is not None else [])


bases_st = st.integers(0, 1).map(lambda i: _bases()[i % len(_bases())])
FUZZ = settings(max_examples=200, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def _build_or_refuse(data: bytes) -> None:
    try:
        index = build_index(data)
    except CodestreamError:
        return
    # Whatever was accepted is self-consistent and serializable.
    check_consistency(data, index)
    assert CodestreamIndex.from_json(index.to_json()) == index


@given(bases_st, st.data())
@FUZZ
def test_fuzz_truncation(base: bytes, data: st.DataObject) -> None:
    """Every truncation of a valid codestream is refused with CodestreamError (never another exception)."""
    cut = data.draw(st.integers(0, len(base) - 1))
    with pytest.raises(CodestreamError):
        build_index(base[:cut])


@given(bases_st, st.data())
@FUZZ
def test_fuzz_byte_overwrites(base: bytes, data: st.DataObject) -> None:
    """Random byte overwrites (mostly in the headers) give an index or CodestreamError, nothing else."""
    damaged = bytearray(base)
    head = data.draw(st.booleans())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, min(len(base), 400) - 1 if head else len(base) - 1))
        damaged[pos] = data.draw(st.integers(0, 255))
    _build_or_refuse(bytes(damaged))


@given(bases_st, st.data())
@FUZZ
def test_fuzz_insertions_and_deletions(base: bytes, data: st.DataObject) -> None:
    """Inserting or deleting a run of bytes gives an index or CodestreamError, nothing else."""
    pos = data.draw(st.integers(0, len(base)))
    if data.draw(st.booleans()):
        damaged = base[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + base[pos:]
    else:
        damaged = base[:pos] + base[pos + data.draw(st.integers(1, 16)) :]
    _build_or_refuse(damaged)


@given(st.binary(max_size=600), st.sampled_from([b"", b"\xff\x4f", b"\xff\x4f\xff\x51"]))
@FUZZ
def test_fuzz_garbage(garbage: bytes, prefix: bytes) -> None:
    """Random bytes (optionally behind SOC or SOC+SIZ markers) give CodestreamError, nothing else."""
    _build_or_refuse(prefix + garbage)


@given(bases_st, st.integers(0, 2**32 - 1), st.data())
@FUZZ
def test_fuzz_header_fields(base: bytes, value: int, data: st.DataObject) -> None:
    """Overwriting a 16- or 32-bit big-endian field anywhere in the headers with any value is handled."""
    size = data.draw(st.sampled_from([2, 4]))
    limit = base.index(b"\xff\x93") + 2
    pos = data.draw(st.integers(0, limit - size))
    damaged = base[:pos] + (value & ((1 << (8 * size)) - 1)).to_bytes(size, "big") + base[pos + size :]
    _build_or_refuse(damaged)


# --- scale ---------------------------------------------------------------------------


def _rpcl_big(width: int, height: int, ncomp: int, layers: int, levels: int, ppx: int) -> bytes:
    comps = [(8, False, 1, 1)] * ncomp
    precincts = [(ppx, ppx)] * (levels + 1)
    style = CodingStyle(levels, 4, 4, 0, 1, tuple(precincts))
    grid = compute_precinct_grid((0, 0, width, height), ImageComponent(8, False, 1, 1), style)
    count = sum(cols * rows for cols, rows in grid) * ncomp * layers
    main = siz_segment(width, height, components=comps)
    main += cod_segment(2, layers, levels, precincts) + qcd_segment(levels)
    lengths = [1 + i % 3 for i in range(count)]
    plt = b"".join(plt_segments(lengths[i : i + 20000]) for i in range(0, count, 20000))
    return make_codestream(main, [tile_part(0, plt, bytes(sum(lengths)))])


def test_large_image_index_is_fast_and_compact() -> None:
    """A 4096x4096 RGB codestream with 8 layers and 64x64 precincts (~130k packets) is indexed in well under
    a few seconds, stored compactly, and looked up without per-packet objects."""
    data = _rpcl_big(4096, 4096, 3, 8, 5, 6)
    start = time.monotonic()
    index = build_index(data)
    elapsed = time.monotonic() - start
    tile = index.tiles[0]
    assert tile.num_packets > 100_000
    assert elapsed < 5, elapsed
    assert len(tile.offsets) == 8 * tile.num_packets and len(tile.lengths) == 4 * tile.num_packets
    text = index.to_json()
    assert CodestreamIndex.from_json(text) == index
    assert len(text) < 12 * tile.num_packets
    cols, rows = index.precinct_grid(0, 2, 5)
    last = cols * rows - 1
    assert index.precinct_from_bin_id(index.precinct_bin_id(0, 2, 5, last)) == (0, 2, 5, last)
    assert len(index.packets(0, 2, 5, last)) == 8
