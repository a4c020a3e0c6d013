"""The per-connection guard between the socket and pynetdicom, with a fake socket."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from imageshare.protocols.dicom.pduguard import (
    INVALID_PARAMETER_VALUE,
    REASON_NOT_SPECIFIED,
    PduFramer,
    Refusal,
    abort_pdu,
)
from imageshare.protocols.dicom.server import ConnectionGuard

RQ = struct.pack(">BBL", 1, 0, 68) + bytes(68)


class FakeSocket:
    """Records what the guard does to the socket; ``reads`` are what recv returns or raises."""

    def __init__(self, *reads: bytes | BaseException) -> None:
        self.reads = list(reads)
        self.sent: list[bytes] = []
        self.calls: list[str] = []

    def raw_recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.calls.append("recv")
        item = self.reads.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)

    def settimeout(self, value: float) -> None:
        self.calls.append(f"settimeout {value}")

    def shutdown(self, how: int) -> None:
        self.calls.append("shutdown")

    def close(self) -> None:
        self.calls.append("close")


def guard() -> tuple[ConnectionGuard, list[Refusal]]:
    refusals: list[Refusal] = []
    return ConnectionGuard(PduFramer(max_pdata=1024, max_object_size=4096), refusals.append, 60.0), refusals


def recv(g: ConnectionGuard, sock: FakeSocket) -> bytes:
    return g.recv(sock, sock.raw_recv, 4096, 0)  # type: ignore[arg-type]


def test_valid_bytes_pass_and_settle_the_negotiation() -> None:
    """The bytes of a request are handed on unchanged; once it is whole the guard is settled."""
    g, refusals = guard()
    sock = FakeSocket(RQ[:30], RQ[30:])
    assert recv(g, sock) == RQ[:30]
    assert g.negotiating and not g.settled.is_set()
    assert recv(g, sock) == RQ[30:]
    assert not g.negotiating and g.settled.is_set()
    assert not refusals and not sock.sent


def test_refusal_aborts_closes_and_reads_as_end_of_stream() -> None:
    """An oversized header: A-ABORT sent, socket shut and closed, b"" returned, reported once; no more reads."""
    g, refusals = guard()
    sock = FakeSocket(struct.pack(">BBL", 1, 0, 0xFFFFFFFF), b"never read")
    assert recv(g, sock) == b""
    assert sock.sent == [abort_pdu(INVALID_PARAMETER_VALUE)]
    assert sock.calls[-2:] == ["shutdown", "close"]
    assert len(refusals) == 1 and refusals[0].claimed_length == 0xFFFFFFFF
    assert g.dropped and g.settled.is_set()
    assert recv(g, sock) == b""
    assert sock.calls.count("recv") == 1


def test_stall_mid_pdu_is_refused() -> None:
    """A read that times out (the peer stopped inside a PDU) is a refusal, not an exception."""
    g, refusals = guard()
    sock = FakeSocket(RQ[:10], TimeoutError())
    assert recv(g, sock) == RQ[:10]
    assert recv(g, sock) == b""
    assert sock.sent == [abort_pdu(REASON_NOT_SPECIFIED)]
    assert "no data for 60 s" in refusals[0].reason


def test_drop_before_negotiation_shuts_down_without_abort() -> None:
    """The negotiation deadline shuts the socket (waking a blocked read) and sends nothing; reads then end."""
    g, refusals = guard()
    sock = FakeSocket(OSError("shut down under the read"))
    g.drop(sock, Refusal("no A-ASSOCIATE-RQ within 10 s", REASON_NOT_SPECIFIED))  # type: ignore[arg-type]
    assert sock.calls == ["shutdown"] and not sock.sent
    assert len(refusals) == 1 and g.settled.is_set()
    assert recv(g, sock) == b""
    g.drop(sock, Refusal("again", REASON_NOT_SPECIFIED))  # type: ignore[arg-type]
    assert len(refusals) == 1


def test_drop_after_negotiation_does_nothing() -> None:
    """A request completed just before the deadline fired is kept."""
    g, refusals = guard()
    sock = FakeSocket(RQ)
    recv(g, sock)
    g.drop(sock, Refusal("late", REASON_NOT_SPECIFIED))  # type: ignore[arg-type]
    assert "shutdown" not in sock.calls and not refusals and not g.dropped


def test_other_socket_errors_propagate() -> None:
    """A connection error that is not ours reaches pynetdicom, which handles it."""
    g, _ = guard()
    sock: Any = FakeSocket(ConnectionResetError())
    with pytest.raises(ConnectionResetError):
        recv(g, sock)
