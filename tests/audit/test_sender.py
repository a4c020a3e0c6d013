"""The syslog sender: order, octet counting, confirmation, resend after a loss, backoff."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from imageshare.audit.sender import SyslogSender, _StreamProtocol
from imageshare.audit.syslog import parse_frames


class FakeLink:
    framed = True

    def __init__(self) -> None:
        self.protocols: list[_StreamProtocol] = []
        self.refuse = 0

    async def connect(self) -> Any:
        if self.refuse:
            self.refuse -= 1
            return await fail(ConnectionRefusedError("refused"))
        proto = _StreamProtocol()
        proto.makeConnection(StringTransport())
        self.protocols.append(proto)
        return proto


class MemorySpool:
    def __init__(self) -> None:
        self.rows: list[tuple[int, bytes]] = []
        self.next = 1

    def add(self, body: bytes) -> None:
        self.rows.append((self.next, body))
        self.next += 1

    def batch(self, after: int) -> "Deferred[list[tuple[int, bytes]]]":
        return succeed([r for r in self.rows if r[0] > after][:2])

    def taken(self, last: int) -> "Deferred[None]":
        self.rows = [r for r in self.rows if r[0] > last]
        return succeed(None)


def _sender(link: FakeLink, spool: MemorySpool, clock: Clock) -> SyslogSender:
    sender = SyslogSender(link, spool.batch, spool.taken, clock, where="test", confirm_delay=1.0, retry_max=8)
    sender.startService()
    return sender


def _received(proto: _StreamProtocol) -> list[bytes]:
    frames, rest = parse_frames(proto.transport.value())
    assert rest == b""
    return frames


def test_sends_in_order_and_forgets_once_confirmed() -> None:
    """Frames go out oldest first; a message leaves the spool once the connection outlived the delay."""
    link, spool, clock = FakeLink(), MemorySpool(), Clock()
    for i in range(3):
        spool.add(b"m%d" % i)
    sender = _sender(link, spool, clock)
    proto = link.protocols[0]
    assert _received(proto) == [b"m0", b"m1"]
    assert len(spool.rows) == 3  # not confirmed yet
    clock.advance(1)
    assert [b for _, b in spool.rows] == [b"m2"]
    assert _received(proto) == [b"m0", b"m1", b"m2"]
    clock.advance(1)
    assert spool.rows == []
    spool.add(b"m3")
    sender.wake()
    assert _received(proto)[-1] == b"m3"
    clock.advance(1)
    sender.stopService()


def test_lost_connection_sends_again() -> None:
    """Messages written on a connection lost before confirmation are sent again on the next one."""
    link, spool, clock = FakeLink(), MemorySpool(), Clock()
    spool.add(b"a")
    spool.add(b"b")
    sender = _sender(link, spool, clock)
    first = link.protocols[0]
    first.connectionLost(None)
    clock.advance(1)
    assert len(spool.rows) == 2
    second = link.protocols[1]
    assert _received(second) == [b"a", b"b"]
    clock.advance(1)
    assert spool.rows == []
    sender.stopService()


def test_reconnects_with_backoff() -> None:
    """An unreachable repository is retried after 1, 2, 4 s... and the spool is kept meanwhile."""
    link, spool, clock = FakeLink(), MemorySpool(), Clock()
    link.refuse = 3
    spool.add(b"x")
    sender = _sender(link, spool, clock)
    assert not link.protocols
    clock.advance(1)
    clock.advance(2)
    assert not link.protocols
    clock.advance(4)
    assert _received(link.protocols[0]) == [b"x"]
    clock.advance(1)
    assert spool.rows == []
    sender.stopService()
    assert not clock.getDelayedCalls()
