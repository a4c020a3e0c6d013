"""Token-making for tests: RSA and EC keys made here, JWK Sets, signed JWT access tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

ISSUER = "https://idp.example.org/realms/imaging"
AUDIENCE = "https://imageshare.example.org"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Keys:
    """An RSA key (kid ``rsa1``) and an EC P-256 key (kid ``ec1``), and a second RSA key for rotation."""

    def __init__(self) -> None:
        self.rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa1", "use": "sig"})
        self.ec = ECKey.generate_key("P-256", parameters={"kid": "ec1"})
        self.rotated = RSAKey.generate_key(2048, parameters={"kid": "rsa2"})

    def jwks(self, *keys: Any) -> bytes:
        keys = keys or (self.rsa, self.ec)
        return json.dumps({"keys": [k.as_dict(private=False) for k in keys]}).encode()

    def write_jwks(self, path: Path, *keys: Any) -> Path:
        path.write_bytes(self.jwks(*keys))
        return path

    def token(self, *, key: Any = None, alg: str = "RS256", typ: str | None = "at+jwt", kid: str | None = "",
              header: dict[str, Any] | None = None, **claims: Any) -> str:
        """A signed token; ``claims`` override the good defaults (a value ``None`` drops the claim)."""
        key = key if key is not None else (self.ec if alg.startswith("ES") else self.rsa)
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER, "aud": [AUDIENCE, "account"], "sub": "alice", "client_id": "viewer",
            "jti": "j-1", "iat": now, "exp": now + 300, "scope": "image.read xds.read",
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        protected: dict[str, Any] = {"alg": alg}
        if typ is not None:
            protected["typ"] = typ
        kid = key.kid if kid == "" else kid
        if kid is not None:
            protected["kid"] = kid
        protected.update(header or {})
        return jws.serialize_compact(protected, json.dumps(body).encode(), key, algorithms=[alg])

    def unsigned(self, **claims: Any) -> str:
        """``alg: none``."""
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300,
                "scope": "image.read", **claims}
        return f"{b64(json.dumps({'alg': 'none', 'typ': 'at+jwt'}).encode())}.{b64(json.dumps(body).encode())}."

    def hmac_with_public_key(self) -> str:
        """HS256 whose secret is the RSA public key (PEM): the classic key-confusion attack."""
        now = int(time.time())
        secret = self.rsa.as_pem(private=False)
        head = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": "rsa1"}).encode())
        body = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300,
                               "scope": "image.read"}).encode())
        signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64(signature)}"


def tamper(token: str) -> str:
    """The same token with one claim changed and the signature kept."""
    head, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["sub"] = "mallory"
    return f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
