"""The listeners' endpoint descriptions: DICOM's own parser, and the Twisted listeners'."""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactor

from imageshare.endpoints import (
    EndpointError,
    check_server_endpoint,
    parse_dicom_endpoint,
    parse_server_endpoint,
    server_endpoint,
)
from tests.integration.test_tls import make_cert


def test_tcp_forms() -> None:
    """Positional and keyword ports, interface and backlog are understood; loopback by default."""
    assert parse_dicom_endpoint("tcp:11112").interface == "127.0.0.1"
    e = parse_dicom_endpoint("tcp:port=104:interface=0.0.0.0:backlog=5")
    assert (e.port, e.interface, e.backlog, e.tls) == (104, "0.0.0.0", 5, False)
    assert parse_dicom_endpoint(r"tcp:11112:interface=\:\:1").interface == "::1"


def test_ssl_form() -> None:
    """ssl: carries key, certificate and optional client CA."""
    e = parse_dicom_endpoint("ssl:2762:privateKey=k.pem:certKey=c.pem:caCerts=ca.pem")
    assert e.tls and (e.private_key, e.cert_key, e.ca_certs) == ("k.pem", "c.pem", "ca.pem")


@pytest.mark.parametrize(
    "text",
    ["unix:/tmp/x", "tcp:", "tcp:abc", "tcp:70000", "tcp:1:2", "tcp:1:caCerts=x", "ssl:2762", "tcp:1:port=2"],
)
def test_rejected(text: str) -> None:
    """What the listener cannot use is refused with EndpointError."""
    with pytest.raises(EndpointError):
        parse_dicom_endpoint(text)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate it signed, and a folder holding them."""
    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    return tmp_path


def test_server_endpoint_forms() -> None:
    """Positional values take Twisted's order per type; escaped colons survive the round trip."""
    assert parse_server_endpoint("tcp:8080:127.0.0.1").options == (("port", "8080"), ("interface", "127.0.0.1"))
    e = parse_server_endpoint(r"tcp6:port=8080:interface=\:\:1")
    assert e.get("interface") == "::1" and e.strports() == r"tcp6:port=8080:interface=\:\:1"
    assert parse_server_endpoint("unix:/run/imageshare.sock:mode=660").get("address") == "/run/imageshare.sock"


@pytest.mark.parametrize(
    "text,message",
    [
        ("udp:8080", "expected a tcp:, tcp6:, ssl: or unix: endpoint"),
        ("8080", "expected a tcp:"),
        ("tcp:", "names no port"),
        ("tcp:http", "port must be a number"),
        ("tcp:70000", "port out of range"),
        ("tcp:8080:backlog=many", "backlog must be a number"),
        ("tcp:8080:caCerts=ca.pem", "unknown option 'caCerts'"),
        ("ssl:8443:privateKey=server.key:verify=yes", "unknown option 'verify'"),
        ("ssl:8443:privateKey=missing.key", "privateKey: no such file"),
        ("tcp:1:a:2:extra", "too many values"),
        ("tcp:1:port=2", "port given twice"),
    ],
)
def test_server_endpoint_rejected_with_a_reason(pki: Path, text: str, message: str) -> None:
    """Every bad description is an EndpointError whose one-line message says what is wrong."""
    with pytest.raises(EndpointError, match=message) as info:
        check_server_endpoint(text, pki)
    assert "\n" not in str(info.value)


def test_unloadable_key_or_ca_file_is_rejected(pki: Path) -> None:
    """Files that are there but are no PEM key or certificate fail at check time, not at start."""
    (pki / "junk.pem").write_text("not a key\n")
    for text in ("ssl:8443:privateKey=junk.pem", "ssl:8443:privateKey=server.key:certKey=server.crt:caCerts=junk.pem"):
        with pytest.raises(EndpointError, match="junk.pem|cannot use"):
            check_server_endpoint(text, pki)


def test_relative_files_resolve_against_the_base_folder(pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Key and CA file names start at the configuration's folder, not the working directory."""
    monkeypatch.chdir("/")
    e = check_server_endpoint("ssl:0:privateKey=server.key:certKey=server.crt:caCerts=ca.crt", pki)
    assert e.get("privateKey") == str(pki / "server.key") and e.get("caCerts") == str(pki / "ca.crt")
    endpoint = server_endpoint(MemoryReactor(), "ssl:0:privateKey=server.key:certKey=server.crt", pki)
    assert isinstance(endpoint, SSL4ServerEndpoint)


def test_ca_certs_make_a_listener_that_requires_client_certificates(pki: Path) -> None:
    """ssl: with caCerts builds a TLS endpoint that requires and verifies a client certificate;
    without caCerts none is asked for; tcp: stays what serverFromString makes."""
    verifying = server_endpoint(MemoryReactor(), "ssl:8443:interface=127.0.0.1:privateKey=server.key:"
                                                 "certKey=server.crt:caCerts=ca.crt", pki)
    assert isinstance(verifying, SSL4ServerEndpoint)
    context = verifying._sslContextFactory.getContext()
    required = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    assert context.get_verify_mode() & required == required
    assert (verifying._port, verifying._interface) == (8443, "127.0.0.1")
    plain = server_endpoint(MemoryReactor(), "ssl:8443:privateKey=server.key:certKey=server.crt", pki)
    assert plain._sslContextFactory.getContext().get_verify_mode() == SSL.VERIFY_NONE
    assert isinstance(server_endpoint(MemoryReactor(), "tcp:0:interface=127.0.0.1"), TCP4ServerEndpoint)
