"""URL grants (imageshare.auth.grants): signing, verification and the key file."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from imageshare.auth import GRANT_KEY_FILE, grant_key
from imageshare.auth.grants import MAX_GRANT_BYTES, Grant, GrantError, grant_in_query, sign, verify

KEY = bytes(range(32))
STUDY = "1.2.826.0.1.3680043.8.498.1"
GRANT = Grant(STUDY, "https://idp.example.org", "alice", 1000)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_valid_grant_verifies() -> None:
    """A grant signed with the key verifies before its expiry and gives back what was signed."""
    text = sign(KEY, GRANT)
    assert verify(KEY, text, 999.0) == GRANT
    assert verify(KEY, text.encode(), 0.0) == GRANT
    assert len(text) < 200 and all(c.isalnum() or c in "-_." for c in text)


def test_expired_grant_is_refused() -> None:
    """At or after its expiry a grant is refused."""
    text = sign(KEY, GRANT)
    for now in (1000.0, 5000.0, float("nan")):
        with pytest.raises(GrantError, match="expired"):
            verify(KEY, text, now)


def test_tampered_payload_is_refused() -> None:
    """A payload changed (another study, a later expiry) no longer matches its MAC."""
    text = sign(KEY, GRANT)
    _, mac = text.split(".")
    for payload in ({"s": "1.2.3", "i": GRANT.issuer, "u": "alice", "e": 1000},
                    {"s": STUDY, "i": GRANT.issuer, "u": "alice", "e": 10**12}):
        forged = _b64(json.dumps(payload, separators=(",", ":")).encode()) + "." + mac
        with pytest.raises(GrantError, match="signature"):
            verify(KEY, forged, 0.0)


def test_tampered_mac_and_other_key_are_refused() -> None:
    """A changed MAC, or a grant signed with another key, is refused."""
    text = sign(KEY, GRANT)
    payload, mac = text.split(".")
    flipped = payload + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    with pytest.raises(GrantError, match="signature"):
        verify(KEY, flipped, 0.0)
    with pytest.raises(GrantError, match="signature"):
        verify(bytes(32), text, 0.0)


def test_grant_names_its_one_study() -> None:
    """The study is part of what is signed: a grant for another study is another grant."""
    other = sign(KEY, Grant("1.2.3.4", GRANT.issuer, GRANT.subject, 1000))
    assert verify(KEY, other, 0.0).study == "1.2.3.4" != STUDY
    assert other != sign(KEY, GRANT)


@pytest.mark.parametrize("text", [
    "", ".", "abc", "abc.", ".abc", "a.b.c", "é.é", b"\xff\xfe", "a" * (MAX_GRANT_BYTES + 1),
    "x" * 10 + "." + "y" * 43, "%%%." + "A" * 43,
])
def test_malformed_or_huge_grants_are_refused(text: str | bytes) -> None:
    """Anything but ``payload.mac`` of the right shape and size ends in GrantError."""
    with pytest.raises(GrantError):
        verify(KEY, text, 0.0)


def test_well_signed_but_malformed_payload_is_refused() -> None:
    """A payload that is signed but not the grant object (a forged-key test) ends in GrantError."""
    import hashlib
    import hmac
    for payload in (b"[]", b"{}", b'{"s":"1","i":"x","u":"y","e":true}', b'{"s":1,"i":"x","u":"y","e":1}',
                    b"not json"):
        p = _b64(payload)
        text = p + "." + _b64(hmac.new(KEY, p.encode(), hashlib.sha256).digest())
        with pytest.raises(GrantError, match="malformed"):
            verify(KEY, text, 0.0)


def test_grant_in_query() -> None:
    """The grant parameter is found among others; two are refused; none is None."""
    assert grant_in_query(b"target=1.2&grant=abc.def&fsiz=64,64") == "abc.def"
    assert grant_in_query(b"target=1.2&fsiz=64,64") is None
    assert grant_in_query(b"xgrant=abc") is None
    with pytest.raises(GrantError):
        grant_in_query(b"grant=a&grant=b")
    with pytest.raises(GrantError):
        grant_in_query(b"grant=" + b"a" * (MAX_GRANT_BYTES * 3 + 1))


def test_key_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    """The key is 32 random bytes kept in the data folder, readable by its owner only, and reused."""
    key = grant_key(tmp_path)
    path = tmp_path / GRANT_KEY_FILE
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert grant_key(tmp_path) == key
    assert [p.name for p in tmp_path.iterdir()] == [GRANT_KEY_FILE]  # no temporary file left
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="grant key"):
        grant_key(tmp_path)
