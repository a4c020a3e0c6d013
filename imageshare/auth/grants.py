"""
URL grants: short-lived signed permissions to read one study, carried in a URL.

A viewer given a JPIP-referenced header can only open its Pixel Data Provider URL: it has
no way to add an ``Authorization`` header. With ``[auth] mode = bearer`` the server signs
that URL for the principal it hands it to: ``grant=<base64url(payload)>.<base64url(mac)>``,
the payload ``{"s": study, "i": issuer, "u": subject, "e": expiry}`` (compact JSON), the
MAC HMAC-SHA256 over the payload's base64url text with the server's own 32-byte key.

Pure: the key and the time are passed in. A hostile grant can only ever end in a
:class:`GrantError`. A grant is never logged or put in an error description.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from typing import Any
from urllib.parse import parse_qsl

import attrs

__all__ = ["KEY_BYTES", "MAX_GRANT_BYTES", "Grant", "GrantError", "grant_in_query", "sign", "verify"]

#: The length of the signing key.
KEY_BYTES = 32
#: The longest grant accepted (a study UID is at most 64 characters, an issuer a URL).
MAX_GRANT_BYTES = 1024
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_MAC_B64_LENGTH = 43  # 32 bytes, unpadded


class GrantError(Exception):
    """The grant is malformed, badly signed or expired (HTTP 401)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


@attrs.frozen
class Grant:
    """What a verified grant allows: reading ``study``, for ``subject@issuer``, until ``expires``."""

    study: str
    issuer: str
    subject: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mac(key: bytes, payload: str) -> bytes:
    return hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest()


def sign(key: bytes, grant: Grant) -> str:
    """The grant's text, ``payload.mac``: URL-safe as it is."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"the grant key must be {KEY_BYTES} bytes")
    payload = _b64(json.dumps({"s": grant.study, "i": grant.issuer, "u": grant.subject, "e": grant.expires},
                              separators=(",", ":"), ensure_ascii=True).encode("ascii"))
    return f"{payload}.{_b64(_mac(key, payload))}"


def verify(key: bytes, text: str | bytes, now: float) -> Grant:
    """
    The grant of ``text`` if its MAC is ours and it has not expired.

    Raises
    ------
    GrantError
        Oversized, malformed, badly signed or expired.
    """
    if len(text) > MAX_GRANT_BYTES:
        raise GrantError("the grant is too large")
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise GrantError("the grant is malformed") from None
    payload, dot, mac = text.partition(".")
    if not dot or not _B64URL.match(payload) or len(mac) != _MAC_B64_LENGTH or not _B64URL.match(mac):
        raise GrantError("the grant is malformed")
    # The MAC first: nothing of an unsigned payload is parsed.
    if not hmac.compare_digest(_b64(_mac(key, payload)), mac):
        raise GrantError("the grant signature is not valid")
    try:
        value: Any = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode("ascii"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise GrantError("the grant is malformed") from None
    if not isinstance(value, dict) or set(value) != {"s", "i", "u", "e"}:
        raise GrantError("the grant is malformed")
    study, issuer, subject, expires = value["s"], value["i"], value["u"], value["e"]
    if not all(isinstance(v, str) and v for v in (study, issuer, subject)) \
            or not isinstance(expires, int) or isinstance(expires, bool):
        raise GrantError("the grant is malformed")
    if not math.isfinite(now) or now >= expires:
        raise GrantError("the grant has expired")
    return Grant(study, issuer, subject, expires)


def grant_in_query(query: bytes) -> str | None:
    """
    The ``grant`` parameter of a raw query string; ``None`` if there is none.

    Raises
    ------
    GrantError
        More than one, or an oversized query part.
    """
    if b"grant=" not in query:
        return None
    found: list[str] = []
    for part in query.split(b"&"):
        name, eq, value = part.partition(b"=")
        if name != b"grant" or not eq:
            continue
        if len(value) > MAX_GRANT_BYTES * 3:
            raise GrantError("the grant is too large")
        pairs = parse_qsl(part.decode("latin-1"), keep_blank_values=True)
        found.append(pairs[0][1] if pairs else "")
    if len(found) > 1:
        raise GrantError("more than one grant")
    return found[0] if found else None
