"""
Hostile DICOM peers against the running server (issue 10, "Stays up"): oversized PDU
headers, deflate bombs, oversized data sets, connection floods, silent and idle peers.

The server runs in this process, so its memory is this process's resident size, sampled
every 10 ms from /proc/self/status while an attack runs. Attackers connect from
127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux) and legitimate senders from
127.0.0.1, so per-address limits can tell them apart. Every loop is bounded in count and
time.

Measured (2 cores, loopback; the ceilings asserted are wider):

* 4 connections streaming junk after a header claiming 4 GiB or 500 MiB: each dropped
  right after the header (the peer gets the A-ABORT ~40 ms after sending it) with ~3 MiB
  taken by the socket buffers; peak RSS growth ~7 MiB (ceiling 64 MiB). Before issue 10:
  everything sent was read into memory, +1 GiB for 4 x 256 MiB (peak RSS 3.3 GiB over
  the file).
* two deflate bombs at once (1 MiB inflating to 1 GiB each, max_object_size 4 MiB):
  0xA700 for both, peak RSS growth ~22 MiB (ceiling 64 MiB). Before: both stored.
* 50 associations, then 500 silent sockets, from one address: 16 held, the other 534
  closed at once (all 500 sockets within ~0.1 s); a sender from another address is
  served. Before: "Local Limit Exceeded" for it.
* silent, half-sent and trickling connections: closed 1.50-1.9 s after connecting with
  negotiation_timeout 1.5 s (before: the ARTIM timer, acse_timeout 30 s, or never for a
  half-sent PDU); an idle association aborted after 1.49 s with network_timeout 1.5 s.
* a TLS listener with silent clients: a legitimate TLS client is served at once, the
  silent ones are closed at negotiation_timeout. Before: the listener stopped accepting.
"""

from __future__ import annotations

import select
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import RawDataStorage, Verification
from twisted.internet import threads

from tests.helpers import make_instances, part10_file, rss, sample_file, scu_store
from tests.integration.conftest import run_with_deadline
from tests.integration.test_ingest import get_status

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.2"
RSS_CEILING_MIB = 64
ABORT_INVALID = bytes.fromhex("0700 00000004 0000 02 06")  # A-ABORT, provider, invalid PDU parameter value
ABORT_UNSPECIFIED = bytes.fromhex("0700 00000004 0000 02 00")


# -- helpers ---------------------------------------------------------------------------


class PeakRss:
    """Samples the resident size every 10 ms in a thread, while the ``with`` block runs."""

    def __enter__(self) -> "PeakRss":
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / (1 << 20)


def connect(port: int, source: str = ATTACKER, timeout: float = 10) -> socket.socket:
    """A TCP connection to the server from ``source``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``timeout``), and when it closed."""
    start, data = time.monotonic(), b""
    s.settimeout(timeout)
    try:
        while time.monotonic() - start < timeout:
            chunk = s.recv(65536)
            if not chunk:
                return data, time.monotonic() - start
            data += chunk
    except ConnectionResetError:
        return data, time.monotonic() - start
    except TimeoutError:
        pass
    return data, float("inf")


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(called: str = "IMAGESHARE", calling: str = "RAWSCU") -> bytes:
    """A minimal A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian (PS3.8 9.3.2)."""
    context = _item(0x20, bytes((1, 0, 0, 0)) + _item(0x30, Verification.encode()) + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.10.1489.98"))
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    )
    return pdu_header(0x01, len(body)) + body


def read_pdu(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = s.recv(6 - len(head))
        assert chunk, "closed before a PDU header"
        head += chunk
    pdu_type, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = s.recv(length - len(body))
        assert chunk, "closed inside a PDU"
        body += chunk
    return pdu_type, body


def echo(port: int, source: str = "127.0.0.1", **tls: Any) -> int | None:
    """C-ECHO in a fresh association; the status, or None if not established."""
    ae = AE(ae_title="LEGITSCU")
    ae.add_requested_context(Verification)
    # connection_timeout bounds the TLS handshake too (a listener stuck elsewhere never answers it).
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE", bind_address=(source, 0), **tls)
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


def raw_data_set(payload_size: int) -> tuple[bytes, str]:
    """A Raw Data Storage data set (not an image: nothing to transcode) ending in a private OB
    element of ``payload_size`` bytes; returns (everything but the payload, SOP Instance UID)."""
    ds = Dataset()
    ds.SOPClassUID = RawDataStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "HOSTILE"
    ds.Modality = "OT"
    ds.add_new(0x7FE10010, "LO", "IMAGESHARE TEST")  # private creator of the block below
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    head = buf.getvalue() + struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"OB", 0, payload_size)
    return head, str(ds.SOPInstanceUID)


def deflate_bomb(inflated: int) -> tuple[bytes, str]:
    """A real, well-formed deflated data set that inflates to ``inflated`` bytes and more.

    After a full flush deflate starts afresh, so every MiB of zeros compresses to the same
    bytes: the stream is built by repetition in milliseconds.
    """
    mib = 1 << 20
    head, uid = raw_data_set(inflated)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    assert block == again
    end = c.compress(bytes(mib)) + c.flush()
    return start + block * (inflated // mib - 1) + end, uid


def send_files(port: int, files: list[Path], syntax: str) -> list[int | None]:
    return scu_store(port, files, contexts=[build_context(RawDataStorage, syntax)])


@pytest.fixture
def raw_sends(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """pynetdicom sends files' data sets as they are (needed for bombs); undone afterwards."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    yield


def wait_until(predicate: Callable[[], bool], timeout: float) -> float:
    """Poll ``predicate`` every 50 ms; seconds it took, or inf if it never held."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    return float("inf")


# -- oversized PDUs --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_oversized_headers_are_aborted_at_once(start_server) -> None:
    """An A-ASSOCIATE-RQ claiming 4 GiB or 500 MiB, and after negotiation a P-DATA-TF claiming
    4 GiB, get an A-ABORT (invalid PDU parameter value) and a close within a second."""
    server = await start_server()
    port = server.dicom_port

    def header_only(claim: int) -> tuple[bytes, float]:
        with connect(port) as s:
            s.sendall(pdu_header(0x01, claim))
            return read_until_closed(s, 10)

    for claim in (0xFFFFFFFF, 500 << 20):
        data, closed_after = await threads.deferToThread(header_only, claim)
        assert data == ABORT_INVALID
        assert closed_after < 1.0
    # Not counted against the address once dropped (not only at negotiation_timeout).
    assert await threads.deferToThread(wait_until, lambda: server.service.dicom.connections(ATTACKER) == 0, 1) < 1

    def pdata_after_negotiation() -> tuple[int, bytes, float]:
        with connect(port) as s:
            s.sendall(associate_rq())
            accepted, _ = read_pdu(s)
            s.sendall(pdu_header(0x04, 0xFFFFFFFF) + b"\x00" * 1000)
            data, closed_after = read_until_closed(s, 10)
            return accepted, data, closed_after

    accepted, data, closed_after = await threads.deferToThread(pdata_after_negotiation)
    assert accepted == 0x02  # A-ASSOCIATE-AC: the request itself was fine
    assert data == ABORT_INVALID and closed_after < 1.0
    assert await threads.deferToThread(echo, port) == 0


@pytest_twisted.ensureDeferred
async def test_junk_after_huge_headers_is_never_buffered(start_server) -> None:
    """Four connections stream up to 256 MiB each after headers claiming 4 GiB and 500 MiB:
    each is cut off within the socket buffers, and the server's memory stays flat."""
    server = await start_server()
    port = server.dicom_port
    per_connection = 256 << 20
    results: list[tuple[int, float]] = []

    def stream(claim: int) -> None:
        chunk = b"\xa5" * (1 << 20)
        sent, start = 0, time.monotonic()
        with connect(port) as s:
            try:
                s.sendall(pdu_header(0x01, claim))
                while sent < per_connection and time.monotonic() - start < 30:
                    s.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
        results.append((sent, time.monotonic() - start))

    def attack() -> PeakRss:
        with PeakRss() as peak:
            attackers = [threading.Thread(target=stream, args=(c,)) for c in (0xFFFFFFFF, 0xFFFFFFFF, 500 << 20, 500 << 20)]
            for t in attackers:
                t.start()
            for t in attackers:
                t.join(60)
        return peak

    peak = await threads.deferToThread(attack)
    assert len(results) == 4
    for sent, _ in results:
        assert sent < 32 << 20, results  # socket buffers, not a PDU's worth
    assert peak.growth_mib < RSS_CEILING_MIB, f"RSS grew {peak.growth_mib:.0f} MiB"
    assert await threads.deferToThread(echo, port) == 0


# -- data sets over max_object_size ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_deflate_bombs_are_refused_without_inflating(start_server, tmp_path: Path, raw_sends: None) -> None:
    """Two deflated data sets of 1 MiB inflating to 1 GiB, sent at once with max_object_size
    4 MiB, each get Out of Resources (0xA700); nothing is stored and memory stays flat."""
    server = await start_server(dicom={"max_object_size": str(4 << 20)})
    port = server.dicom_port
    bombs = []
    for i in range(2):
        stream, uid = deflate_bomb(1 << 30)
        assert len(stream) < 2 << 20
        bombs.append(part10_file(tmp_path / f"bomb{i}.dcm", stream, transfer_syntax=DeflatedExplicitVRLittleEndian,
                                 sop_class_uid=RawDataStorage, sop_instance_uid=uid))
    statuses: list[list[int | None]] = []

    def attack() -> PeakRss:
        with PeakRss() as peak:
            senders = [threading.Thread(target=lambda f=f: statuses.append(send_files(port, [f], DeflatedExplicitVRLittleEndian)))
                       for f in bombs]
            for t in senders:
                t.start()
            for t in senders:
                t.join(120)
        return peak

    peak = await threads.deferToThread(attack)
    assert statuses == [[0xA700], [0xA700]]
    assert peak.growth_mib < RSS_CEILING_MIB, f"RSS grew {peak.growth_mib:.0f} MiB"
    status = await threads.deferToThread(get_status, server.url)
    assert status["instances"] == 0

    # A small deflated instance still goes through.
    small, uid = raw_data_set(1000)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    ok = part10_file(tmp_path / "small.dcm", c.compress(small + bytes(1000)) + c.flush(),
                     transfer_syntax=DeflatedExplicitVRLittleEndian, sop_class_uid=RawDataStorage, sop_instance_uid=uid)
    assert await threads.deferToThread(send_files, port, [ok], DeflatedExplicitVRLittleEndian) == [0]


@pytest_twisted.ensureDeferred
async def test_oversized_plain_data_set_is_aborted(start_server, tmp_path: Path, raw_sends: None) -> None:
    """A 2 MiB data set with max_object_size 1 MiB is aborted while it arrives; nothing is
    stored; the next association is served."""
    server = await start_server(dicom={"max_object_size": str(1 << 20)})
    port = server.dicom_port
    head, uid = raw_data_set(2 << 20)
    big = part10_file(tmp_path / "big.dcm", head + bytes(2 << 20), transfer_syntax=ExplicitVRLittleEndian,
                      sop_class_uid=RawDataStorage, sop_instance_uid=uid)
    assert await threads.deferToThread(send_files, port, [big], ExplicitVRLittleEndian) == [None]
    head, uid = raw_data_set(1000)
    fits = part10_file(tmp_path / "fits.dcm", head + bytes(1000), transfer_syntax=ExplicitVRLittleEndian,
                       sop_class_uid=RawDataStorage, sop_instance_uid=uid)
    assert await threads.deferToThread(send_files, port, [fits], ExplicitVRLittleEndian) == [0]
    status = await threads.deferToThread(get_status, server.url)
    assert status["instances"] == 1


# -- connection floods and slow peers ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_lock_out_the_others(start_server) -> None:
    """50 idle associations and then 500 silent sockets from one address: 16 associations
    are held, every other connection is closed at once, and a sender from another address
    stores (pynetdicom) and echoes (dcmtk) meanwhile."""
    server = await start_server(dicom={"network_timeout": "60", "negotiation_timeout": "30"})
    port = server.dicom_port
    idle: list[Any] = []
    silent: list[socket.socket] = []

    def flood() -> tuple[int, int, float]:
        ae = AE(ae_title="IDLESCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for _ in range(50):
            idle.append(ae.associate("127.0.0.1", port, ae_title="IMAGESHARE", bind_address=(ATTACKER, 0)))
        established = sum(a.is_established for a in idle)
        for _ in range(500):
            silent.append(connect(port, timeout=10))
        # Each refused socket is closed by the server: readable, at end of stream.
        start, pending = time.monotonic(), list(silent)
        while pending and time.monotonic() - start < 10:
            readable, _, _ = select.select(pending, [], [], 0.5)
            for s in readable:
                try:
                    s.recv(16)
                except OSError:
                    pass
                pending.remove(s)
        return established, len(silent) - len(pending), time.monotonic() - start

    try:
        established, closed, took = await threads.deferToThread(flood)
        # Served meanwhile, from another address.
        assert await threads.deferToThread(scu_store, port, [sample_file("CT_small.dcm")]) == [0]
        if shutil.which("echoscu"):
            result = await threads.deferToThread(run_with_deadline, ["echoscu", "-aec", "IMAGESHARE", "127.0.0.1", str(port)], 30)
            assert result.returncode == 0, result.stderr
        assert established == 16
        assert closed == 500 and took < 5
        assert server.service.dicom.connections(ATTACKER) == 16
    finally:
        for s in silent:
            s.close()
        for a in idle:
            a.abort()


@pytest_twisted.ensureDeferred
async def test_silent_and_trickling_connections_are_dropped_at_the_negotiation_deadline(start_server) -> None:
    """Connections that send nothing, half a request, or a byte every 0.3 s are closed at
    negotiation_timeout (1.5 s), and their count is released soon after."""
    server = await start_server(dicom={"negotiation_timeout": "1.5"})
    port = server.dicom_port

    def peers() -> list[float]:
        socks = [connect(port) for _ in range(5)]
        half = connect(port)
        half.sendall(associate_rq()[:40])  # a header claiming more, then silence
        socks.append(half)
        trickle = connect(port)
        socks.append(trickle)
        closed_after: dict[socket.socket, float] = {}
        start = time.monotonic()
        rq = associate_rq()
        sent = 0
        while len(closed_after) < len(socks) and time.monotonic() - start < 8:
            if trickle not in closed_after and sent < len(rq):
                try:
                    trickle.sendall(rq[sent : sent + 1])
                    sent += 1
                except OSError:
                    pass
            readable, _, _ = select.select([s for s in socks if s not in closed_after], [], [], 0.3)
            for s in readable:
                try:
                    data = s.recv(100)
                except OSError:
                    data = b""
                if not data:
                    closed_after[s] = time.monotonic() - start
        for s in socks:
            s.close()
        return [closed_after.get(s, float("inf")) for s in socks]

    times = await threads.deferToThread(peers)
    assert all(1.2 < t < 3.0 for t in times), times
    released = await threads.deferToThread(wait_until, lambda: server.service.dicom.connections(ATTACKER) == 0, 5)
    assert released < 5
    assert await threads.deferToThread(echo, port) == 0


@pytest_twisted.ensureDeferred
async def test_idle_association_is_aborted_at_network_timeout(start_server) -> None:
    """An association that says nothing after negotiation is aborted by the server at
    network_timeout (1.5 s) and no longer counted."""
    server = await start_server(dicom={"network_timeout": "1.5"})
    port = server.dicom_port

    def idle() -> tuple[bool, float]:
        ae = AE(ae_title="IDLESCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE", bind_address=(ATTACKER, 0))
        established = assoc.is_established
        ended = wait_until(lambda: not assoc.is_established, 10)
        assoc.abort()
        return established, ended

    established, ended = await threads.deferToThread(idle)
    assert established
    assert 1.0 < ended < 4.0
    assert await threads.deferToThread(wait_until, lambda: server.service.dicom.connections(ATTACKER) == 0, 5) < 5


@pytest_twisted.ensureDeferred
async def test_silent_tls_clients_do_not_stall_the_listener(start_server, tmp_path: Path) -> None:
    """On a TLS listener, clients that never start the handshake neither stop others from
    connecting (the handshake is not done in the accept thread) nor stay past the deadline."""
    from tests.integration.test_tls import make_cert
    import ssl

    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    make_cert(tmp_path, "client", issuer=ca)
    server = await start_server(dicom={
        "listen": f"ssl:0:interface=127.0.0.1:privateKey={tmp_path}/server.key:"
                  f"certKey={tmp_path}/server.crt:caCerts={tmp_path}/ca.crt",
        "negotiation_timeout": "2",
    })
    port = server.dicom_port
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "ca.crt"))
    ctx.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))

    def scenario() -> tuple[int | None, list[float]]:
        silent = [connect(port) for _ in range(3)]
        try:
            status = echo(port, tls_args=(ctx, "localhost"))
            return status, [read_until_closed(s, 8)[1] for s in silent]
        finally:
            for s in silent:
                s.close()

    status, closed = await threads.deferToThread(scenario)
    assert status == 0
    assert all(t < 4 for t in closed), closed


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")
@pytest_twisted.ensureDeferred
async def test_dcmtk_keeps_to_a_small_max_pdu(start_server, tmp_path: Path) -> None:
    """dcmtk's storescu fills PDUs up to a 4096-byte maximum and no further: the strict
    P-DATA-TF cap accepts everything it sends."""
    server = await start_server(dicom={"max_pdu": "4096"})
    folder = tmp_path / "in"
    make_instances(folder, 3, seed="maxpdu")
    result = await threads.deferToThread(
        run_with_deadline,
        ["storescu", "-aec", "IMAGESHARE", "127.0.0.1", str(server.dicom_port), "+sd", str(folder)],
    )
    assert result.returncode == 0, result.stderr
    status = await threads.deferToThread(get_status, server.url)
    assert status["instances"] == 3
