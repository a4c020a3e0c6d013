"""[auth] in the configuration, and the factory the composition root uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from imageshare.auth import build_auth
from imageshare.auth.guard import Guard
from imageshare.config import ConfigError, load
from tests.auth.keys import AUDIENCE, ISSUER, Keys


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imageshare.ini"
    path.write_text(text)
    return path


def test_default_is_off(tmp_path: Path) -> None:
    """Without [auth] the mode is none and guards are the resources themselves."""
    config = load(write(tmp_path, ""))
    assert config.auth.mode == "none" and not config.auth.enabled
    auth = build_auth(config, Clock())
    resource = Resource()
    assert auth.guard(resource, "image.read") is resource
    assert auth.services == [] and set(auth.open_resources()) == {b"health"}


def test_bearer_needs_issuer_audience_jwks(tmp_path: Path) -> None:
    """mode = bearer without issuer, audience or jwks stops start-up, naming the key."""
    with pytest.raises(ConfigError, match=r"\[auth\] issuer"):
        load(write(tmp_path, "[auth]\nmode = bearer\n"))
    with pytest.raises(ConfigError, match=r"\[auth\] jwks: no such file"):
        load(write(tmp_path, f"[auth]\nmode = bearer\nissuer = {ISSUER}\naudience = x\njwks = nope.json\n"))
    with pytest.raises(ConfigError, match=r"\[auth\] jwks"):
        load(write(tmp_path, f"[auth]\nmode = bearer\nissuer = {ISSUER}\naudience = x\njwks = http://idp/jwks\n"))


@pytest.mark.parametrize("value", ["HS256", "none", "RS256, HS512", ""])
def test_algorithms_refuse_none_and_hmac(tmp_path: Path, value: str) -> None:
    """Only public-key algorithms can be configured."""
    with pytest.raises(ConfigError, match=r"\[auth\] algorithms"):
        load(write(tmp_path, f"[auth]\nalgorithms = {value}\n"))


def test_bearer_builds_guards(tmp_path: Path) -> None:
    """With mode = bearer, guards wrap, the JWK Set source is a service, the metadata is published."""
    Keys().write_jwks(tmp_path / "jwks.json")
    config = load(write(tmp_path, f"[auth]\nmode = bearer\nissuer = {ISSUER}\naudience = {AUDIENCE}\n"
                                  "jwks = jwks.json\nscope_image_read = img\nleeway = 5\nrequire_typ =\n"))
    assert config.auth.leeway == 5 and config.auth.require_typ == "" and config.auth.scope_image_read == "img"
    auth = build_auth(config, Clock())
    assert isinstance(auth.guard(Resource(), auth.scopes.image_read), Guard)
    assert [s.name for s in auth.services] == ["jwks"]
    assert set(auth.open_resources()) == {b"health", b".well-known"}
    assert auth.metadata is not None and "img" in auth.metadata["scopes_supported"]


def test_internal_client_adds_the_internal_token(tmp_path: Path) -> None:
    """The embedded repository's own submitter authenticates with a random in-process token."""
    Keys().write_jwks(tmp_path / "jwks.json")
    config = load(write(tmp_path, f"[auth]\nmode = bearer\nissuer = {ISSUER}\naudience = {AUDIENCE}\n"
                                  "jwks = jwks.json\n"))
    auth = build_auth(config, Clock())
    seen = {}

    class Client:
        def post(self, url, data=None, headers=None):
            seen.update(headers)
            return "posted"

    assert auth.internal_client(Client()).post("u", data=b"", headers={b"Content-Type": [b"x"]}) == "posted"
    assert seen[b"Authorization"] == [b"Bearer " + auth.internal_token.encode()]
    assert len(auth.internal_token) >= 40


def test_grant_lifetime(tmp_path: Path) -> None:
    """[auth] grant_lifetime defaults to 300 s and must be a whole number from 1 to 86400."""
    assert load(write(tmp_path, "")).auth.grant_lifetime == 300
    assert load(write(tmp_path, "[auth]\ngrant_lifetime = 60\n")).auth.grant_lifetime == 60
    for bad in ("0", "86401", "1.5", "soon"):
        with pytest.raises(ConfigError, match=r"\[auth\] grant_lifetime"):
            load(write(tmp_path, f"[auth]\ngrant_lifetime = {bad}\n"))


INTROSPECTION = (f"[auth]\nmode = bearer\nissuer = {ISSUER}\naudience = {AUDIENCE}\n"
                 "introspection_url = https://idp.example.org/introspect\n")


def test_introspection_only(tmp_path: Path) -> None:
    """mode = bearer with introspection_url and no jwks: no JWK Set service but an introspector;
    the secret is not in the config's repr."""
    config = load(write(tmp_path, INTROSPECTION + "introspection_client_id = imageshare\n"
                                                  "introspection_client_secret = s3cr;et\n"))
    ac = config.auth
    assert ac.jwks == "" and ac.introspection_url == "https://idp.example.org/introspect"
    assert ac.introspection_client_id == "imageshare" and ac.introspection_client_secret == "s3cr;et"
    assert "s3cr" not in repr(ac)
    auth = build_auth(config, Clock())
    assert auth.enabled and auth.services == []
    assert auth.authenticator is not None and auth.authenticator._introspector is not None


@pytest.mark.parametrize(("text", "key"), [
    (f"[auth]\nmode = bearer\nissuer = {ISSUER}\naudience = {AUDIENCE}\n", r"jwks: is required .*introspection_url"),
    (INTROSPECTION, "introspection_client_id: is required"),
    (INTROSPECTION + "introspection_client_id = rs\n", "introspection_client_secret: is required"),
    ("[auth]\nintrospection_url = http://idp/introspect\n", "introspection_url: expected an https URL"),
    ("[auth]\nintrospection_client_secret = \x01\n", "introspection_client_secret: expected"),
])
def test_introspection_config_errors(tmp_path: Path, text: str, key: str) -> None:
    """Missing credentials, neither jwks nor introspection_url, a non-https URL: one line naming the key."""
    with pytest.raises(ConfigError, match=r"^\[auth\] " + key) as info:
        load(write(tmp_path, text))
    assert "\n" not in str(info.value) and "\x01" not in str(info.value)
