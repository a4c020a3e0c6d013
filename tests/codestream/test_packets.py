"""Packet header decoding: every packet boundary found from the headers equals the PLT one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from imageshare.codestream.index import CodestreamIndex, build_index
from imageshare.codestream.packets import NeedMoreData, PacketError, PrecinctPackets, precinct_blocks
from imageshare.transcode import openjpeg
from imageshare.transcode.params import EncodeParams


def walker(index: CodestreamIndex, t: int, c: int, r: int, p: int) -> PrecinctPackets:
    style = index.tiles[t].coding.components[c]
    cols, _ = index.precinct_grid(t, c, r)
    return PrecinctPackets(
        precinct_blocks(
            index.resolution_bounds(t, c, r), index.component_bounds(t, c), style.levels, r,
            (p % cols, p // cols), style.precincts[r], (style.xcb, style.ycb),
        ),
        style.cblk_style,
    )


def check_every_precinct(data: bytes) -> int:
    """Walk every precinct bin with the decoder; compare each length with PLT's. Return packets seen."""
    index = build_index(data)
    seen = 0
    for t in range(index.siz.num_tiles):
        for c in range(len(index.siz.components)):
            for r in range(index.tiles[t].coding.components[c].levels + 1):
                cols, rows = index.precinct_grid(t, c, r)
                for p in range(cols * rows):
                    packets = index.packets(t, c, r, p)
                    bin_data = b"".join(data[o : o + n] for o, n in packets)
                    w = walker(index, t, c, r, p)
                    pos = 0
                    for _, length in packets:
                        assert w.next_packet(bin_data, pos) == length, (t, c, r, p, w.layer)
                        pos += length
                        seen += 1
                    assert pos == len(bin_data)
    return seen


@pytest.mark.parametrize(
    "shape, precision, signed, rates, precinct",
    [
        ((256, 300), 12, True, (80.0, 40.0, 20.0, 10.0, 1.0), 128),
        ((97, 131), 16, False, (40.0, 10.0, 1.0), 32),
        ((64, 80, 3), 8, False, (20.0, 5.0, 1.0), 16),
        ((300, 200), 15, False, (80.0, 40.0, 20.0, 10.0, 1.0), 64),
    ],
)
def test_our_codestreams(tmp_path: Path, shape: tuple[int, ...], precision: int, signed: bool,
                         rates: tuple[float, ...], precinct: int) -> None:
    """For codestreams from our encoder (several sizes, layers, precincts, colour), the decoded
    packet lengths equal the PLT lengths for every packet of every precinct."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = (np.sin(x / 9.0) + np.cos(y / 13.0)) * (1 << (precision - 3))
    frame = base[..., None].repeat(shape[2], axis=2) if len(shape) == 3 else base
    frame = frame + rng.normal(0, 1 << max(precision - 8, 1), frame.shape)
    lo, hi = (-(1 << (precision - 1)), (1 << (precision - 1)) - 1) if signed else (0, (1 << precision) - 1)
    frame = np.clip(np.rint(frame + (0 if signed else 1 << (precision - 1))), lo, hi)
    frame = frame.astype(np.int16 if signed else (np.uint8 if precision <= 8 else np.uint16))
    path = tmp_path / "x.j2k"
    openjpeg.encode(frame, path, precision=precision, signed=signed, colour_transform=len(shape) == 3,
                    params=EncodeParams(layer_rates=rates, precinct=precinct))
    assert check_every_precinct(path.read_bytes()) > 10


@pytest.mark.skipif(shutil.which("opj_compress") is None, reason="opj_compress is not installed")
@pytest.mark.parametrize("extra", [["-p", "LRCP"], ["-p", "PCRL", "-t", "64,64", "-c", "[32,32]"], ["-n", "1"]])
def test_opj_compress_codestreams(tmp_path: Path, extra: list[str]) -> None:
    """The same holds for opj_compress output with other progressions, tiles and no precincts."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 4096, (150, 170), dtype=np.uint16)
    pgm = tmp_path / "in.pgm"
    pgm.write_bytes(b"P5\n170 150\n4095\n" + img.astype(">u2").tobytes())
    out = tmp_path / "out.j2k"
    subprocess.run(["opj_compress", "-i", str(pgm), "-o", str(out), "-r", "20,5,1", "-PLT", *extra],
                   check=True, capture_output=True, timeout=60)
    assert check_every_precinct(out.read_bytes()) >= 3


def test_truncated_and_unsupported() -> None:
    """A cut packet raises NeedMoreData; multi-segment code-block styles are refused."""
    bands = precinct_blocks((0, 0, 64, 64), (0, 0, 64, 64), 0, 0, (0, 0), (15, 15), (6, 6))
    w = PrecinctPackets(bands)
    with pytest.raises(NeedMoreData):
        w.next_packet(b"", 0)
    with pytest.raises(NeedMoreData):
        PrecinctPackets(bands).next_packet(b"\xff", 0)  # inclusion bits run off the end
    assert PrecinctPackets(bands).next_packet(b"\x00", 0) == 1  # an empty packet
    with pytest.raises(PacketError):
        PrecinctPackets(bands, codeblock_style=0x01)
