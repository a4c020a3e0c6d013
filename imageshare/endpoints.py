"""
Endpoint descriptions for the listeners.

All listeners take Twisted's strports language::

    tcp:11112:interface=127.0.0.1
    ssl:2762:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem:caCerts=ca.pem

``caCerts`` (an extension) makes the listener require and verify client certificates, as
the DICOM secure transport connection profiles (PS3.15 B.1) expect between enterprises.

The DICOM listener is pynetdicom's own socket server, which Twisted cannot host: it gets
this language through :func:`parse_dicom_endpoint`, a parser of the subset that makes
sense for it. The HTTP and JPIP aux listeners are Twisted endpoints:
:func:`check_server_endpoint` validates a description when the configuration is read
(every option known, numbers numbers, files there and loadable) and
:func:`server_endpoint` builds it, through ``serverFromString`` except for ``ssl:`` with
``caCerts``, which Twisted's parser does not know. Relative file names resolve against
the configuration file's folder, in every listener.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any

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


# -- Twisted listeners (HTTP, JPIP aux) -------------------------------------------------------

# Options per endpoint type, positional ones in Twisted's order (twisted.internet.endpoints
# _parseTCP, _parseSSL, _parseUNIX and the tcp6 parser), plus our caCerts for ssl:.
_SERVER_OPTIONS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain",
            "dhParameters", "caCerts"),
    "unix": ("address", "mode", "backlog", "lockfile"),
}
_FILE_OPTIONS = ("privateKey", "certKey", "extraCertChain", "dhParameters", "caCerts")
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


@attrs.frozen
class ServerEndpoint:
    """A validated description for a Twisted listener; file names are absolute."""

    kind: str
    options: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)

    @property
    def verifies_clients(self) -> bool:
        """Client certificates are required (``ssl:`` with ``caCerts``)."""
        return self.kind == "ssl" and self.get("caCerts") is not None

    def strports(self) -> str:
        """The description for ``serverFromString``, without our ``caCerts``."""
        def escape(value: str) -> str:
            return re.sub(r"([\\:=])", r"\\\1", value)

        return ":".join([self.kind] + [f"{k}={escape(v)}" for k, v in self.options if k != "caCerts"])


def parse_server_endpoint(description: str, base: Path | None = None) -> ServerEndpoint:
    """
    Parse an HTTP or JPIP aux listener description: ``tcp:``, ``tcp6:``, ``ssl:`` or ``unix:``.

    Parameters
    ----------
    description
        The strports description, e.g. ``ssl:8443:privateKey=k.pem:caCerts=ca.pem``.
    base
        Where relative file names start (the configuration file's folder); ``None``: the
        working directory.

    Raises
    ------
    EndpointError
        With a message that says what is wrong: the type, an unknown option, a number,
        or a file that is not there.
    """
    parts = _split(description.strip())
    kind = parts[0]
    names = _SERVER_OPTIONS.get(kind)
    if names is None:
        raise EndpointError(f"expected a tcp:, tcp6:, ssl: or unix: endpoint such as "
                            f"tcp:8080:interface=127.0.0.1, got {description!r}")
    options: dict[str, str] = {}
    positional = 0
    for part in parts[1:]:
        if "=" in part:
            name, value = part.split("=", 1)
            if name not in names:
                raise EndpointError(f"unknown option {name!r} in {description!r} "
                                    f"({kind}: takes {', '.join(names)})")
        else:
            if positional >= len(names):
                raise EndpointError(f"too many values in {description!r}")
            name, value = names[positional], part
            positional += 1
        if name in options:
            raise EndpointError(f"{name} given twice in {description!r}")
        options[name] = value
    first = names[0]
    if first not in options or not options[first]:
        raise EndpointError(f"{description!r} names no {first}")
    for name in ("port", "backlog"):
        if name in options:
            if not options[name].isdigit():
                raise EndpointError(f"{name} must be a number in {description!r}")
            if name == "port" and int(options[name]) > 65535:
                raise EndpointError(f"port out of range in {description!r}")
    if kind == "ssl":
        options.setdefault("privateKey", "server.pem")  # Twisted's default
        for name in _FILE_OPTIONS:
            if name in options:
                path = _resolve(options[name], base)
                if not path.is_file():
                    raise EndpointError(f"{name}: no such file {str(path)!r} in {description!r}")
                options[name] = str(path)
    return ServerEndpoint(kind, tuple(options.items()))


def check_server_endpoint(description: str, base: Path | None = None) -> ServerEndpoint:
    """
    :func:`parse_server_endpoint`, then build the endpoint (without listening), which loads
    and checks the keys and certificates.

    Raises
    ------
    EndpointError
        On anything that would stop :func:`server_endpoint` later.
    """
    endpoint = parse_server_endpoint(description, base)
    try:
        _build(object(), endpoint)  # a stand-in reactor: nothing listens or runs
    except EndpointError:
        raise
    except Exception as e:  # Twisted's parsers and OpenSSL raise many kinds
        reason = str(e) or type(e).__name__
        raise EndpointError(f"cannot use {description!r}: {reason}") from None
    return endpoint


def server_endpoint(reactor: Any, description: str, base: Path | None = None) -> Any:
    """
    The ``IStreamServerEndpoint`` for ``description``.

    ``ssl:`` with ``caCerts`` gets a TLS endpoint that requires a client certificate and
    verifies it against the certificates in the ``caCerts`` file; everything else is what
    ``serverFromString`` makes of it.
    """
    return _build(reactor, parse_server_endpoint(description, base))


def client_tls_material(ca_file: Path | None, client_cert: Path | None, client_key: Path | None) -> tuple[Any, Any]:
    """
    What an outgoing TLS connection of ours trusts and presents: the CA certificate in
    ``ca_file`` (the platform's roots if ``None``) and the client certificate (with its key
    from ``client_key``, or from the same file), as ``twisted.internet.ssl`` objects for
    ``optionsForClientTLS(trustRoot=..., clientCertificate=...)``.
    """
    from twisted.internet import ssl as tls

    trust = tls.Certificate.loadPEM(ca_file.read_bytes()) if ca_file is not None else tls.platformTrust()
    certificate = None
    if client_cert is not None:
        pem = client_cert.read_bytes()
        if client_key is not None:
            pem = pem + b"\n" + client_key.read_bytes()
        certificate = tls.PrivateCertificate.loadPEM(pem)
    return trust, certificate


def _build(reactor: Any, endpoint: ServerEndpoint) -> Any:
    from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString

    if not endpoint.verifies_clients:
        return serverFromString(reactor, endpoint.strports())
    from OpenSSL import SSL
    from twisted.internet import ssl as tls

    def read(name: str) -> bytes:
        value = endpoint.get(name)
        assert value is not None
        return Path(value).read_bytes()

    key_pem = read("privateKey")
    cert_pem = read("certKey") if endpoint.get("certKey") else key_pem
    private = tls.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    authorities = [tls.Certificate.loadPEM(pem) for pem in _PEM_CERTIFICATE.findall(read("caCerts"))]
    if not authorities:
        raise EndpointError(f"caCerts: no PEM certificate in {endpoint.get('caCerts')!r}")
    extra: dict[str, Any] = {}
    if endpoint.get("extraCertChain"):
        extra["extraCertChain"] = [
            tls.Certificate.loadPEM(pem).original for pem in _PEM_CERTIFICATE.findall(read("extraCertChain"))
        ]
    if endpoint.get("dhParameters"):
        from twisted.python.filepath import FilePath

        extra["dhParameters"] = tls.DiffieHellmanParameters.fromFile(FilePath(endpoint.get("dhParameters")))
    if endpoint.get("sslmethod"):
        extra["method"] = getattr(SSL, str(endpoint.get("sslmethod")))
    options = tls.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        trustRoot=tls.trustRootFromCertificates(authorities),  # implies requiring a client certificate
        **extra,
    )
    return SSL4ServerEndpoint(
        reactor,
        int(endpoint.get("port", "0") or 0),
        options,
        backlog=int(endpoint.get("backlog", "50") or 50),
        interface=endpoint.get("interface", "") or "",
    )


def _resolve(name: str, base: Path | None) -> Path:
    path = Path(os.path.expanduser(name))
    return path if path.is_absolute() or base is None else base / path
