"""The blocking JPIP client over http-tcp (ISO/IEC 15444-9 Annex G), against a fake peer.

The fake is an HTTP server answering canned JPIP headers plus a raw TCP listener for the
auxiliary channel: it checks the handshake, sends chunks (8-byte header + whole JPP
messages) one at a time, waits for each acknowledgement and records everything the client
writes on the channel.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import queue
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

from imageshare.jpip_cli import JpipClient, JpipTransportError, main
from imageshare.protocols.jpip.messages import BinClass, MessageEncoder

CID = "JPHT-test-cid"
UID = "1.2.3.4"

#: A data-bin piece: (class, in-class id, offset, data, complete).
Piece = tuple[int, int, int, bytes, bool]


def header(length: int, qid: int, seq: int) -> bytes:
    """Chunk header: length with the header, low 16 bits of the qid, repeat 0, 24-bit seq."""
    return struct.pack(">HHB", length, qid & 0xFFFF, 0) + seq.to_bytes(3, "big")


def make_chunks(qid: int, groups: list[list[Piece]], reason: int) -> list[bytes]:
    """One chunk per group of pieces (the encoder reset per chunk); the EOR ends the last."""
    out = []
    groups = groups or [[]]
    for seq, group in enumerate(groups):
        enc = MessageEncoder()
        enc.reset()
        body = b"".join(enc.header(c, 0, i, off, len(d), done) + d for c, i, off, d, done in group)
        if seq == len(groups) - 1:
            body += enc.eor(reason)
        out.append(header(8 + len(body), qid, seq) + body)
    return out


def make_stream(pieces: list[Piece], reason: int) -> bytes:
    """The same pieces as one HTTP body."""
    return make_chunks(0, [pieces], reason)[0][8:]


@attrs.define
class Reply:
    status: int = 200
    headers: dict[str, str] = attrs.Factory(dict)
    body: bytes = b""
    chunks: list[bytes] = attrs.Factory(list)  # queued on the aux channel once the reply is sent


class Peer:
    """Fake JPIP server: ``replies`` answer the HTTP requests in order (then 200, empty)."""

    def __init__(self, tls: ssl.SSLContext | None = None, aux_tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict[str, str]] = []
        self.replies: list[Reply] = []
        self.aux: queue.Queue[bytes | str] = queue.Queue()  # chunks, "close" or "eof"
        self.handshake = b""
        self.acks = bytearray()
        self.aux_connected = threading.Event()
        self.aux_done = threading.Event()
        self.aux_eof = threading.Event()
        self.errors: list[str] = []
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                fields = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                peer.requests.append(fields)
                reply = peer.replies.pop(0) if peer.replies else Reply()
                self.send_response(reply.status)
                if "qid" in fields:
                    self.send_header("JPIP-qid", fields["qid"])
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "image/jpp-stream")
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
                self.wfile.flush()
                for c in reply.chunks:
                    peer.aux.put(c)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.http.socket = tls.wrap_socket(self.http.socket, server_side=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.aux_tls = aux_tls or tls
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.http.server_address[1]}/jpip?target={UID}"
        self.aux_port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self.http.serve_forever, daemon=True),
                        threading.Thread(target=self._serve_aux, daemon=True)]
        for t in self.threads:
            t.start()

    def grant(self, transport: str = "http-tcp") -> dict[str, str]:
        value = f"cid={CID},path=jpip,transport={transport}"
        return {"JPIP-cnew": value + (f",auxport={self.aux_port}" if transport == "http-tcp" else "")}

    def _serve_aux(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            if self.aux_tls is not None:
                conn = self.aux_tls.wrap_socket(conn, server_side=True)
            conn.settimeout(10)
            self.aux_connected.set()
            while not self.handshake.endswith(b"\r\n") and len(self.handshake) < 512:
                data = conn.recv(1)
                if not data:
                    return
                self.handshake += data
            if self.handshake != CID.encode() + b"\r\n":
                return  # an unknown channel: close without a word
            while True:
                item = self.aux.get(timeout=10)
                if item == "close":
                    return
                if item == "eof":  # the client should close: keep what it still wrote
                    while data := conn.recv(4096):
                        self.acks += data
                    self.aux_eof.set()
                    return
                assert isinstance(item, bytes)
                conn.sendall(item)
                want = len(self.acks) + 8  # the next chunk waits for this one's ack (a 1-chunk window)
                while len(self.acks) < want:
                    data = conn.recv(want - len(self.acks))
                    if not data:
                        return
                    self.acks += data
        except Exception as e:  # reported by the fixture
            self.errors.append(repr(e))
        finally:
            conn.close()
            self.aux_done.set()

    def wait_acks(self, n: int) -> bytes:
        """The first ``n`` bytes the client wrote after the handshake (the last ack may still
        be on its way when the client's request returns)."""
        deadline = time.monotonic() + 5
        while len(self.acks) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return bytes(self.acks)

    def stop(self) -> None:
        self.aux.put("close")
        self.http.shutdown()
        self.http.server_close()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a pending accept()
        except OSError:
            pass
        self.listener.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.stop()
    assert not p.errors


MAIN = (BinClass.MAIN_HEADER, 0, 0, b"\xff\x4f\xff\x51main-header", True)
TILE_HEADER = (BinClass.TILE_HEADER, 0, 0, b"", True)


def precinct(bin_id: int, offset: int, size: int, done: bool) -> Piece:
    return (BinClass.PRECINCT, bin_id, offset, bytes((bin_id + offset + k) % 256 for k in range(size)), done)


def test_http_tcp_session(peer: Peer) -> None:
    """The handshake, acks echoing every header, messages in the cache, EOR reasons, qids."""
    first = make_chunks(1, [[MAIN, TILE_HEADER], [precinct(0, 0, 300, False)], [precinct(1, 0, 50, True)]], 4)
    second = make_chunks(2, [[precinct(0, 300, 200, True)]], 1)
    peer.replies = [Reply(headers=peer.grant(), chunks=first), Reply(chunks=second)]
    with JpipClient(peer.url, transport="http-tcp", timeout=5) as client:
        assert client.request(fsiz="64,64") == 4
        assert client.transport == "http-tcp" and client.cid == CID
        assert client.fetch(fsiz="64,64") == 1  # one more round: the byte limit is lifted
        assert peer.handshake == CID.encode() + b"\r\n"
        assert client.cache.bin(BinClass.MAIN_HEADER, 0, 0) == MAIN[3]
        assert client.cache.is_complete(BinClass.MAIN_HEADER, 0, 0)
        assert client.cache.bin(BinClass.PRECINCT, 0, 0) == precinct(0, 0, 300, False)[3] + precinct(0, 300, 200, True)[3]
        assert client.cache.is_complete(BinClass.PRECINCT, 0, 0) and client.cache.is_complete(BinClass.PRECINCT, 0, 1)
        peer.aux.put("eof")
    assert peer.aux_eof.wait(5), "close() left the aux connection open"
    assert bytes(peer.acks) == b"".join(c[:8] for c in first + second)  # acks only, each header as sent
    opening, *later, closing = peer.requests
    assert opening == {"fsiz": "64,64", "target": UID, "cnew": "http-tcp,http", "qid": "1"}
    assert later == [{"fsiz": "64,64", "cid": CID, "qid": "2"}]
    assert closing == {"cid": CID, "cclose": CID, "qid": "3"}
    assert client.transport == "http-tcp" and client.cid is None


def test_lone_eor_and_pre_empted_reason(peer: Peer) -> None:
    """A response that is only an EOR (11-byte chunk) returns its reason; the qid wraps at 16 bits."""
    peer.replies = [Reply(headers=peer.grant(), chunks=make_chunks(1, [], 3))]
    client = JpipClient(peer.url, transport="http-tcp", timeout=5)
    assert client.request(fsiz="8,8") == 3
    assert peer.wait_acks(8) == header(11, 1, 0)
    client._qid = 0x1FFFF  # the next request is 0x20000: its chunks say 0
    peer.replies = [Reply(chunks=make_chunks(0x20000, [[MAIN]], 2))]
    assert client.request(fsiz="8,8") == 2
    client.close()


def test_http_granted_instead(peer: Peer) -> None:
    """A server that grants only http: data in the body, no aux connection, reported as http."""
    body = make_stream([MAIN, precinct(0, 0, 40, True)], 2)
    peer.replies = [Reply(headers=peer.grant("http"), body=body)]
    with JpipClient(peer.url, transport="http-tcp", timeout=5) as client:
        assert client.request(fsiz="64,64") == 2
        assert client.transport == "http" and client.cid == CID
        assert client.cache.bin(BinClass.PRECINCT, 0, 0) == precinct(0, 0, 40, True)[3]
    assert not peer.aux_connected.is_set()
    assert peer.requests[0]["cnew"] == "http-tcp,http"
    assert peer.requests[-1] == {"cid": CID, "cclose": CID, "qid": "2"}


def test_plain_http_session_and_stateless(peer: Peer) -> None:
    """transport=http behaves as before (cnew=http, data in the body), with a qid added."""
    peer.replies = [Reply(headers=peer.grant("http"), body=make_stream([MAIN], 1))]
    with JpipClient(peer.url, session=True, timeout=5) as client:
        assert client.request(fsiz="8,8") == 1 and client.transport == "http"
    assert peer.requests[0] == {"fsiz": "8,8", "target": UID, "cnew": "http", "qid": "1"}
    peer.requests.clear()
    peer.replies = [Reply(body=make_stream([MAIN], 2))]
    with JpipClient(peer.url, timeout=5) as client:
        assert client.request(fsiz="8,8") == 2 and client.transport is None and client.cid is None
    assert peer.requests == [{"fsiz": "8,8", "target": UID, "qid": "1"}]  # no cclose without a session
    with pytest.raises(ValueError):
        JpipClient(peer.url, transport="http-udp")


def test_aux_closed_mid_response(peer: Peer) -> None:
    """A server that closes the channel inside a response gives a clear error, not a hang."""
    chunks = make_chunks(1, [[MAIN], [precinct(0, 0, 100, True)]], 2)
    peer.replies = [Reply(headers=peer.grant(), chunks=chunks[:1] + ["close"])]  # type: ignore[list-item]
    client = JpipClient(peer.url, transport="http-tcp", timeout=5)
    start = time.monotonic()
    with pytest.raises(JpipTransportError, match="middle of a response"):
        client.request(fsiz="64,64")
    assert time.monotonic() - start < 4
    assert client.cache.bin(BinClass.MAIN_HEADER, 0, 0) == MAIN[3]  # what came is kept
    with pytest.raises(JpipTransportError, match="closed"):
        client.request(fsiz="64,64")
    client.close()


def test_unknown_cid_closes_the_channel(peer: Peer) -> None:
    peer.replies = [Reply(headers={"JPIP-cnew": f"cid=other,path=jpip,transport=http-tcp,auxport={peer.aux_port}"})]
    with pytest.raises(JpipTransportError, match="did not accept the channel id"):
        JpipClient(peer.url, transport="http-tcp", timeout=5).request(fsiz="8,8")
    assert peer.handshake == b"other\r\n"


def test_timeout_is_bounded_and_the_channel_resumes(peer: Peer) -> None:
    """A silent channel times out; data that comes later is still taken (and cached) in order."""
    late = make_chunks(1, [[MAIN], [precinct(0, 0, 30, True)]], 2)
    peer.replies = [Reply(headers=peer.grant(), chunks=late[:1])]
    client = JpipClient(peer.url, transport="http-tcp", timeout=0.3)
    start = time.monotonic()
    with pytest.raises(JpipTransportError, match="no data"):
        client.request(fsiz="64,64")
    assert time.monotonic() - start < 3
    peer.aux.put(late[1])  # the rest of request 1 comes before request 2's data
    second = make_chunks(2, [[precinct(1, 0, 20, True)]], 1)
    peer.replies = [Reply(chunks=second)]
    assert client.request(fsiz="64,64") == 1
    assert client.cache.bin(BinClass.PRECINCT, 0, 0) == precinct(0, 0, 30, True)[3]
    assert client.cache.bin(BinClass.PRECINCT, 0, 1) == precinct(1, 0, 20, True)[3]
    assert peer.wait_acks(24) == b"".join(c[:8] for c in late + second)
    client.close()


def test_error_reply_sends_nothing_on_the_channel(peer: Peer) -> None:
    peer.replies = [Reply(headers=peer.grant(), chunks=make_chunks(1, [[MAIN]], 2)), Reply(status=400),
                    Reply(chunks=make_chunks(3, [], 2))]
    client = JpipClient(peer.url, transport="http-tcp", timeout=2)
    assert client.request(fsiz="8,8") == 2
    with pytest.raises(urllib.error.HTTPError):
        client.request(fsiz="bad")
    assert client.request(fsiz="8,8") == 2
    client.close()


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        (header(20, 9, 0) + bytes(12), "bad http-tcp chunk header"),  # a request never made
        (header(11, 1, 5) + MessageEncoder().eor(2), "chunk 5 of request 1"),  # sequence gap
        (header(7, 1, 0), "bad http-tcp chunk header"),  # shorter than its header
        (header(14, 1, 0) + MessageEncoder().eor(2) * 2, "after the end"),
        (header(10, 1, 0) + b"\x00\x02", "ends inside a message"),  # messages are never split
        (header(11, 1, 0) + b"\x01\x00\x00", "bad JPP stream"),  # reserved Bin-ID indicator
    ],
    ids=["unknown-qid", "sequence-gap", "short-length", "after-eor", "split-message", "bad-jpp"],
)
def test_broken_chunks(peer: Peer, chunk: bytes, match: str) -> None:
    peer.replies = [Reply(headers=peer.grant(), chunks=[chunk])]
    client = JpipClient(peer.url, transport="http-tcp", timeout=2)
    with pytest.raises(JpipTransportError, match=match):
        client.request(fsiz="8,8")
    client.close()


def test_body_on_http_tcp_is_refused(peer: Peer) -> None:
    peer.replies = [Reply(headers=peer.grant(), body=make_stream([MAIN], 2))]
    with pytest.raises(JpipTransportError, match="body"):
        JpipClient(peer.url, transport="http-tcp", timeout=2).request(fsiz="8,8")


def _make_cert(folder: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A CA and a server certificate for 127.0.0.1 signed by it: the CA file and a server context."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject_name: str, key: Any, issuer: Any, signer: Any, ca: bool) -> Any:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build(f"{name} ca", ca_key, None, ca_key, True)
    cert = build("127.0.0.1", key, ca.subject, ca_key, False)
    ca_file, cert_file, key_file = folder / f"{name}-ca.crt", folder / f"{name}.crt", folder / f"{name}.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ca_file, ctx


def test_https_wraps_the_channel_in_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an https URL the aux connection speaks TLS, verified like the HTTPS requests."""
    ca, trusted = _make_cert(tmp_path, "trusted")
    _, untrusted = _make_cert(tmp_path, "untrusted")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the default trust store of urllib and the client
    p = Peer(tls=trusted)
    try:
        chunks = make_chunks(1, [[MAIN]], 2)
        p.replies = [Reply(headers=p.grant(), chunks=chunks)]
        with JpipClient(p.url, transport="http-tcp", timeout=5) as client:
            assert client.request(fsiz="8,8") == 2
        assert p.handshake == CID.encode() + b"\r\n" and p.wait_acks(8) == chunks[0][:8]
    finally:
        p.stop()
    p = Peer(tls=trusted, aux_tls=untrusted)  # the same name, but a certificate nobody vouches for
    try:
        p.replies = [Reply(headers=p.grant())]
        with pytest.raises(JpipTransportError, match="certificate verify failed"):
            JpipClient(p.url, transport="http-tcp", timeout=5).request(fsiz="8,8")
    finally:
        p.stop()


def test_command_line_over_http_tcp(peer: Peer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """imageshare-jpip --transport http-tcp: a real codestream's messages rebuild the image."""
    from imageshare.codestream.index import build_index
    from imageshare.protocols.jpip.cachemodel import CacheModel
    from imageshare.protocols.jpip.plan import TargetBins, plan
    from imageshare.protocols.jpip.window import Window, precincts, resolve
    from imageshare.transcode import openjpeg
    from imageshare.transcode.params import EncodeParams

    img = (np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 7) % 4096
    path = tmp_path / "img.j2k"
    openjpeg.encode(img, path, precision=12, signed=False, colour_transform=False, params=EncodeParams(precinct=32))
    data = path.read_bytes()
    index = build_index(data)
    resolved = resolve(index, Window(fsiz=(48, 40)))
    result = plan(TargetBins(index), index, resolved, precincts(index, resolved), CacheModel(), 0, max_message=4000)
    pieces = [(p.bin_class, p.bin_id, p.bin_offset, p.body(data), p.complete) for p in result.pieces]
    groups = [pieces[i : i + 3] for i in range(0, len(pieces), 3)]
    peer.replies = [Reply(headers=peer.grant(), chunks=make_chunks(1, groups, result.eor_reason))]
    out = tmp_path / "v.npy"
    assert main([peer.url.replace(f"?target={UID}", f"/{UID}"), "--transport", "http-tcp", "--fsiz", "48,40",
                 "-o", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), img)
    assert capsys.readouterr().err.strip().endswith("over http-tcp")
    assert peer.requests[0]["cnew"] == "http-tcp,http" and peer.requests[-1]["cclose"] == CID
