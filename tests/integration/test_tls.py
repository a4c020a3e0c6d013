"""TLS on every listener: DICOM (with client certificates), HTTP and the JPIP aux port."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from twisted.internet import threads
from twisted.logger import globalLogPublisher

from tests.helpers import sample_file

pytestmark = pytest.mark.integration


def make_cert(folder: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
              ca: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Write NAME.key and NAME.crt (self-signed when no issuer) and return them."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


@pytest_twisted.ensureDeferred
async def test_tls_listeners(start_server, tmp_path: Path) -> None:
    """With ssl: endpoints, DICOM needs a trusted client certificate and HTTP speaks HTTPS."""
    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    make_cert(tmp_path, "client", issuer=ca)
    rogue = make_cert(tmp_path, "rogueca", ca=True)
    make_cert(tmp_path, "rogue", issuer=rogue)
    server = await start_server(
        dicom={"listen": f"ssl:0:interface=127.0.0.1:privateKey={tmp_path}/server.key:"
                         f"certKey={tmp_path}/server.crt:caCerts={tmp_path}/ca.crt"},
        http={"listen": f"ssl:0:interface=127.0.0.1:privateKey={tmp_path}/server.key:"
                        f"certKey={tmp_path}/server.crt"},
        jpip={"tcp_listen": f"ssl:0:interface=127.0.0.1:privateKey={tmp_path}/server.key:"
                            f"certKey={tmp_path}/server.crt"},
    )

    def client_context(name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "ca.crt"))
        ctx.load_cert_chain(str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key"))
        return ctx

    def echo(name: str | None) -> bool:
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        tls = (client_context(name), "localhost") if name else None
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE", tls_args=tls)
        ok = assoc.is_established and int(assoc.send_c_echo().Status) == 0
        if assoc.is_established:
            assoc.release()
        return ok

    assert await threads.deferToThread(echo, "client")
    assert not await threads.deferToThread(echo, "rogue")  # certificate from an unknown CA
    assert not await threads.deferToThread(echo, None)  # plain TCP on a TLS port

    def store_over_tls() -> int:
        ae = AE(ae_title="TLSSCU")
        ds = dcmread(sample_file("CT_small.dcm"))
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE",
                             tls_args=(client_context("client"), "localhost"))
        status = int(assoc.send_c_store(ds).Status)
        assoc.release()
        return status

    assert await threads.deferToThread(store_over_tls) == 0
    await server.service.transcoder.when_idle()

    def https_status() -> dict[str, int]:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with urllib.request.urlopen(f"https://localhost:{server.http_port}/status", context=ctx, timeout=10) as r:
            return json.load(r)  # type: ignore[no-any-return]

    status = await threads.deferToThread(https_status)
    assert status["instances"] == 1 and status["streamable"] == 1

    uid = str(dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True).SOPInstanceUID)

    def http_tcp_over_tls() -> bytes:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        url = f"https://localhost:{server.http_port}/jpip?target={uid}&fsiz=128,128&cnew=http-tcp&qid=1"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
            cnew = dict(item.split("=", 1) for item in r.headers["JPIP-cnew"].split(","))
            assert r.read() == b""
        raw = socket.create_connection(("127.0.0.1", int(cnew["auxport"])), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost") as aux:
            aux.sendall(cnew["cid"].encode() + b"\r\n")
            data = b""
            while not data.endswith(bytes([0, 2, 0])) and not data.endswith(bytes([0, 1, 0])):
                chunk = aux.recv(65536)
                assert chunk, "the aux connection closed early"
                data += chunk
        return data

    data = await threads.deferToThread(http_tcp_over_tls)
    assert data[2:4] == b"\x00\x01" and int.from_bytes(data[:2], "big") == len(data)  # one chunk, qid 1

    def plain_on_tls_aux() -> bytes:
        with socket.create_connection(("127.0.0.1", server.service.jpip.aux_port), timeout=10) as s:
            s.sendall(b"JPHT0000\r\n")
            try:
                return s.recv(100)
            except ConnectionResetError:
                return b""

    reply = await threads.deferToThread(plain_on_tls_aux)
    assert reply == b"" or reply[0] == 0x15  # closed, or a TLS alert record: never data


def tls_exchange(port: int, folder: Path, name: str | None, request: bytes) -> bytes | Exception:
    """Send ``request`` over TLS with client certificate ``name`` (or none); what comes back
    until the server closes, or the error that ended the exchange."""
    ctx = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    if name is not None:
        ctx.load_cert_chain(str(folder / f"{name}.crt"), str(folder / f"{name}.key"))
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request)
                for _ in range(1000):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return e if not data else data
    return data


@pytest_twisted.ensureDeferred
async def test_http_and_aux_listeners_require_client_certificates(start_server, tmp_path: Path) -> None:
    """With caCerts, the HTTP and JPIP aux listeners serve a client whose certificate the CA
    signed and refuse one without a certificate or with another CA's; relative file names
    resolve against the configuration file's folder."""
    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    make_cert(tmp_path, "client", issuer=ca)
    rogue = make_cert(tmp_path, "rogueca", ca=True)
    make_cert(tmp_path, "rogue", issuer=rogue)
    tls = "ssl:0:interface=127.0.0.1:privateKey=server.key:certKey=server.crt:caCerts=ca.crt"
    server = await start_server(http={"listen": tls}, jpip={"tcp_listen": tls})
    get = b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"

    reply = await threads.deferToThread(tls_exchange, server.http_port, tmp_path, "client", get)
    assert isinstance(reply, bytes) and reply.startswith(b"HTTP/1.1 200 "), reply
    for name in (None, "rogue"):
        reply = await threads.deferToThread(tls_exchange, server.http_port, tmp_path, name, get)
        assert isinstance(reply, Exception) or reply == b"", (name, reply)

    # The aux port: a verified client's bytes reach the JPIP aux protocol (which then drops
    # the unknown channel id); the others never get that far.
    heard: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "unknown channel" in event.get("log_format", ""):
            heard.append(event)

    aux = server.service.jpip.aux_port
    globalLogPublisher.addObserver(observe)
    try:
        for name in (None, "rogue", "client"):
            reply = await threads.deferToThread(tls_exchange, aux, tmp_path, name, b"JPHT0000\r\n")
            assert not (isinstance(reply, bytes) and reply), reply  # no data either way
            assert len(heard) == (1 if name == "client" else 0), name
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize(
    "listen,message",
    [
        ("ssl:0:privateKey=server.key:certKey=server.crt:caCerts=missing.pem", "caCerts: no such file"),
        ("tcp:0:interface=127.0.0.1:caCerts=ca.crt", "unknown option 'caCerts'"),
        ("tcp:http", "port must be a number"),
    ],
)
def test_bad_listener_stops_twistd_with_one_line(config_file, tmp_path: Path, listen: str, message: str) -> None:
    """A bad [http] listen stops twistd with the configuration error's one line, no traceback."""
    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    config = config_file(http={"listen": listen})
    twistd = str(Path(sys.executable).parent / "twistd")
    result = subprocess.run([twistd, "-n", "--pidfile=", "imageshare", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    line = next(line for line in output.splitlines() if "[http] listen:" in line)
    assert message in line
