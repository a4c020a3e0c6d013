"""
Endpoint descriptions for the DICOM listener.

The HTTP listeners are Twisted endpoints built with ``serverFromString``. The DICOM
listener is pynetdicom's own socket server, which Twisted cannot host, so it gets the same
configuration language through this small parser of the strports subset that makes sense
for it::

    tcp:11112:interface=127.0.0.1
    ssl:2762:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem:caCerts=ca.pem

``caCerts`` (an extension) makes the listener require and verify client certificates, as
the DICOM secure transport connection profiles (PS3.15 B.1) expect between enterprises.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs


class EndpointError(ValueError):
    """The endpoint description cannot be used."""


@attrs.frozen
class DicomEndpoint:
    port: int
    interface: str = "127.0.0.1"
    backlog: int = 50
    private_key: str | None = None
    cert_key: str | None = None
    ca_certs: str | None = None

    @property
    def tls(self) -> bool:
        return self.private_key is not None

    def ssl_context(self, base: Path | None = None) -> ssl.SSLContext | None:
        """Build the server TLS context, or ``None`` for plain TCP."""
        if self.private_key is None:
            return None

        def resolve(name: str) -> str:
            p = Path(name)
            return str(p if p.is_absolute() or base is None else base / p)

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(resolve(self.cert_key or self.private_key), resolve(self.private_key))
        if self.ca_certs:
            context.load_verify_locations(resolve(self.ca_certs))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _split(description: str) -> list[str]:
    """Split on unescaped colons, as Twisted's strports does (``\\:`` keeps a colon)."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_dicom_endpoint(description: str) -> DicomEndpoint:
    """
    Parse ``tcp:PORT[:interface=ADDR][:backlog=N]`` or the ``ssl:`` form.

    Raises
    ------
    EndpointError
        With a message that says what is wrong.
    """
    parts = _split(description.strip())
    kind = parts[0]
    if kind not in ("tcp", "ssl"):
        raise EndpointError(f"the DICOM listener supports tcp: and ssl: endpoints, not {kind!r}")
    positional: list[str] = []
    options: dict[str, str] = {}
    for part in parts[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            options[k] = v
        else:
            positional.append(part)
    if positional:
        if "port" in options or len(positional) > 1:
            raise EndpointError(f"unexpected positional value in {description!r}")
        options["port"] = positional[0]
    known = {"port", "interface", "backlog"} | ({"privateKey", "certKey", "caCerts"} if kind == "ssl" else set())
    unknown = set(options) - known
    if unknown:
        raise EndpointError(f"unknown option(s) {', '.join(sorted(unknown))} in {description!r}")
    try:
        port = int(options.get("port", ""))
        backlog = int(options.get("backlog", "50"))
    except ValueError:
        raise EndpointError(f"port and backlog must be numbers in {description!r}") from None
    if not 0 <= port <= 65535:
        raise EndpointError(f"port out of range in {description!r}")
    if kind == "ssl" and "privateKey" not in options:
        raise EndpointError("an ssl: endpoint needs privateKey= (and usually certKey=)")
    return DicomEndpoint(
        port=port,
        interface=options.get("interface", "127.0.0.1") or "127.0.0.1",
        backlog=backlog,
        private_key=options.get("privateKey"),
        cert_key=options.get("certKey"),
        ca_certs=options.get("caCerts"),
    )
