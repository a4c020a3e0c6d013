"""Tests for :mod:`imageshare.transcode.openjpeg`: exact round trips, the
codestream layout JPIP needs, an independent decoder, and error handling."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageshare.transcode import openjpeg
from imageshare.transcode.errors import DecodeError, EncodeError, InvalidFrame
from imageshare.transcode.params import EncodeParams, resolutions_for

pytestmark = pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing")

TOOL_TIMEOUT = 60
PARAMS = EncodeParams()


def _random_frame(
    rng: np.random.Generator, shape: tuple[int, ...], precision: int, signed: bool
) -> np.ndarray:
    """Uniform noise over the full range, with both extremes present."""
    if signed:
        lo, hi = -(2 ** (precision - 1)), 2 ** (precision - 1) - 1
    else:
        lo, hi = 0, 2**precision - 1
    dtype = np.dtype(("i" if signed else "u") + ("1" if precision <= 8 else "2"))
    frame = rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    flat = frame.reshape(-1)
    flat[0] = lo
    flat[-1] = hi
    return frame


def _encode(frame: np.ndarray, directory: Path | str, **kwargs: Any) -> Path:
    path = Path(directory) / "frame.j2k"  # the OpenJPEG tools want .j2k
    defaults: dict[str, Any] = {"colour_transform": frame.ndim == 3, "params": PARAMS}
    defaults.update(kwargs)
    size = openjpeg.encode(frame, path, **defaults)
    assert size == path.stat().st_size > 0
    return path


# --- a minimal marker-segment reader (ISO/IEC 15444-1 Annex A) -----------------


def parse_codestream(data: bytes) -> dict[str, Any]:
    """Split a codestream into main-header and tile-part marker segments."""
    assert data[:2] == b"\xff\x4f", "no SOC"
    assert data[-2:] == b"\xff\xd9", "no EOC"
    pos = 2
    main: list[tuple[int, bytes]] = []
    tile_parts: list[dict[str, Any]] = []
    while True:
        marker, length = struct.unpack(">HH", data[pos : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xFF90:  # SOT ends the main header
            break
        main.append((marker, segment))
        pos += 2 + length
    while marker == 0xFF90:
        start = pos
        isot, psot, tpsot, tnsot = struct.unpack(">HIBB", segment)
        pos += 2 + length
        markers: list[tuple[int, bytes]] = []
        while True:
            marker = struct.unpack(">H", data[pos : pos + 2])[0]
            if marker == 0xFF93:  # SOD
                break
            length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            markers.append((marker, data[pos + 4 : pos + 2 + length]))
            pos += 2 + length
        body = start + psot - (pos + 2)
        tile_parts.append(
            {
                "tile": isot,
                "psot": psot,
                "index": tpsot,
                "count": tnsot,
                "markers": markers,
                "body": body,
            }
        )
        pos = start + psot
        if pos >= len(data) - 2:
            break
        marker, length = struct.unpack(">HH", data[pos : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
    return {"main": main, "tile_parts": tile_parts, "size": len(data)}


def _segments(markers: list[tuple[int, bytes]], code: int) -> list[bytes]:
    return [seg for m, seg in markers if m == code]


def decode_siz(segment: bytes) -> dict[str, Any]:
    rsiz, xsiz, ysiz, xo, yo, xt, yt, xto, yto, csiz = struct.unpack(">HIIIIIIIIH", segment[:36])
    comps = [struct.unpack(">BBB", segment[36 + 3 * i : 39 + 3 * i]) for i in range(csiz)]
    return {
        "size": (xsiz - xo, ysiz - yo),
        "tile": (xt, yt, xto, yto),
        "precision": [(c[0] & 0x7F) + 1 for c in comps],
        "signed": [bool(c[0] & 0x80) for c in comps],
        "subsampling": [(c[1], c[2]) for c in comps],
    }


def decode_cod(segment: bytes) -> dict[str, Any]:
    scod, progression, layers, mct, nl, xcb, ycb, style, transform = struct.unpack(
        ">BBHBBBBBB", segment[:10]
    )
    precincts = [((b & 0x0F), (b >> 4)) for b in segment[10 : 10 + nl + 1]] if scod & 1 else []
    return {
        "scod": scod,
        "progression": progression,
        "layers": layers,
        "mct": mct,
        "resolutions": nl + 1,
        "codeblock": (2 ** (xcb + 2), 2 ** (ycb + 2)),
        "style": style,
        "transform": transform,
        "precincts": [(2**w, 2**h) for w, h in precincts],
    }


def plt_lengths(segment: bytes) -> list[int]:
    """Packet lengths from one PLT segment (Zplt, then 7-bit groups, MSB = more)."""
    lengths, value = [], 0
    for byte in segment[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            lengths.append(value)
            value = 0
    assert value == 0, "PLT ends inside a length"
    return lengths


def tlm_entries(segment: bytes) -> list[tuple[int | None, int]]:
    """(tile index, tile-part length) pairs from one TLM segment."""
    stlm = segment[1]
    st_size = (stlm >> 4) & 0x3
    sp_size = 4 if stlm & 0x40 else 2
    step = st_size + sp_size
    entries = []
    for i in range(2, len(segment), step):
        tile = int.from_bytes(segment[i : i + st_size], "big") if st_size else None
        entries.append((tile, int.from_bytes(segment[i + st_size : i + step], "big")))
    return entries


# --- round trips ------------------------------------------------------------------


@st.composite
def frame_specs(draw: st.DrawFn) -> tuple[tuple[int, int], int, bool, int]:
    signed = draw(st.booleans())
    precision = draw(st.integers(1 if not signed else 2, 16))
    shape = (draw(st.integers(1, 150)), draw(st.integers(1, 150)))
    return shape, precision, signed, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=frame_specs())
def test_round_trip_is_exact_for_any_shape_and_precision(
    spec: tuple[tuple[int, int], int, bool, int],
) -> None:
    """Lossless encode -> decode returns the input exactly for uint8/uint16/int8/int16
    frames of odd shapes (1..150 px) at every precision, extremes included, and SIZ
    records the requested precision and signedness."""
    shape, precision, signed, seed = spec
    frame = _random_frame(np.random.default_rng(seed), shape, precision, signed)
    with tempfile.TemporaryDirectory() as tmp:
        path = _encode(frame, tmp, precision=precision, signed=signed)
        decoded = openjpeg.decode(path)
        siz = decode_siz(_segments(parse_codestream(path.read_bytes())["main"], 0xFF51)[0])
    assert decoded.shape == frame.shape
    np.testing.assert_array_equal(decoded, frame)
    assert siz["precision"] == [precision] and siz["signed"] == [signed]


def test_signed_12_bit_round_trip(tmp_path: Path) -> None:
    """12-bit signed CT-like data (-2048..2047) survives exactly, as int16, and SIZ
    says 12 bits signed (not 16 bits unsigned as glymur's writer would)."""
    frame = _random_frame(np.random.default_rng(12), (301, 517), 12, True)
    path = _encode(frame, tmp_path, precision=12, signed=True)
    decoded = openjpeg.decode(path)
    assert decoded.dtype == np.int16
    np.testing.assert_array_equal(decoded, frame)
    siz = decode_siz(_segments(parse_codestream(path.read_bytes())["main"], 0xFF51)[0])
    assert siz["precision"] == [12] and siz["signed"] == [True]


def test_uint16_values_in_int32_container(tmp_path: Path) -> None:
    """The input dtype does not matter as long as the values fit: int32/int64 arrays
    of 16-bit unsigned values encode exactly."""
    frame = _random_frame(np.random.default_rng(5), (40, 33), 16, False).astype(np.int64)
    path = _encode(frame, tmp_path, precision=16, signed=False)
    np.testing.assert_array_equal(openjpeg.decode(path), frame)


@pytest.mark.parametrize("precision", [8, 12, 16])
def test_rgb_with_colour_transform_round_trip(tmp_path: Path, precision: int) -> None:
    """RGB frames coded with the reversible colour transform (COD MCT = 1) decode
    exactly, including 16-bit RGB where RCT needs an extra bit internally."""
    frame = _random_frame(np.random.default_rng(precision), (97, 131, 3), precision, False)
    path = _encode(frame, tmp_path, precision=precision, signed=False, colour_transform=True)
    np.testing.assert_array_equal(openjpeg.decode(path), frame)
    cod = decode_cod(_segments(parse_codestream(path.read_bytes())["main"], 0xFF52)[0])
    assert cod["mct"] == 1


def test_rgb_without_colour_transform(tmp_path: Path) -> None:
    """colour_transform=False codes the three components independently (MCT = 0)."""
    frame = _random_frame(np.random.default_rng(3), (20, 30, 3), 8, False)
    path = _encode(frame, tmp_path, precision=8, signed=False, colour_transform=False)
    np.testing.assert_array_equal(openjpeg.decode(path), frame)
    assert decode_cod(_segments(parse_codestream(path.read_bytes())["main"], 0xFF52)[0])["mct"] == 0


def test_decode_from_bytes_matches_file(tmp_path: Path) -> None:
    """decode() accepts the codestream as bytes (memory stream) as well as a path."""
    frame = _random_frame(np.random.default_rng(7), (70, 90), 10, False)
    path = _encode(frame, tmp_path, precision=10, signed=False)
    np.testing.assert_array_equal(openjpeg.decode(path.read_bytes()), frame)
    np.testing.assert_array_equal(openjpeg.decode(bytearray(path.read_bytes())), frame)


def test_reduce_and_layers(tmp_path: Path) -> None:
    """reduce=r gives ceil(size / 2**r); fewer layers give an approximation that gets
    closer with each layer; all layers give the exact frame."""
    y, x = np.mgrid[0:300, 0:500]
    rng = np.random.default_rng(0)
    frame = (2000 + 1500 * np.sin(x / 37.0) * np.cos(y / 23.0) + rng.normal(0, 20, x.shape)).astype(
        np.uint16
    )
    path = _encode(frame, tmp_path, precision=12, signed=False)
    assert openjpeg.decode(path, reduce=1).shape == (150, 250)
    assert openjpeg.decode(path, reduce=3).shape == (38, 63)
    errors = [
        float(np.abs(openjpeg.decode(path, layers=n).astype(float) - frame).mean())
        for n in range(1, len(PARAMS.layer_rates) + 1)
    ]
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0 and errors[-1] == 0
    with pytest.raises(DecodeError):
        openjpeg.decode(path, reduce=resolutions_for(500, 300, PARAMS))


def test_irreversible_mode_is_close_but_not_exact(tmp_path: Path) -> None:
    """lossless=False writes the 9/7 transform (COD transform 0) and decodes close
    to, not equal to, the input."""
    y, x = np.mgrid[0:128, 0:160]
    frame = (128 + 100 * np.sin(x / 9.0) * np.cos(y / 7.0)).astype(np.uint8)
    params = EncodeParams(lossless=False, layer_rates=(80, 40, 20, 10))
    path = _encode(frame, tmp_path, precision=8, signed=False, params=params)
    cod = decode_cod(_segments(parse_codestream(path.read_bytes())["main"], 0xFF52)[0])
    assert cod["transform"] == 0
    decoded = openjpeg.decode(path).astype(float)
    assert 0 < np.abs(decoded - frame).mean() < 4


def test_encoder_threads_give_identical_codestream(tmp_path: Path) -> None:
    """OpenJPEG's own threads (params.threads) change speed, not the codestream."""
    frame = _random_frame(np.random.default_rng(9), (300, 400), 12, True)
    one = _encode(frame, tmp_path, precision=12, signed=True).read_bytes()
    two = _encode(frame, tmp_path, precision=12, signed=True, params=EncodeParams(threads=2))
    assert two.read_bytes() == one


def test_concurrent_encodes_do_not_interfere(tmp_path: Path) -> None:
    """Encodes running on several threads at once (as in the worker pool) each
    produce their own exact codestream."""
    frames = [
        _random_frame(np.random.default_rng(i), (130 + i, 170), 12, i % 2 == 0) for i in range(8)
    ]

    def work(i: int) -> np.ndarray:
        path = tmp_path / f"f{i}.j2k"
        openjpeg.encode(
            frames[i], path, precision=12, signed=i % 2 == 0, colour_transform=False, params=PARAMS
        )
        return openjpeg.decode(path)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(len(frames))))
    for frame, result in zip(frames, results):
        np.testing.assert_array_equal(result, frame)


# --- what JPIP streaming needs ------------------------------------------------------


@pytest.mark.parametrize(
    "shape, precision, signed",
    [
        ((512, 512), 12, True),
        ((300, 1000), 16, False),
        ((600, 200, 3), 8, False),
        ((40, 30), 8, False),
    ],
)
def test_codestream_has_streaming_layout(
    tmp_path: Path, shape: tuple[int, ...], precision: int, signed: bool
) -> None:
    """Parsing the marker segments shows: raw J2C (SOC first), one tile and one
    tile-part, RPCL, 5 layers, reversible 5/3 without quantisation, 64x64
    code-blocks, 128x128 precincts at every resolution (Scod bit 0), no SOP/EPH,
    resolutions down to <= 64 px, TLM in the main header matching the tile-part,
    PLT in the tile-part header accounting for every body byte, no PPM/PPT, and
    SIZ with the true precision and signedness."""
    frame = _random_frame(np.random.default_rng(1), shape, precision, signed)
    path = _encode(frame, tmp_path, precision=precision, signed=signed)
    data = path.read_bytes()
    cs = parse_codestream(data)
    main = cs["main"]
    height, width = shape[:2]
    ncomp = shape[2] if len(shape) == 3 else 1

    siz = decode_siz(_segments(main, 0xFF51)[0])
    assert siz["size"] == (width, height)
    assert siz["precision"] == [precision] * ncomp
    assert siz["signed"] == [signed] * ncomp
    assert siz["subsampling"] == [(1, 1)] * ncomp
    assert siz["tile"][:2] == (width, height)  # a single tile

    cod = decode_cod(_segments(main, 0xFF52)[0])
    assert cod["progression"] == 2  # RPCL
    assert cod["layers"] == len(PARAMS.layer_rates) == 5
    assert cod["transform"] == 1  # reversible 5/3
    assert cod["scod"] & 0x01 and not cod["scod"] & 0x06  # precincts, no SOP/EPH
    assert cod["codeblock"] == (64, 64) and cod["style"] == 0
    numres = resolutions_for(width, height, PARAMS)
    assert cod["resolutions"] == numres
    assert cod["precincts"] == [(128, 128)] * numres
    assert -(-max(width, height) // 2 ** (numres - 1)) <= 64
    assert cod["mct"] == (1 if ncomp == 3 else 0)

    qcd = _segments(main, 0xFF5C)[0]
    assert qcd[0] & 0x1F == 0  # no quantisation: reversible

    codes = {m for m, _ in main}
    assert 0xFF60 not in codes  # PPM
    assert len(cs["tile_parts"]) == 1
    tile_part = cs["tile_parts"][0]
    assert tile_part["count"] in (0, 1)
    tp_codes = {m for m, _ in tile_part["markers"]}
    assert 0xFF61 not in tp_codes  # PPT
    plts = _segments(tile_part["markers"], 0xFF58)
    assert plts, "no PLT in the tile-part header"
    packets = [n for seg in plts for n in plt_lengths(seg)]
    assert sum(packets) == tile_part["body"]
    tlms = _segments(main, 0xFF55)
    assert tlms, "no TLM in the main header"
    assert [length for seg in tlms for _, length in tlm_entries(seg)] == [tile_part["psot"]]


@pytest.mark.skipif(shutil.which("opj_dump") is None, reason="opj_dump not installed")
def test_opj_dump_agrees(tmp_path: Path) -> None:
    """OpenJPEG's own opj_dump reports RPCL (prg=0x2), 5 layers, 5/3 (qmfbid=1),
    128 precincts at every resolution, 12-bit signed, and a TLM marker."""
    frame = _random_frame(np.random.default_rng(2), (700, 400), 12, True)
    path = _encode(frame, tmp_path, precision=12, signed=True)
    out = subprocess.run(
        ["opj_dump", "-i", str(path)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=True,
    ).stdout
    numres = resolutions_for(400, 700, PARAMS)
    assert "prg=0x2" in out
    assert "numlayers=5" in out
    assert "qmfbid=1" in out
    assert f"numresolutions={numres}" in out
    assert "preccintsize (w,h)=" + "(7,7) " * numres in out
    assert "prec=12" in out and "sgnd=1" in out
    assert "type=0xff55" in out  # TLM


def _opj_decompress(path: Path, out: Path) -> None:
    subprocess.run(
        ["opj_decompress", "-i", str(path), "-o", str(out)],
        capture_output=True,
        timeout=TOOL_TIMEOUT,
        check=True,
    )


@pytest.mark.skipif(shutil.which("opj_decompress") is None, reason="opj_decompress not installed")
@pytest.mark.parametrize(
    "shape, precision, signed",
    [((257, 333), 12, True), ((128, 99), 16, False), ((64, 80, 3), 8, False), ((31, 17), 5, False)],
)
def test_opj_decompress_reproduces_input(
    tmp_path: Path, shape: tuple[int, ...], precision: int, signed: bool
) -> None:
    """The independent opj_decompress tool decodes our codestream (raw little-endian
    output, planar components) to exactly the input samples."""
    frame = _random_frame(np.random.default_rng(4), shape, precision, signed)
    path = _encode(frame, tmp_path, precision=precision, signed=signed)
    raw = tmp_path / "out.rawl"
    _opj_decompress(path, raw)
    dtype = np.dtype(("i" if signed else "u") + ("1" if precision <= 8 else "2")).newbyteorder("<")
    ncomp = shape[2] if len(shape) == 3 else 1
    planes = np.fromfile(raw, dtype=dtype).reshape(ncomp, shape[0], shape[1])
    if signed:
        # opj_decompress writes signed samples as `precision`-bit two's complement
        # (masked, not sign-extended): sign-extend them here.
        shift = 8 * dtype.itemsize - precision
        planes = (planes.astype(dtype.newbyteorder("=")) << shift) >> shift
    decoded = planes[0] if ncomp == 1 else np.moveaxis(planes, 0, -1)
    np.testing.assert_array_equal(decoded, frame)


@pytest.mark.skipif(shutil.which("opj_decompress") is None, reason="opj_decompress not installed")
def test_opj_decompress_pgm(tmp_path: Path) -> None:
    """opj_decompress also writes our 10-bit unsigned frame as a PGM with the same samples."""
    frame = _random_frame(np.random.default_rng(8), (45, 77), 10, False)
    path = _encode(frame, tmp_path, precision=10, signed=False)
    pgm = tmp_path / "out.pgm"
    _opj_decompress(path, pgm)
    data = pgm.read_bytes()
    # Header: magic, width, height, maxval, whitespace-separated, with '#' comment lines.
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end : end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    assert fields == [b"P5", b"77", b"45", b"1023"]
    pixels = np.frombuffer(data[pos + 1 :], dtype=">u2").reshape(frame.shape)
    np.testing.assert_array_equal(pixels, frame)


# --- errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame, precision, signed, colour, message",
    [
        (np.array([[0, 4096]], np.uint16), 12, False, False, "do not fit 12-bit unsigned"),
        (np.array([[-1, 5]], np.int16), 12, False, False, "do not fit 12-bit unsigned"),
        (np.array([[-2049, 0]], np.int16), 12, True, False, "do not fit 12-bit signed"),
        (np.array([[2048]], np.int16), 12, True, False, "do not fit"),
        (np.zeros((0, 5), np.uint8), 8, False, False, "empty"),
        (np.zeros((2, 2, 2, 2), np.uint8), 8, False, False, "shape"),
        (np.zeros((4, 4, 4), np.uint8), 8, False, False, "shape"),
        (np.zeros(7, np.uint8), 8, False, False, "shape"),
        (np.zeros((4, 4), np.float32), 8, False, False, "integers"),
        (np.zeros((4, 4), np.uint8), 0, False, False, "precision"),
        (np.zeros((4, 4), np.uint16), 17, False, False, "precision"),
        (np.zeros((4, 4), np.uint8), 8, False, True, "3-component"),
    ],
)
def test_bad_input_raises_encode_error(
    tmp_path: Path, frame: np.ndarray, precision: int, signed: bool, colour: bool, message: str
) -> None:
    """Malformed frames and values outside precision/signedness raise InvalidFrame,
    which is both an EncodeError and a ValueError, and leave no file behind."""
    path = tmp_path / "bad.j2k"
    with pytest.raises(EncodeError, match=message) as info:
        openjpeg.encode(
            frame, path, precision=precision, signed=signed, colour_transform=colour, params=PARAMS
        )
    assert isinstance(info.value, InvalidFrame) and isinstance(info.value, ValueError)
    assert not path.exists()


def test_unwritable_path_raises_encode_error(tmp_path: Path) -> None:
    """A destination that cannot be opened gives an EncodeError, not a crash."""
    with pytest.raises(EncodeError, match="cannot open"):
        openjpeg.encode(
            np.zeros((8, 8), np.uint8),
            tmp_path / "missing-dir" / "x.j2k",
            precision=8,
            signed=False,
            colour_transform=False,
            params=PARAMS,
        )


def test_library_errors_carry_openjpeg_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When OpenJPEG itself refuses (here: too many resolutions for a 4x4 image,
    forced past our own guard), the EncodeError holds OpenJPEG's message and the
    partial file is removed."""
    monkeypatch.setattr(openjpeg, "resolutions_for", lambda w, h, p: 5)
    path = tmp_path / "x.j2k"
    with pytest.raises(EncodeError, match="Number of resolutions is too high"):
        openjpeg.encode(
            np.zeros((4, 4), np.uint8),
            path,
            precision=8,
            signed=False,
            colour_transform=False,
            params=PARAMS,
        )
    assert not path.exists()


def test_decode_rejects_non_jpeg2000(tmp_path: Path) -> None:
    """decode() raises DecodeError for data that is not a codestream, for a damaged
    codestream header, and for a missing file."""
    with pytest.raises(DecodeError):
        openjpeg.decode(b"not a codestream at all")
    frame = _random_frame(np.random.default_rng(0), (50, 50), 8, False)
    data = _encode(frame, tmp_path, precision=8, signed=False).read_bytes()
    with pytest.raises(DecodeError):
        openjpeg.decode(data[:20])
    with pytest.raises(DecodeError):
        openjpeg.decode(tmp_path / "nope.j2k")


def test_version_and_availability() -> None:
    """The library reports a version >= 2.5.0 and is available."""
    assert openjpeg.is_available()
    major, minor = (int(v) for v in openjpeg.library_version().split(".")[:2])
    assert (major, minor) >= (2, 5)


def test_no_reactor_import() -> None:
    """The transcode modules run on worker threads and must not import
    twisted.internet (which would install a reactor)."""
    code = (
        "import sys, imageshare.transcode.openjpeg, imageshare.transcode.pixels, "
        "imageshare.transcode.params, imageshare.transcode.errors; "
        "sys.exit('twisted.internet' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], timeout=TOOL_TIMEOUT, env={**os.environ})
    assert result.returncode == 0


def test_threaded_decode_is_identical(tmp_path: Path) -> None:
    """Decoding with several OpenJPEG threads gives the same samples, at every reduction."""
    img = (np.random.default_rng(9).random((300, 420)) * 4095).astype(np.uint16)
    path = tmp_path / "t.j2k"
    openjpeg.encode(img, path, precision=12, signed=False, colour_transform=False, params=EncodeParams(precinct=64))
    data = path.read_bytes()
    for reduce in (0, 1, 2):
        np.testing.assert_array_equal(openjpeg.decode(data, reduce=reduce, threads=2),
                                      openjpeg.decode(data, reduce=reduce))
