"""JPIP request fields (ISO/IEC 15444-9 Annex C) parsed into a typed value.

Sans-IO: the HTTP adapter hands over the method, the decoded path target, the
raw query and body and two headers; :func:`parse_request` returns a
:class:`JpipRequest` or raises :class:`JpipRequestError` carrying the HTTP
status to answer with. What the fields *mean* for a target (rounding a frame
size, resolving ``model=``) is decided elsewhere; this module only checks that
every value is well-formed and bounded.

Decoding choices (``docs/jpip.md`` 1.1, 9 and 10):

* the field string is split on ``&`` first, each field at its first ``=``,
  and only then are name and value %-decoded (Kakadu %-encodes ``model`` and
  ``metareq`` values, which may contain ``&``-free but otherwise arbitrary
  text), then decoded as UTF-8;
* ``+`` is a literal plus, not a space, in GET and POST alike: JPIP's field
  grammar is not HTML form encoding, Kakadu sends the same string in both,
  and a target name may legitimately contain ``+``. A ``%`` not followed by
  two hex digits is kept literally;
* unknown fields are ignored but listed in :attr:`JpipRequest.unknown` for
  logging (Kakadu answers 400, OpenHTJ2K ignores them; ignoring is friendlier);
* a field given twice (also across query and POST body) is a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

import attrs

__all__ = [
    "JpipRequestError",
    "Fsiz",
    "JpipRequest",
    "RECOGNISED_FIELDS",
    "MAX_FIELDS",
    "parse_fields",
    "parse_request",
]

RoundMode = Literal["round-down", "round-up", "closest"]
ReturnType = Literal["jpp-stream", "jpt-stream"]

# Bounds on numeric values. They are far beyond anything a real codestream
# has, and exist so a hostile number cannot reach arithmetic unchecked.
_MAX_COORD = 2**32  # fsiz / roff / rsiz components (Xsiz is 32-bit)
_MAX_LEN = 2**40
_MAX_QID = 2**32
_MAX_LAYERS = 65535  # Annex A: at most 65535 quality layers
_MAX_COMPONENT = 16383  # Csiz <= 16384
_MAX_CODESTREAM = 2**32
_MAX_BYTE_OFFSET = 2**63 - 1
_MAX_DIGITS = 20  # checked before int() so huge digit strings cost nothing
_MAX_ID_LENGTH = 255  # tid: "<= 255 characters" (D.2); cids are ours
_MAX_TARGET_LENGTH = 4096

#: Most fields (distinct names, unknown ones included) one request may carry.
MAX_FIELDS = 256

_FORM_TYPE = "application/x-www-form-urlencoded"
_UINT = re.compile(r"[0-9]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_SUPPORTED_TYPES: Mapping[str, ReturnType] = {
    "jpp-stream": "jpp-stream",
    "image/jpp-stream": "jpp-stream",
    "jpt-stream": "jpt-stream",
    "image/jpt-stream": "jpt-stream",
}
_WILDCARD_TYPES = frozenset({"*/*", "image/*"})


class JpipRequestError(ValueError):
    """A request that cannot be served as sent.

    Attributes
    ----------
    status
        HTTP status to answer with: 400 malformed, 405 method, 415 no supported
        return ``type``, 501 unsupported feature (``upload``, ...).
    reason
        Human-readable explanation, safe to send back as the reason phrase.
    field
        The request field at fault, if one is.
    """

    def __init__(self, status: int, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.field = field

    def __repr__(self) -> str:
        return f"JpipRequestError({self.status}, {self.reason!r})"


@attrs.frozen
class Fsiz:
    """The ``fsiz`` field: requested frame size and how to round to a resolution.

    Attributes
    ----------
    fx, fy
        Requested frame width and height.
    round
        ``round-down`` (the default when absent), ``round-up`` or ``closest``.
    """

    fx: int
    fy: int
    round: RoundMode = "round-down"


ComponentRange = tuple[int, int | None]
StreamRange = tuple[int, int | None, int]


@attrs.frozen
class JpipRequest:
    """The fields of one JPIP request, validated; ``None`` means absent.

    Attributes
    ----------
    target, subtarget, tid
        Target identification (C.2). `subtarget` is an inclusive byte range.
    cid, cnew, cclose, qid
        Sessions and channels (C.3). `cnew` lists the offered transports,
        lower-cased, in the client's order; `cclose` is a tuple of cids or
        ``("*",)``.
    fsiz, roff, rsiz, comps, stream, context, roi, layers, srate
        View-window (C.4). `comps` ranges are ``(lo, hi)`` with ``hi is None``
        for an open range ``lo-``; `stream` ranges are ``(lo, hi, step)``.
    metareq
        Metadata request (C.5), raw.
    len, quality
        Data limiting (C.6).
    align, wait, type, drate
        Server control (C.7). `type` is the return type chosen from the
        client's preferences (only the two we can produce), ``None`` if the
        client expressed none.
    model, tpmodel, need, tpneed, mset
        Cache management, raw: see :mod:`imageshare.protocols.jpip.cachespec`.
    cap, pref
        Capabilities and preferences (C.10), raw.
    unknown
        Names of unrecognised fields, in request order, for logging.
    type_from_accept
        No ``type`` field: the ``Accept`` header chose `type` (or could have), so a
        response varies by it (``Vary: Accept``). Set by :func:`parse_request` only.
    """

    target: str | None = None
    subtarget: tuple[int, int] | None = None
    tid: str | None = None
    cid: str | None = None
    cnew: tuple[str, ...] | None = None
    cclose: tuple[str, ...] | None = None
    qid: int | None = None
    fsiz: Fsiz | None = None
    roff: tuple[int, int] | None = None
    rsiz: tuple[int, int] | None = None
    comps: tuple[ComponentRange, ...] | None = None
    stream: tuple[StreamRange, ...] | None = None
    context: str | None = None
    roi: str | None = None
    layers: int | None = None
    srate: str | None = None
    metareq: str | None = None
    len: int | None = None
    quality: int | None = None
    align: bool = False
    wait: bool = False
    type: ReturnType | None = None
    drate: str | None = None
    model: str | None = None
    tpmodel: str | None = None
    need: str | None = None
    tpneed: str | None = None
    mset: str | None = None
    cap: str | None = None
    pref: str | None = None
    unknown: tuple[str, ...] = ()
    type_from_accept: bool = False


# ---------------------------------------------------------------- value parsers


def _bad(field: str, what: str) -> JpipRequestError:
    return JpipRequestError(400, f"malformed {field}: {what}", field=field)


def _uint(text: str, field: str, maximum: int) -> int:
    """A UINT: ASCII digits only (no sign, no spaces), at most `maximum`."""
    if not _UINT.fullmatch(text):
        raise _bad(field, f"{text!r} is not an unsigned integer")
    if len(text) > _MAX_DIGITS or int(text) > maximum:
        raise _bad(field, f"{text} exceeds {maximum}")
    return int(text)


def _uint_pair(text: str, field: str, maximum: int) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2:
        raise _bad(field, "expected two comma-separated integers")
    return _uint(parts[0], field, maximum), _uint(parts[1], field, maximum)


def _list(text: str, field: str) -> list[str]:
    """Split a ``1#`` list; empty items are malformed."""
    items = text.split(",")
    if any(not item for item in items):
        raise _bad(field, "empty list item")
    return items


def _nonempty(limit: int) -> Callable[[str, str], str]:
    def parse(text: str, field: str) -> str:
        if not text:
            raise _bad(field, "empty value")
        if len(text) > limit:
            raise _bad(field, f"longer than {limit} characters")
        return text

    return parse


def _raw(text: str, field: str) -> str:
    return text


def _yes_no(text: str, field: str) -> bool:
    if text == "yes":
        return True
    if text == "no":
        return False
    raise _bad(field, "expected yes or no")


def _parse_subtarget(text: str, field: str) -> tuple[int, int]:
    if text.startswith("["):
        raise JpipRequestError(501, "codestream subtargets are not supported", field=field)
    first, sep, last = text.partition("-")
    if not sep:
        raise _bad(field, "expected <start>-<end>")
    start = _uint(first, field, _MAX_BYTE_OFFSET)
    end = _uint(last, field, _MAX_BYTE_OFFSET)
    if start > end:
        raise _bad(field, "start after end")
    return start, end


def _parse_cnew(text: str, field: str) -> tuple[str, ...]:
    names: list[str] = []
    for item in _list(text, field):
        if not _TOKEN.fullmatch(item):
            raise _bad(field, f"{item!r} is not a transport name")
        name = item.lower()
        if name not in names:
            names.append(name)
    return tuple(names)


def _parse_cclose(text: str, field: str) -> tuple[str, ...]:
    items = _list(text, field)
    if "*" in items:
        if len(items) > 1:
            raise _bad(field, "'*' cannot be combined with channel ids")
        return ("*",)
    for item in items:
        _nonempty(_MAX_ID_LENGTH)(item, field)
    return tuple(items)


def _parse_fsiz(text: str, field: str) -> Fsiz:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise _bad(field, "expected fx,fy[,round-direction]")
    fx = _uint(parts[0], field, _MAX_COORD)
    fy = _uint(parts[1], field, _MAX_COORD)
    if len(parts) == 2:
        return Fsiz(fx, fy)
    mode = parts[2]
    if mode == "round-down":
        return Fsiz(fx, fy, "round-down")
    if mode == "round-up":
        return Fsiz(fx, fy, "round-up")
    if mode == "closest":
        return Fsiz(fx, fy, "closest")
    raise _bad(field, f"unknown round direction {mode!r}")


def _parse_range(
    text: str, field: str, maximum: int
) -> tuple[int, int | None]:
    """UINT-RANGE: ``n``, ``a-b`` (a <= b) or open ``a-``."""
    first, sep, last = text.partition("-")
    lo = _uint(first, field, maximum)
    if not sep:
        return lo, lo
    if not last:
        return lo, None
    hi = _uint(last, field, maximum)
    if lo > hi:
        raise _bad(field, f"range {text} is descending")
    return lo, hi


def _parse_comps(text: str, field: str) -> tuple[ComponentRange, ...]:
    return tuple(_parse_range(item, field, _MAX_COMPONENT) for item in _list(text, field))


def _parse_stream(text: str, field: str) -> tuple[StreamRange, ...]:
    out: list[StreamRange] = []
    for item in _list(text, field):
        rng, sep, step_text = item.partition(":")
        lo, hi = _parse_range(rng, field, _MAX_CODESTREAM)
        step = 1
        if sep:
            step = _uint(step_text, field, _MAX_CODESTREAM)
            if step == 0:
                raise _bad(field, "sampling factor 0")
        out.append((lo, hi, step))
    return tuple(out)


def _parse_quality(text: str, field: str) -> int:
    return _uint(text, field, 100)


def _bounded(maximum: int) -> Callable[[str, str], int]:
    def parse(text: str, field: str) -> int:
        return _uint(text, field, maximum)

    return parse


def _choose_type(items: list[str], field: str, *, from_accept: bool) -> ReturnType | None:
    """Pick the first return type we can produce from a preference list.

    Items are ``jpp-stream``, ``jpt-stream``, ``raw`` or media types, each with
    optional ``;`` parameters (``ptype=ext``, ``ttype=ext``, an Accept ``q``);
    parameters are ignored except that ``q=0`` in Accept rules an item out.
    With Accept, wildcards mean "anything", so they never cause a 415.
    """
    wildcard = False
    offered = False
    for item in items:
        base, *params = item.split(";")
        base = base.strip().lower()
        if not base:
            if from_accept:
                continue
            raise _bad(field, "empty return type")
        if from_accept and any(_is_q_zero(p) for p in params):
            continue
        if base in _WILDCARD_TYPES:
            wildcard = True
            continue
        offered = True
        chosen = _SUPPORTED_TYPES.get(base)
        if chosen is not None:
            return chosen
    if not offered or wildcard:
        return None
    raise JpipRequestError(
        415, "none of the requested return types is supported (use jpp-stream)", field=field
    )


def _is_q_zero(param: str) -> bool:
    name, _, value = param.strip().partition("=")
    if name.strip().lower() != "q":
        return False
    try:
        return float(value) == 0.0
    except ValueError:
        return False


def _parse_type(text: str, field: str) -> ReturnType | None:
    return _choose_type(_list(text, field), field, from_accept=False)


def _unsupported(text: str, field: str) -> Any:
    raise JpipRequestError(501, f"the {field} request field is not supported", field=field)


#: Recognised request fields and their value parsers; the key is both the wire
#: name and the :class:`JpipRequest` attribute. Adding a field is one line here
#: (plus the attribute).
_FIELD_PARSERS: dict[str, Callable[[str, str], Any]] = {
    # C.2 target identification
    "target": _nonempty(_MAX_TARGET_LENGTH),
    "subtarget": _parse_subtarget,
    "tid": _nonempty(_MAX_ID_LENGTH),
    # C.3 sessions and channels
    "cid": _nonempty(_MAX_ID_LENGTH),
    "cnew": _parse_cnew,
    "cclose": _parse_cclose,
    "qid": _bounded(_MAX_QID),
    # C.4 view-window
    "fsiz": _parse_fsiz,
    "roff": lambda text, field: _uint_pair(text, field, _MAX_COORD),
    "rsiz": lambda text, field: _uint_pair(text, field, _MAX_COORD),
    "comps": _parse_comps,
    "stream": _parse_stream,
    "context": _raw,
    "roi": _raw,
    "layers": _bounded(_MAX_LAYERS),
    "srate": _raw,
    # C.5 metadata
    "metareq": _raw,
    # C.6 data limiting
    "len": _bounded(_MAX_LEN),
    "quality": _parse_quality,
    # C.7 server control
    "align": _yes_no,
    "wait": _yes_no,
    "type": _parse_type,
    "drate": _raw,
    # C.8 cache management (parsed later by cachespec)
    "model": _raw,
    "tpmodel": _raw,
    "need": _raw,
    "tpneed": _raw,
    "mset": _raw,
    # C.9 upload (Annex E) and C.10 capabilities / preferences
    "upload": _unsupported,
    "cap": _raw,
    "pref": _raw,
}

#: Names of the request fields this module understands.
RECOGNISED_FIELDS: frozenset[str] = frozenset(_FIELD_PARSERS)


# ---------------------------------------------------------------- field splitting


def _decode(raw: bytes, what: str) -> str:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise JpipRequestError(400, f"{what} is not valid UTF-8 after %-decoding") from None


def _split_fields(text: str | bytes) -> list[tuple[str, str]]:
    """Split a field string into decoded ``(name, value)`` pairs, in order."""
    if isinstance(text, str):
        # surrogatepass: a lone surrogate then fails the strict decode as a 400.
        raw = text.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(text)
    pairs: list[tuple[str, str]] = []
    for chunk in raw.split(b"&"):
        if not chunk:
            continue  # tolerate "a=1&&b=2" and a trailing "&"
        name_raw, _, value_raw = chunk.partition(b"=")
        name = _decode(name_raw, "field name")
        if not name:
            raise JpipRequestError(400, "request field with an empty name")
        pairs.append((name, _decode(value_raw, f"value of {name}")))
        if len(pairs) > MAX_FIELDS:
            raise JpipRequestError(400, f"more than {MAX_FIELDS} request fields")
    return pairs


def _collect(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Index fields by name; a name given twice is a 400."""
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise JpipRequestError(400, f"request field {name} given twice", field=name)
        fields[name] = value
    return fields


def _build(fields: dict[str, str], *, extra: Mapping[str, Any] | None = None) -> JpipRequest:
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for name, text in fields.items():
        parser = _FIELD_PARSERS.get(name)
        if parser is None:
            unknown.append(name)
        else:
            values[name] = parser(text, name)
    for name, value in (extra or {}).items():
        values.setdefault(name, value)
    if ("roff" in values or "rsiz" in values) and values.get("fsiz") is None:
        raise JpipRequestError(400, "roff and rsiz are only valid with fsiz", field="fsiz")
    return JpipRequest(**values, unknown=tuple(unknown))


def parse_fields(text: str | bytes) -> JpipRequest:
    """Parse a JPIP field string (a query string or a POST body).

    Parameters
    ----------
    text
        ``name=value`` fields joined by ``&``, %-encoded; may be empty.

    Returns
    -------
    JpipRequest
        The validated fields.

    Raises
    ------
    JpipRequestError
        400 for malformed or duplicate fields, 415 if no requested return type
        is supported, 501 for ``upload`` or a codestream ``subtarget``.
    """
    return _build(_collect(_split_fields(text)))


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_request(
    method: str,
    path_target: str | None,
    query: bytes,
    body: bytes | None,
    content_type: str | None,
    accept: str | None,
) -> JpipRequest:
    """Parse one JPIP-over-HTTP request (Annex F).

    Parameters
    ----------
    method
        HTTP method; GET and POST are allowed.
    path_target
        The URL path after the JPIP prefix, already %-decoded; the target when
        there is no ``target`` field (as in Kakadu). Empty means none.
    query
        The raw query string, without ``?``.
    body
        The request body (POST).
    content_type
        The ``Content-Type`` header. A POST body is read as fields when it is
        ``application/x-www-form-urlencoded`` or when the header is missing.
    accept
        The ``Accept`` header; its media types are the return-type preferences
        when there is no ``type`` field (``*/*`` and ``image/*`` only mean the
        client takes whatever it gets).

    Returns
    -------
    JpipRequest
        The validated fields of query and body together.

    Raises
    ------
    JpipRequestError
        405 for other methods, 400 for malformed or duplicate fields (also
        between query and body) or a POST body of another media type, 415 and
        501 as in :func:`parse_fields`.
    """
    verb = method.upper()
    if verb not in ("GET", "POST"):
        raise JpipRequestError(405, f"method {method} not allowed; use GET or POST")
    pairs = _split_fields(query)
    if verb == "POST" and body:
        if content_type is not None and _media_type(content_type) != _FORM_TYPE:
            raise JpipRequestError(400, f"a POST body must be {_FORM_TYPE}")
        pairs += _split_fields(body)
        if len(pairs) > MAX_FIELDS:
            raise JpipRequestError(400, f"more than {MAX_FIELDS} request fields")
    fields = _collect(pairs)
    extra: dict[str, Any] = {}
    if "target" not in fields and path_target:
        extra["target"] = path_target
    if "type" not in fields:
        extra["type_from_accept"] = True
        if accept:
            extra["type"] = _choose_type(accept.split(","), "type", from_accept=True)
    return _build(fields, extra=extra)
