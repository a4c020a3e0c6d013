"""The pure token checks (imageshare.auth.tokens): no reactor, no sockets."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings, strategies as st

from imageshare.auth.tokens import (
    Policy, TokenError, UnknownKey, bearer_token, challenge, load_key_set, verify,
)
from tests.auth.keys import AUDIENCE, ISSUER, Keys, b64, tamper


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def key_set(keys: Keys):
    return load_key_set(keys.jwks())


POLICY = Policy(issuer=ISSUER, audience=AUDIENCE)


def refused(token: str, key_set, policy: Policy = POLICY, now: float | None = None) -> str:
    with pytest.raises(TokenError) as e:
        verify(token, key_set, policy, time.time() if now is None else now)
    return e.value.description


def test_good_rsa_and_ec_tokens(keys: Keys, key_set) -> None:
    """RS256, PS256 and ES256 tokens verify and yield the principal, scopes and patient."""
    for alg in ("RS256", "PS256", "ES256"):
        p = verify(keys.token(alg=alg, extensions={"ihe_bppc": {"patient_id": "P1^^^&1.2.3&ISO"}}),
                   key_set, POLICY, time.time())
        assert (p.issuer, p.subject, p.jti, p.client_id) == (ISSUER, "alice", "j-1", "viewer")
        assert p.scopes == {"image.read", "xds.read"}
        assert p.patient == "P1^^^&1.2.3&ISO"
        assert p.user == f"alice@{ISSUER}"


def test_times(keys: Keys, key_set) -> None:
    """exp and nbf are checked with the leeway; iat is required and not in the future."""
    now = time.time()
    assert "expired" in refused(keys.token(exp=int(now) - 61), key_set)
    verify(keys.token(exp=int(now) - 30), key_set, POLICY, now)  # within the leeway
    assert "not valid yet" in refused(keys.token(nbf=int(now) + 120), key_set)
    assert "iat" in refused(keys.token(iat=None), key_set)
    assert "future" in refused(keys.token(iat=int(now) + 600), key_set)
    assert "exp" in refused(keys.token(exp=None), key_set)


def test_issuer_audience_typ(keys: Keys, key_set) -> None:
    """The issuer is compared exactly, aud must contain ours, typ must be at+jwt unless relaxed."""
    assert "issuer" in refused(keys.token(iss=ISSUER + "/"), key_set)
    assert "audience" in refused(keys.token(aud="account"), key_set)
    verify(keys.token(aud=AUDIENCE), key_set, POLICY, time.time())
    verify(keys.token(typ="application/at+jwt"), key_set, POLICY, time.time())
    assert "typ" in refused(keys.token(typ="JWT"), key_set)
    relaxed = Policy(issuer=ISSUER, audience=AUDIENCE, require_typ="")
    verify(keys.token(typ="JWT"), key_set, relaxed, time.time())
    verify(keys.token(typ=None), key_set, relaxed, time.time())
    assert "typ" in refused(keys.token(typ="dpop+jwt"), key_set, relaxed)


def test_algorithm_attacks(keys: Keys, key_set) -> None:
    """alg=none, HMAC with the public key, an algorithm outside the list, a key of the wrong type: refused."""
    assert "algorithm" in refused(keys.unsigned(), key_set)
    assert "algorithm" in refused(keys.hmac_with_public_key(), key_set)
    assert "algorithm" in refused(keys.token(alg="RS384"), key_set)
    # An ES256 header pointing at the RSA key.
    assert refused(keys.token(alg="ES256", kid="rsa1"), key_set)


def test_signature_and_kid(keys: Keys, key_set) -> None:
    """A tampered payload fails; an unknown kid says so (for a refetch); no kid tries the fitting keys."""
    assert "signature" in refused(tamper(keys.token()), key_set)
    with pytest.raises(UnknownKey):
        verify(keys.token(key=keys.rotated), key_set, POLICY, time.time())
    verify(keys.token(kid=None), key_set, POLICY, time.time())
    assert "keys are unavailable" in refused(keys.token(), None)


def test_claim_types(keys: Keys, key_set) -> None:
    """Claims of the wrong JSON type are refused, never raised as another exception."""
    for claims in ({"exp": "tomorrow"}, {"exp": True}, {"sub": 5}, {"scope": ["image.read"]},
                   {"iss": [ISSUER]}, {"aud": {"x": 1}}, {"extensions": []},
                   {"extensions": {"ihe_bppc": {"patient_id": 7}}}, {"nbf": None, "iat": "x"}):
        refused(keys.token(**claims), key_set)


def test_malformed_tokens(key_set) -> None:
    """Garbage, non-base64, non-JSON, deep nesting and huge tokens end in TokenError."""
    deep = b64(b"[" * 100000 + b"]" * 100000)
    head = b64(json.dumps({"alg": "RS256", "typ": "at+jwt"}).encode())
    for token in ("", "a", "a.b", "a.b.c.d", "!!!.###.$$$", f"{deep}.{deep}.x", f"{head}.{deep}.AAAA",
                  f"{b64(b'[1]')}.e30.AAAA", f"{b64(b'{')}.e30.AAAA", "x" * 100000):
        refused(token, key_set)


def test_bearer_header() -> None:
    """The Authorization header: scheme, token68 characters, length cap."""
    assert bearer_token(None) is None
    assert bearer_token(b"Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token(b"bearer abc") == "abc"
    for header in (b"Basic YWxhZGRpbjpvcGVuc2VzYW1l", b"Bearer", b"Bearer a b", b"Bearer \xff\xfe",
                   b"Bearer " + b"a" * 9000):
        with pytest.raises(TokenError):
            bearer_token(header)


def test_challenge() -> None:
    """WWW-Authenticate values quote safely (no quotes or control characters from descriptions)."""
    assert challenge() == b"Bearer"
    value = challenge(error="invalid_token", description='bad "x"\r\n', resource_metadata="https://h/m")
    assert value == b'Bearer resource_metadata="https://h/m", error="invalid_token", error_description="bad x"'


def test_key_set_loading(keys: Keys) -> None:
    """Only public RSA/EC keys are kept; garbage is refused with ValueError."""
    ks = load_key_set(json.dumps({"keys": [keys.rsa.as_dict(private=True), {"kty": "oct", "k": "c2VjcmV0"},
                                           {"kty": "RSA", "n": 1}, "x"]}).encode())
    assert [k.kid for k in ks.keys] == ["rsa1"] and not ks.keys[0].is_private
    for data in (b"", b"[]", b'{"keys": 1}', b'{"keys": [{"kty": "oct", "k": "AA"}]}', b"\xff", b"[" * 50000):
        with pytest.raises(ValueError):
            load_key_set(data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b64(b) + "." + b64(b[::-1]) + "." + b64(b)))
def test_fuzz_never_raises_otherwise(key_set, token: str) -> None:
    """Any string is a TokenError or a principal, never another exception."""
    try:
        verify(token, key_set, POLICY, time.time())
    except TokenError:
        pass
