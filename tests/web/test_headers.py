"""JPIP response header names as ISO/IEC 15444-9 spells them, through Twisted unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from imageshare.web.headers import WireCaseHeaders, wire_name
from imageshare.web.root import QuietSite

# 15444-9 D.2: "JPIP-" and the request field's name.
STANDARD = ("JPIP-tid", "JPIP-cnew", "JPIP-qid", "JPIP-fsiz", "JPIP-rsiz", "JPIP-roff", "JPIP-comps",
            "JPIP-stream", "JPIP-context", "JPIP-roi", "JPIP-layers", "JPIP-srate", "JPIP-metareq",
            "JPIP-len", "JPIP-quality", "JPIP-type", "JPIP-mset", "JPIP-cap", "JPIP-pref")


@pytest.mark.parametrize("name", STANDARD)
def test_every_jpip_header_comes_out_as_the_standard_spells_it(name: str) -> None:
    """Whatever case a JPIP header is set in, and however Twisted stores it, its wire name is
    the standard's."""
    for given in (name, name.lower(), name.upper(), name.title()):
        headers = WireCaseHeaders()
        headers.setRawHeaders(given.encode(), [b"1"])
        assert list(headers.getAllRawHeaders()) == [(name.encode(), [b"1"])]
    assert wire_name(name.title().encode()) == name.encode()


def test_other_headers_and_lookups_are_twisteds() -> None:
    """Non-JPIP names keep Twisted's spelling (ETag from its own table included); lookups
    stay case-insensitive; a copy keeps the respelling."""
    headers = WireCaseHeaders()
    for name in (b"content-type", b"etag", b"x-jpip-note", b"JPIP-cnew"):
        headers.setRawHeaders(name, [b"v"])
    assert [n for n, _ in headers.getAllRawHeaders()] == [b"Content-Type", b"ETag", b"X-Jpip-Note", b"JPIP-cnew"]
    assert headers.getRawHeaders(b"jpip-CNEW") == [b"v"] and headers.hasHeader("Jpip-Cnew")
    assert [n for n, _ in headers.copy().getAllRawHeaders()][-1] == b"JPIP-cnew"
    assert wire_name(b"Jpip") == b"Jpip" and wire_name(b"Jpipx-Tid") == b"Jpipx-Tid"


class Sets(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"jpip-cnew", b"cid=1,path=jpip,transport=http")
        request.setHeader(b"JPIP-fsiz", b"123,116")
        request.setHeader(b"content-type", b"image/jpp-stream")
        return b"x"


def test_the_site_writes_the_standard_spelling() -> None:
    """Through the real site, channel and Twisted's response writing (no socket): the header
    block holds JPIP-cnew and JPIP-fsiz byte for byte. This fails if Twisted stops writing
    response headers from ``getAllRawHeaders`` (the public API WireCaseHeaders relies on)."""
    site = QuietSite(Sets(), request_log=False, reactor=Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    head = transport.value().split(b"\r\n\r\n", 1)[0]
    assert b"\r\nJPIP-cnew: cid=1,path=jpip,transport=http\r\n" in head + b"\r\n", head
    assert b"\r\nJPIP-fsiz: 123,116\r\n" in head + b"\r\n" and b"\r\nContent-Type: image/jpp-stream" in head
    assert b"Jpip-" not in head
    channel.connectionLost(None)
