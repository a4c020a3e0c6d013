"""Marker segments of a raw JPEG 2000 codestream (ISO/IEC 15444-1 Annex A).

Sans-IO: every function takes the whole codestream as bytes (or a memoryview
of it) and returns frozen values; nothing here reads files or touches the
network. Only the main header and the tile-part headers are parsed: tile-part
bodies (the packets) are located by SOT's Psot and never looked into.

Every malformed, truncated, hostile or unsupported input raises
:class:`~imageshare.codestream.errors.CodestreamError`; counts that would size
an allocation (components, tiles, levels) are checked before anything is
allocated.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs
import numpy as np
import numpy.typing as npt

from imageshare.codestream.errors import CodestreamError

__all__ = [
    "Marker",
    "Progression",
    "MAX_COMPONENTS",
    "MAX_TILES",
    "MAX_LEVELS",
    "MAX_PRECISION",
    "SOT_SEGMENT_LENGTH",
    "Segment",
    "ImageComponent",
    "SIZ",
    "CodingStyle",
    "COD",
    "COC",
    "QCD",
    "QCC",
    "RGN",
    "ProgressionChange",
    "POC",
    "TLM",
    "PLM",
    "CRG",
    "COM",
    "SOT",
    "PLT",
    "MainHeader",
    "TilePartHeader",
    "Codestream",
    "parse_siz",
    "parse_cod",
    "parse_coc",
    "parse_qcd",
    "parse_qcc",
    "parse_rgn",
    "parse_poc",
    "parse_tlm",
    "parse_plm",
    "parse_crg",
    "parse_com",
    "parse_sot",
    "parse_plt",
    "parse_main_header",
    "parse_tile_part",
    "parse_codestream",
    "decode_packet_lengths",
]

Buffer = bytes | bytearray | memoryview

#: Csiz is 16 bits but Part 1 caps it at 16384.
MAX_COMPONENTS = 16384
#: Isot is 16 bits, so tiles are numbered 0..65534; we allow one more as a round cap.
MAX_TILES = 65535
#: Decomposition levels (NL) allowed by Part 1.
MAX_LEVELS = 32
#: Sample precision allowed by Part 1 (Ssiz & 0x7F is precision - 1).
MAX_PRECISION = 38
#: SOT marker (2) + Lsot (2) + Isot (2) + Psot (4) + TPsot (1) + TNsot (1).
SOT_SEGMENT_LENGTH = 12
#: A PLT packet length is at most 32 bits (it cannot exceed Psot): 5 bytes of 7 bits.
_MAX_PLT_LENGTH_BYTES = 5


class Marker(enum.IntEnum):
    """The marker codes of ISO/IEC 15444-1 Table A.2 (and CAP of Part 15)."""

    SOC = 0xFF4F
    CAP = 0xFF50
    SIZ = 0xFF51
    COD = 0xFF52
    COC = 0xFF53
    TLM = 0xFF55
    PLM = 0xFF57
    PLT = 0xFF58
    QCD = 0xFF5C
    QCC = 0xFF5D
    RGN = 0xFF5E
    POC = 0xFF5F
    PPM = 0xFF60
    PPT = 0xFF61
    CRG = 0xFF63
    COM = 0xFF64
    SOT = 0xFF90
    SOP = 0xFF91
    EPH = 0xFF92
    SOD = 0xFF93
    EOC = 0xFFD9


class Progression(enum.IntEnum):
    """Progression orders (SGcod), ISO/IEC 15444-1 Table A.16."""

    LRCP = 0
    RLCP = 1
    RPCL = 2
    PCRL = 3
    CPRL = 4


_KNOWN = frozenset(int(m) for m in Marker)
# Markers that are a bare two-byte code; everything else from 0xFF40 up carries Lxxx.
_NO_LENGTH = frozenset({Marker.SOC, Marker.SOD, Marker.EOC, Marker.EPH})
# Only the first tile-part of a tile may change coding parameters (Table A.3).
_FIRST_PART_ONLY = frozenset({Marker.COD, Marker.COC, Marker.QCD, Marker.QCC, Marker.RGN})


def _name(marker: int) -> str:
    try:
        return Marker(marker).name
    except ValueError:
        return f"marker 0x{marker:04X}"


def _as_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _u16(view: memoryview, pos: int) -> int:
    return (view[pos] << 8) | view[pos + 1]


def _u32(view: memoryview, pos: int) -> int:
    return int.from_bytes(view[pos : pos + 4], "big")


def _comp_bytes(csiz: int) -> int:
    # Component indices in COC/QCC/RGN/POC are 8 bits when Csiz < 257, else 16.
    return 1 if csiz < 257 else 2


def _read_comp(view: memoryview, pos: int, csiz: int) -> int:
    return view[pos] if csiz < 257 else _u16(view, pos)


def _read_marker(view: memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """Read the marker at ``pos``; return ``(code, payload_start, segment_end)``.

    ``end`` bounds the segment (the end of the data or of the tile-part); for a
    marker without a length the payload is empty.
    """
    if pos + 2 > end:
        raise CodestreamError(f"truncated codestream: expected a marker at offset {pos}")
    if view[pos] != 0xFF:
        raise CodestreamError(f"expected a marker at offset {pos}, found byte 0x{view[pos]:02X}")
    code = 0xFF00 | view[pos + 1]
    if code in _NO_LENGTH or 0xFF30 <= code <= 0xFF3F:
        return code, pos + 2, pos + 2
    if code < 0xFF30:
        raise CodestreamError(f"invalid marker 0x{code:04X} at offset {pos}")
    if pos + 4 > end:
        raise CodestreamError(f"truncated {_name(code)} segment at offset {pos}")
    length = _u16(view, pos + 2)
    if length < 2:
        raise CodestreamError(f"{_name(code)} segment at offset {pos} has length {length} < 2")
    if pos + 2 + length > end:
        raise CodestreamError(
            f"{_name(code)} segment at offset {pos} (length {length}) runs past offset {end}"
        )
    return code, pos + 4, pos + 2 + length


def _need(payload: memoryview, size: int, what: str, offset: int, exact: bool = True) -> None:
    n = len(payload)
    if n < size or (exact and n != size):
        raise CodestreamError(
            f"{what} segment at offset {offset}: {n} parameter bytes, expected "
            f"{'' if exact else 'at least '}{size}"
        )


@attrs.frozen
class Segment:
    """Where one marker (segment) sits in the codestream.

    Parameters
    ----------
    marker : int
        The marker code, e.g. ``0xFF52`` (compare with :class:`Marker`).
    offset : int
        File offset of the marker's first byte (``0xFF``).
    length : int
        Total bytes: 2 for a marker without parameters, else ``2 + Lxxx``.
    """

    marker: int
    offset: int
    length: int


@attrs.frozen
class ImageComponent:
    """One component as declared by SIZ (Ssiz, XRsiz, YRsiz).

    Parameters
    ----------
    precision : int
        Bit depth, 1..38.
    signed : bool
        Whether samples are two's-complement signed.
    xrsiz, yrsiz : int
        Horizontal/vertical separation on the reference grid (subsampling), 1..255.
    """

    precision: int
    signed: bool
    xrsiz: int
    yrsiz: int

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.precision <= MAX_PRECISION:
            raise CodestreamError(f"component precision {self.precision} outside 1..{MAX_PRECISION}")
        if not (1 <= self.xrsiz <= 255 and 1 <= self.yrsiz <= 255):
            raise CodestreamError(f"component subsampling {self.xrsiz}x{self.yrsiz} outside 1..255")


@attrs.frozen
class SIZ:
    """Image and tile size (SIZ), ISO/IEC 15444-1 A.5.1.

    All coordinates are on the reference grid. The constructor enforces the
    Part 1 constraints and our caps (at most :data:`MAX_COMPONENTS` components
    and :data:`MAX_TILES` tiles).

    Parameters
    ----------
    rsiz : int
        Capabilities (profile) word, kept as is.
    xsiz, ysiz : int
        Right/bottom edge of the image area (exclusive).
    xosiz, yosiz : int
        Left/top edge of the image area.
    xtsiz, ytsiz : int
        Nominal tile width and height.
    xtosiz, ytosiz : int
        Origin of the tile grid.
    components : tuple of ImageComponent
        One entry per component, in codestream order.
    """

    rsiz: int
    xsiz: int
    ysiz: int
    xosiz: int
    yosiz: int
    xtsiz: int
    ytsiz: int
    xtosiz: int
    ytosiz: int
    components: tuple[ImageComponent, ...]

    def __attrs_post_init__(self) -> None:
        for name in ("rsiz", "xsiz", "ysiz", "xosiz", "yosiz", "xtsiz", "ytsiz", "xtosiz", "ytosiz"):
            value = getattr(self, name)
            if not 0 <= value < 1 << 32:
                raise CodestreamError(f"SIZ {name} {value} outside 0..2^32-1")
        if not 1 <= len(self.components) <= MAX_COMPONENTS:
            raise CodestreamError(f"SIZ has {len(self.components)} components, expected 1..{MAX_COMPONENTS}")
        if self.xsiz <= self.xosiz or self.ysiz <= self.yosiz:
            raise CodestreamError(
                f"empty image: Xsiz {self.xsiz} <= XOsiz {self.xosiz} "
                f"or Ysiz {self.ysiz} <= YOsiz {self.yosiz}"
            )
        if self.xtsiz == 0 or self.ytsiz == 0:
            raise CodestreamError(f"zero tile size {self.xtsiz}x{self.ytsiz}")
        if self.xtosiz > self.xosiz or self.ytosiz > self.yosiz:
            raise CodestreamError("tile grid origin lies right of or below the image origin")
        if self.xtosiz + self.xtsiz <= self.xosiz or self.ytosiz + self.ytsiz <= self.yosiz:
            raise CodestreamError("the first tile does not overlap the image")
        if self.num_tiles > MAX_TILES:
            raise CodestreamError(f"{self.num_tiles} tiles, at most {MAX_TILES} are supported")

    @property
    def width(self) -> int:
        """Image width in reference grid samples (Xsiz - XOsiz)."""
        return self.xsiz - self.xosiz

    @property
    def height(self) -> int:
        """Image height in reference grid samples (Ysiz - YOsiz)."""
        return self.ysiz - self.yosiz

    @property
    def tiles_across(self) -> int:
        """Number of tile columns, ceil((Xsiz - XTOsiz) / XTsiz)."""
        return -(-(self.xsiz - self.xtosiz) // self.xtsiz)

    @property
    def tiles_down(self) -> int:
        """Number of tile rows, ceil((Ysiz - YTOsiz) / YTsiz)."""
        return -(-(self.ysiz - self.ytosiz) // self.ytsiz)

    @property
    def num_tiles(self) -> int:
        """Number of tiles."""
        return self.tiles_across * self.tiles_down

    def tile_bounds(self, tile: int) -> tuple[int, int, int, int]:
        """Reference grid bounds ``(tx0, ty0, tx1, ty1)`` of a tile (B.3, equation B-7).

        Parameters
        ----------
        tile : int
            Tile index in raster order.

        Returns
        -------
        tuple of int
            Left, top (inclusive), right, bottom (exclusive), clipped to the image.
        """
        if not 0 <= tile < self.num_tiles:
            raise KeyError(f"no tile {tile}")
        p, q = tile % self.tiles_across, tile // self.tiles_across
        tx0 = self.xtosiz + p * self.xtsiz
        ty0 = self.ytosiz + q * self.ytsiz
        return (
            max(tx0, self.xosiz),
            max(ty0, self.yosiz),
            min(tx0 + self.xtsiz, self.xsiz),
            min(ty0 + self.ytsiz, self.ysiz),
        )


@attrs.frozen
class CodingStyle:
    """Per-component coding style (SPcod / SPcoc), ISO/IEC 15444-1 Table A.15.

    Parameters
    ----------
    levels : int
        Number of decomposition levels NL (0..32); there are NL + 1 resolutions.
    xcb, ycb : int
        Code-block width/height exponents (2..10, ``xcb + ycb <= 12``).
    cblk_style : int
        Code-block style flags (bypass, reset, termall, ...), kept as is.
    transform : int
        Wavelet: 0 = 9/7 irreversible, 1 = 5/3 reversible.
    precincts : tuple of (int, int)
        ``(PPx, PPy)`` exponents for resolutions 0..NL; ``(15, 15)`` everywhere
        when the segment defines no precincts (maximal precincts).
    """

    levels: int
    xcb: int
    ycb: int
    cblk_style: int
    transform: int
    precincts: tuple[tuple[int, int], ...]

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.levels <= MAX_LEVELS:
            raise CodestreamError(f"{self.levels} decomposition levels, at most {MAX_LEVELS}")
        if not (2 <= self.xcb <= 10 and 2 <= self.ycb <= 10 and self.xcb + self.ycb <= 12):
            raise CodestreamError(f"invalid code-block size 2^{self.xcb} x 2^{self.ycb}")
        if not (0 <= self.cblk_style <= 255 and 0 <= self.transform <= 255):
            raise CodestreamError("code-block style or transform outside 0..255")
        if len(self.precincts) != self.levels + 1:
            raise CodestreamError(f"{len(self.precincts)} precinct sizes for {self.levels + 1} resolutions")
        for r, (ppx, ppy) in enumerate(self.precincts):
            # Table A.21: exponent 0 only at resolution 0 (OpenJPEG's decoder enforces it too).
            low = 0 if r == 0 else 1
            if not (low <= ppx <= 15 and low <= ppy <= 15):
                raise CodestreamError(f"invalid precinct size 2^{ppx} x 2^{ppy} at resolution {r}")

    @property
    def resolutions(self) -> int:
        """Number of resolution levels, NL + 1."""
        return self.levels + 1

    @property
    def reversible(self) -> bool:
        """Whether the reversible 5/3 wavelet is used."""
        return self.transform == 1

    @property
    def code_block_size(self) -> tuple[int, int]:
        """Nominal code-block ``(width, height)`` in samples."""
        return (1 << self.xcb, 1 << self.ycb)


def _parse_spcod(payload: memoryview, precincts: bool, what: str, offset: int) -> CodingStyle:
    _need(payload, 5, what, offset, exact=False)
    levels = payload[0]
    if levels > MAX_LEVELS:
        raise CodestreamError(f"{what} segment at offset {offset}: {levels} decomposition levels")
    if precincts:
        _need(payload, 5 + levels + 1, what, offset)
        sizes = tuple((b & 0x0F, b >> 4) for b in payload[5:])
    else:
        _need(payload, 5, what, offset)
        sizes = ((15, 15),) * (levels + 1)
    return CodingStyle(levels, payload[1] + 2, payload[2] + 2, payload[3], payload[4], sizes)


@attrs.frozen
class COD:
    """Coding style default (COD), ISO/IEC 15444-1 A.6.1.

    Parameters
    ----------
    scod : int
        Raw Scod: bit 0 precincts defined, bit 1 SOP allowed, bit 2 EPH used.
    progression : Progression
        Progression order.
    layers : int
        Number of quality layers, 1..65535.
    mct : int
        Multiple component transform (0 none, 1 RCT/ICT on components 0..2).
    style : CodingStyle
        The default per-component coding style.
    """

    scod: int
    progression: Progression
    layers: int
    mct: int
    style: CodingStyle

    @property
    def precincts_defined(self) -> bool:
        """Scod bit 0: the precinct sizes are given (else maximal, 2^15)."""
        return bool(self.scod & 1)

    @property
    def sop(self) -> bool:
        """Scod bit 1: packets may start with SOP marker segments."""
        return bool(self.scod & 2)

    @property
    def eph(self) -> bool:
        """Scod bit 2: packet headers end with EPH markers."""
        return bool(self.scod & 4)


def parse_cod(payload: Buffer, offset: int = 0) -> COD:
    """Parse the parameters of a COD segment (the bytes after Lcod).

    Parameters
    ----------
    payload : bytes-like
        Scod, SGcod and SPcod.
    offset : int
        File offset of the marker, for error messages.

    Returns
    -------
    COD
    """
    view = _as_view(payload)
    _need(view, 10, "COD", offset, exact=False)
    scod = view[0]
    if scod & ~0x07:
        raise CodestreamError(f"COD at offset {offset}: Scod 0x{scod:02X} uses unsupported (Part 2) options")
    if view[1] > max(Progression):
        raise CodestreamError(f"COD at offset {offset}: unknown progression order {view[1]}")
    layers = _u16(view, 2)
    if layers == 0:
        raise CodestreamError(f"COD at offset {offset}: zero quality layers")
    style = _parse_spcod(view[5:], bool(scod & 1), "COD", offset)
    return COD(scod, Progression(view[1]), layers, view[4], style)


@attrs.frozen
class COC:
    """Coding style of one component (COC), ISO/IEC 15444-1 A.6.2.

    Parameters
    ----------
    component : int
        Component index.
    scoc : int
        Raw Scoc: bit 0 precincts defined.
    style : CodingStyle
        Coding style for that component.
    """

    component: int
    scoc: int
    style: CodingStyle


def parse_coc(payload: Buffer, csiz: int, offset: int = 0) -> COC:
    """Parse the parameters of a COC segment.

    Parameters
    ----------
    payload : bytes-like
        Ccoc, Scoc and SPcoc.
    csiz : int
        Number of components (sizes Ccoc and bounds it).
    offset : int
        File offset of the marker, for error messages.
    """
    view = _as_view(payload)
    nc = _comp_bytes(csiz)
    _need(view, nc + 6, "COC", offset, exact=False)
    component = _read_comp(view, 0, csiz)
    if component >= csiz:
        raise CodestreamError(f"COC at offset {offset} names component {component} of {csiz}")
    scoc = view[nc]
    if scoc & ~0x01:
        raise CodestreamError(f"COC at offset {offset}: Scoc 0x{scoc:02X} uses unsupported options")
    return COC(component, scoc, _parse_spcod(view[nc + 1 :], bool(scoc & 1), "COC", offset))


@attrs.frozen
class QCD:
    """Quantization default (QCD): Sqcd and SPqcd kept raw (not needed for the index)."""

    raw: bytes


@attrs.frozen
class QCC:
    """Quantization of one component (QCC): Sqcc and SPqcc kept raw."""

    component: int
    raw: bytes


def parse_qcd(payload: Buffer, offset: int = 0) -> QCD:
    """Parse a QCD segment's parameters (kept raw)."""
    view = _as_view(payload)
    _need(view, 1, "QCD", offset, exact=False)
    return QCD(bytes(view))


def parse_qcc(payload: Buffer, csiz: int, offset: int = 0) -> QCC:
    """Parse a QCC segment's parameters (component index, rest kept raw)."""
    view = _as_view(payload)
    nc = _comp_bytes(csiz)
    _need(view, nc + 1, "QCC", offset, exact=False)
    component = _read_comp(view, 0, csiz)
    if component >= csiz:
        raise CodestreamError(f"QCC at offset {offset} names component {component} of {csiz}")
    return QCC(component, bytes(view[nc:]))


@attrs.frozen
class RGN:
    """Region of interest (RGN): component, style (0 = implicit/max-shift) and shift."""

    component: int
    style: int
    shift: int


def parse_rgn(payload: Buffer, csiz: int, offset: int = 0) -> RGN:
    """Parse an RGN segment's parameters."""
    view = _as_view(payload)
    nc = _comp_bytes(csiz)
    _need(view, nc + 2, "RGN", offset)
    component = _read_comp(view, 0, csiz)
    if component >= csiz:
        raise CodestreamError(f"RGN at offset {offset} names component {component} of {csiz}")
    return RGN(component, view[nc], view[nc + 1])


@attrs.frozen
class ProgressionChange:
    """One progression change of a POC segment (values as coded).

    Parameters
    ----------
    resolution_start, component_start : int
        RSpoc, CSpoc (inclusive).
    layer_end, resolution_end, component_end : int
        LYEpoc, REpoc, CEpoc (exclusive; CEpoc 0 means 256 or 16384 per A.6.6).
    progression : Progression
        Ppoc.
    """

    resolution_start: int
    component_start: int
    layer_end: int
    resolution_end: int
    component_end: int
    progression: Progression


@attrs.frozen
class POC:
    """Progression order change (POC); parsed, but the index refuses it."""

    changes: tuple[ProgressionChange, ...]


def parse_poc(payload: Buffer, csiz: int, offset: int = 0) -> POC:
    """Parse a POC segment's parameters."""
    view = _as_view(payload)
    nc = _comp_bytes(csiz)
    size = 5 + 2 * nc
    if len(view) == 0 or len(view) % size:
        raise CodestreamError(f"POC at offset {offset}: {len(view)} bytes is not a multiple of {size}")
    changes = []
    for pos in range(0, len(view), size):
        order = view[pos + 4 + 2 * nc]
        if order > max(Progression):
            raise CodestreamError(f"POC at offset {offset}: unknown progression order {order}")
        changes.append(
            ProgressionChange(
                view[pos],
                _read_comp(view, pos + 1, csiz),
                _u16(view, pos + 1 + nc),
                view[pos + 3 + nc],
                _read_comp(view, pos + 4 + nc, csiz),
                Progression(order),
            )
        )
    return POC(tuple(changes))


@attrs.frozen
class TLM:
    """Tile-part lengths (TLM), ISO/IEC 15444-1 A.7.1.

    Parameters
    ----------
    index : int
        Ztlm.
    entries : tuple of (int or None, int)
        ``(Ttlm, Ptlm)`` per tile-part; Ttlm is None when implied (ST = 0).
    """

    index: int
    entries: tuple[tuple[int | None, int], ...]


def parse_tlm(payload: Buffer, offset: int = 0) -> TLM:
    """Parse a TLM segment's parameters."""
    view = _as_view(payload)
    _need(view, 2, "TLM", offset, exact=False)
    stlm = view[1]
    st, sp = (stlm >> 4) & 0x03, (stlm >> 6) & 0x01
    if st == 3:
        raise CodestreamError(f"TLM at offset {offset}: invalid Stlm 0x{stlm:02X}")
    psize = 4 if sp else 2
    size = st + psize
    body = view[2:]
    if len(body) % size:
        raise CodestreamError(f"TLM at offset {offset}: {len(body)} bytes is not a multiple of {size}")
    entries: list[tuple[int | None, int]] = []
    for pos in range(0, len(body), size):
        tile = None if st == 0 else int.from_bytes(body[pos : pos + st], "big")
        entries.append((tile, int.from_bytes(body[pos + st : pos + size], "big")))
    return TLM(view[0], tuple(entries))


@attrs.frozen
class PLM:
    """Packet lengths in the main header (PLM): Zplm and the raw Nplm/Iplm bytes.

    The index does not use PLM (it needs PLT); kept so that nothing is lost.
    """

    index: int
    data: bytes


def parse_plm(payload: Buffer, offset: int = 0) -> PLM:
    """Parse a PLM segment's parameters (kept raw after Zplm)."""
    view = _as_view(payload)
    _need(view, 1, "PLM", offset, exact=False)
    return PLM(view[0], bytes(view[1:]))


@attrs.frozen
class CRG:
    """Component registration (CRG): ``(Xcrg, Ycrg)`` per component, in 1/65536 sample."""

    offsets: tuple[tuple[int, int], ...]


def parse_crg(payload: Buffer, csiz: int, offset: int = 0) -> CRG:
    """Parse a CRG segment's parameters."""
    view = _as_view(payload)
    _need(view, 4 * csiz, "CRG", offset)
    return CRG(tuple((_u16(view, 4 * i), _u16(view, 4 * i + 2)) for i in range(csiz)))


@attrs.frozen
class COM:
    """Comment (COM): Rcom (0 binary, 1 Latin-1 text) and the data."""

    registration: int
    data: bytes


def parse_com(payload: Buffer, offset: int = 0) -> COM:
    """Parse a COM segment's parameters."""
    view = _as_view(payload)
    _need(view, 2, "COM", offset, exact=False)
    return COM(_u16(view, 0), bytes(view[2:]))


@attrs.frozen
class SOT:
    """Start of tile-part (SOT), ISO/IEC 15444-1 A.4.2.

    Parameters
    ----------
    tile : int
        Isot, the tile index.
    length : int
        Psot, bytes from the SOT marker to the end of the tile-part (0: up to EOC).
    part : int
        TPsot, the tile-part index within the tile.
    parts : int
        TNsot, the number of tile-parts of the tile (0: not given).
    """

    tile: int
    length: int
    part: int
    parts: int


def parse_sot(payload: Buffer, offset: int = 0) -> SOT:
    """Parse a SOT segment's parameters."""
    view = _as_view(payload)
    _need(view, 8, "SOT", offset)
    return SOT(_u16(view, 0), _u32(view, 2), view[6], view[7])


@attrs.frozen
class PLT:
    """Packet lengths of a tile-part (PLT): Zplt and the raw Iplt bytes.

    Decode with :func:`decode_packet_lengths`; a length may continue from one
    PLT segment into the next one of the same tile-part.
    """

    index: int
    data: bytes


def parse_plt(payload: Buffer, offset: int = 0) -> PLT:
    """Parse a PLT segment's parameters (Iplt kept raw)."""
    view = _as_view(payload)
    _need(view, 1, "PLT", offset, exact=False)
    return PLT(view[0], bytes(view[1:]))


def parse_siz(payload: Buffer, offset: int = 0) -> SIZ:
    """Parse the parameters of a SIZ segment.

    Parameters
    ----------
    payload : bytes-like
        Everything after Lsiz.
    offset : int
        File offset of the marker, for error messages.

    Returns
    -------
    SIZ
        Validated (see :class:`SIZ`).
    """
    view = _as_view(payload)
    _need(view, 36, "SIZ", offset, exact=False)
    csiz = _u16(view, 34)
    if not 1 <= csiz <= MAX_COMPONENTS:
        raise CodestreamError(f"SIZ at offset {offset}: {csiz} components, expected 1..{MAX_COMPONENTS}")
    _need(view, 36 + 3 * csiz, "SIZ", offset)
    # Components are usually identical: share one value per distinct triple.
    cache: dict[bytes, ImageComponent] = {}
    components = []
    for pos in range(36, 36 + 3 * csiz, 3):
        key = bytes(view[pos : pos + 3])
        comp = cache.get(key)
        if comp is None:
            ssiz = key[0]
            comp = cache[key] = ImageComponent((ssiz & 0x7F) + 1, bool(ssiz & 0x80), key[1], key[2])
        components.append(comp)
    xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz = (_u32(view, 2 + 4 * i) for i in range(8))
    return SIZ(_u16(view, 0), xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, tuple(components))


@attrs.frozen
class MainHeader:
    """The parsed main header.

    Parameters
    ----------
    siz : SIZ
    cod : COD
    coc : tuple of COC
        At most one per component.
    qcd : QCD
    qcc : tuple of QCC
    rgn : tuple of RGN
    poc : tuple of POC
    tlm : tuple of TLM
    plm : tuple of PLM
    crg : CRG or None
    com : tuple of COM
    segments : tuple of Segment
        Every marker segment from SOC on, in codestream order (unknown ones too).
    end : int
        Offset of the first SOT: the main header is ``data[0:end]``.
    """

    siz: SIZ
    cod: COD
    coc: tuple[COC, ...]
    qcd: QCD
    qcc: tuple[QCC, ...]
    rgn: tuple[RGN, ...]
    poc: tuple[POC, ...]
    tlm: tuple[TLM, ...]
    plm: tuple[PLM, ...]
    crg: CRG | None
    com: tuple[COM, ...]
    segments: tuple[Segment, ...]
    end: int


def _once(seen: set[tuple[int, int]], marker: int, component: int, offset: int, where: str) -> None:
    if (marker, component) in seen:
        what = _name(marker) + ("" if component < 0 else f" for component {component}")
        raise CodestreamError(f"second {what} in the {where} at offset {offset}")
    seen.add((marker, component))


@attrs.define
class _Found:
    """The marker segments of one header, as the shared reader collects them."""

    cod: COD | None = None
    qcd: QCD | None = None
    crg: CRG | None = None
    coc: list[COC] = attrs.Factory(list)
    qcc: list[QCC] = attrs.Factory(list)
    rgn: list[RGN] = attrs.Factory(list)
    poc: list[POC] = attrs.Factory(list)
    tlm: list[TLM] = attrs.Factory(list)
    plm: list[PLM] = attrs.Factory(list)
    plt: list[PLT] = attrs.Factory(list)
    com: list[COM] = attrs.Factory(list)
    segments: list[Segment] = attrs.Factory(list)


def _read_header(
    view: memoryview,
    pos: int,
    end: int,
    csiz: int,
    *,
    main: bool,
    first_part: bool = True,
    found: _Found | None = None,
) -> tuple[_Found, int]:
    """
    Read the marker segments of the main header (up to SOT) or of a tile-part header (up
    to SOD); return them and the offset of the SOT or SOD marker that ends the header.

    Both headers share COD, COC, QCD, QCC, RGN, POC and COM (each coding segment at most
    once per component); TLM, PLM and CRG belong to the main header, PLT to tile-parts.
    Packed headers (PPM, PPT) are refused, other known markers out of place too; unknown
    segments (and CAP in the main header) are skipped by their length.
    """
    f = found if found is not None else _Found()
    where = "main header" if main else "tile-part header"
    stop = Marker.SOT if main else Marker.SOD
    seen: set[tuple[int, int]] = set()
    while True:
        marker, start, seg_end = _read_marker(view, pos, end)
        if marker == stop:
            return f, pos
        if not main and not first_part and marker in _FIRST_PART_ONLY:
            raise CodestreamError(f"{_name(marker)} at offset {pos} in a later tile-part (only allowed in the first)")
        payload = view[start:seg_end]
        if marker == Marker.COD:
            _once(seen, marker, -1, pos, where)
            f.cod = parse_cod(payload, pos)
        elif marker == Marker.COC:
            c = parse_coc(payload, csiz, pos)
            _once(seen, marker, c.component, pos, where)
            f.coc.append(c)
        elif marker == Marker.QCD:
            _once(seen, marker, -1, pos, where)
            f.qcd = parse_qcd(payload, pos)
        elif marker == Marker.QCC:
            q = parse_qcc(payload, csiz, pos)
            _once(seen, marker, q.component, pos, where)
            f.qcc.append(q)
        elif marker == Marker.RGN:
            g = parse_rgn(payload, csiz, pos)
            _once(seen, marker, g.component, pos, where)
            f.rgn.append(g)
        elif marker == Marker.POC:
            f.poc.append(parse_poc(payload, csiz, pos))
        elif marker == Marker.COM:
            f.com.append(parse_com(payload, pos))
        elif main and marker == Marker.TLM:
            f.tlm.append(parse_tlm(payload, pos))
        elif main and marker == Marker.PLM:
            f.plm.append(parse_plm(payload, pos))
        elif main and marker == Marker.CRG:
            _once(seen, marker, -1, pos, where)
            f.crg = parse_crg(payload, csiz, pos)
        elif not main and marker == Marker.PLT:
            f.plt.append(parse_plt(payload, pos))
        elif marker in (Marker.PPM, Marker.PPT):
            raise CodestreamError(f"{_name(marker)} at offset {pos}: packed packet headers are not supported")
        elif marker in _KNOWN and not (main and marker == Marker.CAP):
            raise CodestreamError(f"unexpected {_name(marker)} in the {where} at offset {pos}")
        f.segments.append(Segment(marker, pos, seg_end - pos))
        pos = seg_end


def parse_main_header(data: Buffer) -> MainHeader:
    """Parse the main header, from SOC up to the first SOT.

    Parameters
    ----------
    data : bytes-like
        The whole codestream (J2C, starting with SOC; not a JP2 file).

    Returns
    -------
    MainHeader

    Raises
    ------
    CodestreamError
        Not a codestream, truncated, malformed, PPM present, COD/QCD missing.
    """
    view = _as_view(data)
    end = len(view)
    if end < 2 or view[0] != 0xFF or view[1] != 0x4F:
        raise CodestreamError("not a JPEG 2000 codestream: it does not start with SOC (FF4F)")
    marker, start, seg_end = _read_marker(view, 2, end)
    if marker != Marker.SIZ:
        raise CodestreamError(f"SIZ must follow SOC, found {_name(marker)} at offset 2")
    siz = parse_siz(view[start:seg_end], 2)
    csiz = len(siz.components)
    f, pos = _read_header(view, seg_end, end, csiz, main=True, found=_Found(
        segments=[Segment(Marker.SOC, 0, 2), Segment(Marker.SIZ, 2, seg_end - 2)]))
    cod, qcd = f.cod, f.qcd
    if cod is None:
        raise CodestreamError("the main header has no COD segment")
    if qcd is None:
        raise CodestreamError("the main header has no QCD segment")
    return MainHeader(
        siz, cod, tuple(f.coc), qcd, tuple(f.qcc), tuple(f.rgn), tuple(f.poc), tuple(f.tlm), tuple(f.plm),
        f.crg, tuple(f.com), tuple(f.segments), pos,
    )  # fmt: skip


@attrs.frozen
class TilePartHeader:
    """One parsed tile-part: its SOT, header marker segments and where its body is.

    Parameters
    ----------
    sot : SOT
        As coded (Psot may be 0).
    offset : int
        Offset of the SOT marker.
    length : int
        Bytes from SOT to the end of the tile-part (Psot, or up to EOC when Psot is 0).
    header_offset, header_length : int
        The marker segments after the SOT segment and before SOD.
    body_offset, body_length : int
        The packet data after SOD.
    cod : COD or None
    coc, qcc, rgn, poc, plt, com : tuples of the segments found
    qcd : QCD or None
    segments : tuple of Segment
        The header marker segments (SOT and SOD excluded), in order.
    """

    sot: SOT
    offset: int
    length: int
    header_offset: int
    header_length: int
    body_offset: int
    body_length: int
    cod: COD | None
    coc: tuple[COC, ...]
    qcd: QCD | None
    qcc: tuple[QCC, ...]
    rgn: tuple[RGN, ...]
    poc: tuple[POC, ...]
    plt: tuple[PLT, ...]
    com: tuple[COM, ...]
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        """Offset just past the tile-part."""
        return self.offset + self.length


def parse_tile_part(data: Buffer, offset: int, siz: SIZ) -> TilePartHeader:
    """Parse the tile-part starting with the SOT marker at ``offset``.

    Parameters
    ----------
    data : bytes-like
        The whole codestream.
    offset : int
        Offset of the SOT marker.
    siz : SIZ
        The image's SIZ (number of tiles and components).

    Returns
    -------
    TilePartHeader

    Raises
    ------
    CodestreamError
        Bad SOT, Psot past the end, no SOD, PPT, coding segments in a later tile-part.
    """
    view = _as_view(data)
    size = len(view)
    marker, start, seg_end = _read_marker(view, offset, size)
    if marker != Marker.SOT:
        raise CodestreamError(f"expected SOT at offset {offset}, found {_name(marker)}")
    sot = parse_sot(view[start:seg_end], offset)
    if sot.tile >= siz.num_tiles:
        raise CodestreamError(f"SOT at offset {offset} names tile {sot.tile} of {siz.num_tiles}")
    if sot.parts and sot.part >= sot.parts:
        raise CodestreamError(f"SOT at offset {offset}: tile-part {sot.part} of {sot.parts}")
    if sot.length == 0:
        # Psot 0: the tile-part runs up to the EOC that ends the codestream.
        if size < 2 or view[size - 2] != 0xFF or view[size - 1] != 0xD9:
            raise CodestreamError(f"SOT at offset {offset} has Psot 0 but the data does not end with EOC")
        end = size - 2
    else:
        end = offset + sot.length
        if end > size:
            raise CodestreamError(
                f"tile-part at offset {offset} (Psot {sot.length}) runs past the end of the data ({size})"
            )
    if end < seg_end + 2:
        raise CodestreamError(f"tile-part at offset {offset} is too short ({end - offset} bytes)")
    header_offset = seg_end
    f, pos = _read_header(view, header_offset, end, len(siz.components), main=False, first_part=sot.part == 0)
    return TilePartHeader(
        sot, offset, end - offset, header_offset, pos - header_offset, pos + 2, end - pos - 2,
        f.cod, tuple(f.coc), f.qcd, tuple(f.qcc), tuple(f.rgn), tuple(f.poc), tuple(f.plt), tuple(f.com),
        tuple(f.segments),
    )  # fmt: skip


@attrs.frozen
class Codestream:
    """A fully parsed codestream (headers only).

    Parameters
    ----------
    main : MainHeader
    tile_parts : tuple of TilePartHeader
        In codestream order (tiles may be interleaved).
    eoc : int
        Offset of the EOC marker (the last two bytes).
    """

    main: MainHeader
    tile_parts: tuple[TilePartHeader, ...]
    eoc: int


def parse_codestream(data: Buffer) -> Codestream:
    """Parse the main header and every tile-part header, and check the structure.

    Checks: tile-parts numbered 0, 1, ... per tile, consistent TNsot, every tile
    present, EOC right after the last tile-part and nothing after it.

    Parameters
    ----------
    data : bytes-like
        The whole codestream.

    Returns
    -------
    Codestream
    """
    view = _as_view(data)
    main = parse_main_header(view)
    size = len(view)
    parts: list[TilePartHeader] = []
    counts: dict[int, int] = {}
    totals: dict[int, int] = {}
    pos = main.end
    while True:
        if pos + 2 > size:
            raise CodestreamError(f"truncated codestream: no EOC after the tile-part ending at offset {pos}")
        if view[pos] == 0xFF and view[pos + 1] == 0xD9:
            break
        part = parse_tile_part(view, pos, main.siz)
        tile, sot = part.sot.tile, part.sot
        if sot.part != counts.get(tile, 0):
            raise CodestreamError(
                f"tile-part at offset {pos}: tile {tile} part {sot.part}, expected part {counts.get(tile, 0)}"
            )
        if sot.parts:
            if totals.setdefault(tile, sot.parts) != sot.parts:
                raise CodestreamError(f"tile-part at offset {pos}: tile {tile} TNsot changes to {sot.parts}")
        counts[tile] = sot.part + 1
        parts.append(part)
        pos = part.end
    if pos + 2 != size:
        raise CodestreamError(f"{size - pos - 2} bytes after EOC at offset {pos}")
    if len(counts) != main.siz.num_tiles:
        missing = next(t for t in range(main.siz.num_tiles) if t not in counts)
        raise CodestreamError(
            f"tile {missing} has no tile-part ({len(counts)} of {main.siz.num_tiles} tiles present)"
        )
    for tile, total in totals.items():
        if counts[tile] != total:
            raise CodestreamError(f"tile {tile} has {counts[tile]} tile-parts but TNsot says {total}")
    return Codestream(main, tuple(parts), pos)


def decode_packet_lengths(segments: Iterable[PLT]) -> npt.NDArray[np.int64]:
    """Decode the packet lengths of one tile-part's PLT segments.

    Each length is a big-endian base-128 number, 7 bits per byte, the high bit
    set on every byte but the last; a length may continue from one PLT segment
    into the next, so the segments are decoded as one stream, in codestream
    order.

    Parameters
    ----------
    segments : iterable of PLT
        The tile-part's PLT segments in codestream order.

    Returns
    -------
    numpy.ndarray
        The packet lengths (int64), in the order of the packets.

    Raises
    ------
    CodestreamError
        A length longer than 5 bytes, unfinished at the end, or zero.
    """
    raw = np.frombuffer(b"".join(s.data for s in segments), dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    if raw[-1] & 0x80:
        raise CodestreamError("a PLT packet length is unfinished at the end of the tile-part's PLT segments")
    ends = np.flatnonzero(raw < 0x80)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    nbytes = ends - starts + 1
    longest = int(nbytes.max())
    if longest > _MAX_PLT_LENGTH_BYTES:
        raise CodestreamError(f"a PLT packet length spans {longest} bytes (more than 32 bits)")
    digits = (raw & 0x7F).astype(np.int64)
    values = np.zeros(ends.size, dtype=np.int64)
    for k in range(longest):
        more = nbytes > k
        values[more] = (values[more] << 7) | digits[starts[more] + k]
    if not values.all():
        raise CodestreamError("a PLT packet length is zero")
    return values
