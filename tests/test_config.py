"""Configuration loading and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageshare.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_file_equals_embedded_defaults(tmp_path: Path) -> None:
    """etc/imageshare.ini documents the defaults: loading it gives the embedded values."""
    shipped = load(ROOT / "etc" / "imageshare.ini")
    embedded = load(None)
    assert shipped.dicom == embedded.dicom
    assert shipped.http == embedded.http
    assert shipped.transcode == embedded.transcode
    assert shipped.storage.data_dir == ROOT / "etc" / "var"


def test_defaults_are_safe() -> None:
    """Without a file, listeners bind to loopback only and coding is lossless."""
    c = load(None)
    assert "interface=127.0.0.1" in c.dicom.listen
    assert "interface=127.0.0.1" in c.http.listen
    assert c.transcode.lossless is True
    assert c.transcode.layer_rates[-1] in (0, 1)
    assert c.dicom.ae_title == "IMAGESHARE"
    assert c.http.request_log is False


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    """data_dir is relative to the config file's folder, not the working directory."""
    sub = tmp_path / "conf"
    sub.mkdir()
    f = sub / "x.ini"
    f.write_text("[storage]\ndata_dir = ../state\n")
    assert load(f).storage.data_dir.resolve() == (tmp_path / "state").resolve()


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("dicom", "ae_title", "THIS_TITLE_IS_FAR_TOO_LONG"),
        ("dicom", "ae_title", "BACK\\SLASH"),
        ("dicom", "listen", "udp:11112"),
        ("dicom", "listen", "tcp:99999"),
        ("dicom", "listen", "tcp:11112:bogus=1"),
        ("dicom", "max_pdu", "-1"),
        ("dicom", "dimse_timeout", "soon"),
        ("dicom", "allowed_calling_aets", "GOOD, BAD\\ONE"),
        ("http", "listen", "8080"),
        ("http", "listen", "tcp:http"),
        ("http", "listen", "tcp:8080:caCerts=ca.pem"),
        ("http", "listen", "ssl:8443:privateKey=missing.key:caCerts=missing.pem"),
        ("jpip", "tcp_listen", "tcp:70000"),
        ("jpip", "tcp_listen", "ssl:8081:privateKey=missing.key"),
        ("jpip", "tcp_public_port", "0"),
        ("jpip", "tcp_public_port", "70000"),
        ("jpip", "tcp_public_port", "http"),
        ("jpip", "tcp_public_host", "two words"),
        ("jpip", "tcp_public_host", "a.example,auxport=1"),
        ("jpip", "tcp_public_host", "300.1.1.1"),
        ("jpip", "tcp_public_host", "[2001:db8::1]"),
        ("jpip", "tile_header_layout", "kakadu"),
        ("jpip", "tile_header_layout", ""),
        ("jpip", "openjpeg_user_agents", "Java/,,kdu"),
        ("jpip", "openjpeg_user_agents", "Java/,"),
        ("jpip", "openjpeg_user_agents", "Jav\u00e4/"),
        ("http", "public_url", "ftp://example"),
        ("http", "public_url", "http://host/path?query"),
        ("http", "request_log", "maybe"),
        ("http", "max_request_line", "1023"),
        ("http", "max_request_line", "65537"),
        ("http", "cors_origins", "viewer.example.org"),
        ("jpip", "cors_origins", "https://viewer.example.org/path"),
        ("transcode", "workers", "0"),
        ("transcode", "workers", "two"),
        ("transcode", "lossless", "perhaps"),
        ("transcode", "layer_rates", "40,20"),
        ("transcode", "layer_rates", "10,20,1"),
        ("transcode", "precinct_size", "100"),
        ("transcode", "unknown_key", "1"),
    ],
)
def test_bad_value_names_section_and_key(tmp_path: Path, section: str, key: str, value: str) -> None:
    """Every bad value stops loading with an error naming the section and key."""
    f = tmp_path / "bad.ini"
    f.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load(f)
    assert info.value.section == section
    assert info.value.key == key
    assert f"[{section}] {key}:" in str(info.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    """A missing file or one that is not INI is reported, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.ini")
    f = tmp_path / "broken.ini"
    f.write_text("no section header\n")
    with pytest.raises(ConfigError, match="not a valid INI"):
        load(f)


def test_values_are_parsed(tmp_path: Path) -> None:
    """Lists, numbers and booleans come out typed."""
    f = tmp_path / "ok.ini"
    f.write_text(
        "[dicom]\nallowed_calling_aets = PACS1, PACS2 MODALITY\nmax_pdu = 0\n"
        "[http]\npublic_url = https://images.example.org/share/\nrequest_log = yes\n"
        "[transcode]\nworkers = 3\nlayer_rates = 50,20,5,0\nlossless = no\n"
    )
    c = load(f)
    assert c.dicom.allowed_calling_aets == ("PACS1", "PACS2", "MODALITY")
    assert c.dicom.max_pdu == 0
    assert c.http.public_url == "https://images.example.org/share"
    assert c.http.request_log is True
    assert c.transcode.workers == 3
    assert c.transcode.layer_rates == (50.0, 20.0, 5.0, 0.0)
    assert c.transcode.lossless is False


def test_jpip_public_aux_address(tmp_path: Path) -> None:
    """[jpip] tcp_public_host and tcp_public_port are optional (None) and typed when set; set
    without an aux listener, they are one line naming the key."""
    f = tmp_path / "nat.ini"
    assert (load(None).jpip.tcp_public_host, load(None).jpip.tcp_public_port) == (None, None)
    f.write_text("[jpip]\ntcp_public_host = jpip.example.org\ntcp_public_port = 443\n")
    c = load(f)
    assert (c.jpip.tcp_public_host, c.jpip.tcp_public_port) == ("jpip.example.org", 443)
    f.write_text("[jpip]\ntcp_public_host = 203.0.113.7\n")
    assert load(f).jpip.tcp_public_host == "203.0.113.7"
    for key, value in (("tcp_public_port", "9001"), ("tcp_public_host", "jpip.example.org")):
        f.write_text(f"[jpip]\ntcp_listen =\n{key} = {value}\n")
        with pytest.raises(ConfigError) as info:
            load(f)
        assert str(info.value) == f"[jpip] {key}: needs tcp_listen (http-tcp is off)"


def test_jpip_tile_header_layout_and_openjpeg_user_agents(tmp_path: Path) -> None:
    """[jpip] tile_header_layout is part9 (default) or openjpeg, any case; openjpeg_user_agents
    is a comma-separated list of User-Agent prefixes (spaces kept inside, empty by default);
    the shipped file has the defaults; a bad value is one line naming the key."""
    default = load(None).jpip
    assert (default.tile_header_layout, default.openjpeg_user_agents) == ("part9", ())
    shipped = load(ROOT / "etc" / "imageshare.ini").jpip
    assert (shipped.tile_header_layout, shipped.openjpeg_user_agents) == ("part9", ())
    f = tmp_path / "opj.ini"
    f.write_text("[jpip]\ntile_header_layout = OpenJPEG\n"
                 "openjpeg_user_agents = Java/ , opj viewer/2,Mozilla/5.0 (X11\n")
    c = load(f).jpip
    assert c.tile_header_layout == "openjpeg"
    assert c.openjpeg_user_agents == ("Java/", "opj viewer/2", "Mozilla/5.0 (X11")
    for value, message in [
        ("tile_header_layout = iso", "[jpip] tile_header_layout: expected part9 or openjpeg, got 'iso'"),
        ("openjpeg_user_agents = Java/,", "[jpip] openjpeg_user_agents: empty User-Agent prefix in 'Java/,' "
                                          "(to match every client, set tile_header_layout = openjpeg)"),
        ("openjpeg_user_agents = Java/\u00e9", "[jpip] openjpeg_user_agents: expected printable ASCII "
                                               "User-Agent prefixes, got 'Java/\u00e9'"),
    ]:
        f.write_text(f"[jpip]\n{value}\n", encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load(f)
        assert str(info.value) == message and "\n" not in str(info.value)


def test_manifest_and_destinations(config_file) -> None:  # type: ignore[no-untyped-def]
    """[manifest] defaults; [dicom_destinations] keeps AE title case; other keys any case."""
    c = load(config_file(
        manifest={"Stable_After": "5", "retrieve_location_uid": "1.2.3.4"},
        dicom_destinations={"PacsB": "127.0.0.1:11113", "VIEWER": "viewer.example.org:2762:tls"},
    ))
    assert c.manifest.stable_after == 5 and c.manifest.enabled and c.manifest.retrieve_location_uid == "1.2.3.4"
    assert [(d.ae_title, d.host, d.port, d.tls) for d in c.dicom_destinations] == [
        ("PacsB", "127.0.0.1", 11113, False), ("VIEWER", "viewer.example.org", 2762, True)]
    for bad in ({"dicom_destinations": {"PACS": "nohost"}}, {"dicom_destinations": {"PACS": "h:70000"}},
                {"manifest": {"retrieve_location_uid": "1.2.x"}}, {"manifest": {"bogus": "1"}}):
        with pytest.raises(ConfigError):
            load(config_file(**bad))


def test_destination_options(config_file) -> None:  # type: ignore[no-untyped-def]
    """[dicom_destinations] takes :tls and :jpip after host:port, in any order; a bad or
    repeated option is one line naming the key."""
    c = load(config_file(dicom_destinations={
        "PLAIN": "pacs:104", "VIEWER": "viewer.example.org:2762:jpip", "BOTH": "[::1]:11112:jpip:tls",
        "TLSONLY": "h:1:TLS"}))
    assert [(d.ae_title, d.host, d.port, d.tls, d.jpip) for d in c.dicom_destinations] == [
        ("PLAIN", "pacs", 104, False, False), ("VIEWER", "viewer.example.org", 2762, False, True),
        ("BOTH", "::1", 11112, True, True), ("TLSONLY", "h", 1, True, False)]
    for value, message in [("h:104:jpeg", "unknown option 'jpeg'"), ("h:104:tls:tls", "'tls' given twice"),
                           ("h:104:", "unknown option ''"), ("h:jpip", "expected host:port")]:
        with pytest.raises(ConfigError) as e:
            load(config_file(dicom_destinations={"PacsX": value}))
        assert str(e.value).startswith("[dicom_destinations] PacsX: ") and message in str(e.value)
        assert "\n" not in str(e.value)


def test_listener_ca_certs_are_checked_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[http] listen and [jpip] tcp_listen take caCerts; relative names resolve like data_dir,
    and a missing CA file is one line naming the key."""
    from tests.integration.test_tls import make_cert

    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    monkeypatch.chdir("/")
    listen = "ssl:0:interface=127.0.0.1:privateKey=server.key:certKey=server.crt:caCerts=ca.crt"
    f = tmp_path / "tls.ini"
    f.write_text(f"[http]\nlisten = {listen}\n[jpip]\ntcp_listen = {listen}\n")
    c = load(f)
    assert c.http.listen == listen and c.jpip.tcp_listen == listen
    f.write_text(f"[http]\nlisten = {listen.replace('ca.crt', 'other-ca.crt')}\n")
    with pytest.raises(ConfigError) as info:
        load(f)
    message = str(info.value)
    assert message.startswith("[http] listen: caCerts: no such file") and "\n" not in message


def test_cors_origins_in_http_and_the_deprecated_jpip_key(tmp_path: Path) -> None:
    """[http] cors_origins serves /jpip and /wado; the old [jpip] key still works with a
    deprecation line for the start-up log; both set with values is one line naming the old key."""
    f = tmp_path / "cors.ini"
    assert load(None).http.cors_origins == () and load(None).deprecations == ()
    f.write_text("[http]\ncors_origins = https://a.example, https://b.example:8443\n")
    c = load(f)
    assert c.http.cors_origins == ("https://a.example", "https://b.example:8443") and c.deprecations == ()
    f.write_text("[jpip]\ncors_origins = *\n")
    c = load(f)
    assert c.http.cors_origins == ("*",)
    assert c.deprecations == ("[jpip] cors_origins is deprecated: it now applies to /wado too; "
                              "write it as [http] cors_origins",)
    f.write_text("[jpip]\ncors_origins =\n[http]\ncors_origins = https://a.example\n")
    c = load(f)  # an empty old key left behind (as the old etc/imageshare.ini had it)
    assert c.http.cors_origins == ("https://a.example",) and len(c.deprecations) == 1
    f.write_text("[jpip]\ncors_origins = https://a.example\n[http]\ncors_origins = https://b.example\n")
    with pytest.raises(ConfigError) as info:
        load(f)
    assert str(info.value) == ("[jpip] cors_origins: replaced by [http] cors_origins, which is set too: "
                               "remove this one")


def test_max_request_line(tmp_path: Path) -> None:
    """[http] max_request_line: 16384 by default (what Twisted served before), 1 KiB to 64 KiB."""
    f = tmp_path / "line.ini"
    assert load(None).http.max_request_line == 16384
    f.write_text("[http]\nmax_request_line = 8192\n")
    assert load(f).http.max_request_line == 8192


def test_calling_aets_per_operation(tmp_path: Path) -> None:
    """store/query/retrieve_calling_aets default to allowed_calling_aets; each replaces it
    for its operation; replace defaults to same_source."""
    f = tmp_path / "a.ini"
    f.write_text("[dicom]\nallowed_calling_aets = A, B\nstore_calling_aets = MODALITY\nreplace = never\n")
    d = load(f).dicom
    assert d.calling_aets("store") == ("MODALITY",)
    assert d.calling_aets("query") == d.calling_aets("retrieve") == ("A", "B")
    assert d.replace == "never"
    assert load(None).dicom.replace == "same_source"
    assert load(None).dicom.calling_aets("store") == ()


def test_dicom_peer_pins(tmp_path: Path) -> None:
    """[dicom_peers] pins: sha256: with hex (colons allowed) or base64, several per peer; a
    pin needs a listener that requires client certificates, and a pinned destination :tls."""
    import base64

    digest = bytes(range(32))
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    listen = "ssl:0:interface=127.0.0.1:privateKey=k.pem:caCerts=ca.pem"
    f = tmp_path / "p.ini"
    f.write_text(f"[dicom]\nlisten = {listen}\n[dicom_peers]\n"
                 f"PACS = sha256:{digest.hex()}\n"
                 f"VIEWER = sha256:{':'.join(f'{b:02X}' for b in digest)}, "
                 f"sha256:{base64.b64encode(digest[::-1]).decode()}\n")
    peers = {p.ae_title: p.pins for p in load(f).dicom_peers}
    assert peers == {"PACS": (digest,), "VIEWER": (digest, digest[::-1])}
    for body, section in [
        (f"[dicom]\nlisten = {listen}\n[dicom_peers]\nPACS = md5:{digest.hex()}\n", "dicom_peers"),
        (f"[dicom]\nlisten = {listen}\n[dicom_peers]\nPACS = sha256:abcd\n", "dicom_peers"),
        (f"[dicom_peers]\nPACS = sha256:{digest.hex()}\n", "dicom_peers"),  # plain TCP listener
        (f"[dicom]\nlisten = {listen}\n[dicom_peers]\nPACS = sha256:{digest.hex()}\n"
         "[dicom_destinations]\nPACS = 10.0.0.5:104\n", "dicom_destinations"),
    ]:
        f.write_text(body)
        with pytest.raises(ConfigError) as info:
            load(f)
        assert info.value.section == section, body


@pytest.mark.parametrize(
    "body,refused",
    [
        ("[http]\nlisten = tcp:8080:interface=0.0.0.0\n", "[http] listen"),
        ("[http]\nlisten = tcp:8080\n", "[http] listen"),  # every address
        ("[jpip]\ntcp_listen = tcp:8081:interface=10.1.2.3\n", "[jpip] tcp_listen"),
        ("[dicom]\nlisten = tcp:104:interface=0.0.0.0\n", "[dicom] listen"),
        ("[dicom]\nlisten = tcp:104:interface=0.0.0.0\nstore_calling_aets = CT\nquery_calling_aets = WS\n",
         "[dicom] listen"),  # retrieve is open to any AE
        ("[dicom]\nlisten = tcp:104:interface=0.0.0.0\nallowed_calling_aets = CT WS\n", None),
        ("[dicom]\nlisten = tcp:104:interface=127.0.0.2\n", None),
        ("[http]\nlisten = tcp6:8080:interface=\\:\\:1\n", None),
        ("[http]\nlisten = tcp:8080:interface=0.0.0.0\n[auth]\ninsecure_remote = yes\n", None),
        ("[dicom]\nlisten = tcp:104:interface=0.0.0.0\n[auth]\ninsecure_remote = yes\n", None),
    ],
)
def test_unprotected_remote_listeners_are_refused(tmp_path: Path, body: str, refused: str | None) -> None:
    """A listener beyond loopback needs protection (HTTP/JPIP aux: [auth] mode = bearer or
    client certificates; DICOM: calling-AE lists for every operation or client
    certificates) unless [auth] insecure_remote = yes; the error says why in one line."""
    from imageshare.exposure import unsafe_exposure

    f = tmp_path / "e.ini"
    f.write_text(body)
    if refused is None:
        assert unsafe_exposure(load(f)) is None
        return
    with pytest.raises(ConfigError) as info:
        load(f)
    message = str(info.value)
    assert message.startswith(refused) and "insecure_remote = yes" in message and "\n" not in message
