"""Tests of :mod:`imageshare.protocols.jpip.messages`: VBAS, headers, EOR, parser.

Byte-exact expectations come from ``docs/jpip.md`` 3.1-3.5 (the worked
response and the OpenJPEG/Kakadu encoder agreement on ``A0 14``); the rest is
encoder -> parser round trips and fuzzing that damaged input raises
``JppError`` and nothing else.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageshare.protocols.jpip.messages import (
    MAX_VBAS_BYTES,
    BinClass,
    Eor,
    EorReason,
    JppError,
    Message,
    MessageEncoder,
    StreamParser,
    decode_vbas,
    encode_vbas,
    parse_stream,
)

# ---------------------------------------------------------------- VBAS


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "81 00"),
        (300, "82 2c"),
        (16383, "ff 7f"),
        (16384, "81 80 00"),
        (2**32, "90 80 80 80 00"),
    ],
)
def test_vbas_known_encodings(value: int, wire: str) -> None:
    """encode_vbas gives the minimal big-endian 7-bit-group form; decode_vbas inverts it."""
    assert encode_vbas(value) == bytes.fromhex(wire)
    assert decode_vbas(bytes.fromhex(wire), 0) == (value, len(bytes.fromhex(wire)))


@given(st.integers(min_value=0, max_value=2**63 - 1), st.binary(max_size=4), st.binary(max_size=4))
def test_vbas_round_trip_inside_a_buffer(value: int, before: bytes, after: bytes) -> None:
    """A VBAS decodes to its value at any offset and reports the offset after it."""
    wire = encode_vbas(value)
    assert decode_vbas(before + wire + after, len(before)) == (value, len(before) + len(wire))


def test_vbas_leading_zero_groups_accepted() -> None:
    """Leading 0x80 groups (ESA writes them) are legal and change nothing."""
    assert decode_vbas(b"\x80\x80\x05", 0) == (5, 3)
    assert decode_vbas(b"\x80\x00", 0) == (0, 2)
    assert decode_vbas(b"\x80" * 8 + b"\x7f", 0) == (127, 9)


def test_vbas_too_long_rejected() -> None:
    """A VBAS longer than max_bytes (default 9) is an error, not a big number."""
    with pytest.raises(JppError, match="longer"):
        decode_vbas(b"\x80" * MAX_VBAS_BYTES + b"\x01", 0)
    with pytest.raises(JppError):
        decode_vbas(b"\x81\x00", 0, max_bytes=1)


def test_vbas_truncated_or_out_of_range_offset() -> None:
    """A VBAS running off the end, or an offset outside the buffer, raises JppError."""
    with pytest.raises(JppError, match="truncated"):
        decode_vbas(b"\x81\x80", 0)
    with pytest.raises(JppError):
        decode_vbas(b"\x01", 1)
    with pytest.raises(JppError):
        decode_vbas(b"\x01", -1)
    with pytest.raises(JppError):
        decode_vbas(b"", 0)


def test_vbas_negative_not_encodable() -> None:
    """encode_vbas refuses negative values (a programming error, not a stream error)."""
    with pytest.raises(ValueError):
        encode_vbas(-1)


# ---------------------------------------------------------------- encoder


def test_worked_response_bytes() -> None:
    """The session-start example of jpip.md 3.5 is reproduced byte for byte."""
    enc = MessageEncoder()
    enc.reset()
    assert enc.header(BinClass.METADATA, 0, 0, 0, 0, True) == bytes.fromhex("70 08 00 00 00")
    assert enc.header(BinClass.MAIN_HEADER, 0, 0, 0, 181, True) == bytes.fromhex("50 06 00 81 35")
    assert enc.header(BinClass.TILE_HEADER, 0, 0, 0, 0, True) == bytes.fromhex("50 02 00 00")
    assert enc.header(BinClass.PRECINCT, 0, 0, 0, 7, False) == bytes.fromhex("40 00 00 07")
    assert enc.header(BinClass.PRECINCT, 0, 1, 0, 9, False) == bytes.fromhex("21 00 09")
    assert enc.eor(EorReason.WINDOW_DONE) == bytes.fromhex("00 02 00")


def test_precinct_20_inherited_not_last() -> None:
    """Id 20 with class inherited and not last encodes its Bin-ID as A0 14 (OJ and KDU agree)."""
    enc = MessageEncoder()
    enc.header(BinClass.PRECINCT, 0, 0, 0, 0, False)
    assert enc.header(BinClass.PRECINCT, 0, 20, 0, 0, False)[:2] == bytes.fromhex("a0 14")


def test_indicator_choice() -> None:
    """11 after reset or when CSn changes, 10 when only the class changes, 01 otherwise."""
    enc = MessageEncoder()
    assert enc.header(BinClass.PRECINCT, 3, 0, 0, 0, False)[0] >> 5 == 0b11
    assert enc.header(BinClass.PRECINCT, 3, 0, 0, 0, False)[0] >> 5 == 0b01
    assert enc.header(BinClass.TILE_HEADER, 3, 0, 0, 0, False)[0] >> 5 == 0b10
    assert enc.header(BinClass.TILE_HEADER, 4, 0, 0, 0, False)[0] >> 5 == 0b11
    assert enc.header(BinClass.PRECINCT, 4, 0, 0, 0, False)[0] >> 5 == 0b10
    enc.eor(EorReason.WINDOW_DONE)  # an EOR does not disturb inheritance
    assert enc.header(BinClass.PRECINCT, 4, 0, 0, 0, False)[0] >> 5 == 0b01
    enc.reset()
    assert enc.header(BinClass.PRECINCT, 4, 0, 0, 0, False)[0] >> 5 == 0b11


@pytest.mark.parametrize(
    ("bin_id", "nbytes"),
    [(0, 1), (15, 1), (16, 2), (2**11 - 1, 2), (2**11, 3), (2**60 - 1, 9), (2**60, 10)],
)
def test_bin_id_lengths(bin_id: int, nbytes: int) -> None:
    """A k-byte Bin-ID carries 7k-3 bits of in-class id."""
    enc = MessageEncoder()
    enc.header(BinClass.PRECINCT, 0, 0, 0, 0, False)
    header = enc.header(BinClass.PRECINCT, 0, bin_id, 0, 0, False)
    assert len(header) == nbytes + 2  # + offset + length


def test_huge_bin_id_round_trips_with_a_larger_vbas_cap() -> None:
    """Ids beyond the default 60-bit parser cap encode, and parse when the cap is raised."""
    enc = MessageEncoder()
    wire = enc.header(BinClass.PRECINCT, 0, 2**100 + 12345, 0, 1, True) + b"x"
    with pytest.raises(JppError):
        parse_stream(wire)
    [msg] = parse_stream(wire, max_vbas_bytes=16)
    assert isinstance(msg, Message) and msg.bin_id == 2**100 + 12345


def test_aux_presence_follows_class_parity() -> None:
    """Odd (extended) classes need Aux and carry it last in the header; even ones reject it."""
    enc = MessageEncoder()
    assert enc.header(BinClass.EXT_PRECINCT, 0, 0, 0, 0, False, aux=3) == bytes.fromhex("60 01 00 00 00 03")
    with pytest.raises(ValueError):
        enc.header(BinClass.EXT_TILE, 0, 0, 0, 0, False)
    with pytest.raises(ValueError):
        enc.header(BinClass.PRECINCT, 0, 0, 0, 0, False, aux=1)


def test_encoder_rejects_bad_values() -> None:
    """Unknown classes, negative numbers and non-byte EOR reasons are ValueErrors."""
    enc = MessageEncoder()
    with pytest.raises(ValueError):
        enc.header(3, 0, 0, 0, 0, False)
    for args in [(0, -1, 0, 0, 0), (0, 0, -1, 0, 0), (0, 0, 0, -1, 0), (0, 0, 0, 0, -1)]:
        with pytest.raises(ValueError):
            enc.header(*args, complete=False)
    with pytest.raises(ValueError):
        enc.eor(256)


def test_eor_with_body() -> None:
    """An EOR body is length-prefixed with a VBAS and comes back from the parser."""
    wire = MessageEncoder().eor(EorReason.BYTE_LIMIT, b"why")
    assert wire == b"\x00\x04\x03why"
    assert parse_stream(wire) == [Eor(EorReason.BYTE_LIMIT, b"why")]


# ---------------------------------------------------------------- parser


def test_parse_worked_response() -> None:
    """The jpip.md 3.5 stream parses to resolved messages, inherited fields filled in."""
    main = bytes(range(181))
    wire = (
        bytes.fromhex("70 08 00 00 00 50 06 00 81 35")
        + main
        + bytes.fromhex("50 02 00 00 40 00 00 02")
        + b"ab"
        + bytes.fromhex("21 00 01")
        + b"c"
        + bytes.fromhex("00 02 00")
    )
    assert parse_stream(wire) == [
        Message(BinClass.METADATA, 0, 0, 0, True, None, b""),
        Message(BinClass.MAIN_HEADER, 0, 0, 0, True, None, main),
        Message(BinClass.TILE_HEADER, 0, 0, 0, True, None, b""),
        Message(BinClass.PRECINCT, 0, 0, 0, False, None, b"ab"),
        Message(BinClass.PRECINCT, 0, 1, 0, False, None, b"c"),
        Eor(EorReason.WINDOW_DONE),
    ]
    assert parse_stream(wire)[1].end == 181  # type: ignore[union-attr]


@pytest.mark.parametrize("first", ["20 00 00", "40 00 00 00", "a0 14 00 00"])
def test_inheritance_undefined_at_stream_start(first: str) -> None:
    """A first message that would inherit Class or CSn is an error (state starts undefined)."""
    with pytest.raises(JppError, match="inherits"):
        parse_stream(bytes.fromhex(first))


def test_inheritance_survives_eor() -> None:
    """An EOR does not reset the inherited Class/CSn (it is not a data-bin message)."""
    wire = bytes.fromhex("60 04 07 00 00 00 01 00 20 00 00")
    assert parse_stream(wire) == [
        Message(BinClass.TILE, 7, 0, 0, False, None, b""),
        Eor(EorReason.IMAGE_DONE),
        Message(BinClass.TILE, 7, 0, 0, False, None, b""),
    ]


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ("10 00 00", "indicator"),  # indicator 00 but not an EOR
        ("80 00 00", "indicator"),
        ("60 03 00 00 00", "class 3"),
        ("60 07 00 00 00", "class 7"),
        ("60 09 00 00 00", "class 9"),
        ("e0 80 80 80 80 80 80 80 80 00 00 00 00 00", "Bin-ID"),
        ("60 00 00 00 " + "80 " * 9 + "01", "VBAS"),
    ],
)
def test_malformed_headers(wire: str, match: str) -> None:
    """Reserved indicators, unknown classes and over-long VBAS raise JppError."""
    with pytest.raises(JppError, match=match):
        parse_stream(bytes.fromhex(wire))


def test_length_checked_before_body_arrives() -> None:
    """An oversized Msg-Length fails as soon as the header is in, not after buffering it."""
    parser = StreamParser(max_message_length=1000)
    header = MessageEncoder().header(BinClass.PRECINCT, 0, 0, 0, 1001, False)
    with pytest.raises(JppError, match="limit"):
        parser.feed(header)
    with pytest.raises(JppError, match="limit"):
        StreamParser(max_message_length=10).feed(b"\x00\x01\x0b")


def test_parser_unusable_after_error() -> None:
    """After a JppError every further feed/close raises too (the framing is lost)."""
    parser = StreamParser()
    with pytest.raises(JppError):
        parser.feed(b"\x10")
    with pytest.raises(JppError):
        parser.feed(b"\x00\x02\x00")
    with pytest.raises(JppError):
        parser.close()


def test_incremental_feed_and_pending() -> None:
    """Partial input is kept across feed() calls; close() rejects a partial message."""
    enc = MessageEncoder()
    wire = enc.header(BinClass.MAIN_HEADER, 0, 0, 0, 5, True) + b"hello" + enc.eor(1)
    parser = StreamParser()
    out: list[Message | Eor] = []
    for i in range(len(wire) - 1):
        out += parser.feed(wire[i : i + 1])
    assert out == [Message(BinClass.MAIN_HEADER, 0, 0, 0, True, None, b"hello")]
    assert parser.pending == 2
    with pytest.raises(JppError, match="left over"):
        parser.close()
    assert parser.feed(wire[-1:]) == [Eor(EorReason.IMAGE_DONE)]
    assert parser.pending == 0
    parser.close()


def test_large_body_in_small_pieces() -> None:
    """A 4 MiB body fed in 4 KiB pieces is parsed once, without quadratic re-parsing."""
    body = bytes(4 << 20)
    wire = MessageEncoder().header(BinClass.PRECINCT, 0, 0, 0, len(body), True) + body
    parser = StreamParser()
    out: list[Message | Eor] = []
    for i in range(0, len(wire), 4096):
        out += parser.feed(memoryview(wire)[i : i + 4096])
    assert len(out) == 1 and out[0].data == body  # type: ignore[union-attr]


def test_unknown_eor_reason_kept() -> None:
    """EOR codes outside the known set come back as plain ints rather than failing."""
    assert parse_stream(b"\x00\x09\x00") == [Eor(9)]
    assert parse_stream(b"\x00\xff\x00") == [Eor(EorReason.UNSPECIFIED)]


# ---------------------------------------------------------------- round trips

_CLASSES = st.sampled_from(list(BinClass))


@st.composite
def _messages(draw: st.DrawFn) -> Message | Eor:
    if draw(st.integers(0, 9)) == 0:
        return Eor(draw(st.sampled_from(list(EorReason)) | st.integers(0, 255)), draw(st.binary(max_size=5)))
    cls = draw(_CLASSES)
    return Message(
        bin_class=cls,
        csn=draw(st.integers(0, 3) | st.integers(0, 2**32)),
        bin_id=draw(st.integers(0, 40) | st.integers(0, 2**60 - 1)),
        offset=draw(st.integers(0, 300) | st.integers(0, 2**62)),
        complete=draw(st.booleans()),
        aux=draw(st.integers(0, 2**40)) if cls & 1 else None,
        data=draw(st.binary(max_size=40)),
    )


def _encode(items: list[Message | Eor], resets: set[int]) -> bytes:
    enc = MessageEncoder()
    out = bytearray()
    for i, item in enumerate(items):
        if i in resets:
            enc.reset()
        if isinstance(item, Eor):
            out += enc.eor(item.reason, item.body)
        else:
            out += enc.header(
                item.bin_class, item.csn, item.bin_id, item.offset, len(item.data), item.complete, item.aux
            )
            out += item.data
    return bytes(out)


@given(st.lists(_messages(), max_size=25), st.sets(st.integers(1, 25)), st.data())
def test_round_trip_with_random_splits(items: list[Message | Eor], resets: set[int], data: st.DataObject) -> None:
    """Whatever the encoder writes, the parser reads back exactly, however the bytes are split."""
    wire = _encode(items, resets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    parser = StreamParser()
    out: list[Message | Eor] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)]):
        out += parser.feed(wire[a:b])
    parser.close()
    assert out == items


@given(st.lists(_messages(), min_size=1, max_size=10), st.data())
def test_truncated_streams_raise_only_jpp_error(items: list[Message | Eor], data: st.DataObject) -> None:
    """A cut stream yields a prefix of the messages or JppError, never another exception."""
    wire = _encode(items, set())
    cut = data.draw(st.integers(0, len(wire) - 1))
    try:
        out = parse_stream(wire[:cut])
    except JppError:
        return
    assert out == items[: len(out)]


@given(st.binary(max_size=200), st.integers(1, 64))
def test_garbage_raises_only_jpp_error(garbage: bytes, max_length: int) -> None:
    """Arbitrary bytes parse or raise JppError; nothing else escapes."""
    try:
        parse_stream(garbage, max_message_length=max_length)
    except JppError:
        pass


@given(st.lists(_messages(), max_size=6), st.binary(min_size=1, max_size=30), st.integers(0, 200))
def test_corrupted_streams_raise_only_jpp_error(items: list[Message | Eor], noise: bytes, at: int) -> None:
    """Valid streams with bytes spliced in parse or raise JppError; nothing else escapes."""
    wire = _encode(items, set())
    at = min(at, len(wire))
    try:
        parse_stream(wire[:at] + noise + wire[at:])
    except JppError:
        pass
