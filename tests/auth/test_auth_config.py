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
