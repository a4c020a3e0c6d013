"""Tests of :mod:`imageshare.codestream.markers` on hand-built marker segments.

The ``*_segment`` and :func:`make_codestream` builders are also used by
``test_index.py`` to make synthetic codestreams (the index never looks inside
packets, so bodies can be arbitrary bytes).
"""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageshare.codestream.errors import CodestreamError
from imageshare.codestream.markers import (
    COD,
    PLT,
    SIZ,
    CodingStyle,
    ImageComponent,
    Marker,
    Progression,
    decode_packet_lengths,
    parse_coc,
    parse_cod,
    parse_codestream,
    parse_com,
    parse_crg,
    parse_main_header,
    parse_plm,
    parse_plt,
    parse_poc,
    parse_qcc,
    parse_qcd,
    parse_rgn,
    parse_siz,
    parse_sot,
    parse_tile_part,
    parse_tlm,
)

# --- builders ------------------------------------------------------------------


def segment(marker: int, payload: bytes) -> bytes:
    """A marker segment: marker, Lxxx, parameters."""
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def siz_payload(
    xsiz: int,
    ysiz: int,
    xosiz: int = 0,
    yosiz: int = 0,
    xtsiz: int | None = None,
    ytsiz: int | None = None,
    xtosiz: int = 0,
    ytosiz: int = 0,
    components: list[tuple[int, bool, int, int]] | None = None,
    rsiz: int = 0,
) -> bytes:
    """SIZ parameters; components are (precision, signed, XRsiz, YRsiz)."""
    comps = components if components is not None else [(8, False, 1, 1)]
    out = struct.pack(
        ">HIIIIIIIIH", rsiz, xsiz, ysiz, xosiz, yosiz,
        xsiz if xtsiz is None else xtsiz, ysiz if ytsiz is None else ytsiz, xtosiz, ytosiz, len(comps),
    )  # fmt: skip
    for precision, signed, xr, yr in comps:
        out += bytes([(precision - 1) | (0x80 if signed else 0), xr, yr])
    return out


def siz_segment(*args: object, **kwargs: object) -> bytes:
    """A SIZ segment (see :func:`siz_payload`)."""
    return segment(Marker.SIZ, siz_payload(*args, **kwargs))  # type: ignore[arg-type]


def spcod(
    levels: int, precincts: list[tuple[int, int]] | None, xcb: int = 4, ycb: int = 4, transform: int = 1
) -> bytes:
    """SPcod/SPcoc bytes; ``precincts`` are (PPx, PPy) per resolution or None."""
    out = bytes([levels, xcb - 2, ycb - 2, 0, transform])
    if precincts is not None:
        out += bytes(ppx | (ppy << 4) for ppx, ppy in precincts)
    return out


def cod_segment(
    progression: int = 0,
    layers: int = 1,
    levels: int = 2,
    precincts: list[tuple[int, int]] | None = None,
    sop: bool = False,
    eph: bool = False,
    mct: int = 0,
    xcb: int = 4,
    ycb: int = 4,
    transform: int = 1,
) -> bytes:
    """A COD segment."""
    scod = (1 if precincts is not None else 0) | (2 if sop else 0) | (4 if eph else 0)
    return segment(Marker.COD, bytes([scod, progression]) + struct.pack(">HB", layers, mct)
                   + spcod(levels, precincts, xcb, ycb, transform))  # fmt: skip


def coc_segment(
    component: int, csiz: int, levels: int, precincts: list[tuple[int, int]] | None = None, transform: int = 1
) -> bytes:
    """A COC segment."""
    comp = bytes([component]) if csiz < 257 else struct.pack(">H", component)
    scoc = bytes([1 if precincts is not None else 0])
    return segment(Marker.COC, comp + scoc + spcod(levels, precincts, transform=transform))


def qcd_segment(levels: int = 2) -> bytes:
    """A QCD segment (no quantization, one exponent per sub-band)."""
    return segment(Marker.QCD, bytes([0x40]) + bytes([0x48] * (3 * levels + 1)))


def sot_segment(tile: int, psot: int, part: int = 0, parts: int = 1) -> bytes:
    """A SOT segment."""
    return segment(Marker.SOT, struct.pack(">HIBB", tile, psot, part, parts))


def encode_lengths(lengths: list[int]) -> bytes:
    """Iplt bytes of packet lengths: base 128, high bit = more bytes follow."""
    out = bytearray()
    for n in lengths:
        digits = [n & 0x7F]
        n >>= 7
        while n:
            digits.append(0x80 | (n & 0x7F))
            n >>= 7
        out += bytes(reversed(digits))
    return bytes(out)


def plt_segments(lengths: list[int], cuts: list[int] | None = None) -> bytes:
    """PLT segments for ``lengths``; ``cuts`` split the Iplt bytes anywhere (even inside a length)."""
    data = encode_lengths(lengths)
    points = sorted({0, len(data), *(c for c in (cuts or []) if 0 < c < len(data))})
    out = b""
    for z, (a, b) in enumerate(zip(points, points[1:])):
        out += segment(Marker.PLT, bytes([z]) + data[a:b])
    return out


def tile_part(
    tile: int, header: bytes, body: bytes, part: int = 0, parts: int = 1, psot: int | None = None
) -> bytes:
    """A tile-part: SOT, header segments, SOD, body (Psot computed unless given)."""
    length = 12 + len(header) + 2 + len(body)
    return sot_segment(tile, length if psot is None else psot, part, parts) + header + b"\xff\x93" + body


def make_codestream(main: bytes, tile_parts: list[bytes], eoc: bool = True) -> bytes:
    """SOC + main header segments (SIZ first) + tile-parts + EOC."""
    return b"\xff\x4f" + main + b"".join(tile_parts) + (b"\xff\xd9" if eoc else b"")


def simple_codestream(lengths: list[int] | None = None, **cod: object) -> bytes:
    """A one-tile 16x16 gray codestream, NL=0 by default (one precinct, one packet per layer)."""
    kw: dict[str, object] = {"levels": 0}
    kw.update(cod)
    layers = int(kw.get("layers", 1))  # type: ignore[call-overload]
    lengths = lengths if lengths is not None else [3] * layers
    main = siz_segment(16, 16) + cod_segment(**kw) + qcd_segment(int(kw["levels"]))  # type: ignore[arg-type]
    body = bytes(sum(lengths))
    return make_codestream(main, [tile_part(0, plt_segments(lengths), body)])


# --- SIZ -------------------------------------------------------------------------


def test_siz_fields() -> None:
    """SIZ parameters are decoded: geometry, tile grid, precision/signedness/subsampling per component."""
    comps = [(8, False, 1, 1), (12, True, 2, 1), (38, False, 255, 3)]
    siz = parse_siz(siz_payload(200, 150, 5, 3, 64, 64, 0, 0, comps, rsiz=2))
    assert (siz.rsiz, siz.xsiz, siz.ysiz, siz.xosiz, siz.yosiz) == (2, 200, 150, 5, 3)
    assert (siz.width, siz.height, siz.tiles_across, siz.tiles_down, siz.num_tiles) == (195, 147, 4, 3, 12)
    assert siz.components == (
        ImageComponent(8, False, 1, 1),
        ImageComponent(12, True, 2, 1),
        ImageComponent(38, False, 255, 3),
    )
    assert siz.tile_bounds(0) == (5, 3, 64, 64)
    assert siz.tile_bounds(11) == (192, 128, 200, 150)


@pytest.mark.parametrize(
    "payload",
    [
        siz_payload(16, 16, components=[]),  # Csiz 0
        siz_payload(16, 16, components=[(8, False, 1, 1)] * 16385),  # too many components
        siz_payload(16, 16)[:-1],  # Lsiz does not match Csiz
        siz_payload(16, 16) + b"\x00",
        siz_payload(16, 16, components=[(39, False, 1, 1)]),  # precision 39
        siz_payload(16, 16, components=[(8, False, 0, 1)]),  # XRsiz 0
        siz_payload(16, 16, components=[(8, False, 1, 0)]),  # YRsiz 0
        siz_payload(16, 16, 16, 0),  # Xsiz == XOsiz: empty image
        siz_payload(16, 16, 0, 20),  # YOsiz > Ysiz
        siz_payload(16, 16, xtsiz=0),  # zero tile width
        siz_payload(16, 16, ytsiz=0),
        siz_payload(300, 300, xtsiz=1, ytsiz=1),  # 90000 tiles
        siz_payload(0xFFFFFFFF, 0xFFFFFFFF, xtsiz=1, ytsiz=1),  # 2^64 tiles
        siz_payload(16, 16, 4, 4, 8, 8, 5, 0),  # XTOsiz > XOsiz
        siz_payload(16, 16, 10, 10, 4, 4, 2, 2),  # first tile misses the image
        b"\x00" * 35,  # truncated
    ],
)
def test_siz_hostile_values_are_refused(payload: bytes) -> None:
    """Hostile or inconsistent SIZ values raise CodestreamError, fast and without allocating."""
    start = time.monotonic()
    with pytest.raises(CodestreamError):
        parse_siz(payload)
    assert time.monotonic() - start < 1.0


def test_siz_shares_identical_components() -> None:
    """16384 identical components are accepted and share one value object (no per-component cost)."""
    siz = parse_siz(siz_payload(16, 16, components=[(8, False, 1, 1)] * 16384))
    assert len(siz.components) == 16384
    assert len({id(c) for c in siz.components}) == 1


# --- COD / COC -------------------------------------------------------------------


def test_cod_without_precincts() -> None:
    """COD with Scod bit 0 clear gives maximal precincts (15, 15) for every resolution."""
    cod = parse_cod(cod_segment(progression=2, layers=5, levels=3, mct=1, xcb=6, ycb=5)[4:])
    assert cod == COD(0, Progression.RPCL, 5, 1, CodingStyle(3, 6, 5, 0, 1, ((15, 15),) * 4))
    assert not (cod.precincts_defined or cod.sop or cod.eph)
    assert cod.style.resolutions == 4 and cod.style.code_block_size == (64, 32) and cod.style.reversible


def test_cod_with_precincts_sop_eph() -> None:
    """COD with Scod bit 0 set reads PPx (low nibble) / PPy (high nibble) per resolution; SOP/EPH bits."""
    cod = parse_cod(cod_segment(progression=4, layers=2, levels=2, precincts=[(0, 1), (7, 8), (15, 2)],
                                sop=True, eph=True)[4:])  # fmt: skip
    assert cod.progression is Progression.CPRL and cod.layers == 2
    assert cod.style.precincts == ((0, 1), (7, 8), (15, 2))
    assert cod.precincts_defined and cod.sop and cod.eph


@pytest.mark.parametrize(
    "payload",
    [
        cod_segment(progression=5)[4:],  # unknown progression
        cod_segment(layers=0)[4:],  # zero layers
        cod_segment(levels=33)[4:],  # too many levels
        cod_segment(xcb=7, ycb=7)[4:],  # code-block area > 4096
        cod_segment(xcb=11)[4:],
        cod_segment(levels=2, precincts=[(1, 1), (0, 3), (3, 3)])[4:],  # PPx 0 above resolution 0
        cod_segment(levels=2, precincts=[(1, 1), (2, 2)])[4:],  # one precinct size missing
        cod_segment(levels=2)[4:] + b"\x00",  # trailing byte
        bytes([0x08]) + cod_segment()[5:],  # Part 2 Scod bit
        cod_segment()[4:9],  # truncated
    ],
)
def test_cod_malformed(payload: bytes) -> None:
    """Malformed COD parameters raise CodestreamError."""
    with pytest.raises(CodestreamError):
        parse_cod(payload)


def test_coc_component_index_width() -> None:
    """COC's Ccoc is one byte when Csiz < 257 and two bytes otherwise; it must name an existing component."""
    one = parse_coc(coc_segment(3, 4, 1, [(2, 2), (3, 4)])[4:], 4)
    assert (one.component, one.scoc, one.style.precincts) == (3, 1, ((2, 2), (3, 4)))
    two = parse_coc(coc_segment(300, 400, 0)[4:], 400)
    assert (two.component, two.style.precincts) == (300, ((15, 15),))
    with pytest.raises(CodestreamError):
        parse_coc(coc_segment(4, 4, 1)[4:], 4)


# --- other segments ----------------------------------------------------------------


def test_qcd_qcc_rgn_crg_com_kept() -> None:
    """QCD/QCC are kept raw; RGN, CRG and COM are decoded."""
    assert parse_qcd(b"\x22\x01\x02").raw == b"\x22\x01\x02"
    qcc = parse_qcc(b"\x01\x40\x48", 2)
    assert (qcc.component, qcc.raw) == (1, b"\x40\x48")
    assert parse_qcc(b"\x01\x00\x40", 300).component == 256
    rgn = parse_rgn(b"\x00\x00\x05", 1)
    assert (rgn.component, rgn.style, rgn.shift) == (0, 0, 5)
    assert parse_crg(b"\x00\x01\x00\x02\x80\x00\x00\x00", 2).offsets == ((1, 2), (32768, 0))
    com = parse_com(b"\x00\x01hello")
    assert (com.registration, com.data) == (1, b"hello")
    for bad in (lambda: parse_qcd(b""), lambda: parse_rgn(b"\x00\x00", 1), lambda: parse_crg(b"\x00" * 4, 2),
                lambda: parse_com(b"\x00"), lambda: parse_qcc(b"\x05\x00", 2)):  # fmt: skip
        with pytest.raises(CodestreamError):
            bad()


def test_poc_parsed() -> None:
    """POC entries are decoded with 1-byte (Csiz < 257) and 2-byte component fields."""
    poc = parse_poc(bytes([0, 0]) + struct.pack(">H", 3) + bytes([6, 3, 2]), 3)
    change = poc.changes[0]
    assert (change.resolution_start, change.component_start, change.layer_end) == (0, 0, 3)
    assert (change.resolution_end, change.component_end, change.progression) == (6, 3, Progression.RPCL)
    wide = parse_poc(bytes([1]) + struct.pack(">HHBHB", 2, 4, 5, 300, 1) * 1, 400)
    assert wide.changes[0].component_start == 2 and wide.changes[0].component_end == 300
    with pytest.raises(CodestreamError):
        parse_poc(b"\x00" * 6, 3)
    with pytest.raises(CodestreamError):
        parse_poc(bytes([0, 0, 0, 1, 1, 1, 9]), 3)


@pytest.mark.parametrize(
    ("stlm", "entry", "expected"),
    [
        (0x00, struct.pack(">H", 1000), (None, 1000)),
        (0x10, struct.pack(">BH", 7, 1000), (7, 1000)),
        (0x20, struct.pack(">HH", 700, 9), (700, 9)),
        (0x50, struct.pack(">BI", 3, 1 << 20), (3, 1 << 20)),
        (0x60, struct.pack(">HI", 3, 70000), (3, 70000)),
    ],
)
def test_tlm_variants(stlm: int, entry: bytes, expected: tuple[int | None, int]) -> None:
    """TLM's Stlm selects 0/1/2-byte tile indices and 2/4-byte tile-part lengths."""
    tlm = parse_tlm(bytes([4, stlm]) + entry * 2)
    assert tlm.index == 4 and tlm.entries == (expected, expected)


def test_tlm_malformed() -> None:
    """A TLM whose size is not a multiple of its entry size, or with ST = 3, is refused."""
    with pytest.raises(CodestreamError):
        parse_tlm(bytes([0, 0x10, 1, 2]))
    with pytest.raises(CodestreamError):
        parse_tlm(bytes([0, 0x30, 1, 2, 3, 4, 5]))


def test_plm_sot_plt() -> None:
    """PLM keeps Zplm and raw data; SOT decodes Isot/Psot/TPsot/TNsot; PLT keeps Zplt and raw Iplt."""
    plm = parse_plm(b"\x02\x03\x01\x02\x03")
    assert (plm.index, plm.data) == (2, b"\x03\x01\x02\x03")
    sot = parse_sot(struct.pack(">HIBB", 5, 1234, 1, 3))
    assert (sot.tile, sot.length, sot.part, sot.parts) == (5, 1234, 1, 3)
    assert parse_plt(b"\x07\x81\x00") == PLT(7, b"\x81\x00")
    with pytest.raises(CodestreamError):
        parse_sot(b"\x00" * 7)


# --- PLT packet lengths ----------------------------------------------------------


def test_plt_lengths_single_and_multi_byte() -> None:
    """Iplt is base 128 with the high bit marking continuation."""
    lengths = decode_packet_lengths([PLT(0, bytes([0x05, 0x81, 0x00, 0x82, 0x80, 0x01, 0x7F]))])
    assert lengths.tolist() == [5, 128, 2 * 16384 + 1, 127]


def test_plt_length_continues_across_segments() -> None:
    """A packet length begun in one PLT segment is finished in the next one of the tile-part."""
    segments = [PLT(0, bytes([0x03, 0x81])), PLT(1, bytes([0x82])), PLT(2, bytes([0x03, 0x01]))]
    assert decode_packet_lengths(segments).tolist() == [3, (1 << 14) + (2 << 7) + 3, 1]


@pytest.mark.parametrize(
    "data",
    [bytes([0x05, 0x81]), bytes([0x81] * 5 + [0x01]), bytes([0x05, 0x00]), bytes([0x80, 0x00])],
)
def test_plt_malformed_lengths(data: bytes) -> None:
    """Unfinished, longer than 5 bytes, or zero packet lengths are refused."""
    with pytest.raises(CodestreamError):
        decode_packet_lengths([PLT(0, data)])


@given(
    st.lists(st.integers(1, (1 << 32) - 1), max_size=60),
    st.lists(st.integers(0, 400), max_size=6),
)
@settings(max_examples=200, deadline=None)
def test_plt_roundtrip_with_arbitrary_splits(lengths: list[int], cuts: list[int]) -> None:
    """Encoding lengths and splitting the bytes into PLT segments anywhere decodes to the same lengths."""
    data = plt_segments(lengths, cuts)
    segments = []
    pos = 0
    while pos < len(data):
        (size,) = struct.unpack_from(">H", data, pos + 2)
        segments.append(parse_plt(data[pos + 4 : pos + 2 + size]))
        pos += 2 + size
    assert decode_packet_lengths(segments).tolist() == lengths


# --- main header and tile-parts ------------------------------------------------


def test_main_header_skips_unknown_markers() -> None:
    """Reserved 0xFF30..0xFF3F markers (no length) and unknown segments with a length are skipped."""
    main = (siz_segment(16, 16) + b"\xff\x30" + cod_segment(levels=0) + segment(0xFF70, b"abc")
            + segment(Marker.CAP, b"\x00\x02\x00\x00\x00\x00") + qcd_segment(0)
            + segment(Marker.COM, b"\x00\x01hi"))  # fmt: skip
    data = make_codestream(main, [tile_part(0, plt_segments([2]), b"\x00\x00")])
    header = parse_main_header(data)
    assert [s.marker for s in header.segments] == [
        Marker.SOC, Marker.SIZ, 0xFF30, Marker.COD, 0xFF70, Marker.CAP, Marker.QCD, Marker.COM,
    ]  # fmt: skip
    assert header.segments[2].length == 2 and header.segments[4].length == 7
    assert header.end == 2 + len(main) and header.com[0].data == b"hi"


BASIC = siz_segment(16, 16) + cod_segment() + qcd_segment()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\x51", "SOC"),
        (b"\xff\x4f" + cod_segment(), "SIZ must follow"),
        (make_codestream(siz_segment(16, 16) + qcd_segment(), [tile_part(0, b"", b"")]), "no COD"),
        (make_codestream(siz_segment(16, 16) + cod_segment(), [tile_part(0, b"", b"")]), "no QCD"),
        (make_codestream(BASIC + cod_segment(), []), "second COD"),
        (make_codestream(BASIC + segment(Marker.PPM, b"\x00\x00"), []), "PPM"),
        (make_codestream(BASIC + b"\xff\x10", []), "invalid marker"),
        (make_codestream(BASIC + b"\x00\x00", []), "expected a marker"),
        (make_codestream(BASIC + b"\xff\x64\x00\x40", []), "runs past"),
        (make_codestream(BASIC + b"\xff\x64\x00\x01", []), "length 1"),
        (make_codestream(BASIC, [], eoc=True), "unexpected EOC"),
    ],
)
def test_main_header_malformed(data: bytes, message: str) -> None:
    """Malformed main headers raise CodestreamError saying what is wrong."""
    with pytest.raises(CodestreamError, match=message):
        parse_codestream(data)


def _main(tiles: int = 1) -> bytes:
    return siz_segment(16 * tiles, 16, xtsiz=16, ytsiz=16) + cod_segment(levels=0) + qcd_segment(0)


def test_tile_parts_are_located() -> None:
    """SOT/Psot, header segments and SOD give the header and body ranges of each tile-part."""
    header = plt_segments([1, 2]) + segment(Marker.COM, b"\x00\x00x")
    tp0 = tile_part(1, header, b"abc", 0, 2)
    tp1 = tile_part(0, plt_segments([4]), b"defg")
    tp2 = tile_part(1, b"", b"", 1, 2)
    data = make_codestream(_main(2), [tp0, tp1, tp2])
    stream = parse_codestream(data)
    first = stream.tile_parts[0]
    start = 2 + len(_main(2))
    assert (first.offset, first.length) == (start, len(tp0))
    assert (first.header_offset, first.header_length) == (start + 12, len(header))
    assert data[first.body_offset : first.body_offset + first.body_length] == b"abc"
    assert [s.marker for s in first.segments] == [Marker.PLT, Marker.COM]
    assert [(p.sot.tile, p.sot.part) for p in stream.tile_parts] == [(1, 0), (0, 0), (1, 1)]
    assert stream.eoc == len(data) - 2


def test_psot_zero_runs_to_eoc() -> None:
    """Psot 0 on the last tile-part means the tile-part runs up to the final EOC."""
    data = make_codestream(_main(), [tile_part(0, plt_segments([3]), b"xyz", psot=0)])
    (part,) = parse_codestream(data).tile_parts
    assert part.sot.length == 0 and part.body_length == 3 and part.end == len(data) - 2


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([tile_part(0, b"", b"abc", psot=1000)], "past the end"),
        ([tile_part(0, b"", b"", psot=13)], "too short"),
        ([tile_part(3, b"", b"")], "names tile 3"),
        ([tile_part(0, b"", b"", 1, 2)], "expected part 0"),
        ([tile_part(0, b"", b"", 0, 2), tile_part(0, cod_segment(levels=0), b"", 1, 2)], "only allowed in"),
        ([tile_part(0, b"", b"", 0, 2)], "TNsot says 2"),
        ([tile_part(0, b"", b"", 0, 2), tile_part(0, b"", b"", 1, 3)], "TNsot changes"),
        ([tile_part(0, segment(Marker.PPT, b"\x00\x00"), b"")], "PPT"),
        ([tile_part(0, segment(Marker.TLM, b"\x00\x00"), b"")], "unexpected TLM"),
        ([tile_part(0, b"\xff\x64\x00\x08\x00\x00", b"")], "runs past"),
    ],
)
def test_tile_parts_malformed(parts: list[bytes], message: str) -> None:
    """Broken tile-part structure raises CodestreamError saying what is wrong."""
    with pytest.raises(CodestreamError, match=message):
        parse_codestream(make_codestream(_main(), parts))


def test_codestream_end_checks() -> None:
    """A missing EOC, data after EOC and a tile without tile-parts are refused."""
    good = [tile_part(0, b"", b"")]
    with pytest.raises(CodestreamError, match="no EOC"):
        parse_codestream(make_codestream(_main(), good, eoc=False))
    with pytest.raises(CodestreamError, match="after EOC"):
        parse_codestream(make_codestream(_main(), good) + b"\x00")
    with pytest.raises(CodestreamError, match="tile 1 has no tile-part"):
        parse_codestream(make_codestream(_main(2), good))


def test_parse_tile_part_directly() -> None:
    """parse_tile_part reads one tile-part at a given offset and keeps its PLT and COD segments."""
    header = cod_segment(progression=1, layers=2, levels=0) + plt_segments([1, 1])
    data = make_codestream(_main(), [tile_part(0, header, b"\x00\x00")])
    siz = parse_main_header(data).siz
    part = parse_tile_part(data, 2 + len(_main()), siz)
    assert part.cod is not None and part.cod.layers == 2 and len(part.plt) == 1
    assert isinstance(siz, SIZ)
