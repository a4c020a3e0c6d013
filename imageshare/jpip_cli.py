"""
``imageshare-jpip``: fetch a view of an image over JPIP and save it.

    imageshare-jpip URL [--fsiz W,H] [--roff X,Y] [--rsiz W,H] [--layers N] [--len BYTES]
                        [--stream K] [--session] [--transport http|http-tcp]
                        -o out.png|out.npy|out.j2c

URL names the target: ``http://host:8080/jpip?target=<SOP Instance UID>`` or
``http://host:8080/jpip/<SOP Instance UID>``. With ``--session`` the client opens a JPIP
session (``cnew=http``) and later requests of the same process reuse it; ``--len`` fetches
in byte-limited pieces until the view is complete. ``--transport http-tcp`` (implies
``--session``) asks for ``cnew=http-tcp,http``: requests stay on HTTP, the data comes on an
auxiliary TCP connection (ISO/IEC 15444-9 Annex G) when the server grants it, else in the
HTTP bodies as with ``http``. The output is the decoded view
(``.npy``: samples as decoded; ``.png``: scaled to 8 bits per sample), or the rebuilt
codestream itself (``.j2c``).

Blocking code for a command line, not for the server.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from imageshare.codestream.index import packet_layout
from imageshare.protocols.jpip.client import MAIN_HEADER, ClientCache
from imageshare.protocols.jpip.messages import Eor, JppError, Message, StreamParser


class JpipTransportError(ConnectionError):
    """The http-tcp data channel failed: it could not be opened, the server closed it or
    fell silent for longer than the timeout, or what it sent breaks the chunk framing."""


_CHUNK_HEADER = 8  # length (header included), low 16 bits of the qid, repeat count, 24-bit sequence number


class _Pending:
    """A request whose data is still expected on the aux channel."""

    def __init__(self) -> None:
        self.parser = StreamParser()  # one JPP stream per request, across its chunks
        self.seq = 0  # sequence number the next chunk must carry


class JpipClient:
    """A blocking JPIP client with a client-side cache: requests over HTTP, data in the HTTP
    body (``http``) or on an auxiliary TCP connection (``http-tcp``, ISO/IEC 15444-9 Annex G)."""

    def __init__(self, url: str, *, session: bool = False, transport: str = "http", timeout: float = 60) -> None:
        if transport not in ("http", "http-tcp"):
            raise ValueError(f"unknown transport {transport!r} (http or http-tcp)")
        parts = urllib.parse.urlsplit(url)
        fields = dict(urllib.parse.parse_qsl(parts.query))
        path = parts.path
        if "target" not in fields and "/jpip/" in path:
            path, target = path.split("/jpip/", 1)
            path += "/jpip"
            fields["target"] = urllib.parse.unquote(target)
        if "target" not in fields:
            raise ValueError("the URL names no target (…/jpip?target=UID or …/jpip/UID)")
        self._endpoint = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self._host = parts.hostname or "localhost"
        self._tls = parts.scheme == "https"
        self._fields = fields
        self._session = session or transport == "http-tcp"  # a channel is what http-tcp names
        self._offer = "http-tcp,http" if transport == "http-tcp" else "http"
        self._timeout = timeout
        self._qid = 0
        self._aux: socket.socket | None = None
        self._aux_buffer = bytearray()
        self._aux_received = False  # whether the server sent anything yet (tells a refused cid)
        self._pending: dict[int, _Pending] = {}  # by qid, oldest first (the server answers in order)
        self.cid: str | None = None
        self.transport: str | None = None  # the granted transport; None while stateless
        self.cache = ClientCache()
        self.last_headers: dict[str, str] = {}

    def __enter__(self) -> JpipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, **window: Any) -> int:
        """One request; the messages (from the HTTP body, or from the aux channel once http-tcp
        is granted) go to the cache. Returns the EOR reason.

        Raises
        ------
        urllib.error.HTTPError
            For a 4xx/5xx reply.
        JpipTransportError
            If the http-tcp channel cannot be opened, closes, stays silent for ``timeout``
            seconds, or breaks the chunk framing.
        """
        fields = {k: v for k, v in window.items() if v is not None}
        if self.cid is not None:
            fields["cid"] = self.cid
        else:
            fields.update(self._fields)
            if self._session:
                fields["cnew"] = self._offer
        self._qid += 1
        qid = fields["qid"] = self._qid  # http-tcp chunks name their request by it
        if self.transport == "http-tcp":
            # Expected before the reply: if the HTTP side times out the data may still come,
            # and the next request must then recognise (and cache) it.
            self._pending[qid] = _Pending()
        try:
            self.last_headers, body = self._get(fields)
        except urllib.error.HTTPError:
            self._pending.pop(qid, None)  # an error reply sends nothing on the channel
            raise
        echoed = self.last_headers.get("jpip-qid")
        if echoed is not None and echoed.strip() != str(qid):
            raise JpipTransportError(f"the reply names request {echoed}, not {qid}")
        cnew = self.last_headers.get("jpip-cnew")
        if cnew:
            granted = dict(item.split("=", 1) for item in cnew.split(",") if "=" in item)
            self.cid, self.transport = granted.get("cid"), granted.get("transport")
            if self.transport == "http-tcp":
                self._open_aux(granted.get("auxport"))
        if self.transport != "http-tcp":
            return self._parse_body(body)
        if body:
            raise JpipTransportError(f"an http-tcp reply carries a {len(body)}-byte body; data belongs on the channel")
        self._pending.setdefault(qid, _Pending())
        return self._read_aux(qid)

    def fetch(self, *, limit_rounds: int = 10_000, **window: Any) -> int:
        """Request until the view is complete (repeating while the byte limit cuts it)."""
        reason = self.request(**window)
        rounds = 1
        while reason == 4 and rounds < limit_rounds:
            if self.cid is None:
                raise RuntimeError("a byte-limited view needs a session (--session)")
            reason = self.request(**window)
            rounds += 1
        return reason

    def close(self) -> None:
        """Close the channel (``cclose``) and the aux connection. Best effort: a server that
        cannot be reached drops the idle session on its own, so HTTP errors are ignored."""
        try:
            if self.cid is not None:
                self._qid += 1
                try:
                    # Whatever the server sends for this request on the aux channel is not
                    # awaited; last_headers keep describing the view (view() reads them).
                    self._get({"cid": self.cid, "cclose": self.cid, "qid": self._qid})
                except OSError:  # URLError, HTTPError, timeouts
                    pass
        finally:
            self.cid = None
            self._pending.clear()
            self._drop_aux()

    def view(self, stream: int = 0, fsiz: str | None = None) -> tuple[np.ndarray, bytes]:
        """The decoded view at the frame size the server granted (``JPIP-fsiz``, else the
        ``fsiz`` asked for: the server only says when it changed it), and the codestream."""
        from imageshare.transcode import openjpeg  # OpenJPEG only where decoding happens

        codestream = self.cache.rebuild(stream)
        siz, _ = packet_layout(self.cache.bin(MAIN_HEADER, stream, 0))
        fsiz = self.last_headers.get("jpip-fsiz") or fsiz
        reduce = 0
        if fsiz:
            fx = int(fsiz.split(",")[0])
            while reduce < 32 and -(-siz.xsiz // (1 << reduce)) - -(-siz.xosiz // (1 << reduce)) > fx:
                reduce += 1
        return openjpeg.decode(codestream, reduce=reduce), codestream

    # -- helpers ---------------------------------------------------------------------------

    def _get(self, fields: dict[str, Any]) -> tuple[dict[str, str], bytes]:
        """One HTTP request: its headers (lower-cased names) and body (4xx/5xx raise HTTPError)."""
        url = self._endpoint + "?" + "&".join(f"{k}={urllib.parse.quote(str(v), safe=',')}" for k, v in fields.items())
        with urllib.request.urlopen(url, timeout=self._timeout) as response:
            return {k.lower(): v for k, v in response.headers.items()}, response.read()

    def _parse_body(self, body: bytes) -> int:
        parser = StreamParser()
        reason = 0
        for m in parser.feed(body):
            if isinstance(m, Message):
                self.cache.add(m)
            elif isinstance(m, Eor):
                reason = m.reason
        parser.close()
        return reason

    def _open_aux(self, auxport: str | None) -> None:
        """Connect the data channel and name it: ``cid CRLF`` (the server answers nothing)."""
        if self._aux is not None:
            return
        if auxport is None or not auxport.isdigit() or not 0 < int(auxport) < 65536:
            raise JpipTransportError(f"http-tcp granted without a usable auxport ({auxport!r})")
        assert self.cid is not None
        try:
            sock = socket.create_connection((self._host, int(auxport)), timeout=self._timeout)
        except OSError as e:
            raise JpipTransportError(f"cannot connect the http-tcp channel to {self._host}:{auxport}: {e}") from e
        try:
            # Acknowledgements are 8-byte writes: with Nagle's algorithm one waits for the
            # server's delayed ACK (about 40 ms) whenever the previous one is unanswered.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:  # same trust as the HTTPS requests
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
            sock.sendall(self.cid.encode("ascii") + b"\r\n")
        except (OSError, UnicodeEncodeError) as e:
            sock.close()
            raise JpipTransportError(f"cannot open the http-tcp channel to {self._host}:{auxport}: {e}") from e
        self._aux = sock
        self._aux_buffer.clear()
        self._aux_received = False

    def _drop_aux(self) -> None:
        if self._aux is not None:
            try:
                self._aux.close()
            finally:
                self._aux = None
                self._aux_buffer.clear()

    def _fail(self, reason: str) -> JpipTransportError:
        """The channel is unusable from now on (its byte stream can no longer be trusted)."""
        self._drop_aux()
        self._pending.clear()
        return JpipTransportError(reason)

    def _fill(self, n: int) -> None:
        """Buffer at least ``n`` bytes from the aux channel without consuming them, so that a
        timeout leaves the stream in step (a later call resumes); EOF or an error ends it."""
        if self._aux is None:
            raise JpipTransportError("the http-tcp channel is closed")
        while len(self._aux_buffer) < n:  # each pass adds at least one byte or raises
            try:
                data = self._aux.recv(max(n - len(self._aux_buffer), 65536))
            except TimeoutError as e:
                raise JpipTransportError(f"no data on the http-tcp channel for {self._timeout} s") from e
            except OSError as e:
                raise self._fail(f"the http-tcp channel failed: {e}") from e
            if not data:
                if not self._aux_received:
                    raise self._fail("the server closed the http-tcp channel without sending data"
                                     " (it did not accept the channel id?)")
                raise self._fail("the server closed the http-tcp channel in the middle of a response")
            self._aux_received = True
            self._aux_buffer += data

    def _read_aux(self, qid: int) -> int:
        """Read chunks until the EOR of request ``qid``; acknowledge each; return the EOR reason.

        Chunks of older requests still pending (left by a timeout) come first, as the server
        answers in request order; their messages are cached too. The loop is bounded: every
        chunk must carry its request's next sequence number (24 bits), every read is bounded
        by the timeout, and EOF raises.
        """
        while qid in self._pending:
            self._fill(_CHUNK_HEADER)
            header = bytes(self._aux_buffer[:_CHUNK_HEADER])
            length, low_qid = struct.unpack(">HH", header[:4])
            seq = int.from_bytes(header[5:], "big")
            owner = next((q for q in self._pending if q & 0xFFFF == low_qid), None)
            if length < _CHUNK_HEADER or owner is None:
                raise self._fail(f"bad http-tcp chunk header {header.hex()} (waiting for request {qid})")
            pending = self._pending[owner]
            if seq != pending.seq:
                raise self._fail(f"http-tcp chunk {seq} of request {owner} came instead of chunk {pending.seq}")
            self._fill(length)
            body = bytes(self._aux_buffer[_CHUNK_HEADER:length])
            del self._aux_buffer[:length]
            pending.seq += 1
            assert self._aux is not None  # _fill returned
            try:
                self._aux.sendall(header)  # the ack: the header echoed; the server's window needs it
            except OSError as e:
                raise self._fail(f"cannot acknowledge on the http-tcp channel: {e}") from e
            try:
                items = pending.parser.feed(body)
            except JppError as e:
                raise self._fail(f"bad JPP stream on the http-tcp channel: {e}") from e
            if pending.parser.pending:
                raise self._fail(f"http-tcp chunk {seq} of request {owner} ends inside a message")
            for i, item in enumerate(items):
                if isinstance(item, Message):
                    self.cache.add(item)
                    continue
                if i != len(items) - 1:
                    raise self._fail(f"data after the end of response {owner} in its chunk")
                del self._pending[owner]
                if owner == qid:
                    return item.reason
        raise JpipTransportError(f"request {qid} is not awaiting data")  # unreachable: failures raise


def _pair(text: str) -> str:
    a, b = (int(v) for v in text.split(","))
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError("expected two non-negative integers")
    return f"{a},{b}"


def _to_png(view: np.ndarray, path: Path) -> None:
    from PIL import Image

    lo, hi = float(view.min()), float(view.max())
    scaled = np.zeros(view.shape, dtype=np.uint8) if hi <= lo else np.rint((view - lo) * 255.0 / (hi - lo))
    Image.fromarray(scaled.astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imageshare-jpip", description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--fsiz", type=_pair, help="frame size wanted, W,H (rounded down to a resolution level)")
    p.add_argument("--roff", type=_pair, help="region offset X,Y in that frame")
    p.add_argument("--rsiz", type=_pair, help="region size W,H in that frame")
    p.add_argument("--layers", type=int, help="quality layers wanted")
    p.add_argument("--len", type=int, help="bytes per request (fetches until complete; needs --session)")
    p.add_argument("--stream", type=int, default=None, help="codestream: frame number - 1")
    p.add_argument("--session", action="store_true", help="open a JPIP session (cnew=http)")
    p.add_argument("--transport", choices=("http", "http-tcp"), default="http",
                   help="http-tcp: data on an auxiliary TCP connection if granted (implies --session)")
    p.add_argument("-o", "--output", type=Path, required=True, help="out.png, out.npy or out.j2c")
    a = p.parse_args(argv)
    if a.output.suffix not in (".png", ".npy", ".j2c", ".j2k"):
        p.error("the output must end in .png, .npy or .j2c")
    with JpipClient(a.url, session=a.session, transport=a.transport) as client:
        client.fetch(fsiz=a.fsiz, roff=a.roff, rsiz=a.rsiz, layers=a.layers, len=a.len, stream=a.stream)
    view, codestream = client.view(a.stream or 0, a.fsiz)
    if a.roff or a.rsiz:
        x, y = (int(v) for v in client.last_headers.get("jpip-roff", a.roff or "0,0").split(","))
        size = client.last_headers.get("jpip-rsiz", a.rsiz)
        if size:
            w, h = (int(v) for v in size.split(","))
            view = view[y : y + h, x : x + w]
    if a.output.suffix in (".j2c", ".j2k"):
        a.output.write_bytes(codestream)
    elif a.output.suffix == ".npy":
        np.save(a.output, view)
    else:
        _to_png(view, a.output)
    print(f"{a.output}: {view.shape[1]}x{view.shape[0]} from {client.cache.size} bytes"
          f" over {client.transport or 'http (stateless)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
