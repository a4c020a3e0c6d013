"""What to send, in which order, for one JPIP request (ISO/IEC 15444-9 Annex A, C.6, D.3).

:class:`TargetBins` describes, once per codestream, every data-bin as byte
ranges of the codestream file: the main header bin (SOC up to the first SOT,
TLM/PLM/PPM/POC dropped), one tile-header bin per tile (its tile-part header
segments without PLT/PPT/POC, in one of the two layouts below), one precinct bin
per precinct (its packets in layer order), one tile bin per tile for JPT
streams (its tile-parts as in the file) and the empty metadata-bin 0.

Tile-header bins come in one of two layouts (:data:`TILE_HEADER_LAYOUTS`), fixed per
session by the server: ``part9``, ISO/IEC 15444-9 A.3.3 as Kakadu-family clients and
our own client read it (the tile-part header markers, nothing else), and ``openjpeg``,
what OpenJPEG's ``opj_server`` sends and its ``opj_dec_server``/``opj_jpip_transcode``
rebuild from: the SOT segment body without its FF90 code (Lsot 10, Isot, Psot 0,
TPsot 0, TNsot 1), the same markers, then SOD (FF93). The two differ in length, so a
cache model only makes sense for the layout it was built with.

:func:`plan` turns a resolved view-window and the client's cache model into
:class:`Piece` values, one JPP/JPT message each, in the order of
``docs/jpip.md`` 6.3: metadata-bin 0, main header, tile headers, then packets
layer by layer, resolution by resolution. Nothing the model holds is sent
again; a bin is resumed at the byte where the client's copy stops, even inside
a packet. :func:`commit` records in the model what was actually sent.

Sans-IO: a Piece says where its bytes are (``source``); reading them is the
caller's business (:meth:`Piece.body` slices a buffer it is given).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from imageshare.codestream.index import CodestreamIndex
from imageshare.codestream.markers import Marker
from imageshare.protocols.jpip.cachemodel import (
    MAIN_HEADER,
    METADATA,
    PRECINCT,
    TILE,
    TILE_HEADER,
    BinKey,
    CacheModel,
)
from imageshare.protocols.jpip.window import ResolvedWindow, tiles_in_window

__all__ = [
    "PART9",
    "OPENJPEG",
    "TILE_HEADER_LAYOUTS",
    "EOR_IMAGE_DONE",
    "EOR_WINDOW_DONE",
    "EOR_BYTE_LIMIT",
    "Ranges",
    "Piece",
    "PlanResult",
    "TargetBins",
    "vbas_length",
    "message_header_length",
    "plan",
    "commit",
]

#: Tile-header bin layouts (see the module docstring).
PART9 = "part9"
OPENJPEG = "openjpeg"
TILE_HEADER_LAYOUTS = (PART9, OPENJPEG)

#: EOR reason codes (D.3) a plan can end with.
EOR_IMAGE_DONE = 1
EOR_WINDOW_DONE = 2
EOR_BYTE_LIMIT = 4

#: ``(file_offset, length)`` ranges whose concatenation is some bytes of a data-bin.
Ranges = tuple[tuple[int, int], ...]

# Pointer and packing segments describe the layout of the file, not of the
# codestream a client rebuilds from data-bins; POC is refused by the index anyway.
_MAIN_HEADER_DROPPED = frozenset({Marker.TLM, Marker.PLM, Marker.PPM, Marker.POC})
_TILE_HEADER_DROPPED = frozenset({Marker.PLT, Marker.PPT, Marker.POC})
# OpenJPEG's layout ends with SOD; its rebuild prepends FF90 to the bin and fixes Psot.
_SOD = b"\xff\x93"
_OPJ_SOT_BODY_LENGTH = 10  # Lsot Isot Psot TPsot TNsot


def _opj_sot_body(t: int) -> bytes:
    """The SOT segment without its marker code, as OpenJPEG's tile-header bin starts.

    Lsot 10, Isot ``t``, Psot 0 (the rebuild recomputes it), TPsot 0 and TNsot 1: the
    rebuilt codestream has one tile-part per tile, whatever the file had.
    """
    return struct.pack(">HHIBB", _OPJ_SOT_BODY_LENGTH, t, 0, 0, 1)


def _coalesce(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Drop empty ranges and merge ranges that follow each other in the file."""
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        if not length:
            continue
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return tuple(out)


def _slice(ranges: Ranges, start: int, stop: int) -> Ranges:
    """The file ranges holding bytes ``[start, stop)`` of the concatenation of ``ranges``."""
    out: list[tuple[int, int]] = []
    pos = 0
    for offset, length in ranges:
        if pos >= stop:
            break
        lo, hi = max(start, pos), min(stop, pos + length)
        if lo < hi:
            out.append((offset + lo - pos, hi - lo))
        pos += length
    return _coalesce(out)


def vbas_length(value: int) -> int:
    """Bytes of a VBAS (7 bits per byte) holding ``value``."""
    return max(1, (value.bit_length() + 6) // 7)


def message_header_length(
    bin_class: int, csn: int, bin_id: int, bin_offset: int, length: int, aux: int | None = None
) -> int:
    """Bytes of a JPP/JPT message header, counting Class and CSn as present.

    The Bin-ID VBAS carries 4 bits in its first byte and 7 in each further one
    (a k-byte Bin-ID holds a 7k-3 bit id). Class and CSn are only omitted when
    inherited from the previous message, so counting them always gives an upper
    bound whatever the encoder does.
    """
    id_bytes = max(1, -(-(bin_id.bit_length() + 3) // 7))
    size = id_bytes + vbas_length(bin_class) + vbas_length(csn)
    size += vbas_length(bin_offset) + vbas_length(length)
    return size + (vbas_length(aux) if aux is not None else 0)


@attrs.frozen
class Piece:
    """Data for one JPP/JPT message: bytes ``[bin_offset, bin_offset + length)`` of a data-bin.

    Parameters
    ----------
    bin_class, csn, bin_id : int
        The data-bin (class numbers as in :mod:`~imageshare.protocols.jpip.cachemodel`).
    bin_offset, length : int
        Msg-Offset and Msg-Length.
    complete : bool
        Whether the piece ends at the end of the data-bin (the message's
        completeness bit).
    source : tuple of (int, int) or bytes
        Where the bytes are: ranges ``(file_offset, length)`` of the codestream
        file, concatenated, or the bytes themselves.
    aux : int, optional
        Aux value of extended classes; never used by this planner.
    """

    bin_class: int
    csn: int
    bin_id: int
    bin_offset: int
    length: int
    complete: bool
    source: Ranges | bytes
    aux: int | None = None
    # Bin offsets inside the piece where a packet (or tile-part) ends: where an aligned
    # cut may fall (``align=yes``).
    boundaries: tuple[int, ...] = ()

    @property
    def key(self) -> BinKey:
        """The data-bin key ``(bin_class, csn, bin_id)``."""
        return (self.bin_class, self.csn, self.bin_id)

    @property
    def end(self) -> int:
        """Offset in the data-bin just past the piece."""
        return self.bin_offset + self.length

    @property
    def header_length(self) -> int:
        """Upper bound on the bytes of its message header (:func:`message_header_length`)."""
        return message_header_length(
            self.bin_class, self.csn, self.bin_id, self.bin_offset, self.length, self.aux
        )

    def head(self, length: int) -> Piece:
        """The piece cut to its first ``length`` bytes (complete only if nothing was cut)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot cut a {self.length}-byte piece to {length} bytes")
        if isinstance(self.source, bytes):
            source: Ranges | bytes = self.source[:length]
        else:
            source = _slice(self.source, 0, length)
        complete = self.complete and length == self.length
        return attrs.evolve(self, length=length, complete=complete, source=source)

    def body(self, codestream: bytes | bytearray | memoryview) -> bytes:
        """The piece's bytes, gathered from ``codestream`` (the whole file) when needed."""
        if isinstance(self.source, bytes):
            return self.source
        view = memoryview(codestream)
        return b"".join(view[offset : offset + length] for offset, length in self.source)


@attrs.frozen
class PlanResult:
    """The pieces of one response and how it ends.

    Parameters
    ----------
    pieces : tuple of Piece
        In sending order.
    eor_reason : int
        :data:`EOR_IMAGE_DONE` when, once these pieces are sent, the client
        holds every data-bin of the codestream completely;
        :data:`EOR_WINDOW_DONE` when it holds everything the window needs;
        :data:`EOR_BYTE_LIMIT` when the byte limit stopped the response first.
    size : int
        Bytes of the pieces with an upper bound for their message headers (the
        EOR message is not counted).
    """

    pieces: tuple[Piece, ...]
    eor_reason: int
    size: int


class TargetBins:
    """The data-bins of one codestream, as ranges of its file.

    Built once per codestream from its index; cheap (per tile, not per
    packet): precinct bins are read from the index's flat packet arrays when
    asked for. The same index always gives the same bins, so the bytes a client
    caches under a target id never change.

    Parameters
    ----------
    index : CodestreamIndex
        The codestream's index.
    tile_header_layout : str
        :data:`PART9` or :data:`OPENJPEG` (see the module docstring).
    codestream : bytes-like, optional
        The codestream file's bytes; needed by the ``openjpeg`` layout, whose
        tile-header bins mix bytes of their own with the file's markers and are
        served as bytes (gathered per tile on first use; they are small).

    Attributes
    ----------
    main_header : Ranges
        The main header bin: SOC up to the first SOT without TLM, PLM, PPM
        and POC segments.
    main_header_length : int
    """

    def __init__(
        self,
        index: CodestreamIndex,
        tile_header_layout: str = PART9,
        codestream: bytes | bytearray | memoryview | None = None,
    ) -> None:
        if tile_header_layout not in TILE_HEADER_LAYOUTS:
            raise ValueError(f"unknown tile-header layout {tile_header_layout!r}")
        if tile_header_layout == OPENJPEG and codestream is None:
            raise ValueError("the openjpeg tile-header layout needs the codestream's bytes")
        self.index = index
        self.tile_header_layout = tile_header_layout
        self._codestream = codestream
        self._opj_headers: dict[int, bytes] = {}
        kept = [(s.offset, s.length) for s in index.main_segments if s.marker not in _MAIN_HEADER_DROPPED]
        self.main_header: Ranges = _coalesce(kept)
        self.main_header_length = sum(length for _, length in self.main_header)
        self._tile_headers: list[Ranges] = []
        self._tiles: list[Ranges] = []
        # Per tile: packet offsets and lengths (zero-copy views) and, per
        # component, the number of precincts of the components before it.
        self._packets: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32], list[int]]] = []
        self.precinct_bins = 0
        for tile in index.tiles:
            self._tile_headers.append(_coalesce(
                (s.offset, s.length) for part in tile.parts for s in part.segments
                if s.marker not in _TILE_HEADER_DROPPED
            ))  # fmt: skip
            self._tiles.append(_coalesce((part.offset, part.length) for part in tile.parts))
            bases = [0]
            for c in range(index.num_components):
                bases.append(bases[-1] + tile.precincts_in_component(c))
            self._packets.append((
                np.frombuffer(tile.offsets, dtype="<u8"), np.frombuffer(tile.lengths, dtype="<u4"), bases
            ))  # fmt: skip
            self.precinct_bins += bases[-1]

    def tile_header(self, t: int) -> Ranges | bytes:
        """The tile-header bin of tile ``t``: file ranges (``part9``, possibly empty) or bytes."""
        if self.tile_header_layout == PART9:
            return self._tile_headers[t]
        header = self._opj_headers.get(t)
        if header is None:
            assert self._codestream is not None
            view = memoryview(self._codestream)
            markers = b"".join(view[offset : offset + length] for offset, length in self._tile_headers[t])
            header = self._opj_headers[t] = _opj_sot_body(t) + markers + _SOD
        return header

    def tile_header_length(self, t: int) -> int:
        """Bytes of the tile-header bin of tile ``t``, without reading the codestream."""
        markers = sum(length for _, length in self._tile_headers[t])
        return markers if self.tile_header_layout == PART9 else _OPJ_SOT_BODY_LENGTH + markers + len(_SOD)

    def tile(self, t: int) -> Ranges:
        """The JPT tile bin of tile ``t``: its tile-parts, SOT to end, in order."""
        return self._tiles[t]

    def packets(self, t: int, c: int, r: int, p: int) -> tuple[list[int], list[int]]:
        """File offsets and lengths of a precinct's packets, layers 0..L-1."""
        offsets, lengths, bases = self._packets[t]
        tile = self.index.tiles[t]
        first = (bases[c] + tile.precinct_sequence(c, r, p)) * tile.layers
        stop = first + tile.layers
        return offsets[first:stop].tolist(), lengths[first:stop].tolist()

    def ranges(self, bin_class: int, bin_id: int) -> Ranges | bytes | None:
        """Where a data-bin's bytes are (file ranges, or the bytes of an ``openjpeg``
        tile-header bin), or ``None`` if the codestream has no such bin."""
        try:
            if bin_class == PRECINCT:
                offsets, lengths = self.packets(*self.index.precinct_from_bin_id(bin_id))
                return _coalesce(zip(offsets, lengths))
            if bin_class == MAIN_HEADER and bin_id == 0:
                return self.main_header
            if bin_class == METADATA and bin_id == 0:
                return ()
            if bin_class in (TILE_HEADER, TILE) and 0 <= bin_id < len(self._tiles):
                return self.tile_header(bin_id) if bin_class == TILE_HEADER else self._tiles[bin_id]
        except KeyError:
            pass
        return None

    def length(self, bin_class: int, bin_id: int) -> int | None:
        """Full length of a data-bin, or ``None`` if there is no such bin.

        Suitable as ``bin_lengths`` for :func:`~imageshare.protocols.jpip.cachemodel.apply_spec`.
        Never reads the codestream (``need=`` asks for the length of every bin).
        """
        if bin_class == TILE_HEADER and 0 <= bin_id < len(self._tiles):
            return self.tile_header_length(bin_id)
        ranges = self.ranges(bin_class, bin_id)
        return None if ranges is None else _source_length(ranges)

    def content(self, bin_class: int, bin_id: int, codestream: bytes | bytearray | memoryview) -> bytes:
        """The full bytes of a data-bin, gathered from the codestream file's bytes."""
        ranges = self.ranges(bin_class, bin_id)
        if ranges is None:
            raise KeyError(f"no data-bin {bin_id} of class {bin_class}")
        if isinstance(ranges, bytes):
            return ranges
        view = memoryview(codestream)
        return b"".join(view[offset : offset + length] for offset, length in ranges)

    def keys(self, csn: int, *, jpt: bool = False) -> Iterator[BinKey]:
        """Every data-bin of the codestream (JPP: precinct and tile-header bins; JPT: tile bins)."""
        yield (METADATA, csn, 0)
        yield (MAIN_HEADER, csn, 0)
        index = self.index
        count = index.num_tiles
        if jpt:
            for t in range(count):
                yield (TILE, csn, t)
            return
        for t in range(count):
            yield (TILE_HEADER, csn, t)
        for tile in index.tiles:
            for c in range(index.num_components):
                for s in range(tile.precincts_in_component(c)):
                    yield (PRECINCT, csn, tile.index + (c + s * index.num_components) * count)

    def num_bins(self, *, jpt: bool = False) -> int:
        """Number of data-bins :meth:`keys` yields."""
        tiles = self.index.num_tiles
        return 2 + (tiles if jpt else tiles + self.precinct_bins)


# --- planning ------------------------------------------------------------------------


def _source_length(source: Ranges | bytes) -> int:
    return len(source) if isinstance(source, bytes) else sum(n for _, n in source)


def _header_piece(
    bin_class: int, csn: int, bin_id: int, source: Ranges | bytes, model: CacheModel
) -> Piece | None:
    """The rest of a header bin, complete (possibly empty), unless the client has it all."""
    key = (bin_class, csn, bin_id)
    if model.is_complete(key):
        return None
    length = _source_length(source)
    held = min(model.held(key), length)
    rest = source[held:] if isinstance(source, bytes) else _slice(source, held, length)
    return Piece(bin_class, csn, bin_id, held, length - held, True, rest)


def _packet_ranges(
    offsets: list[int], lengths: list[int], cumulative: list[int], start: int, stop: int
) -> Ranges:
    """File ranges of bytes ``[start, stop)`` of a precinct bin."""
    out = []
    j = bisect.bisect_right(cumulative, start) - 1
    while j < len(lengths) and cumulative[j] < stop:
        lo, hi = max(start, cumulative[j]), min(stop, cumulative[j + 1])
        if lo < hi:
            out.append((offsets[j] + lo - cumulative[j], hi - lo))
        j += 1
    return _coalesce(out)


def _precinct_pieces(
    bins: TargetBins, index: CodestreamIndex, selected: Sequence[tuple[int, int, int, int]],
    layers: int, model: CacheModel, csn: int,
) -> Iterator[Piece]:  # fmt: skip
    """Packets of the window, layer by layer, resolution ascending, then component, tile, precinct."""
    prepared = []
    # A stable sort keeps tiles ascending and precincts in raster order within (r, c).
    for t, c, r, p in sorted(selected, key=lambda q: (q[2], q[1])):
        bin_id = index.precinct_bin_id(t, c, r, p)
        if model.is_complete((PRECINCT, csn, bin_id)):
            continue
        offsets, lengths = bins.packets(t, c, r, p)
        cumulative = [0]
        for n in lengths:
            cumulative.append(cumulative[-1] + n)
        prepared.append((bin_id, offsets, lengths, cumulative))
    for layer in range(layers):
        for bin_id, offsets, lengths, cumulative in prepared:
            last = len(lengths) - 1
            if layer > last:
                continue  # a tile with fewer layers
            held = model.held((PRECINCT, csn, bin_id))
            start, stop = max(cumulative[layer], held), cumulative[layer + 1]
            if start < stop:
                source = _packet_ranges(offsets, lengths, cumulative, start, stop)
                yield Piece(PRECINCT, csn, bin_id, start, stop - start, layer == last, source, boundaries=(stop,))
            elif layer == last and held >= cumulative[-1]:
                # Every byte is held but the client was never told the bin is complete.
                yield Piece(PRECINCT, csn, bin_id, cumulative[-1], 0, True, ())


def _tile_pieces(
    bins: TargetBins, index: CodestreamIndex, tiles: list[int], selected: Sequence[tuple[int, int, int, int]],
    layers: int, model: CacheModel, csn: int,
) -> Iterator[Piece]:  # fmt: skip
    """JPT: per tile, its tile-parts up to the one holding the last packet the window needs."""
    last_packet: dict[int, int] = {}
    for t, c, r, p in selected:
        n = min(layers, index.tiles[t].layers)
        if n:
            offsets, _ = bins.packets(t, c, r, p)
            # Within a precinct later layers always come later in the file.
            last_packet[t] = max(last_packet.get(t, -1), offsets[n - 1])
    for t in tiles:
        if t not in last_packet:
            continue
        key = (TILE, csn, t)
        if model.is_complete(key):
            continue
        ranges = bins.tile(t)
        needed = 0
        for part in index.tiles[t].parts:
            needed += part.length
            if part.offset <= last_packet[t] < part.end:
                break
        total = sum(n for _, n in ranges)
        held = model.held(key)
        if held < needed:
            yield Piece(TILE, csn, t, held, needed - held, needed == total, _slice(ranges, held, needed))


def _coalesce_pieces(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """Merge consecutive pieces of one bin that follow each other."""
    pending: Piece | None = None
    for piece in pieces:
        if pending is not None and pending.key == piece.key and pending.end == piece.bin_offset:
            assert not isinstance(pending.source, bytes) and not isinstance(piece.source, bytes)
            pending = attrs.evolve(
                pending, length=pending.length + piece.length, complete=piece.complete,
                source=_coalesce(pending.source + piece.source),
                boundaries=pending.boundaries + piece.boundaries,
            )  # fmt: skip
            continue
        if pending is not None:
            yield pending
        pending = piece
    if pending is not None:
        yield pending


def _split_pieces(pieces: Iterable[Piece], max_message: int) -> Iterator[Piece]:
    """Cut pieces whose message would exceed ``max_message`` bytes into consecutive ones."""
    for piece in pieces:
        while piece.header_length + piece.length > max_message:
            head = _fit(piece, max_message)
            if head is None:
                raise ValueError(f"max_message {max_message} cannot hold a message header")
            yield head
            piece = _tail(piece, head.length)
        yield piece


def _tail(piece: Piece, start: int) -> Piece:
    """The piece without its first ``start`` bytes."""
    if isinstance(piece.source, bytes):
        source: Ranges | bytes = piece.source[start:]
    else:
        source = _slice(piece.source, start, piece.length)
    return attrs.evolve(
        piece, bin_offset=piece.bin_offset + start, length=piece.length - start, source=source,
        boundaries=tuple(b for b in piece.boundaries if b > piece.bin_offset + start),
    )  # fmt: skip


def _fit(piece: Piece, room: int, align: bool = False) -> Piece | None:
    """The longest head of a piece whose message fits in ``room`` bytes, if any byte fits.

    With ``align``, a head that would cross a packet boundary is cut back to the last
    boundary it reaches (a head inside the first packet crosses none and stays).
    """
    if piece.length == 0:
        return None
    n = room - message_header_length(piece.bin_class, piece.csn, piece.bin_id, piece.bin_offset,
                                     min(piece.length, max(room, 0)), piece.aux)  # fmt: skip
    n = min(n, piece.length)
    # The length VBAS of a shorter body may be a byte shorter: try to use that byte.
    while n + 1 <= piece.length and attrs.evolve(piece, length=n + 1).header_length + n + 1 <= room:
        n += 1
    if align and n > 0:
        reached = [b - piece.bin_offset for b in piece.boundaries if b - piece.bin_offset <= n]
        if reached:
            n = max(reached)
    return piece.head(n) if n > 0 else None


def _image_done(bins: TargetBins, model: CacheModel, csn: int, jpt: bool, completed: set[BinKey]) -> bool:
    """Whether the model plus the bins completed by this plan hold every bin of the codestream."""
    held = sum(model.complete_count(cls, csn) for cls in (METADATA, MAIN_HEADER, TILE_HEADER, TILE, PRECINCT))
    if held + len(completed) < bins.num_bins(jpt=jpt):
        return False  # the common case, decided without looking at every bin
    return all(key in completed or model.is_complete(key) for key in bins.keys(csn, jpt=jpt))


def plan(
    bins: TargetBins,
    index: CodestreamIndex,
    resolved: ResolvedWindow,
    selected: Sequence[tuple[int, int, int, int]],
    model: CacheModel,
    csn: int,
    *,
    jpt: bool = False,
    byte_limit: int | None = None,
    align: bool = False,
    max_message: int | None = None,
) -> PlanResult:
    """The pieces to send for one request, in order, and the EOR reason.

    Order: metadata-bin 0 (empty and complete) unless held, the main header,
    the tile-header bins of the tiles in the window (empty ones too), then for
    every layer ``l < resolved.layers``, resolution ascending, component,
    tile and precinct: the bytes of packet ``l`` the client does not hold.
    Consecutive pieces of one bin are merged; a piece is complete only when it
    reaches the end of its bin (every layer, not just the requested ones).

    With ``jpt=True`` tile bins (class 4) replace tile-header and precinct bins:
    per tile in the window, ascending, the tile's tile-parts from the client's
    offset up to the end of the tile-part holding the last packet the window
    needs (all of a one-tile-part tile); tiles where the window needs no packet
    get nothing.

    With ``byte_limit``, pieces are added while the message headers (upper
    bound, :func:`message_header_length`) plus bodies fit; the first piece
    that does not fit is cut to fit (mid-packet) and the plan ends there.
    A tile-header bin in the ``openjpeg`` layout is never cut: OpenJPEG's rebuild
    puts an SOT marker code before every message of that bin, so it must come whole.

    Parameters
    ----------
    bins : TargetBins
    index : CodestreamIndex
    resolved : ResolvedWindow
        From :func:`~imageshare.protocols.jpip.window.resolve`.
    selected : sequence of (t, c, r, p)
        From :func:`~imageshare.protocols.jpip.window.precincts`.
    model : CacheModel
        What the client holds; not modified (see :func:`commit`).
    csn : int
        Codestream number for the pieces.
    jpt : bool
        Plan a JPT-stream instead of a JPP-stream.
    byte_limit : int, optional
        The request's ``len``.
    align : bool
        The request's ``align=yes``: a piece cut by the byte limit ends at a packet
        boundary if it crosses one.
    max_message : int, optional
        Largest message (header and body) a piece may make: http-tcp chunks carry whole
        messages of at most 65527 bytes, so longer pieces are cut into consecutive ones.

    Returns
    -------
    PlanResult
    """

    def pieces() -> Iterator[Piece]:
        if not model.is_complete((METADATA, csn, 0)):
            yield Piece(METADATA, csn, 0, 0, 0, True, b"")
        main = _header_piece(MAIN_HEADER, csn, 0, bins.main_header, model)
        if main is not None:
            yield main
        tiles = tiles_in_window(index, resolved)
        if jpt:
            yield from _tile_pieces(bins, index, tiles, selected, resolved.layers, model, csn)
            return
        for t in tiles:
            header = _header_piece(TILE_HEADER, csn, t, bins.tile_header(t), model)
            if header is not None:
                yield header
        yield from _precinct_pieces(bins, index, selected, resolved.layers, model, csn)

    out: list[Piece] = []
    size = 0
    coalesced = _coalesce_pieces(pieces())
    for piece in coalesced if max_message is None else _split_pieces(coalesced, max_message):
        cost = piece.header_length + piece.length
        if byte_limit is not None and size + cost > byte_limit:
            whole_only = piece.bin_class == TILE_HEADER and bins.tile_header_layout == OPENJPEG
            cut = None if whole_only else _fit(piece, byte_limit - size, align)
            if cut is not None:
                out.append(cut)
                size += cut.header_length + cut.length
            return PlanResult(tuple(out), EOR_BYTE_LIMIT, size)
        out.append(piece)
        size += cost
    completed = {piece.key for piece in out if piece.complete}
    reason = EOR_IMAGE_DONE if _image_done(bins, model, csn, jpt, completed) else EOR_WINDOW_DONE
    return PlanResult(tuple(out), reason, size)


def commit(model: CacheModel, pieces: Iterable[Piece]) -> None:
    """Record in the model that these pieces reached the transport, in order.

    Call it as bytes go out (a piece cut short can be committed as
    ``piece.head(n)``), so that a response interrupted by a pre-empting request
    or a closed connection leaves the model exact. A piece that starts beyond
    what the model holds is ignored: the model only records leading bytes.
    """
    for piece in pieces:
        key = piece.key
        if piece.bin_offset > model.held(key):
            continue
        model.add(key, piece.end, piece.complete)
