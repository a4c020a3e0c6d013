"""
Configuration: the INI file read at start-up, validated into frozen values.

Every key has a default that is safe on a shared machine (listeners on 127.0.0.1, lossless
coding). A bad value stops start-up with a :class:`ConfigError` that names the section and
the key, so an operator knows exactly which line to fix. Relative paths resolve against the
folder of the config file, not the working directory of the process.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from pathlib import Path
from typing import Callable, TypeVar

import attrs

from imageshare.endpoints import EndpointError, check_server_endpoint, parse_dicom_endpoint
from imageshare.xds.affinity import AffinityDomain, AffinityDomainError, Code, is_oid

T = TypeVar("T")

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control


class ConfigError(Exception):
    """A configuration value is missing or wrong."""

    def __init__(self, section: str, key: str, message: str) -> None:
        super().__init__(f"[{section}] {key}: {message}")
        self.section = section
        self.key = key


@attrs.frozen
class StorageConfig:
    data_dir: Path


@attrs.frozen
class DicomConfig:
    ae_title: str
    listen: str
    allowed_calling_aets: tuple[str, ...]
    max_pdu: int
    max_associations: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    # Bounds on what a peer can make us spend (issue 10); see docs/configuration.md.
    max_associations_per_address: int
    negotiation_timeout: float
    max_object_size: int
    # Calling AE titles allowed per operation (issue 12); empty: allowed_calling_aets.
    store_calling_aets: tuple[str, ...] = ()
    query_calling_aets: tuple[str, ...] = ()
    retrieve_calling_aets: tuple[str, ...] = ()
    # Who may change a stored instance: any, same_source (default), never (issue 12).
    replace: str = "same_source"

    def calling_aets(self, operation: str) -> tuple[str, ...]:
        """
        The calling AE titles allowed to ``operation`` (``"store"``, ``"query"`` or
        ``"retrieve"``): its own list, else ``allowed_calling_aets``; empty: any.
        """
        own: tuple[str, ...] = getattr(self, f"{operation}_calling_aets")
        return own or self.allowed_calling_aets


@attrs.frozen
class HttpConfig:
    listen: str
    public_url: str
    request_log: bool
    # Bounds on what a client can make us spend; they apply to the JPIP aux listener too.
    max_connections: int
    max_connections_per_address: int
    header_timeout: float  # request line and headers complete within this
    body_timeout: float  # the body complete within this after the headers
    idle_timeout: float  # a connection without a request in progress
    max_body: int  # request bodies at resources without a limit of their own
    # Browser-facing resources (/jpip, /wado): origins allowed to read answers (CORS).
    cors_origins: tuple[str, ...] = ()
    max_request_line: int = 16384  # longer request lines get 414


@attrs.frozen
class TranscodeConfig:
    workers: int
    openjpeg_threads: int
    lossless: bool
    layer_rates: tuple[float, ...]
    precinct_size: int
    max_queue: int
    nice: int


@attrs.frozen
class JpipConfig:
    session_timeout: float
    max_sessions: int
    max_model_bytes: int
    chunked: bool
    target_cache: int
    tcp_listen: str | None
    tcp_window: int
    tcp_attach_timeout: float
    max_sessions_per_client: int
    max_body: int  # POST bodies at /jpip
    # Announced in JPIP-cnew for http-tcp channels instead of where tcp_listen binds, for an
    # aux port reached through NAT or a TCP proxy; None: the listening port, no host=.
    tcp_public_host: str | None = None
    tcp_public_port: int | None = None
    # Tile-header data-bin layout: "part9" (ISO/IEC 15444-9, Kakadu-family clients) for
    # everyone, except clients whose User-Agent starts with one of openjpeg_user_agents,
    # which get "openjpeg" (what OpenJPEG's viewer and decoder rebuild from).
    tile_header_layout: str = "part9"
    openjpeg_user_agents: tuple[str, ...] = ()


@attrs.frozen
class ManifestConfig:
    enabled: bool
    stable_after: float
    retrieve_location_uid: str  # empty: generated once per data directory (see manifests)
    retrieve_ae_title: str  # empty: [dicom] ae_title


@attrs.frozen
class WadoConfig:
    cache_bytes: int
    workers: int
    decode_threads: int
    max_queue_per_client: int  # renderings waiting per client; more get 503


@attrs.frozen
class XdsConfig:
    """``[xds]``: where and how study manifests are registered (ITI-41/RAD-68)."""

    enabled: bool
    repository_url: str  # resolved: "embedded" is <public_url>/xds/repository
    embedded: bool
    timeout: float
    retry_initial: float
    retry_max: float
    max_attempts: int
    ca_file: Path | None
    client_cert: Path | None
    client_key: Path | None
    # Affinity Domain; empty values take the standalone defaults (AffinityDomain.standalone).
    patient_authority: str
    source_id: str
    repository_unique_id: str
    issuer_authorities: tuple[tuple[str, str], ...]
    unmapped_issuers: str
    codes: tuple[tuple[str, Code], ...]  # AffinityDomain attribute -> configured code
    max_body: int  # SOAP bodies at /xds/*

    def domain(self, location_uid: str) -> AffinityDomain:
        """
        The Affinity Domain of the manifests whose Retrieve Location UID is ``location_uid``.

        Raises
        ------
        AffinityDomainError
            A value is not valid for the domain.
        """
        overrides: dict[str, object] = dict(self.codes)
        for name in ("patient_authority", "source_id", "repository_unique_id"):
            if getattr(self, name):
                overrides[name] = getattr(self, name)
        overrides["issuer_authorities"] = self.issuer_authorities
        overrides["unmapped_issuers"] = self.unmapped_issuers
        return AffinityDomain.standalone(location_uid, **overrides)


@attrs.frozen
class DicomDestination:
    """A C-MOVE destination: where the AE title named in a C-MOVE request is reached."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    # Send JPIP Referenced headers (.94) where it accepts them: only for destinations known
    # to store them. Many accept .94 in negotiation and then abort (Orthanc, dcmtk).
    jpip: bool = False


@attrs.frozen
class DicomPeer:
    """``[dicom_peers]``: a peer AE title and the SHA-256 digests of the SubjectPublicKeyInfo
    of the certificates it may present (any one matches; several allow a key rollover)."""

    ae_title: str
    pins: tuple[bytes, ...]


@attrs.frozen
class AuditConfig:
    """``[audit]``: the IHE ATNA audit trail (see docs/configuration.md)."""

    syslog: tuple[str, str, int] | None = None  # (tls|udp, host, port); None: the local audit log only
    source_id: str = ""  # AuditSourceID; empty: [dicom] ae_title
    site_id: str = ""  # AuditEnterpriseSiteID; empty: left out
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    max_spool: int = 256 * 1024 * 1024  # bytes of messages waiting for the repository
    retry_max: float = 60.0  # longest wait between reconnection attempts


@attrs.frozen
class LogConfig:
    level: str  # the least severe level written: debug, info, warn, error


@attrs.frozen
class AuthConfig:
    """``[auth]``: bearer tokens on the HTTP interfaces (see docs/security.md)."""

    mode: str = "none"  # none | bearer
    issuer: str = ""
    audience: str = ""
    jwks: str = ""  # an https URL or an absolute file path (resolved)
    jwks_ca_file: Path | None = None
    jwks_timeout: float = 10.0
    # RFC 7662 introspection of opaque tokens (IUA ITI-102): an https URL, or empty (off).
    # TLS trust and timeout: jwks_ca_file and jwks_timeout.
    introspection_url: str = ""
    introspection_client_id: str = ""
    introspection_client_secret: str = attrs.field(default="", repr=False)
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    leeway: float = 60.0
    require_typ: str = "at+jwt"
    scope_image_read: str = "image.read"
    scope_xds_read: str = "xds.read"
    scope_xds_write: str = "xds.write"
    scope_admin: str = "admin"
    # Listeners beyond loopback may go unprotected (checked by imageshare.exposure).
    insecure_remote: bool = False
    # Lifetime (s) of the URL grants handed out with JPIP-referenced headers (imageshare.auth.grants).
    grant_lifetime: int = 300

    @property
    def enabled(self) -> bool:
        return self.mode == "bearer"


@attrs.frozen
class Config:
    """The whole configuration, as read from one INI file."""

    path: Path | None
    storage: StorageConfig
    dicom: DicomConfig
    http: HttpConfig
    transcode: TranscodeConfig
    jpip: JpipConfig
    manifest: ManifestConfig
    wado: WadoConfig
    dicom_destinations: tuple[DicomDestination, ...]
    xds: XdsConfig
    log: LogConfig = LogConfig(level="info")
    # Bearer tokens on the HTTP interfaces (issue 12).
    auth: AuthConfig = AuthConfig()
    # Certificate pins per peer AE title (issue 12).
    dicom_peers: tuple[DicomPeer, ...] = ()
    # The ATNA audit trail (issue 12).
    audit: AuditConfig = AuditConfig()
    # Deprecated keys that were read, as one line each for the start-up log.
    deprecations: tuple[str, ...] = ()


# -- value parsers: each raises ValueError with a message fit for an operator ---------------


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise ValueError(f"must be more than 0 and at most 86400 seconds, got {text}")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def _one_of(*choices: str) -> Callable[[str], str]:
    """A parser for a keyword among ``choices`` (any case), refusing others in one line."""
    listed = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected {listed}, got {text!r}")
        return value

    return parse


_tile_header_layout = _one_of("part9", "openjpeg")
_log_level = _one_of("debug", "info", "warn", "error")
_replace = _one_of("any", "same_source", "never")
_unmapped = _one_of("domain", "reject")
_auth_mode = _one_of("none", "bearer")


def _ae_title(text: str) -> str:
    title = text.strip()
    if not _AE_TITLE.match(title) or not title.strip():
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): {text!r}")
    return title


def _ae_list(text: str) -> tuple[str, ...]:
    items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    return tuple(_ae_title(t) for t in items)


def _http_endpoint(base: Path) -> Callable[[str], str]:
    """A parser of HTTP/JPIP aux listener descriptions whose files resolve against ``base``."""

    def parse(text: str) -> str:
        # Everything is checked now, keys and certificates loaded: a bad value is one
        # line naming the key, never a traceback when the listener is built.
        try:
            check_server_endpoint(text, base)
        except EndpointError as e:
            raise ValueError(str(e)) from None
        return text.strip()

    return parse


def _optional_endpoint(base: Path) -> Callable[[str], str | None]:
    # Empty switches the listener off.
    parse = _http_endpoint(base)
    return lambda text: parse(text) if text.strip() else None


def _dicom_endpoint(text: str) -> str:
    try:
        parse_dicom_endpoint(text)
    except EndpointError as e:
        raise ValueError(str(e)) from None
    return text.strip()


def _public_url(text: str) -> str:
    url = text.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", url):
        raise ValueError(f"expected an absolute http(s) URL without query, got {text!r}")
    return url


def _layer_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated compression ratios, got {text!r}") from None
    if len(rates) < 3:
        raise ValueError("at least 3 quality layers are needed")
    head = rates[:-1]
    if any(r <= 1 for r in head) or any(a <= b for a, b in zip(head, head[1:])):
        raise ValueError("ratios must be above 1 and strictly decreasing, e.g. 80,40,20,10,1")
    if rates[-1] < 0 or (len(head) and rates[-1] >= head[-1]):
        raise ValueError("the last ratio must be the smallest (1 or 0 means lossless)")
    return rates


class _Reader:
    """Reads keys, remembering which ones were used so that typos are reported."""

    def __init__(self, parser: configparser.ConfigParser, base: Path) -> None:
        self._parser = parser
        self._base = base
        self.base = base
        self.used: set[tuple[str, str]] = set()

    def get(self, section: str, key: str, default: str, parse: Callable[[str], T]) -> T:
        self.used.add((section, key))
        written = next((o for o in self._parser.options(section) if o.lower() == key), None) \
            if self._parser.has_section(section) else None
        raw = self._parser.get(section, written, fallback=default) if written else default
        try:
            return parse(raw)
        except ValueError as e:
            raise ConfigError(section, key, str(e)) from None

    def path(self, section: str, key: str, default: str) -> Path:
        def parse(text: str) -> Path:
            if not text.strip():
                raise ValueError("must not be empty")
            p = Path(os.path.expanduser(text.strip()))
            return p if p.is_absolute() else (self._base / p)

        return self.get(section, key, default, parse)

    def optional_file(self, section: str, key: str) -> Path | None:
        """An existing file (relative to the config file's folder), or ``None`` when empty."""

        def parse(text: str) -> Path | None:
            if not text.strip():
                return None
            p = Path(os.path.expanduser(text.strip()))
            p = p if p.is_absolute() else (self._base / p)
            if not p.is_file():
                raise ValueError(f"no such file: {p}")
            return p

        return self.get(section, key, "", parse)


def load(path: str | os.PathLike[str] | None) -> Config:
    """
    Read and validate a configuration file.

    Parameters
    ----------
    path
        The INI file; ``None`` gives the embedded defaults, with paths relative to the
        current directory.

    Raises
    ------
    ConfigError
        For an unreadable file, an unknown section or key, or a bad value.
    """
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    # Keys keep their case: [dicom_destinations] keys are AE titles, which are case-sensitive.
    # The other keys are matched case-insensitively below.
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        try:
            with open(file, encoding="utf-8") as f:
                parser.read_file(f)
        except OSError as e:
            raise ConfigError("-", "-", f"cannot read {file}: {e.strerror}") from None
        except configparser.Error as e:
            raise ConfigError("-", "-", f"{file} is not a valid INI file: {e}") from None
        base = file.resolve().parent
    r = _Reader(parser, base)
    public_url = r.get("http", "public_url", "http://127.0.0.1:8080", _public_url)
    cors_origins, deprecations = _cors_origins(parser, r)

    config = Config(
        path=Path(path).resolve() if path is not None else None,
        storage=StorageConfig(data_dir=r.path("storage", "data_dir", "var")),
        dicom=DicomConfig(
            ae_title=r.get("dicom", "ae_title", "IMAGESHARE", _ae_title),
            listen=r.get("dicom", "listen", "tcp:11112:interface=127.0.0.1", _dicom_endpoint),
            allowed_calling_aets=r.get("dicom", "allowed_calling_aets", "", _ae_list),
            max_pdu=r.get("dicom", "max_pdu", "262144", _max_pdu),
            max_associations=r.get("dicom", "max_associations", "64", _int_range(1, 1000)),
            acse_timeout=r.get("dicom", "acse_timeout", "30", _seconds),
            dimse_timeout=r.get("dicom", "dimse_timeout", "60", _seconds),
            network_timeout=r.get("dicom", "network_timeout", "60", _seconds),
            max_associations_per_address=r.get("dicom", "max_associations_per_address", "16", _int_range(1, 1000)),
            negotiation_timeout=r.get("dicom", "negotiation_timeout", "10", _seconds),
            max_object_size=r.get("dicom", "max_object_size", "1073741824", _int_range(1 << 16, 1 << 36)),
            store_calling_aets=r.get("dicom", "store_calling_aets", "", _ae_list),
            query_calling_aets=r.get("dicom", "query_calling_aets", "", _ae_list),
            retrieve_calling_aets=r.get("dicom", "retrieve_calling_aets", "", _ae_list),
            replace=r.get("dicom", "replace", "same_source", _replace),
        ),
        http=HttpConfig(
            listen=r.get("http", "listen", "tcp:8080:interface=127.0.0.1", _http_endpoint(base)),
            public_url=public_url,
            request_log=r.get("http", "request_log", "no", _bool),
            max_connections=r.get("http", "max_connections", "512", _int_range(1, 100_000)),
            max_connections_per_address=r.get("http", "max_connections_per_address", "128", _int_range(1, 100_000)),
            header_timeout=r.get("http", "header_timeout", "20", _seconds),
            body_timeout=r.get("http", "body_timeout", "120", _seconds),
            idle_timeout=r.get("http", "idle_timeout", "60", _seconds),
            max_body=r.get("http", "max_body", "65536", _int_range(0, 1 << 40)),
            cors_origins=cors_origins,
            max_request_line=r.get("http", "max_request_line", "16384", _int_range(1024, 65536)),
        ),
        transcode=TranscodeConfig(
            workers=r.get("transcode", "workers", "2", _int_range(1, 64)),
            openjpeg_threads=r.get("transcode", "openjpeg_threads", "1", _int_range(1, 64)),
            lossless=r.get("transcode", "lossless", "yes", _bool),
            layer_rates=r.get("transcode", "layer_rates", "80,40,20,10,1", _layer_rates),
            precinct_size=r.get("transcode", "precinct_size", "128", _precinct),
            max_queue=r.get("transcode", "max_queue", "1024", _int_range(1, 1_000_000)),
            nice=r.get("transcode", "nice", "10", _int_range(0, 19)),
        ),
        jpip=JpipConfig(
            session_timeout=r.get("jpip", "session_timeout", "300", _seconds),
            max_sessions=r.get("jpip", "max_sessions", "1000", _int_range(1, 1_000_000)),
            max_model_bytes=r.get("jpip", "max_model_bytes", "8388608", _int_range(4096, 2**34)),
            chunked=r.get("jpip", "chunked", "yes", _bool),
            target_cache=r.get("jpip", "target_cache", "64", _int_range(1, 100_000)),
            tcp_listen=r.get("jpip", "tcp_listen", "tcp:8081:interface=127.0.0.1", _optional_endpoint(base)),
            tcp_window=r.get("jpip", "tcp_window", "1048576", _int_range(65535, 1 << 30)),
            tcp_attach_timeout=r.get("jpip", "tcp_attach_timeout", "30", _seconds),
            max_sessions_per_client=r.get("jpip", "max_sessions_per_client", "100", _int_range(1, 1_000_000)),
            max_body=r.get("jpip", "max_body", "1048576", _int_range(0, 1 << 40)),
            tcp_public_host=r.get("jpip", "tcp_public_host", "", _public_host),
            tcp_public_port=r.get("jpip", "tcp_public_port", "", _optional_port),
            tile_header_layout=r.get("jpip", "tile_header_layout", "part9", _tile_header_layout),
            openjpeg_user_agents=r.get("jpip", "openjpeg_user_agents", "", _user_agent_prefixes),
        ),
        manifest=ManifestConfig(
            enabled=r.get("manifest", "enabled", "yes", _bool),
            stable_after=r.get("manifest", "stable_after", "60", _seconds),
            retrieve_location_uid=r.get("manifest", "retrieve_location_uid", "", _optional_uid),
            retrieve_ae_title=r.get("manifest", "retrieve_ae_title", "", _optional_ae_title),
        ),
        wado=WadoConfig(
            cache_bytes=r.get("wado", "cache_bytes", "67108864", _int_range(0, 1 << 40)),
            workers=r.get("wado", "workers", "2", _int_range(1, 64)),
            decode_threads=r.get("wado", "decode_threads", "2", _int_range(1, 64)),
            max_queue_per_client=r.get("wado", "max_queue_per_client", "16", _int_range(1, 100_000)),
        ),
        dicom_destinations=_destinations(parser, r),
        dicom_peers=_peers(parser, r),
        xds=_xds(r, public_url),
        log=LogConfig(level=r.get("log", "level", "info", _log_level)),
        auth=_auth(r),
        audit=_audit(r),
        deprecations=deprecations,
    )
    for section in parser.sections():
        for key in parser.options(section):
            if (section, key.lower()) not in r.used:
                raise ConfigError(section, key, "unknown key (misspelt?)")
    _check_peers(config)
    from imageshare.exposure import exposure

    unsafe = exposure(config)
    if unsafe is not None:
        raise ConfigError(*unsafe)
    if config.jpip.tcp_listen is None:
        for key in ("tcp_public_host", "tcp_public_port"):
            if getattr(config.jpip, key) is not None:
                raise ConfigError("jpip", key, "needs tcp_listen (http-tcp is off)")
    return config


def _public_host(text: str) -> str | None:
    # Goes into JPIP-cnew as host=<name>, inside a comma-separated header value: a DNS name
    # or an IPv4 address only (an IPv6 literal would need brackets clients may not parse).
    host = text.strip()
    if not host:
        return None
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$", x) for x in labels):
        raise ValueError(f"expected a host name or an IPv4 address, got {text!r}")
    if all(x.isdigit() for x in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"not a valid IPv4 address: {text!r}") from None
    return host


def _user_agent_prefixes(text: str) -> tuple[str, ...]:
    # Comma-separated (User-Agents hold spaces, never commas in practice). An empty item
    # would match every client: that is tile_header_layout = openjpeg, so say so.
    if not text.strip():
        return ()
    items = tuple(t.strip() for t in text.split(","))
    for item in items:
        if not item:
            raise ValueError(f"empty User-Agent prefix in {text!r} (to match every client, "
                             "set tile_header_layout = openjpeg)")
        if not re.match(r"^[\x20-\x7e]{1,200}$", item):
            raise ValueError(f"expected printable ASCII User-Agent prefixes, got {item!r}")
    return items


def _optional_port(text: str) -> int | None:
    return _int_range(1, 65535)(text.strip()) if text.strip() else None


def _optional_uid(text: str) -> str:
    from imageshare.dicom.uids import is_valid_uid

    text = text.strip()
    if text and not is_valid_uid(text):
        raise ValueError(f"expected a DICOM UID (digits and dots, at most 64 characters), got {text!r}")
    return text


def _optional_ae_title(text: str) -> str:
    return _ae_title(text) if text.strip() else ""


_DESTINATION_OPTIONS = ("tls", "jpip")


def _destinations(parser: configparser.ConfigParser, r: "_Reader") -> tuple[DicomDestination, ...]:
    """``[dicom_destinations]``: ``AET = host:port[:option...]``, one per line; the options
    are ``tls`` and ``jpip``, in any order."""
    if not parser.has_section("dicom_destinations"):
        return ()
    out = []
    for key, text in parser.items("dicom_destinations", raw=True):
        r.used.add(("dicom_destinations", key.lower()))
        m = re.match(r"^([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})((?::[^:]*)*)$", text.strip())
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ConfigError("dicom_destinations", key,
                              f"expected host:port, optionally followed by :tls and/or :jpip, got {text!r}")
        options = [o.strip().lower() for o in m.group(3).split(":")[1:]]
        for option in options:
            if option not in _DESTINATION_OPTIONS:
                raise ConfigError("dicom_destinations", key, f"unknown option {option!r} (expected tls or jpip)")
            if options.count(option) > 1:
                raise ConfigError("dicom_destinations", key, f"option {option!r} given twice")
        try:
            aet = _ae_title(key)
        except ValueError as e:
            raise ConfigError("dicom_destinations", key, str(e)) from None
        out.append(DicomDestination(aet, m.group(1).strip("[]"), int(m.group(2)), "tls" in options, "jpip" in options))
    return tuple(out)


def _pin(text: str) -> bytes:
    """``sha256:`` and the SHA-256 of a certificate's SubjectPublicKeyInfo, in hex (colons
    between byte pairs allowed) or in base64 (as ``openssl ... | base64`` and HPKP write it)."""
    import base64
    import binascii

    kind, sep, value = text.strip().partition(":")
    if not sep or kind.lower() != "sha256" or not value:
        raise ValueError(f"expected sha256:<hex or base64 SPKI digest>, got {text!r}")
    compact = value.replace(":", "")
    if re.fullmatch(r"[0-9A-Fa-f]{64}", compact):
        return bytes.fromhex(compact)
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"not a SHA-256 digest (64 hex digits or 44 base64 characters): {text!r}")
    return digest


def _check_peers(config: Config) -> None:
    """A pin can only be checked where a certificate is presented: incoming, a listener
    that requires client certificates (``ssl:`` with ``caCerts``); outgoing, ``:tls``."""
    if not config.dicom_peers:
        return
    endpoint = parse_dicom_endpoint(config.dicom.listen)
    first = config.dicom_peers[0].ae_title
    if not endpoint.tls or not endpoint.ca_certs:
        raise ConfigError("dicom_peers", first, "certificate pins need [dicom] listen = ssl:... with caCerts "
                          "(client certificates required)")
    pinned = {p.ae_title for p in config.dicom_peers}
    for destination in config.dicom_destinations:
        if destination.ae_title in pinned and not destination.tls:
            raise ConfigError("dicom_destinations", destination.ae_title,
                              "this peer has a certificate pin in [dicom_peers]: add :tls")


def _peers(parser: configparser.ConfigParser, r: "_Reader") -> tuple[DicomPeer, ...]:
    """``[dicom_peers]``: ``AET = sha256:<digest>[, sha256:<digest>...]``."""
    if not parser.has_section("dicom_peers"):
        return ()
    out = []
    for key, text in parser.items("dicom_peers", raw=True):
        r.used.add(("dicom_peers", key.lower()))
        try:
            aet = _ae_title(key)
            pins = tuple(_pin(item) for item in re.split(r"[,\s]+", text.strip()) if item)
        except ValueError as e:
            raise ConfigError("dicom_peers", key, str(e)) from None
        if not pins:
            raise ConfigError("dicom_peers", key, "expected at least one sha256:<digest>")
        out.append(DicomPeer(aet, pins))
    return tuple(out)


def _cors_origins(parser: configparser.ConfigParser, r: "_Reader") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``[http] cors_origins``, or the deprecated ``[jpip] cors_origins`` it replaced; and the warnings."""
    def written(section: str) -> bool:
        return parser.has_section(section) and any(o.lower() == "cors_origins" for o in parser.options(section))

    origins = r.get("http", "cors_origins", "", _origins)
    if not written("jpip"):
        return origins, ()
    legacy = r.get("jpip", "cors_origins", "", _origins)
    if legacy and written("http"):
        raise ConfigError("jpip", "cors_origins", "replaced by [http] cors_origins, which is set too: remove this one")
    # Still honoured, so that an upgrade changes nothing; the start-up log says to move it.
    warning = "[jpip] cors_origins is deprecated: it now applies to /wado too; write it as [http] cors_origins"
    return origins or legacy, (warning,)


def _origins(text: str) -> tuple[str, ...]:
    items = tuple(t for t in re.split(r"[,\s]+", text.strip()) if t)
    for item in items:
        if item != "*" and not re.match(r"^https?://[^/\s]+$", item):
            raise ValueError(f"expected * or origins such as https://viewer.example.org, got {item!r}")
    return items


def _max_pdu(text: str) -> int:
    value = _int_range(0, 2**32 - 1)(text)
    if 0 < value < 64:
        raise ValueError(f"must be 0 (no limit) or at least 64 bytes, got {value}")
    return value


def _precinct(text: str) -> int:
    value = _int_range(4, 32768)(text)
    if value & (value - 1):
        raise ValueError(f"must be a power of two, got {value}")
    return value


# -- [xds] ------------------------------------------------------------------------------------

# Config key -> AffinityDomain attribute, for the codes written code^scheme^display.
_XDS_CODES = (
    ("class_code", "class_code"),
    ("type_code", "type_code"),
    ("practice_setting_code", "practice_setting_code"),
    ("facility_type_code", "healthcare_facility_type_code"),
    ("confidentiality_code", "confidentiality_code"),
    ("content_type_code", "content_type_code"),
)


def _repository_url(text: str) -> str:
    text = text.strip()
    if text.lower() == "embedded":
        return "embedded"
    url = text.rstrip("/")
    if not re.match(r"^https?://[^/\s?#]+(/[^\s#]*)?$", url):
        raise ValueError(f"expected embedded or an absolute http(s) URL, got {text!r}")
    return url


def _optional_oid(text: str) -> str:
    text = text.strip()
    if text and not is_oid(text):
        raise ValueError(f"expected an OID (digits and dots), got {text!r}")
    return text


def _code(text: str) -> Code | None:
    text = text.strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split("^")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"expected code^scheme^display, got {text!r}")
    return Code(*parts)


def _issuer_authorities(text: str) -> tuple[tuple[str, str], ...]:
    """``ISSUER=OID`` pairs, separated by commas or new lines."""
    out = []
    for item in (i.strip() for i in re.split(r"[,\n]", text)):
        if not item:
            continue
        issuer, sep, oid = (p.strip() for p in item.rpartition("="))
        if not sep or not issuer or not is_oid(oid):
            raise ValueError(f"expected ISSUER=OID, got {item!r}")
        out.append((issuer, oid))
    return tuple(out)


def _xds(r: _Reader, public_url: str) -> XdsConfig:
    repository = r.get("xds", "repository_url", "embedded", _repository_url)
    codes = []
    for key, attribute in _XDS_CODES:
        try:
            code = r.get("xds", key, "", _code)
        except AffinityDomainError as e:
            raise ConfigError("xds", key, str(e)) from None
        if code is not None:
            codes.append((attribute, code))
    retry_initial = r.get("xds", "retry_initial", "5", _seconds)
    config = XdsConfig(
        enabled=r.get("xds", "enabled", "yes", _bool),
        repository_url=f"{public_url}/xds/repository" if repository == "embedded" else repository,
        embedded=repository == "embedded",
        timeout=r.get("xds", "timeout", "30", _seconds),
        retry_initial=retry_initial,
        retry_max=r.get("xds", "retry_max", "600", _seconds),
        max_attempts=r.get("xds", "max_attempts", "20", _int_range(1, 1000)),
        ca_file=r.optional_file("xds", "ca_file"),
        client_cert=r.optional_file("xds", "client_cert"),
        client_key=r.optional_file("xds", "client_key"),
        patient_authority=r.get("xds", "patient_authority", "", _optional_oid),
        source_id=r.get("xds", "source_id", "", _optional_oid),
        repository_unique_id=r.get("xds", "repository_unique_id", "", _optional_oid),
        issuer_authorities=r.get("xds", "issuer_authorities", "", _issuer_authorities),
        unmapped_issuers=r.get("xds", "unmapped_issuers", "domain", _unmapped),
        codes=tuple(codes),
        max_body=r.get("xds", "max_body", "67108864", _int_range(0, 1 << 40)),
    )
    if config.retry_max < config.retry_initial:
        raise ConfigError("xds", "retry_max", "must not be less than retry_initial")
    if config.client_key is not None and config.client_cert is None:
        raise ConfigError("xds", "client_key", "needs client_cert")
    try:
        config.domain("1.2.3")  # any valid OID: checks the configured values together
    except AffinityDomainError as e:
        raise ConfigError("xds", "-", str(e)) from None
    return config


# -- [auth] -----------------------------------------------------------------------------------

_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


def _algorithms(text: str) -> tuple[str, ...]:
    items = tuple(t for t in re.split(r"[,\s]+", text.strip()) if t)
    if not items:
        raise ValueError("must name at least one algorithm")
    for item in items:
        if item not in _ASYMMETRIC:
            raise ValueError(f"{item!r} is not accepted: only {', '.join(_ASYMMETRIC)} (never none or HMAC)")
    return items


def _scope_name(text: str) -> str:
    value = text.strip()
    if not re.match(r"^[\x21\x23-\x5b\x5d-\x7e]+$", value):
        raise ValueError(f"expected one scope token (no spaces or quotes), got {text!r}")
    return value


def _leeway(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= 600:
        raise ValueError(f"must be between 0 and 600 seconds, got {text}")
    return value


def _auth(r: _Reader) -> AuthConfig:
    def jwks(text: str) -> str:
        text = text.strip()
        if not text or re.match(r"^https://[^/\s?#]+(/[^\s#]*)?$", text):
            return text
        if re.match(r"^[a-z]+://", text, re.I):
            raise ValueError(f"expected an https URL or a file, got {text!r}")
        p = Path(os.path.expanduser(text))
        p = p if p.is_absolute() else (r.base / p)
        if not p.is_file():
            raise ValueError(f"no such file: {p}")
        return str(p)

    def https_url(text: str) -> str:
        text = text.strip()
        if text and not re.match(r"^https://[^/\s?#]+(/[^\s#]*)?$", text):
            raise ValueError("expected an https URL, or nothing")
        return text

    def credential(text: str) -> str:
        # The value is not quoted back: it may be a secret.
        text = text.strip()
        if not re.match(r"^[\x20-\x7e]{0,256}$", text):
            raise ValueError("expected up to 256 printable ASCII characters")
        return text

    config = AuthConfig(
        mode=r.get("auth", "mode", "none", _auth_mode),
        issuer=r.get("auth", "issuer", "", str.strip),
        audience=r.get("auth", "audience", "", str.strip),
        jwks=r.get("auth", "jwks", "", jwks),
        jwks_ca_file=r.optional_file("auth", "jwks_ca_file"),
        jwks_timeout=r.get("auth", "jwks_timeout", "10", _seconds),
        introspection_url=r.get("auth", "introspection_url", "", https_url),
        introspection_client_id=r.get("auth", "introspection_client_id", "", credential),
        introspection_client_secret=r.get("auth", "introspection_client_secret", "", credential),
        algorithms=r.get("auth", "algorithms", "RS256, PS256, ES256", _algorithms),
        leeway=r.get("auth", "leeway", "60", _leeway),
        require_typ=r.get("auth", "require_typ", "at+jwt", lambda t: t.strip()),
        scope_image_read=r.get("auth", "scope_image_read", "image.read", _scope_name),
        scope_xds_read=r.get("auth", "scope_xds_read", "xds.read", _scope_name),
        scope_xds_write=r.get("auth", "scope_xds_write", "xds.write", _scope_name),
        scope_admin=r.get("auth", "scope_admin", "admin", _scope_name),
        insecure_remote=r.get("auth", "insecure_remote", "no", _bool),
        grant_lifetime=r.get("auth", "grant_lifetime", "300", _int_range(1, 86400)),
    )
    if config.enabled:
        for key in ("issuer", "audience"):
            if not getattr(config, key):
                raise ConfigError("auth", key, "is required with mode = bearer")
        if not config.jwks and not config.introspection_url:
            raise ConfigError("auth", "jwks", "is required with mode = bearer (or introspection_url)")
    if config.introspection_url:
        for key in ("introspection_client_id", "introspection_client_secret"):
            if not getattr(config, key):
                raise ConfigError("auth", key, "is required with introspection_url")
    return config


# -- [audit] ----------------------------------------------------------------------------------


def _syslog(text: str) -> tuple[str, str, int] | None:
    text = text.strip()
    if not text:
        return None
    m = re.match(r"^(tls|udp):([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})$", text)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ValueError(f"expected tls:HOST:PORT or udp:HOST:PORT, or nothing, got {text!r}")
    return m.group(1), m.group(2).strip("[]"), int(m.group(3))


def _audit(r: _Reader) -> AuditConfig:
    def token(text: str) -> str:
        text = text.strip()
        if not re.match(r"^[\x21-\x7e]{0,64}$", text):
            raise ValueError(f"expected up to 64 printable ASCII characters without spaces, got {text!r}")
        return text

    config = AuditConfig(
        syslog=r.get("audit", "syslog", "", _syslog),
        source_id=r.get("audit", "source_id", "", token),
        site_id=r.get("audit", "site_id", "", token),
        ca_file=r.optional_file("audit", "ca_file"),
        client_cert=r.optional_file("audit", "client_cert"),
        client_key=r.optional_file("audit", "client_key"),
        max_spool=r.get("audit", "max_spool", "268435456", _int_range(1 << 20, 1 << 40)),
        retry_max=r.get("audit", "retry_max", "60", _seconds),
    )
    if config.client_key is not None and config.client_cert is None:
        raise ConfigError("audit", "client_key", "needs client_cert")
    if config.syslog is not None and config.syslog[0] == "udp":
        for key in ("ca_file", "client_cert", "client_key"):
            if getattr(config, key) is not None:
                raise ConfigError("audit", key, "applies to syslog = tls:... only")
    return config
