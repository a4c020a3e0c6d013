"""JPP-stream and JPT-stream messages (ISO/IEC 15444-9 Annex A and D.3).

Sans-IO: :class:`MessageEncoder` turns values into header bytes and
:class:`StreamParser` turns received bytes into :class:`Message` / :class:`Eor`
values; nothing here touches a socket or imports Twisted.

Wire summary (``docs/jpip.md`` section 3)::

    message = Bin-ID [Class] [CSn] Msg-Offset Msg-Length [Aux] body
    eor     = 00 R VBAS(body-length) body

Every integer except the EOR reason byte is a VBAS (big-endian 7-bit groups,
bit 7 set on all bytes but the last). The first Bin-ID byte also carries the
2-bit indicator (which of Class/CSn are present) and the completeness bit, so
it holds only 4 bits of the in-class id.

The parser is written for hostile input (OpenJPEG #1617/#1658 were overreads in
exactly this code): every VBAS is capped in length, every message length is
checked against a configurable maximum before the body is awaited, and the
body is only sliced once all its bytes have arrived. Any malformed stream
raises :class:`JppError` and nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

__all__ = [
    "JppError",
    "BinClass",
    "EorReason",
    "MAX_VBAS_BYTES",
    "DEFAULT_MAX_MESSAGE_LENGTH",
    "encode_vbas",
    "decode_vbas",
    "MessageEncoder",
    "Message",
    "Eor",
    "StreamParser",
    "parse_stream",
]

#: Longest VBAS the parser accepts: 9 bytes carry 63 bits (JHV caps at 9 too);
#: a Bin-ID of this length carries a 60-bit in-class id.
MAX_VBAS_BYTES = 9

#: Default cap on one message body (and one EOR body). Our own messages are far
#: smaller; the cap bounds how much a peer can make the parser buffer.
DEFAULT_MAX_MESSAGE_LENGTH = 1 << 24

_INDICATOR_INHERIT_BOTH = 1  # 01: Class and CSn absent
_INDICATOR_CLASS_ONLY = 2  # 10: Class present, CSn absent
_INDICATOR_BOTH = 3  # 11: Class and CSn present
_COMPLETE_BIT = 0x10
_CONTINUE_BIT = 0x80


class JppError(ValueError):
    """A JPP-/JPT-stream is malformed, truncated or exceeds a configured limit.

    The message says what is wrong and at which byte offset of the current
    parse buffer.
    """


class BinClass(enum.IntEnum):
    """Message class identifiers on the wire (Table A.2).

    Odd classes are the "extended" forms whose header carries an Aux VBAS.
    Kakadu's internal class codes (0..4) are different; never use them here.
    """

    PRECINCT = 0
    EXT_PRECINCT = 1
    TILE_HEADER = 2
    TILE = 4
    EXT_TILE = 5
    MAIN_HEADER = 6
    METADATA = 8


class EorReason(enum.IntEnum):
    """Reason codes of the End-Of-Response message (D.3; KDU and ESA agree)."""

    IMAGE_DONE = 1
    WINDOW_DONE = 2
    WINDOW_CHANGE = 3
    BYTE_LIMIT = 4
    QUALITY_LIMIT = 5
    SESSION_LIMIT = 6
    RESPONSE_LIMIT = 7
    UNSPECIFIED = 0xFF


def encode_vbas(n: int) -> bytes:
    """Encode a non-negative integer as a minimal VBAS.

    Parameters
    ----------
    n
        The value; any size.

    Returns
    -------
    bytes
        ``00`` for 0, ``7F`` for 127, ``81 00`` for 128, ``82 2C`` for 300.

    Raises
    ------
    ValueError
        If `n` is negative.
    """
    if n < 0:
        raise ValueError(f"VBAS value must be non-negative, got {n}")
    groups = [n & 0x7F]
    n >>= 7
    while n:
        groups.append((n & 0x7F) | _CONTINUE_BIT)
        n >>= 7
    return bytes(reversed(groups))


def _read_vbas(
    buf: bytes | bytearray | memoryview, pos: int, max_bytes: int
) -> tuple[int, int] | None:
    """Read a VBAS at `pos`; ``None`` if the buffer ends first (more may come).

    Leading ``0x80`` groups are accepted (ESA writes them), but the VBAS as a
    whole may not exceed `max_bytes`.
    """
    end = len(buf)
    value = 0
    for i in range(max_bytes):
        if pos + i >= end:
            return None
        b = buf[pos + i]
        value = (value << 7) | (b & 0x7F)
        if not b & _CONTINUE_BIT:
            return value, pos + i + 1
    raise JppError(f"VBAS at offset {pos} is longer than {max_bytes} bytes")


def decode_vbas(
    buf: bytes | bytearray | memoryview, pos: int, max_bytes: int = MAX_VBAS_BYTES
) -> tuple[int, int]:
    """Decode one VBAS from a complete buffer.

    Parameters
    ----------
    buf
        The bytes holding the VBAS.
    pos
        Offset of its first byte.
    max_bytes
        Longest VBAS accepted.

    Returns
    -------
    tuple of int
        ``(value, offset just after the VBAS)``.

    Raises
    ------
    JppError
        If `pos` is outside `buf`, the VBAS runs past the end of `buf`, or it is
        longer than `max_bytes`.
    """
    if not 0 <= pos < len(buf):
        raise JppError(f"VBAS offset {pos} is outside a buffer of {len(buf)} bytes")
    result = _read_vbas(buf, pos, max_bytes)
    if result is None:
        raise JppError(f"VBAS at offset {pos} is truncated")
    return result


def _encode_bin_id(indicator: int, complete: bool, bin_id: int) -> bytes:
    """Encode the Bin-ID VBAS: the first byte gives 4 id bits, later ones 7."""
    if bin_id < 0:
        raise ValueError(f"in-class id must be non-negative, got {bin_id}")
    extra = 0  # bytes after the first
    while bin_id >> (4 + 7 * extra):
        extra += 1
    first = (indicator << 5) | ((bin_id >> (7 * extra)) & 0x0F)
    if complete:
        first |= _COMPLETE_BIT
    if extra:
        first |= _CONTINUE_BIT
    out = bytearray([first])
    for k in range(extra - 1, -1, -1):
        group = (bin_id >> (7 * k)) & 0x7F
        out.append(group | (_CONTINUE_BIT if k else 0))
    return bytes(out)


class MessageEncoder:
    """Writes message headers, omitting Class/CSn when they can be inherited.

    The encoder remembers the class and codestream of the previous header.
    :meth:`reset` forgets them, so the next header carries both explicitly
    (indicator ``11``); call it at the start of every response and every
    http-tcp chunk, as Kakadu does, so that each can be parsed on its own
    (clients disagree about the state at stream start).
    """

    def __init__(self) -> None:
        self._class: BinClass | None = None
        self._csn: int | None = None

    def reset(self) -> None:
        """Make the next header carry explicit Class and CSn."""
        self._class = None
        self._csn = None

    def header(
        self,
        bin_class: BinClass | int,
        csn: int,
        bin_id: int,
        offset: int,
        length: int,
        complete: bool,
        aux: int | None = None,
    ) -> bytes:
        """Encode one message header; the caller writes `length` body bytes after it.

        Parameters
        ----------
        bin_class
            Wire class of the data-bin.
        csn
            Codestream index.
        bin_id
            In-class identifier; any size.
        offset
            Offset of the body inside the data-bin.
        length
            Number of body bytes that follow the header.
        complete
            Whether the body ends with the last byte of the data-bin.
        aux
            Required for odd (extended) classes, forbidden for the others.

        Returns
        -------
        bytes
            The header.

        Raises
        ------
        ValueError
            On an unknown class, a negative number, or an `aux` that does not
            match the class.
        """
        cls = BinClass(bin_class)
        if cls & 1 and aux is None:
            raise ValueError(f"class {cls.name} needs an Aux value")
        if not cls & 1 and aux is not None:
            raise ValueError(f"class {cls.name} has no Aux field")
        if csn < 0:
            raise ValueError(f"codestream index must be non-negative, got {csn}")
        if self._csn != csn:
            # There is no indicator for "CSn changed, class inherited".
            indicator = _INDICATOR_BOTH
        elif self._class != cls:
            indicator = _INDICATOR_CLASS_ONLY
        else:
            indicator = _INDICATOR_INHERIT_BOTH
        parts = [_encode_bin_id(indicator, complete, bin_id)]
        if indicator >= _INDICATOR_CLASS_ONLY:
            parts.append(encode_vbas(cls))
        if indicator == _INDICATOR_BOTH:
            parts.append(encode_vbas(csn))
        parts.append(encode_vbas(offset))
        parts.append(encode_vbas(length))
        if aux is not None:
            parts.append(encode_vbas(aux))
        self._class = cls
        self._csn = csn
        return b"".join(parts)

    def eor(self, reason: EorReason | int, body: bytes = b"") -> bytes:
        """Encode an End-Of-Response message: ``00 R VBAS(len(body)) body``.

        The EOR does not change the inherited Class/CSn state.

        Raises
        ------
        ValueError
            If `reason` does not fit in one byte.
        """
        if not 0 <= reason <= 0xFF:
            raise ValueError(f"EOR reason must fit in a byte, got {reason}")
        return b"\x00" + bytes([reason]) + encode_vbas(len(body)) + body


@attrs.frozen
class Message:
    """One data-bin message, with Class and CSn resolved (never inherited).

    Attributes
    ----------
    bin_class
        Wire class.
    csn
        Codestream index.
    bin_id
        In-class identifier.
    offset
        Offset of `data` inside the data-bin.
    complete
        Whether `data` ends with the last byte of the data-bin.
    aux
        The Aux value of extended classes, else ``None``.
    data
        The message body.
    """

    bin_class: BinClass
    csn: int
    bin_id: int
    offset: int
    complete: bool
    aux: int | None
    data: bytes

    @property
    def end(self) -> int:
        """Offset just after `data` inside the data-bin (the bin length if complete)."""
        return self.offset + len(self.data)


@attrs.frozen
class Eor:
    """An End-Of-Response message.

    Attributes
    ----------
    reason
        An :class:`EorReason`, or the raw byte if the code is unknown (a client
        should still stop at an EOR it cannot name).
    body
        Server-specific body; usually empty.
    """

    reason: EorReason | int
    body: bytes = b""


def _reason(code: int) -> EorReason | int:
    try:
        return EorReason(code)
    except ValueError:
        return code


_KNOWN_CLASSES = frozenset(int(c) for c in BinClass)


class StreamParser:
    """Incremental JPP-/JPT-stream parser.

    Feed it bytes as they arrive; it returns every message completed so far
    and keeps the partial rest. Class and CSn are inherited from the previous
    message; at the very start they are undefined, so a first message that
    would inherit them is an error (OpenJPEG's reading; Kakadu and we never
    send one). An EOR leaves the inherited state unchanged.

    After a :class:`JppError` the parser is unusable: every later call raises.

    Parameters
    ----------
    max_message_length
        Largest message or EOR body accepted.
    max_vbas_bytes
        Longest VBAS accepted (the Bin-ID included).
    """

    def __init__(
        self,
        *,
        max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        max_vbas_bytes: int = MAX_VBAS_BYTES,
    ) -> None:
        self._max_length = max_message_length
        self._max_vbas = max_vbas_bytes
        self._buf = bytearray()
        # Do not re-parse until at least this many bytes are buffered, so a
        # large body arriving in small pieces costs linear time.
        self._need = 1
        self._class: BinClass | None = None
        self._csn: int | None = None
        self._failed: JppError | None = None

    @property
    def pending(self) -> int:
        """Number of buffered bytes that do not yet form a whole message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message | Eor]:
        """Add received bytes; return the messages they complete, in order.

        Raises
        ------
        JppError
            If the stream is malformed (now or at an earlier call).
        """
        if self._failed is not None:
            raise JppError(f"stream already failed: {self._failed}")
        self._buf += data
        out: list[Message | Eor] = []
        if len(self._buf) < self._need:
            return out
        pos = 0
        try:
            while pos < len(self._buf):
                parsed = self._parse_one(pos)
                if parsed is None:
                    # _parse_one noted an absolute size; rebase it on what stays.
                    self._need -= pos
                    break
                item, pos = parsed
                out.append(item)
        except JppError as e:
            self._failed = e
            raise
        del self._buf[:pos]
        if not self._buf:
            self._need = 1
        return out

    def close(self) -> None:
        """Declare the end of the stream.

        Raises
        ------
        JppError
            If a partial message is still buffered.
        """
        if self._failed is not None:
            raise JppError(f"stream already failed: {self._failed}")
        if self._buf:
            raise JppError(f"stream ends inside a message ({len(self._buf)} bytes left over)")

    def _vbas(self, pos: int) -> tuple[int, int] | None:
        return _read_vbas(self._buf, pos, self._max_vbas)

    def _incomplete(self, total: int) -> None:
        """Note that the buffer must reach `total` bytes before parsing again."""
        self._need = total

    def _parse_one(self, start: int) -> tuple[Message | Eor, int] | None:
        """Parse the message at `start`; ``None`` (after noting what is needed) if incomplete."""
        buf = self._buf
        first = buf[start]
        if first == 0:
            return self._parse_eor(start)
        indicator = (first >> 5) & 0x03
        if indicator == 0:
            raise JppError(f"reserved Bin-ID indicator 00 at offset {start}")
        complete = bool(first & _COMPLETE_BIT)
        bin_id = first & 0x0F
        pos = start + 1
        if first & _CONTINUE_BIT:
            # The Bin-ID continues as ordinary 7-bit groups.
            too_long = JppError(f"Bin-ID at offset {start} is longer than {self._max_vbas} bytes")
            if self._max_vbas < 2:
                raise too_long
            try:
                rest = _read_vbas(buf, pos, self._max_vbas - 1)
            except JppError:
                raise too_long from None
            if rest is None:
                self._incomplete(len(buf) + 1)
                return None
            tail, pos = rest
            nbytes = pos - start - 1
            bin_id = (bin_id << (7 * nbytes)) | tail

        if indicator >= _INDICATOR_CLASS_ONLY:
            r = self._vbas(pos)
            if r is None:
                self._incomplete(len(buf) + 1)
                return None
            code, pos = r
            if code not in _KNOWN_CLASSES:
                raise JppError(f"unknown message class {code} at offset {start}")
            bin_class = BinClass(code)
        elif self._class is None:
            raise JppError(f"message at offset {start} inherits a class but none is defined yet")
        else:
            bin_class = self._class

        if indicator == _INDICATOR_BOTH:
            r = self._vbas(pos)
            if r is None:
                self._incomplete(len(buf) + 1)
                return None
            csn, pos = r
        elif self._csn is None:
            raise JppError(
                f"message at offset {start} inherits a codestream index but none is defined yet"
            )
        else:
            csn = self._csn

        fields: list[int] = []
        for _ in range(3 if bin_class & 1 else 2):
            r = self._vbas(pos)
            if r is None:
                self._incomplete(len(buf) + 1)
                return None
            value, pos = r
            fields.append(value)
        offset, length = fields[0], fields[1]
        aux = fields[2] if bin_class & 1 else None
        if length > self._max_length:
            raise JppError(
                f"message at offset {start} claims {length} bytes, more than the "
                f"limit of {self._max_length}"
            )
        end = pos + length
        if end > len(buf):
            self._incomplete(end)
            return None
        self._class = bin_class
        self._csn = csn
        msg = Message(
            bin_class=bin_class,
            csn=csn,
            bin_id=bin_id,
            offset=offset,
            complete=complete,
            aux=aux,
            data=bytes(buf[pos:end]),
        )
        return msg, end

    def _parse_eor(self, start: int) -> tuple[Eor, int] | None:
        buf = self._buf
        if start + 2 > len(buf):
            self._incomplete(start + 2)
            return None
        reason = buf[start + 1]
        r = self._vbas(start + 2)
        if r is None:
            self._incomplete(len(buf) + 1)
            return None
        length, pos = r
        if length > self._max_length:
            raise JppError(
                f"EOR at offset {start} claims {length} body bytes, more than the "
                f"limit of {self._max_length}"
            )
        end = pos + length
        if end > len(buf):
            self._incomplete(end)
            return None
        return Eor(_reason(reason), bytes(buf[pos:end])), end


def parse_stream(
    data: bytes | bytearray | memoryview | Iterable[bytes],
    *,
    max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
    max_vbas_bytes: int = MAX_VBAS_BYTES,
) -> list[Message | Eor]:
    """Parse a whole stream (one buffer, or an iterable of pieces).

    Returns
    -------
    list
        The messages and EORs in order.

    Raises
    ------
    JppError
        If the stream is malformed or ends inside a message.
    """
    parser = StreamParser(max_message_length=max_message_length, max_vbas_bytes=max_vbas_bytes)
    if isinstance(data, (bytes, bytearray, memoryview)):
        out = parser.feed(data)
    else:
        out = [item for piece in data for item in parser.feed(piece)]
    parser.close()
    return out
