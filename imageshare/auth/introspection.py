"""
Token introspection (RFC 7662, IHE IUA ITI-102) for opaque access tokens: the pure part.

Bytes and values in, a :class:`~imageshare.auth.tokens.Principal` or a
:class:`~imageshare.auth.tokens.TokenError` out; no reactor, no I/O (the HTTP call is
:class:`imageshare.auth.introspector.Introspector`). Also the answer cache: keyed by the
SHA-256 of the token (the token itself is never held), bounded (least recently used goes
first), an active answer kept no longer than its ``exp``, an inactive one briefly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping
from urllib.parse import quote, urlencode

from imageshare.auth.tokens import Policy, Principal, TokenError, claim_number, claim_patient, claim_string

__all__ = [
    "INACTIVE_TTL",
    "MAX_ANSWER_BYTES",
    "MAX_ENTRIES",
    "MAX_TTL",
    "AnswerCache",
    "basic_authorization",
    "is_jwt",
    "parse_answer",
    "principal_from_answer",
    "request_body",
    "token_key",
]

#: An introspection answer larger than this is refused (real ones are well under 4 KiB).
MAX_ANSWER_BYTES = 64 * 1024
#: The longest an active answer is trusted without asking again (seconds).
MAX_TTL = 300.0
#: How long a refused token's answer is kept, to blunt floods of the same bad token (seconds).
INACTIVE_TTL = 10.0
#: Answers held at once.
MAX_ENTRIES = 10_000

_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def is_jwt(token: str) -> bool:
    """Whether ``token`` has the form of a compact JWS: three base64url segments."""
    return bool(_JWT.match(token))


def token_key(token: str) -> bytes:
    """The cache key of ``token``: its SHA-256 (``.hex()[:12]`` is what may be logged)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def request_body(token: str) -> bytes:
    """The form body of the introspection POST (RFC 7662 section 2.1)."""
    return urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")


def basic_authorization(client_id: str, secret: str) -> bytes:
    """``Basic ...`` for the resource server's own credentials (RFC 6749 section 2.3.1: form-encoded first)."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode("utf-8")
    return b"Basic " + base64.b64encode(pair)


def parse_answer(body: bytes) -> dict[str, Any]:
    """
    The JSON object of an introspection answer.

    Raises
    ------
    TokenError
        Too large, not JSON, not an object, or ``active`` not a boolean.
    """
    if len(body) > MAX_ANSWER_BYTES:
        raise TokenError("the token cannot be checked")
    try:
        answer = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TokenError("the token cannot be checked") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
        raise TokenError("the token cannot be checked")
    return answer


def principal_from_answer(answer: Mapping[str, Any], policy: Policy, now: float) -> Principal:
    """
    The principal of an introspection answer, checked as a JWT's claims would be.

    ``iss`` and ``aud`` are checked when the answer has them (RFC 7662 makes them optional);
    ``exp`` and ``nbf`` with the policy's leeway; a missing ``scope`` is no scope. The
    subject is ``sub``, else ``username``, else ``client_id``.

    Raises
    ------
    TokenError
        Inactive, or any check failing; the description is safe to send and to log.
    """
    if answer.get("active") is not True:
        raise TokenError("the token is not active")
    token_type = answer.get("token_type")
    if token_type is not None and (not isinstance(token_type, str)
                                   or token_type.lower() in ("refresh_token", "refresh", "id_token")):
        raise TokenError("the token is not an access token")
    issuer = claim_string(answer, "iss", False)
    if issuer is not None and issuer != policy.issuer:
        raise TokenError("the token is from another issuer")
    if "aud" in answer:
        aud = answer["aud"]
        audiences: Iterable[Any] = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a == policy.audience for a in audiences):
            raise TokenError("the token is not for this audience")
    expires = claim_number(answer, "exp", False)
    if expires is not None and now > expires + policy.leeway:
        raise TokenError("the token has expired")
    not_before = claim_number(answer, "nbf", False)
    if not_before is not None and now + policy.leeway < not_before:
        raise TokenError("the token is not valid yet")
    client_id = claim_string(answer, "client_id", False)
    subject = claim_string(answer, "sub", False) or claim_string(answer, "username", False) or client_id
    if subject is None:
        raise TokenError("the token names no subject")
    scope = answer.get("scope", "")
    if not isinstance(scope, str):
        raise TokenError("the token's scope claim is not a string")
    return Principal(
        issuer=issuer or policy.issuer,
        subject=subject,
        jti=claim_string(answer, "jti", False),
        client_id=client_id,
        scopes=frozenset(scope.split()),
        patient=claim_patient(answer),
        expires=expires if expires is not None else float("inf"),
    )


class AnswerCache:
    """
    Introspection outcomes by :func:`token_key`: a :class:`Principal`, or the
    :class:`TokenError` description of a refused token. Bounded: the least recently used
    entry goes first.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES, max_ttl: float = MAX_TTL,
                 inactive_ttl: float = INACTIVE_TTL) -> None:
        self._entries: OrderedDict[bytes, tuple[float, Principal | str]] = OrderedDict()
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.inactive_ttl = inactive_ttl

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Principal | str | None:
        """The cached outcome (a principal, or a refusal's description), or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, value = entry
        if now >= until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put_active(self, key: bytes, principal: Principal, now: float) -> None:
        """Keep ``principal`` for at most :attr:`max_ttl`, and never past its expiry."""
        self._put(key, min(now + self.max_ttl, principal.expires), principal, now)

    def put_refused(self, key: bytes, description: str, now: float) -> None:
        """Keep a refusal for :attr:`inactive_ttl`."""
        self._put(key, now + self.inactive_ttl, description, now)

    def _put(self, key: bytes, until: float, value: Principal | str, now: float) -> None:
        if until <= now:
            self._entries.pop(key, None)
            return
        self._entries[key] = (until, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
