"""Packet index of a JPEG 2000 codestream, built once and served from by JPIP.

:func:`build_index` parses a raw codestream (J2C) once and records where
every packet is, so that a JPIP server (ISO/IEC 15444-9) can answer requests
for main header, tile header and precinct data-bins with plain byte ranges of
the codestream file and never parse it again. The index is stored beside the
codestream as JSON (:meth:`CodestreamIndex.to_json`).

Packets are found from the PLT marker segments (their lengths) and the
progression order of each tile (which packet comes next, ISO/IEC 15444-1
B.12); codestreams without PLT, with POC (progression changes) or with packed
packet headers (PPM/PPT) are refused.

Vocabulary: ``t`` tile index (raster order), ``c`` component, ``r`` resolution
level (0 is the lowest, NL the full one), ``p`` precinct index within its
resolution (raster order), ``l`` quality layer. Per tile the packets are kept
in *canonical order* ``(c, r, p, l)``, as two flat little-endian arrays
(offsets as uint64, lengths as uint32): the packet of ``(c, r, p, l)`` is entry
``(precincts before (c, r) in the tile + p) * layers + l``, so no per-packet
Python object exists and a precinct's packets are contiguous.

Sans-IO: bytes in, frozen values out; :class:`CodestreamError` is the only
exception raised for bad input. Lookups with coordinates that do not exist
(``packets``, ``precinct_from_bin_id``, ...) raise :class:`KeyError`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import struct
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from imageshare.codestream.errors import CodestreamError
from imageshare.codestream.markers import (
    SIZ,
    SOT_SEGMENT_LENGTH,
    CodingStyle,
    ImageComponent,
    MainHeader,
    Progression,
    Segment,
    TilePartHeader,
    decode_packet_lengths,
    parse_codestream,
    parse_main_header,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "MAX_TILE_COMPONENTS",
    "MAX_TILE_COMPONENT_RESOLUTIONS",
    "TileCoding",
    "TilePart",
    "Tile",
    "CodestreamIndex",
    "build_index",
    "compute_precinct_grid",
]

#: Value of the ``format`` member of the JSON form.
FORMAT = "imageshare/j2c-index"
#: Version of the JSON form; :meth:`CodestreamIndex.from_json` refuses others.
VERSION = 1
#: Caps on tiles x components and on tiles x components x resolutions, so that a
#: tiny hostile SIZ/COD (65535 tiles, 16384 components, 33 resolutions) cannot
#: make us build billions of precinct grids. Real images are far below.
MAX_TILE_COMPONENTS = 1 << 21
MAX_TILE_COMPONENT_RESOLUTIONS = 1 << 22

_LITTLE_ENDIAN = sys.byteorder == "little"
_NO_PLT = (
    "no PLT markers: the packet index needs PLT packet lengths in every tile-part "
    "(encode with PLT, e.g. opj_compress -PLT)"
)
_MAX_LAYERS = 65535


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _read_uints(buf: bytes, code: str, start: int, count: int) -> list[int]:
    # The arrays are little-endian on disk and in memory; a cast view is the
    # fastest way to read a run of them on the (little-endian) hosts we run on.
    if _LITTLE_ENDIAN:
        return memoryview(buf).cast(code)[start : start + count].tolist()
    size = struct.calcsize("<" + code)
    return list(struct.unpack_from(f"<{count}{code}", buf, start * size))


@attrs.frozen
class TileCoding:
    """The coding parameters in force for a tile (COD/COC after precedence).

    Precedence (ISO/IEC 15444-1 A.6): tile-part COC > tile-part COD > main COC
    > main COD. ``CodestreamIndex.coding`` holds the main header's values;
    each :class:`Tile` holds its own (the same object when not overridden).

    Parameters
    ----------
    progression : Progression
        Progression order of the tile's packets.
    layers : int
        Number of quality layers L.
    mct : int
        Multiple component transform (0 none, 1 RCT/ICT).
    sop, eph : bool
        Whether packets may carry SOP marker segments / EPH markers (they are
        part of the packets' byte ranges).
    components : tuple of CodingStyle
        Per component: decomposition levels, code-block size and style,
        wavelet (``reversible``), precinct exponents per resolution.
    """

    progression: Progression
    layers: int
    mct: int
    sop: bool
    eph: bool
    components: tuple[CodingStyle, ...]

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.progression, Progression):
            raise CodestreamError(f"unknown progression order {self.progression!r}")
        if not 1 <= self.layers <= _MAX_LAYERS:
            raise CodestreamError(f"{self.layers} quality layers, expected 1..{_MAX_LAYERS}")
        if not self.components:
            raise CodestreamError("no component coding styles")

    @property
    def levels(self) -> tuple[int, ...]:
        """Decomposition levels NL per component."""
        return tuple(s.levels for s in self.components)


@attrs.frozen
class TilePart:
    """Where one tile-part sits in the codestream.

    Parameters
    ----------
    part : int
        TPsot, the tile-part's index within its tile.
    offset : int
        Offset of its SOT marker.
    length : int
        Bytes from the SOT marker to the end of the tile-part (Psot, resolved
        when the codestream says 0).
    header_length : int
        Bytes of marker segments between the SOT segment and SOD.
    segments : tuple of Segment
        Those marker segments (PLT, COD, COM, ...), in order.
    """

    part: int
    offset: int
    length: int
    header_length: int
    segments: tuple[Segment, ...]

    def __attrs_post_init__(self) -> None:
        minimum = SOT_SEGMENT_LENGTH + 2 + self.header_length
        if self.offset < 0 or self.header_length < 0 or self.length < minimum:
            raise CodestreamError(f"inconsistent tile-part at offset {self.offset}")

    @property
    def header_offset(self) -> int:
        """Offset of the first marker segment after the SOT segment."""
        return self.offset + SOT_SEGMENT_LENGTH

    @property
    def body_offset(self) -> int:
        """Offset of the first packet byte (just after SOD)."""
        return self.header_offset + self.header_length + 2

    @property
    def body_length(self) -> int:
        """Bytes of packet data."""
        return self.offset + self.length - self.body_offset

    @property
    def end(self) -> int:
        """Offset just past the tile-part."""
        return self.offset + self.length


@attrs.frozen
class Tile:
    """One tile: its tile-parts, precinct grids and packet table.

    Parameters
    ----------
    index : int
        Tile index t (raster order).
    bounds : tuple of int
        ``(tx0, ty0, tx1, ty1)`` on the reference grid.
    coding : TileCoding
        Coding parameters in force for the tile.
    parts : tuple of TilePart
        Its tile-parts in order (TPsot 0, 1, ...).
    grid : tuple of tuple of (int, int)
        ``grid[c][r] == (columns, rows)`` of precincts (B.6); 0 when empty.
    offsets : bytes
        Little-endian uint64 file offset of every packet, canonical order
        ``(c, r, p, l)``.
    lengths : bytes
        Little-endian uint32 length of every packet, same order.
    """

    index: int
    bounds: tuple[int, int, int, int]
    coding: TileCoding
    parts: tuple[TilePart, ...]
    grid: tuple[tuple[tuple[int, int], ...], ...]
    offsets: bytes = attrs.field(repr=False)
    lengths: bytes = attrs.field(repr=False)
    # _cumulative[c][r]: precincts of component c below resolution r;
    # _component_base[c]: precincts of the components before c.
    _cumulative: tuple[tuple[int, ...], ...] = attrs.field(init=False, repr=False, eq=False)
    _component_base: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if len(self.grid) != len(self.coding.components):
            raise CodestreamError(f"tile {self.index}: grid for {len(self.grid)} components")
        cumulative = []
        bases = []
        total = 0
        for c, resolutions in enumerate(self.grid):
            if len(resolutions) != self.coding.components[c].resolutions:
                raise CodestreamError(f"tile {self.index}: grid of component {c} has wrong resolutions")
            acc = [0]
            for cols, rows in resolutions:
                acc.append(acc[-1] + cols * rows)
            cumulative.append(tuple(acc))
            bases.append(total)
            total += acc[-1]
        count = total * self.coding.layers
        if len(self.offsets) != 8 * count or len(self.lengths) != 4 * count:
            raise CodestreamError(f"tile {self.index}: packet table does not hold {count} packets")
        object.__setattr__(self, "_cumulative", tuple(cumulative))
        object.__setattr__(self, "_component_base", tuple(bases))

    @property
    def layers(self) -> int:
        """Number of quality layers of the tile."""
        return self.coding.layers

    @property
    def num_packets(self) -> int:
        """Number of packets of the tile (layers x precincts)."""
        return len(self.lengths) // 4

    @property
    def header_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(offset, length)`` of the tile's header marker segments, per tile-part.

        Concatenated, they are the JPIP tile header data-bin (SOT and SOD excluded).
        """
        return tuple((p.header_offset, p.header_length) for p in self.parts if p.header_length)

    def precinct_count(self, c: int, r: int) -> int:
        """Number of precincts of component ``c`` at resolution ``r``."""
        cols, rows = self._grid(c, r)
        return cols * rows

    def precincts_in_component(self, c: int) -> int:
        """Number of precincts of component ``c`` over all resolutions."""
        if not 0 <= c < len(self.grid):
            raise KeyError(f"tile {self.index} has no component {c}")
        return self._cumulative[c][-1]

    def _grid(self, c: int, r: int) -> tuple[int, int]:
        if not (0 <= c < len(self.grid) and 0 <= r < len(self.grid[c])):
            raise KeyError(f"tile {self.index} has no component {c} resolution {r}")
        return self.grid[c][r]

    def precinct_sequence(self, c: int, r: int, p: int) -> int:
        """Sequence number s of a precinct in its tile-component (JPIP A.3.2.1).

        Precincts are counted over resolutions 0, 1, ... and in raster order
        within each resolution.
        """
        if not 0 <= p < self.precinct_count(c, r):
            raise KeyError(f"tile {self.index} component {c} resolution {r} has no precinct {p}")
        return self._cumulative[c][r] + p

    def precinct_at(self, c: int, s: int) -> tuple[int, int]:
        """Inverse of :meth:`precinct_sequence`: ``(r, p)`` of sequence number ``s``."""
        cumulative = self._cumulative[c] if 0 <= c < len(self.grid) else ()
        if not cumulative or not 0 <= s < cumulative[-1]:
            raise KeyError(f"tile {self.index} component {c} has no precinct number {s}")
        r = bisect.bisect_right(cumulative, s) - 1
        return r, s - cumulative[r]

    def _first_packet(self, c: int, r: int, p: int) -> int:
        s = self.precinct_sequence(c, r, p)  # validates c, r, p first
        return (self._component_base[c] + s) * self.coding.layers

    def packet(self, c: int, r: int, p: int, l: int) -> tuple[int, int]:  # noqa: E741
        """``(offset, length)`` of the packet of layer ``l`` of a precinct."""
        if not 0 <= l < self.coding.layers:
            raise KeyError(f"tile {self.index} has no layer {l}")
        i = self._first_packet(c, r, p) + l
        return _read_uints(self.offsets, "Q", i, 1)[0], _read_uints(self.lengths, "I", i, 1)[0]

    def packets(self, c: int, r: int, p: int) -> tuple[tuple[int, int], ...]:
        """``(offset, length)`` of a precinct's packets, layers 0..L-1."""
        i = self._first_packet(c, r, p)
        n = self.coding.layers
        return tuple(zip(_read_uints(self.offsets, "Q", i, n), _read_uints(self.lengths, "I", i, n)))

    def layer_offsets(self, c: int, r: int, p: int) -> tuple[int, ...]:
        """Cumulative offsets of the layers within the precinct data-bin.

        The data-bin is the precinct's packets concatenated in layer order;
        layer ``l`` occupies ``[result[l], result[l + 1])`` and ``result[-1]``
        is the data-bin's length (L + 1 values, starting with 0).
        """
        i = self._first_packet(c, r, p)
        out = [0]
        for length in _read_uints(self.lengths, "I", i, self.coding.layers):
            out.append(out[-1] + length)
        return tuple(out)

    def iter_precincts(
        self, c: int, r: int, columns: range | None = None, rows: range | None = None
    ) -> Iterator[int]:
        """Precinct indices ``p`` of ``(c, r)`` in the given column/row ranges, raster order.

        Parameters
        ----------
        c, r : int
            Component and resolution.
        columns, rows : range, optional
            Precinct columns/rows wanted (clipped to the grid); all by default.
        """
        ncols, nrows = self._grid(c, r)
        cols = range(ncols) if columns is None else range(max(columns.start, 0), min(columns.stop, ncols))
        rws = range(nrows) if rows is None else range(max(rows.start, 0), min(rows.stop, nrows))
        for row in rws:
            for col in cols:
                yield row * ncols + col

    def iter_packets(self) -> Iterator[tuple[int, int, int, int, int, int]]:
        """Every packet as ``(c, r, p, l, offset, length)``, canonical order."""
        offsets = _read_uints(self.offsets, "Q", 0, self.num_packets)
        lengths = _read_uints(self.lengths, "I", 0, self.num_packets)
        i = 0
        layers = self.coding.layers
        for c, resolutions in enumerate(self.grid):
            for r, (cols, rows) in enumerate(resolutions):
                for p in range(cols * rows):
                    for l in range(layers):  # noqa: E741
                        yield c, r, p, l, offsets[i], lengths[i]
                        i += 1


@attrs.frozen
class CodestreamIndex:
    """Everything a JPIP server needs to serve one codestream without parsing it.

    Parameters
    ----------
    length : int
        Size of the codestream in bytes.
    siz : SIZ
        Image and tile geometry (reference grid, components, tile grid).
    coding : TileCoding
        Main header coding parameters (tiles may override them).
    main_header : tuple of int
        ``(offset, length)`` of the main header, SOC up to the first SOT
        (the JPIP main header data-bin).
    main_segments : tuple of Segment
        The main header's marker segments, SOC first.
    tiles : tuple of Tile
        One per tile, in tile index order.
    """

    length: int
    siz: SIZ
    coding: TileCoding
    main_header: tuple[int, int]
    main_segments: tuple[Segment, ...]
    tiles: tuple[Tile, ...]

    def __attrs_post_init__(self) -> None:
        if len(self.tiles) != self.siz.num_tiles or any(t.index != i for i, t in enumerate(self.tiles)):
            raise CodestreamError(f"expected tiles 0..{self.siz.num_tiles - 1} in order")
        if len(self.coding.components) != len(self.siz.components):
            raise CodestreamError("coding and SIZ disagree on the number of components")

    # --- geometry -----------------------------------------------------------

    @property
    def width(self) -> int:
        """Image width on the reference grid (Xsiz - XOsiz)."""
        return self.siz.width

    @property
    def height(self) -> int:
        """Image height on the reference grid (Ysiz - YOsiz)."""
        return self.siz.height

    @property
    def offset(self) -> tuple[int, int]:
        """Image origin ``(XOsiz, YOsiz)`` on the reference grid."""
        return (self.siz.xosiz, self.siz.yosiz)

    @property
    def num_tiles(self) -> int:
        """Number of tiles T."""
        return len(self.tiles)

    @property
    def num_components(self) -> int:
        """Number of components C."""
        return len(self.siz.components)

    @property
    def components(self) -> tuple[ImageComponent, ...]:
        """Per component precision, signedness and subsampling (from SIZ)."""
        return self.siz.components

    @property
    def layers(self) -> int:
        """Number of quality layers (main header; tiles may differ)."""
        return self.coding.layers

    @property
    def progression(self) -> Progression:
        """Progression order (main header; tiles may differ)."""
        return self.coding.progression

    def _tile(self, t: int) -> Tile:
        if not 0 <= t < len(self.tiles):
            raise KeyError(f"no tile {t}")
        return self.tiles[t]

    def component_bounds(self, t: int, c: int) -> tuple[int, int, int, int]:
        """Tile-component bounds ``(tcx0, tcy0, tcx1, tcy1)`` (B-12: ceil(tx / XRsiz))."""
        tx0, ty0, tx1, ty1 = self._tile(t).bounds
        if not 0 <= c < len(self.siz.components):
            raise KeyError(f"no component {c}")
        comp = self.siz.components[c]
        return (
            _ceil_div(tx0, comp.xrsiz),
            _ceil_div(ty0, comp.yrsiz),
            _ceil_div(tx1, comp.xrsiz),
            _ceil_div(ty1, comp.yrsiz),
        )

    def resolution_bounds(self, t: int, c: int, r: int) -> tuple[int, int, int, int]:
        """Bounds ``(trx0, try0, trx1, try1)`` of resolution ``r`` of a tile-component (B-14)."""
        levels = self._tile(t).coding.components[c].levels if 0 <= c < self.num_components else -1
        if not 0 <= r <= levels:
            raise KeyError(f"tile {t} component {c} has no resolution {r}")
        scale = 1 << (levels - r)
        return tuple(_ceil_div(v, scale) for v in self.component_bounds(t, c))  # type: ignore[return-value]

    def precinct_grid(self, t: int, c: int, r: int) -> tuple[int, int]:
        """``(columns, rows)`` of precincts of a tile-component resolution (B-16)."""
        return self._tile(t)._grid(c, r)

    def precinct_bounds(self, t: int, c: int, r: int, p: int) -> tuple[int, int, int, int]:
        """Bounds of precinct ``p`` in resolution-``r`` coordinates, clipped to the resolution."""
        cols, rows = self.precinct_grid(t, c, r)
        if not 0 <= p < cols * rows:
            raise KeyError(f"tile {t} component {c} resolution {r} has no precinct {p}")
        ppx, ppy = self.tiles[t].coding.components[c].precincts[r]
        x0, y0, x1, y1 = self.resolution_bounds(t, c, r)
        px = ((x0 >> ppx) + p % cols) << ppx
        py = ((y0 >> ppy) + p // cols) << ppy
        return (max(px, x0), max(py, y0), min(px + (1 << ppx), x1), min(py + (1 << ppy), y1))

    def precinct_ranges(
        self, t: int, c: int, r: int, x0: int, y0: int, x1: int, y1: int
    ) -> tuple[range, range]:
        """Precinct columns and rows meeting a region of a tile-component resolution.

        Parameters
        ----------
        t, c, r : int
            Tile, component, resolution.
        x0, y0, x1, y1 : int
            The region in resolution-``r`` coordinates (right/bottom exclusive).

        Returns
        -------
        tuple of range
            ``(columns, rows)``, for :meth:`Tile.iter_precincts`; empty when
            the region misses the tile-component.
        """
        cols, rows = self.precinct_grid(t, c, r)
        rx0, ry0, rx1, ry1 = self.resolution_bounds(t, c, r)
        x0, y0, x1, y1 = max(x0, rx0), max(y0, ry0), min(x1, rx1), min(y1, ry1)
        if x0 >= x1 or y0 >= y1 or not cols * rows:
            return range(0), range(0)
        ppx, ppy = self.tiles[t].coding.components[c].precincts[r]
        bx, by = rx0 >> ppx, ry0 >> ppy
        return (
            range((x0 >> ppx) - bx, ((x1 - 1) >> ppx) - bx + 1),
            range((y0 >> ppy) - by, ((y1 - 1) >> ppy) - by + 1),
        )

    # --- packets and data-bins ----------------------------------------------

    def packets(self, t: int, c: int, r: int, p: int) -> tuple[tuple[int, int], ...]:
        """``(offset, length)`` of a precinct's packets in layer order 0..L-1."""
        return self._tile(t).packets(c, r, p)

    def layer_offsets(self, t: int, c: int, r: int, p: int) -> tuple[int, ...]:
        """Cumulative layer offsets within a precinct data-bin, see :meth:`Tile.layer_offsets`."""
        return self._tile(t).layer_offsets(c, r, p)

    def tile_header_ranges(self, t: int) -> tuple[tuple[int, int], ...]:
        """``(offset, length)`` ranges forming the JPIP tile header data-bin of tile ``t``."""
        return self._tile(t).header_ranges

    def precinct_bin_id(self, t: int, c: int, r: int, p: int) -> int:
        """JPIP in-class identifier of a precinct data-bin (ISO/IEC 15444-9 A.3.2.1).

        ``I = t + (c + s * C) * T`` with T tiles, C components and s the
        precinct's sequence number within its tile-component (all resolutions
        from 0 upward, raster order within each).
        """
        s = self._tile(t).precinct_sequence(c, r, p)
        return t + (c + s * self.num_components) * self.num_tiles

    def precinct_from_bin_id(self, bin_id: int) -> tuple[int, int, int, int]:
        """Inverse of :meth:`precinct_bin_id`: ``(t, c, r, p)``.

        Raises
        ------
        KeyError
            No such precinct (a client may send any number).
        """
        if bin_id < 0:
            raise KeyError(f"no precinct data-bin {bin_id}")
        rest, t = divmod(bin_id, self.num_tiles)
        s, c = divmod(rest, self.num_components)
        r, p = self.tiles[t].precinct_at(c, s)
        return t, c, r, p

    def tile_parts(self) -> tuple[tuple[int, TilePart], ...]:
        """Every ``(tile index, tile-part)`` in codestream order."""
        pairs = [(tile.index, part) for tile in self.tiles for part in tile.parts]
        return tuple(sorted(pairs, key=lambda pair: pair[1].offset))

    # --- JSON ----------------------------------------------------------------

    def to_json(self) -> bytes:
        """Serialize to compact JSON (see :meth:`from_json` for the format)."""
        styles: dict[CodingStyle, int] = {}

        def coding_doc(coding: TileCoding) -> list[Any]:
            ids = [styles.setdefault(s, len(styles)) for s in coding.components]
            return [int(coding.progression), coding.layers, coding.mct, int(coding.sop), int(coding.eph), ids]

        siz = self.siz
        default = coding_doc(self.coding)
        tiles = []
        for tile in self.tiles:
            same = tile.coding is self.coding or tile.coding == self.coding
            parts = [
                [p.part, p.offset, p.length, p.header_length, _flat_segments(p.segments)] for p in tile.parts
            ]
            tiles.append([None if same else coding_doc(tile.coding), parts])
        blob = b"".join(t.offsets for t in self.tiles) + b"".join(t.lengths for t in self.tiles)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "length": self.length,
            "siz": [
                siz.rsiz, siz.xsiz, siz.ysiz, siz.xosiz, siz.yosiz,
                siz.xtsiz, siz.ytsiz, siz.xtosiz, siz.ytosiz,
                [v for c in siz.components for v in (c.precision, int(c.signed), c.xrsiz, c.yrsiz)],
            ],
            "styles": [
                [s.levels, s.xcb, s.ycb, s.cblk_style, s.transform, [v for pp in s.precincts for v in pp]]
                for s in styles
            ],
            "coding": default,
            "main": [self.main_header[0], self.main_header[1], _flat_segments(self.main_segments)],
            "tiles": tiles,
            "packets": base64.b64encode(zlib.compress(blob, 6)).decode("ascii"),
        }  # fmt: skip
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes | str) -> CodestreamIndex:
        """Load an index written by :meth:`to_json`.

        The JSON object has: ``format`` (:data:`FORMAT`), ``version``
        (:data:`VERSION`), ``length``, ``siz`` (Rsiz, Xsiz, Ysiz, XOsiz, YOsiz,
        XTsiz, YTsiz, XTOsiz, YTOsiz, then a flat list of precision, signed,
        XRsiz, YRsiz per component), ``styles`` (distinct coding styles: levels,
        xcb, ycb, code-block style, transform, flat PPx/PPy per resolution),
        ``coding`` (progression, layers, MCT, SOP, EPH, style index per
        component), ``main`` (offset, length, flat marker/offset/length per
        segment), ``tiles`` (per tile: coding or null for the main one, and
        per tile-part TPsot, offset, length, header length, flat segments) and
        ``packets``: base64 of zlib of every tile's uint64 LE offsets followed
        by every tile's uint32 LE lengths, canonical order. Precinct grids are
        recomputed, not stored.

        Raises
        ------
        CodestreamError
            Not such a JSON document, another version, or inconsistent content.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CodestreamError("the index is not valid JSON") from exc
        try:
            return _from_doc(doc)
        except CodestreamError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, RecursionError, zlib.error,
                binascii.Error) as exc:  # fmt: skip
            raise CodestreamError(f"malformed index: {exc!r}") from exc


def _flat_segments(segments: tuple[Segment, ...]) -> list[int]:
    return [v for s in segments for v in (s.marker, s.offset, s.length)]


def _int(value: object) -> int:
    if type(value) is not int:
        raise CodestreamError(f"malformed index: expected an integer, got {value!r}")
    return value


def _ints(value: object, multiple: int = 1) -> list[int]:
    if not isinstance(value, list) or len(value) % multiple:
        raise CodestreamError("malformed index: expected a list of integers")
    return [_int(v) for v in value]


def _segments_from(value: object) -> tuple[Segment, ...]:
    flat = _ints(value, 3)
    return tuple(Segment(*flat[i : i + 3]) for i in range(0, len(flat), 3))


def _from_doc(doc: Any) -> CodestreamIndex:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CodestreamError("not an ImageShare codestream index")
    if doc.get("version") != VERSION:
        raise CodestreamError(f"unsupported index version {doc.get('version')!r} (expected {VERSION})")
    length = _int(doc["length"])
    s = doc["siz"]
    flat = _ints(s[9], 4)
    components = tuple(
        ImageComponent(flat[i], bool(flat[i + 1]), flat[i + 2], flat[i + 3]) for i in range(0, len(flat), 4)
    )
    siz = SIZ(*(_int(v) for v in s[:9]), components)
    styles = []
    for entry in doc["styles"]:
        levels, xcb, ycb, cblk_style, transform = (_int(v) for v in entry[:5])
        pp = _ints(entry[5], 2)
        styles.append(
            CodingStyle(levels, xcb, ycb, cblk_style, transform, tuple(zip(pp[0::2], pp[1::2], strict=True)))
        )

    def coding_from(entry: Any) -> TileCoding:
        progression, layers, mct, sop, eph = (_int(v) for v in entry[:5])
        ids = _ints(entry[5])
        if len(ids) != len(components) or min(ids) < 0:
            raise CodestreamError("malformed index: bad component coding styles")
        components_styles = tuple(styles[i] for i in ids)
        return TileCoding(Progression(progression), layers, mct, bool(sop), bool(eph), components_styles)

    default = coding_from(doc["coding"])
    main = doc["main"]
    main_header = (_int(main[0]), _int(main[1]))
    main_segments = _segments_from(main[2])
    tiles_doc = doc["tiles"]
    if not isinstance(tiles_doc, list) or len(tiles_doc) != siz.num_tiles:
        raise CodestreamError("malformed index: wrong number of tiles")
    _check_tile_components(siz)
    codings = [default if entry[0] is None else coding_from(entry[0]) for entry in tiles_doc]
    grids = _tile_grids(siz, codings)
    counts = [sum(cols * rows for res in grid for cols, rows in res) * coding.layers
              for grid, coding in zip(grids, codings)]  # fmt: skip
    total = sum(counts)
    blob = base64.b64decode(doc["packets"], validate=True)
    # Bounded decompression: a corrupt or hostile blob cannot inflate past what we expect.
    inflater = zlib.decompressobj()
    raw = inflater.decompress(blob, 12 * total + 1)
    if len(raw) != 12 * total or not inflater.eof:
        raise CodestreamError("malformed index: packet table has the wrong size")
    offsets = np.frombuffer(raw, dtype="<u8", count=total)
    lengths = np.frombuffer(raw, dtype="<u4", offset=8 * total)
    if total and int((offsets + lengths.astype(np.uint64)).max()) > length:
        raise CodestreamError("malformed index: a packet lies past the end of the codestream")
    tiles = []
    off_pos = 0
    for t, (entry, coding, grid, count) in enumerate(zip(tiles_doc, codings, grids, counts, strict=True)):
        parts = []
        for p in entry[1]:
            part, offset, size, header_length = (_int(v) for v in p[:4])
            parts.append(TilePart(part, offset, size, header_length, _segments_from(p[4])))
            if offset + size > length:
                raise CodestreamError("malformed index: a tile-part lies past the end of the codestream")
        if not parts:
            raise CodestreamError(f"malformed index: tile {t} has no tile-part")
        tiles.append(
            Tile(
                t, siz.tile_bounds(t), coding, tuple(parts), grid,
                raw[8 * off_pos : 8 * (off_pos + count)],
                raw[8 * total + 4 * off_pos : 8 * total + 4 * (off_pos + count)],
            )
        )  # fmt: skip
        off_pos += count
    return CodestreamIndex(length, siz, default, main_header, main_segments, tuple(tiles))


# --- building ----------------------------------------------------------------


def _resolve_coding(main: MainHeader, first: TilePartHeader | None, default: TileCoding | None) -> TileCoding:
    """Apply the COD/COC precedence for a tile (``first`` is its first tile-part)."""
    if default is not None and first is not None and first.cod is None and not first.coc:
        return default
    tile_cod = first.cod if first is not None else None
    cod = tile_cod if tile_cod is not None else main.cod
    main_coc = {x.component: x.style for x in main.coc}
    tile_coc = {x.component: x.style for x in first.coc} if first is not None else {}
    fallback = tile_cod.style if tile_cod is not None else None
    styles = []
    for c in range(len(main.siz.components)):
        style = tile_coc.get(c)
        if style is None:
            style = fallback if fallback is not None else main_coc.get(c, main.cod.style)
        styles.append(style)
    return TileCoding(cod.progression, cod.layers, cod.mct, cod.sop, cod.eph, tuple(styles))


def compute_precinct_grid(
    tile_bounds: tuple[int, int, int, int], component: ImageComponent, style: CodingStyle
) -> tuple[tuple[int, int], ...]:
    """Precinct grid of every resolution of a tile-component (ISO/IEC 15444-1 B.6).

    ``tcx0 = ceil(tx0 / XRsiz)``, ``trx0 = ceil(tcx0 / 2^(NL - r))`` (likewise
    for the other edges) and ``columns = ceil(trx1 / 2^PPx) - floor(trx0 / 2^PPx)``,
    0 when ``trx0 == trx1``; rows likewise.

    Parameters
    ----------
    tile_bounds : tuple of int
        ``(tx0, ty0, tx1, ty1)`` of the tile on the reference grid.
    component : ImageComponent
        Gives XRsiz and YRsiz.
    style : CodingStyle
        Gives NL and the precinct exponents.

    Returns
    -------
    tuple of (int, int)
        ``(columns, rows)`` for resolutions 0..NL.
    """
    tx0, ty0, tx1, ty1 = tile_bounds
    xr, yr = component.xrsiz, component.yrsiz
    tcx0, tcy0, tcx1, tcy1 = _ceil_div(tx0, xr), _ceil_div(ty0, yr), _ceil_div(tx1, xr), _ceil_div(ty1, yr)
    out = []
    for r, (ppx, ppy) in enumerate(style.precincts):
        k = style.levels - r
        trx0, try0 = -(-tcx0 >> k), -(-tcy0 >> k)
        trx1, try1 = -(-tcx1 >> k), -(-tcy1 >> k)
        cols = (-(-trx1 >> ppx)) - (trx0 >> ppx) if trx1 > trx0 else 0
        rows = (-(-try1 >> ppy)) - (try0 >> ppy) if try1 > try0 else 0
        out.append((cols, rows))
    return tuple(out)


def _check_tile_components(siz: SIZ) -> None:
    ncomp = len(siz.components)
    if siz.num_tiles * ncomp > MAX_TILE_COMPONENTS:
        raise CodestreamError(
            f"{siz.num_tiles} tiles x {ncomp} components exceeds the supported {MAX_TILE_COMPONENTS}"
        )


def _tile_grids(siz: SIZ, codings: list[TileCoding]) -> list[tuple[tuple[tuple[int, int], ...], ...]]:
    """Precinct grids of every tile, within the caps on tiles x components (x resolutions)."""
    _check_tile_components(siz)
    budget = 0
    sums: dict[int, int] = {}
    grids = []
    for t, coding in enumerate(codings):
        budget += sums.setdefault(id(coding), sum(s.resolutions for s in coding.components))
        if budget > MAX_TILE_COMPONENT_RESOLUTIONS:
            raise CodestreamError(f"more than {MAX_TILE_COMPONENT_RESOLUTIONS} tile-component resolutions")
        bounds = siz.tile_bounds(t)
        # Components usually share subsampling and coding: compute each grid once per tile.
        cache: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {}
        grid = []
        for comp, style in zip(siz.components, coding.components, strict=True):
            key = (comp.xrsiz, comp.yrsiz, id(style))
            g = cache.get(key)
            if g is None:
                g = cache[key] = compute_precinct_grid(bounds, comp, style)
            grid.append(g)
        grids.append(tuple(grid))
    return grids


def _concat_ranges(starts: list[int], counts: list[int]) -> npt.NDArray[np.int64]:
    """``concatenate([arange(s, s + n) for s, n in ...])`` without a Python loop over ranges."""
    n = np.asarray(counts, dtype=np.int64)
    total = int(n.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - (np.cumsum(n) - n)
    return np.repeat(shift, n) + np.arange(total, dtype=np.int64)


def _precinct_order(
    coding: TileCoding,
    grid: tuple[tuple[tuple[int, int], ...], ...],
    bounds: tuple[int, int, int, int],
    components: tuple[ImageComponent, ...],
    bases: list[list[int]],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Precincts in the order the progression first visits them, and their resolutions.

    Returns canonical precinct numbers and, for RLCP, their resolution levels.
    Position-driven orders follow ISO/IEC 15444-1 B.12.1.3-B.12.1.5 (and
    OpenJPEG's pi.c): the loops run over every reference grid position
    (y, x) of the tile, and precinct k of (c, r) is visited at the position
    where its column and row conditions first hold; that position is computed
    directly here and the precincts are sorted by the loop keys.
    """
    progression = coding.progression
    if progression in (Progression.LRCP, Progression.RLCP):
        starts, counts, levels = [], [], []
        for r in range(max(len(res) for res in grid)):
            for c, res in enumerate(grid):
                if r < len(res):
                    starts.append(bases[c][r])
                    counts.append(res[r][0] * res[r][1])
                    levels.append(r)
        return _concat_ranges(starts, counts), np.repeat(np.asarray(levels, dtype=np.int64), counts)
    tx0, ty0, _, _ = bounds
    keys: list[list[npt.NDArray[np.int64]]] = [[], [], [], [], []]  # c, r, y, x, id
    for c, (comp, style) in enumerate(zip(components, coding.components, strict=True)):
        for r, (cols, rows) in enumerate(grid[c]):
            if not cols or not rows:
                continue
            k = style.levels - r
            dx, dy = comp.xrsiz << k, comp.yrsiz << k
            ppx, ppy = style.precincts[r]
            trx0, try0 = _ceil_div(tx0, dx), _ceil_div(ty0, dy)
            # Column i is visited at x = its left edge scaled back to the reference
            # grid (a multiple of XRsiz * 2^(PPx + NL - r)), except a partial first
            # column, which is visited at x = tx0; rows likewise.
            xs = (np.arange(trx0 >> ppx, (trx0 >> ppx) + cols, dtype=np.int64) << ppx) * dx
            if trx0 & ((1 << ppx) - 1):
                xs[0] = tx0
            ys = (np.arange(try0 >> ppy, (try0 >> ppy) + rows, dtype=np.int64) << ppy) * dy
            if try0 & ((1 << ppy) - 1):
                ys[0] = ty0
            n = cols * rows
            keys[0].append(np.full(n, c, dtype=np.int64))
            keys[1].append(np.full(n, r, dtype=np.int64))
            keys[2].append(np.repeat(ys, cols))
            keys[3].append(np.tile(xs, rows))
            keys[4].append(np.arange(bases[c][r], bases[c][r] + n, dtype=np.int64))
    if not keys[0]:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    cc, rr, yy, xx, ids = (np.concatenate(k) for k in keys)
    # np.lexsort sorts by the last key first.
    if progression == Progression.RPCL:
        perm = np.lexsort((cc, xx, yy, rr))
    elif progression == Progression.PCRL:
        perm = np.lexsort((rr, cc, xx, yy))
    else:  # CPRL
        perm = np.lexsort((rr, xx, yy, cc))
    return ids[perm], rr[perm]


def _packet_sequence(
    coding: TileCoding,
    grid: tuple[tuple[tuple[int, int], ...], ...],
    bounds: tuple[int, int, int, int],
    components: tuple[ImageComponent, ...],
) -> npt.NDArray[np.int64]:
    """Canonical packet number of each packet of the tile, in codestream order."""
    bases: list[list[int]] = []
    total = 0
    for res in grid:
        row = []
        for cols, rows in res:
            row.append(total)
            total += cols * rows
        bases.append(row)
    order, levels = _precinct_order(coding, grid, bounds, components, bases)
    nl = coding.layers
    layers = np.arange(nl, dtype=np.int64)
    if coding.progression == Progression.LRCP:
        return (order[None, :] * nl + layers[:, None]).ravel()
    if coding.progression == Progression.RLCP:
        # Layers inside each resolution: order is grouped by resolution already.
        pieces = []
        for r in np.unique(levels):
            block = order[levels == r]
            pieces.append((block[None, :] * nl + layers[:, None]).ravel())
        return np.concatenate(pieces) if pieces else order
    return (order[:, None] * nl + layers[None, :]).ravel()


def _index_tile(
    t: int,
    siz: SIZ,
    coding: TileCoding,
    grid: tuple[tuple[tuple[int, int], ...], ...],
    parts: list[TilePartHeader],
    any_plt: bool,
) -> Tile:
    expected = sum(cols * rows for res in grid for cols, rows in res) * coding.layers
    per_part = []
    for part in parts:
        lengths = decode_packet_lengths(part.plt)
        if int(lengths.sum()) != part.body_length:
            if not any_plt:
                raise CodestreamError(_NO_PLT)
            raise CodestreamError(
                f"tile {t} tile-part {part.sot.part} at offset {part.offset}: PLT lengths sum to "
                f"{int(lengths.sum())} but the body has {part.body_length} bytes"
            )
        per_part.append(lengths)
    found = sum(len(x) for x in per_part)
    if found != expected:
        if not any_plt:
            raise CodestreamError(_NO_PLT)
        raise CodestreamError(
            f"tile {t}: PLT lists {found} packets but {coding.progression.name} with {coding.layers} "
            f"layers over the precincts yields {expected}"
        )
    bounds = siz.tile_bounds(t)
    offsets = np.empty(expected, dtype="<u8")
    lengths_out = np.empty(expected, dtype="<u4")
    if expected:
        sequence = _packet_sequence(coding, grid, bounds, siz.components)
        # A tile's packets run on from one tile-part body to the next.
        file_offsets = np.empty(expected, dtype=np.int64)
        pos = 0
        for part, lengths in zip(parts, per_part, strict=True):
            n = len(lengths)
            file_offsets[pos : pos + n] = part.body_offset + np.cumsum(lengths) - lengths
            pos += n
        offsets[sequence] = file_offsets
        lengths_out[sequence] = np.concatenate(per_part)
    tile_parts = tuple(
        TilePart(p.sot.part, p.offset, p.length, p.header_length, p.segments) for p in parts
    )
    return Tile(t, bounds, coding, tile_parts, grid, offsets.tobytes(), lengths_out.tobytes())


def build_index(data: bytes | bytearray | memoryview) -> CodestreamIndex:
    """Parse a raw JPEG 2000 codestream once and index every packet.

    Parameters
    ----------
    data : bytes-like
        The whole codestream (J2C: SOC ... EOC, not a JP2 file).

    Returns
    -------
    CodestreamIndex

    Raises
    ------
    CodestreamError
        For anything malformed, truncated, hostile or unsupported: no PLT,
        POC, PPM/PPT, PLT lengths that do not add up to the tile-part bodies
        or to the number of packets the progression yields, caps exceeded.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    stream = parse_codestream(view)
    main = stream.main
    siz = main.siz
    if main.poc or any(part.poc for part in stream.tile_parts):
        raise CodestreamError("POC (progression order change) is not supported")
    # Before anything is done per tile-component.
    _check_tile_components(siz)
    by_tile: list[list[TilePartHeader]] = [[] for _ in range(siz.num_tiles)]
    for part in stream.tile_parts:
        by_tile[part.sot.tile].append(part)
    default = _resolve_coding(main, None, None)
    codings = [_resolve_coding(main, parts[0], default) for parts in by_tile]
    grids = _tile_grids(siz, codings)
    any_plt = any(part.plt for part in stream.tile_parts)
    tiles = tuple(
        _index_tile(t, siz, coding, grid, parts, any_plt)
        for t, (coding, grid, parts) in enumerate(zip(codings, grids, by_tile, strict=True))
    )
    return CodestreamIndex(len(view), siz, default, (0, main.end), main.segments, tiles)


@attrs.frozen
class TileLayout:
    """Where each packet of a tile goes, for a codestream known only by its main header."""

    coding: TileCoding
    grid: tuple[tuple[tuple[int, int], ...], ...]  # [c][r] -> (columns, rows)
    order: tuple[tuple[int, int, int, int], ...]  # (c, r, p, l) in codestream order


def packet_layout(main_header: bytes | bytearray | memoryview) -> tuple[SIZ, tuple[TileLayout, ...]]:
    """
    The packet order of every tile from the main header alone (SOC up to, not including,
    the first SOT), with the main header's coding for every tile.

    A JPIP client has the main header and data-bins but no PLT; this tells it in which
    order to lay the packets out when it rebuilds a codestream.

    Raises
    ------
    CodestreamError
        As :func:`build_index` does for a bad or unsupported main header.
    """
    # parse_main_header reads up to the first SOT: give it a minimal one.
    sot = b"\xff\x90\x00\x0a\x00\x00\x00\x00\x00\x00\x00\x01"
    main = parse_main_header(bytes(main_header) + sot)
    if main.poc:
        raise CodestreamError("progression order changes (POC) are not supported")
    coding = _resolve_coding(main, None, None)
    grids = _tile_grids(main.siz, [coding] * main.siz.num_tiles)
    out = []
    for t, grid in enumerate(grids):
        bases = []
        canonical: list[tuple[int, int, int]] = []
        for c, res in enumerate(grid):
            row = []
            for r, (cols, rows) in enumerate(res):
                row.append(len(canonical))
                canonical.extend((c, r, p) for p in range(cols * rows))
            bases.append(row)
        layers = coding.layers
        sequence = _packet_sequence(coding, grid, main.siz.tile_bounds(t), main.siz.components) if canonical else []
        order = tuple((*canonical[int(n) // layers], int(n) % layers) for n in sequence)
        out.append(TileLayout(coding, grid, order))
    return main.siz, tuple(out)
