"""
Structural check of an encoded DICOM data set, before anything is stored.

pydicom reads a truncated data set without complaint (a value shorter than its length is
returned as it is), so a C-STORE whose data set was cut off would be acknowledged and
archived broken. This walker follows the element structure (explicit or implicit VR,
either byte order, nested sequences and encapsulated pixel data) and raises
:class:`MalformedDataset` if any length runs past the end, a delimiter is missing or
bytes are left over. It only reads tags and lengths, so it costs little next to receiving
the data. Pure: bytes in, exception or ``None`` out.
"""

from __future__ import annotations

import struct
import zlib

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_MAX_DEPTH = 64
#: Inflated size allowed when the caller gives none: the largest max_object_size the
#: configuration accepts, so that anything once received can be read back.
MAX_INFLATED = 1 << 36
_IN_CHUNK = 1 << 16  # compressed bytes handed to zlib at a time
_OUT_CHUNK = 1 << 20  # inflated bytes asked of zlib at a time


class MalformedDataset(ValueError):
    """The encoded data set is truncated or structurally invalid."""


class InflatedTooLarge(ValueError):
    """A deflated data set inflates to more than the limit it was given."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the data set inflates to more than {limit} bytes")
        self.limit = limit


def inflate(data: bytes | memoryview, limit: int = MAX_INFLATED) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set; see :func:`inflate_buffer`."""
    return bytes(inflate_buffer(data, limit))


def inflate_buffer(data: bytes | memoryview, limit: int = MAX_INFLATED) -> bytearray:
    """
    Inflate a Deflated Explicit VR Little Endian data set (raw deflate, PS3.5 A.5).

    The stream is inflated a piece at a time, so a deflate bomb costs at most ``limit``
    bytes (plus one piece) before it is refused: 2 MB of input can claim 2 GiB. The
    result is the buffer it grew in, without the copy :func:`inflate` makes into bytes.

    Raises
    ------
    InflatedTooLarge
        More than ``limit`` bytes would come out.
    MalformedDataset
        The stream is corrupt or ends early.
    """
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    view = memoryview(data).cast("B")
    try:
        for start in range(0, len(view), _IN_CHUNK):
            pending: bytes | memoryview = view[start : start + _IN_CHUNK]
            while True:
                asked = min(_OUT_CHUNK, limit - len(out) + 1)  # one byte over the limit tells
                piece = d.decompress(pending, asked)
                out += piece
                if len(out) > limit:
                    raise InflatedTooLarge(limit)
                before, pending = len(pending), d.unconsumed_tail
                # Done with this input once zlib kept none of it and had no more output
                # than asked; a full answer may mean more output is waiting.
                if d.eof or (not pending and len(piece) < asked):
                    break
                if not piece and len(pending) == before:
                    raise MalformedDataset("deflate stream makes no progress")
            if d.eof:
                break
        out += d.flush()
    except zlib.error as e:
        raise MalformedDataset(f"deflate stream is corrupt: {e}") from None
    if len(out) > limit:
        raise InflatedTooLarge(limit)
    if not d.eof:
        raise MalformedDataset("deflate stream is truncated")
    return out


class _Walker:
    def __init__(self, data: bytes | memoryview, implicit: bool, little: bool, wanted: frozenset[int] = frozenset()) -> None:
        self.wanted = wanted
        self.found: dict[int, tuple[bytes | None, int, int]] = {}
        self.data = memoryview(data)
        self.end = len(data)
        self.implicit = implicit
        e = "<" if little else ">"
        # Precompiled: this runs once per element of every received instance.
        self.tag_long = struct.Struct(e + "HHL")  # tag + 4-byte length (implicit VR, items)
        self.tag_vr_short = struct.Struct(e + "HH2sH")  # explicit VR, 2-byte length
        self.long = struct.Struct(e + "L")

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Return (tag, vr, length, value offset) of the element at ``pos``."""
        if pos + 8 > self.end:
            raise MalformedDataset(f"element header truncated at offset {pos}")
        group, elem, vr, short = self.tag_vr_short.unpack_from(self.data, pos)
        tag = group << 16 | elem
        if implicit or group == 0xFFFE:  # items and delimiters never have a VR
            return tag, None, self.tag_long.unpack_from(self.data, pos)[2], pos + 8
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise MalformedDataset(f"invalid VR {vr!r} at offset {pos}")
        if vr in _LONG_VRS:
            if pos + 12 > self.end:
                raise MalformedDataset(f"element header truncated at offset {pos}")
            return tag, vr, self.long.unpack_from(self.data, pos + 8)[0], pos + 12
        return tag, vr, short, pos + 8

    def dataset(self, pos: int, stop: int, depth: int, until_item_end: bool) -> int:
        """Walk elements from ``pos``; return the offset after the last one."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset("sequences nested too deeply")
        while pos < stop:
            tag, vr, length, value = self.header(pos, self.implicit)
            if depth == 0 and tag in self.wanted and length != _UNDEFINED:
                self.found[tag] = (vr, length, value)
            if tag == _ITEM_END:
                if not until_item_end:
                    raise MalformedDataset(f"unexpected item delimiter at offset {pos}")
                return value
            if tag in (_ITEM, _SEQ_END):
                raise MalformedDataset(f"unexpected item tag at offset {pos}")
            if length == _UNDEFINED:
                if tag == 0x7FE00010 or vr in (b"OB", b"OW"):
                    pos = self.fragments(value)
                elif vr in (None, b"SQ", b"UN"):
                    # Implicit VR or UN with undefined length is a sequence (PS3.5 6.2.2).
                    pos = self.items(value, self.end, depth + 1, delimited=True)
                else:
                    raise MalformedDataset(f"undefined length on VR {vr!r} at offset {pos}")
            else:
                if value + length > stop:
                    raise MalformedDataset(
                        f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end "
                        f"({length} bytes at offset {value}, {stop - value} left)"
                    )
                if vr == b"SQ" and length:
                    end = self.items(value, value + length, depth + 1, delimited=False)
                    if end != value + length:
                        raise MalformedDataset(f"sequence length mismatch at offset {pos}")
                pos = value + length
        if until_item_end:
            raise MalformedDataset("item delimiter missing")
        if pos != stop:
            raise MalformedDataset(f"element overruns its container at offset {pos}")
        return pos

    def items(self, pos: int, stop: int, depth: int, *, delimited: bool) -> int:
        """Walk the items of a sequence: up to its delimiter, or up to ``stop``."""
        while delimited or pos < stop:
            tag, _, length, value = self.header(pos, True)
            if delimited and tag == _SEQ_END:
                return value
            if tag != _ITEM:
                raise MalformedDataset(f"expected an item at offset {pos}")
            if length == _UNDEFINED:
                pos = self.dataset(value, stop, depth, until_item_end=True)
            else:
                if value + length > stop:
                    raise MalformedDataset(f"item runs past its sequence at offset {pos}")
                self.dataset(value, value + length, depth, until_item_end=False)
                pos = value + length
        return pos

    def fragments(self, pos: int) -> int:
        while True:
            tag, _, length, value = self.header(pos, True)
            if tag == _SEQ_END:
                return value
            if tag != _ITEM or length == _UNDEFINED:
                raise MalformedDataset(f"bad fragment item at offset {pos}")
            if value + length > self.end:
                raise MalformedDataset(f"pixel data fragment runs past the end at offset {pos}")
            pos = value + length


def check_dataset(
    data: bytes | memoryview, *, implicit_vr: bool, little_endian: bool, wanted: frozenset[int] = frozenset()
) -> dict[int, tuple[bytes | None, int, int]]:
    """
    Raise :class:`MalformedDataset` unless ``data`` is a complete, well-formed data set.

    ``data`` is the data set as encoded on the wire, without preamble or file meta
    information, already inflated for the deflated transfer syntax.

    Returns
    -------
    dict
        For each top-level tag in ``wanted`` that is present with a defined length:
        ``(VR or None for implicit VR, length, offset of the value)``. Reading just these
        values is much cheaper than parsing the whole data set.
    """
    if not data:
        raise MalformedDataset("the data set is empty")
    walker = _Walker(data, implicit_vr, little_endian, wanted)
    walker.dataset(0, len(data), 0, until_item_end=False)
    return walker.found
