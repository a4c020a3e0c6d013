"""The DICOM listener's endpoint descriptions."""

from __future__ import annotations

import pytest

from imageshare.endpoints import EndpointError, parse_dicom_endpoint


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
