"""The PDU framer: every refusal, any split of the stream, nothing read past a limit."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from imageshare.protocols.dicom.pduguard import (
    ABORT,
    INVALID_PARAMETER_VALUE,
    MAX_ASSOCIATE_RQ,
    MAX_COMMAND,
    PDATA_OVERHEAD,
    REASON_NOT_SPECIFIED,
    UNEXPECTED_PDU,
    UNRECOGNIZED_PDU,
    PduFramer,
    Refusal,
    abort_pdu,
    max_pdata_length,
)

MAX_PDATA = 1024
MAX_OBJECT = 4096


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def pdv(fragment: bytes, *, command: bool, last: bool, context_id: int = 1) -> bytes:
    return struct.pack(">LBB", len(fragment) + 2, context_id, int(command) | int(last) << 1) + fragment


def associate_rq(extra: int = 40) -> bytes:
    """An A-ASSOCIATE-RQ of the right shape (the framer does not read its items)."""
    fixed = b"\x00\x01\x00\x00" + b"IMAGESHARE".ljust(16) + b"SCU".ljust(16) + bytes(32)
    return pdu(0x01, fixed + b"\x10" * extra)


def message(dataset: bytes, *, fragment: int = 500) -> list[bytes]:
    """A C-STORE-like message as P-DATA-TF PDUs: one command PDV, the data set in fragments."""
    pdus = [pdu(0x04, pdv(b"c" * 80, command=True, last=True))]
    pieces = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
    for i, piece in enumerate(pieces):
        pdus.append(pdu(0x04, pdv(piece, command=False, last=i == len(pieces) - 1)))
    return pdus


RELEASE_RQ = pdu(0x05, bytes(4))
PEER_ABORT = pdu(0x07, bytes(4))


def framer(**kw: int) -> PduFramer:
    return PduFramer(max_pdata=kw.pop("max_pdata", MAX_PDATA), max_object_size=kw.pop("max_object_size", MAX_OBJECT), **kw)


def valid_stream() -> bytes:
    return b"".join([associate_rq(), *message(b"d" * 3000), *message(b"e" * 4096), RELEASE_RQ])


def feed(f: PduFramer, data: bytes, sizes: list[int] | None = None) -> Refusal | None:
    """Feed ``data`` in pieces of the given sizes (cycled), or whole."""
    if not sizes:
        return f.receive(data)
    pos, i = 0, 0
    while pos < len(data):
        step = max(1, sizes[i % len(sizes)])
        refusal = f.receive(data[pos : pos + step])
        if refusal is not None:
            return refusal
        pos += step
        i += 1
    return None


def test_a_valid_association_passes_whole_and_byte_by_byte() -> None:
    """Request, two messages and a release pass, whole or one byte at a time; the request is seen complete."""
    data = valid_stream()
    for sizes in (None, [1]):
        f = framer()
        assert feed(f, data, sizes) is None
        assert f.associate_received
        assert f.received == len(data)


def test_associate_received_only_once_the_whole_request_is_in() -> None:
    """The request counts as received with its last byte, not before."""
    rq = associate_rq()
    f = framer()
    assert f.receive(rq[:-1]) is None
    assert not f.associate_received
    assert f.receive(rq[-1:]) is None
    assert f.associate_received


@given(st.lists(st.integers(1, 700), min_size=1, max_size=40))
def test_any_split_of_valid_pdus_passes(sizes: list[int]) -> None:
    """However the stream is cut into reads, valid PDUs pass and the count matches."""
    data = valid_stream()
    f = framer()
    assert feed(f, data, sizes) is None
    assert f.associate_received and f.received == len(data)


@given(
    st.lists(st.binary(max_size=MAX_OBJECT), min_size=1, max_size=4),
    st.integers(1, MAX_PDATA - 6 - 2),
    st.lists(st.integers(1, 300), min_size=1, max_size=10),
)
def test_any_message_sizes_within_limits_pass(datasets: list[bytes], fragment: int, sizes: list[int]) -> None:
    """Messages of any size up to max_object_size, in any fragment size that fits a PDU, pass under any split."""
    data = associate_rq() + b"".join(b"".join(message(d, fragment=fragment)) for d in datasets) + PEER_ABORT
    assert feed(framer(), data, sizes) is None


REFUSALS = [
    # (what, stream, A-ABORT reason, claimed length)
    ("unknown PDU type", header(0x08, 10), UNRECOGNIZED_PDU, 10),
    ("unknown PDU type 0", header(0x00, 4), UNRECOGNIZED_PDU, 4),
    ("HTTP instead of DICOM", b"GET / HTTP/1.1\r\n", UNRECOGNIZED_PDU, int.from_bytes(b"T / ", "big")),
    ("A-ASSOCIATE-AC to an acceptor", header(0x02, 100), UNEXPECTED_PDU, 100),
    ("A-ASSOCIATE-RJ to an acceptor", header(0x03, 4), UNEXPECTED_PDU, 4),
    ("A-ASSOCIATE-RQ claiming 4 GiB", header(0x01, 0xFFFFFFFF), INVALID_PARAMETER_VALUE, 0xFFFFFFFF),
    ("A-ASSOCIATE-RQ claiming 500 MiB", header(0x01, 500 << 20), INVALID_PARAMETER_VALUE, 500 << 20),
    ("A-ASSOCIATE-RQ one byte over", header(0x01, MAX_ASSOCIATE_RQ + 1), INVALID_PARAMETER_VALUE, MAX_ASSOCIATE_RQ + 1),
    ("A-ASSOCIATE-RQ too short", header(0x01, 10), INVALID_PARAMETER_VALUE, 10),
    ("second A-ASSOCIATE-RQ", associate_rq() + associate_rq(), UNEXPECTED_PDU, len(associate_rq()) - 6),
    ("P-DATA-TF before the request", pdu(0x04, pdv(b"x", command=True, last=True)), UNEXPECTED_PDU, 7),
    ("A-RELEASE-RQ before the request", RELEASE_RQ, UNEXPECTED_PDU, 4),
    ("A-RELEASE-RQ of length 5", associate_rq() + header(0x05, 5), INVALID_PARAMETER_VALUE, 5),
    ("A-RELEASE-RP claiming 4 GiB", associate_rq() + header(0x06, 0xFFFFFFFF), INVALID_PARAMETER_VALUE, 0xFFFFFFFF),
    ("A-ABORT claiming 4 GiB", header(0x07, 0xFFFFFFFF), INVALID_PARAMETER_VALUE, 0xFFFFFFFF),
    ("P-DATA-TF claiming 4 GiB", associate_rq() + header(0x04, 0xFFFFFFFF), INVALID_PARAMETER_VALUE, 0xFFFFFFFF),
    ("P-DATA-TF one byte over max_pdu", associate_rq() + header(0x04, MAX_PDATA + 1), INVALID_PARAMETER_VALUE, MAX_PDATA + 1),
    ("P-DATA-TF without a PDV", associate_rq() + pdu(0x04, b"\x00\x00"), INVALID_PARAMETER_VALUE, 2),
    ("PDV item shorter than its header", associate_rq() + pdu(0x04, struct.pack(">LBB", 1, 1, 3)), INVALID_PARAMETER_VALUE, 1),
    ("PDV item past its PDU", associate_rq() + pdu(0x04, struct.pack(">LBB", 100, 1, 3) + b"x" * 20), INVALID_PARAMETER_VALUE, 100),
    (
        "PDV header across the PDU end",
        associate_rq() + pdu(0x04, pdv(b"x", command=True, last=True) + b"\x00\x00"),
        INVALID_PARAMETER_VALUE,
        None,
    ),
]


@pytest.mark.parametrize("what, stream, reason, claimed", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(what: str, stream: bytes, reason: int, claimed: int | None) -> None:
    """Each malformed, unexpected or oversized PDU is refused with its A-ABORT reason, whole or byte by byte."""
    for sizes in (None, [1]):
        refusal = feed(framer(), stream, sizes)
        assert refusal is not None, what
        assert refusal.abort_reason == reason
        assert refusal.claimed_length == claimed


def test_refused_on_the_header_alone() -> None:
    """A header claiming 4 GiB is refused with its sixth byte: no body is needed, none is awaited."""
    f = framer()
    assert f.receive(header(0x01, 0xFFFFFFFF)[:5]) is None
    refusal = f.receive(header(0x01, 0xFFFFFFFF)[5:])
    assert refusal is not None and refusal.pdu_type == 0x01
    assert "longer than" in refusal.reason


def test_refusal_is_final() -> None:
    """After a refusal every further call returns it again and counts no bytes."""
    f = framer()
    first = f.receive(header(0x09, 4))
    assert first is not None
    assert f.receive(associate_rq()) is first
    assert f.received == 0


def test_data_set_over_max_object_size_across_pdus() -> None:
    """Fragments are summed across PDUs; the fragment that passes the limit is refused at its PDV header."""
    f = framer()
    assert f.receive(associate_rq()) is None
    for p in message(b"z" * MAX_OBJECT)[:-1]:  # all but the last fragment: under the limit
        assert f.receive(p) is None
    over = pdu(0x04, pdv(b"z" * 500, command=False, last=True))
    refusal = f.receive(over[:12])  # the PDU and PDV headers only
    assert refusal is not None
    assert refusal.abort_reason == REASON_NOT_SPECIFIED
    assert refusal.claimed_length is not None and refusal.claimed_length > MAX_OBJECT
    assert "max_object_size" in refusal.reason


def test_data_set_count_restarts_after_the_last_fragment() -> None:
    """Two messages each under the limit pass although together they are over it."""
    data = associate_rq() + b"".join(message(b"a" * MAX_OBJECT)) + b"".join(message(b"b" * MAX_OBJECT))
    assert framer().receive(data) is None


def test_command_set_over_its_limit() -> None:
    """A command set that never ends is refused once past MAX_COMMAND."""
    f = framer(max_pdata=1 << 16)
    assert f.receive(associate_rq()) is None
    chunk = pdu(0x04, pdv(b"c" * 60000, command=True, last=False))
    refusal = None
    for _ in range(MAX_COMMAND // 60000 + 2):
        refusal = f.receive(chunk)
        if refusal is not None:
            break
    assert refusal is not None and "command set" in refusal.reason


def test_unlimited_max_pdu_is_bounded_by_the_object_size() -> None:
    """With max_pdu 0 a P-DATA-TF may hold a whole object and its command, not more."""
    limit = max_pdata_length(0, MAX_OBJECT)
    assert limit == MAX_OBJECT + PDATA_OVERHEAD
    assert max_pdata_length(16384, MAX_OBJECT) == 16384
    f = PduFramer(max_pdata=limit, max_object_size=MAX_OBJECT)
    assert f.receive(associate_rq()) is None
    assert f.receive(header(0x04, limit + 1)) is not None


def test_peer_abort_is_accepted_any_time() -> None:
    """An A-ABORT of the right length is fine before and after the request."""
    assert framer().receive(PEER_ABORT) is None
    assert framer().receive(associate_rq() + PEER_ABORT) is None


def test_abort_pdu_bytes() -> None:
    """Our A-ABORT is 07 00, length 4, two reserved bytes, source 2 and the reason (PS3.8 9.3.8)."""
    assert abort_pdu(INVALID_PARAMETER_VALUE) == bytes.fromhex("0700 00000004 0000 02 06")
    assert abort_pdu(0)[0] == ABORT


@given(st.sampled_from(REFUSALS), st.lists(st.integers(1, 50), min_size=1, max_size=10))
def test_refusal_does_not_depend_on_the_split(case: tuple[str, bytes, int, int | None], sizes: list[int]) -> None:
    """The same stream is refused the same way however it is cut into reads."""
    _, stream, reason, claimed = case
    refusal = feed(framer(), stream, sizes)
    assert refusal is not None and (refusal.abort_reason, refusal.claimed_length) == (reason, claimed)


@given(st.binary(max_size=300), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_garbage_never_raises(data: bytes, sizes: list[int]) -> None:
    """Arbitrary bytes, before or after a request, give a verdict and never an exception."""
    for prefix in (b"", associate_rq()):
        f = framer()
        feed(f, prefix + data, sizes)
        assert f.received <= len(prefix + data)
