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
        ("http", "public_url", "ftp://example"),
        ("http", "public_url", "http://host/path?query"),
        ("http", "request_log", "maybe"),
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
