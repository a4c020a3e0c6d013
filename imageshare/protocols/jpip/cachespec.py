"""The ``model=`` / ``need=`` cache-descriptor grammar (15444-9 C.8, 2023: C.9).

Sans-IO and geometry-free: the text becomes a tuple of :class:`CacheItem`
values; mapping implicit ``t/c/r/p`` forms onto precinct ids needs the
codestream and is done by the session code.

Grammar accepted (``docs/jpip.md`` section 5)::

    spec        = element *("," element)
    element     = qualifier / [qualifier] item
    qualifier   = "[" cs-range *(";" cs-range) "]"    ; applies to the following items
    cs-range    = "*" / UINT / UINT "-" UINT
    item        = ["-"] descriptor [":" (UINT / "L" UINT)]
    descriptor  = "Hm" / ("H" / "P" / "M" / "T") (UINT / "*")
                / ["t" range] ["c" range] ["r" range] ["p" range]   ; at least one
    range       = UINT / UINT "-" UINT

``;`` inside brackets separates codestream ranges, as ``$``-lists do elsewhere
in JPIP (``metareq=[a;b]``); it is not a sampling step. ``:L`` (layers) is only
meaningful for precinct descriptors (``P`` and implicit forms).

What is certainly wrong is a 400: empty items, a bad codestream qualifier,
``-`` in ``need``, a number out of bounds, a descending range, too many items.
An item of a form the grammar does not have (OpenHTJ2K's ``Ht3``/``Hp3``,
``P0-3`` id ranges, ``:L`` on a header, ``:*``) is skipped and reported in
:attr:`CacheSpec.ignored`, as ``docs/jpip.md`` recommends: for ``model`` that
only makes the server send more than needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

import attrs

from imageshare.protocols.jpip.request import JpipRequestError

__all__ = [
    "MAX_ITEMS",
    "Kind",
    "Codestreams",
    "ImplicitSpec",
    "CacheItem",
    "CacheSpec",
    "parse_cache_spec",
]

#: Most comma-separated elements one field may hold.
MAX_ITEMS = 100_000

_MAX_ID = 2**63 - 1  # in-class ids: anything a 9-byte Bin-ID VBAS carries
_MAX_BYTES = 2**63 - 1
_MAX_LAYERS = 65535
_MAX_CODESTREAM = 2**32
_MAX_IMPLICIT = 2**32  # tile, component, resolution, precinct indices
_MAX_DIGITS = 20  # checked before int() so huge digit strings cost nothing
_IGNORED_REPORT_LENGTH = 64  # ignored items are logged; keep them short

Kind = Literal["Hm", "H", "P", "M", "T", "implicit"]

_DIGITS = r"[0-9]+"
_RANGE = rf"({_DIGITS})(?:-({_DIGITS}))?"
_EXPLICIT = re.compile(rf"([HPMT])(\*|{_DIGITS})")
_IMPLICIT = re.compile(rf"(?:t{_RANGE})?(?:c{_RANGE})?(?:r{_RANGE})?(?:p{_RANGE})?")
_CS_RANGE = re.compile(_RANGE)
_LAYERS_QUALIFIER = re.compile(rf"L({_DIGITS})")
_BYTES_QUALIFIER = re.compile(_DIGITS)
_EXPLICIT_KINDS: dict[str, Kind] = {"H": "H", "P": "P", "M": "M", "T": "T"}


@attrs.frozen
class ImplicitSpec:
    """An implicit descriptor such as ``t0c0-2r0-3``; ``None`` means "all".

    Attributes
    ----------
    tiles, components, resolutions, precincts
        Index ranges; `precincts` counts precincts within a resolution.
    """

    tiles: range | None = None
    components: range | None = None
    resolutions: range | None = None
    precincts: range | None = None


Codestreams = tuple[range, ...] | Literal["all"] | None


@attrs.frozen
class CacheItem:
    """One cache descriptor.

    Attributes
    ----------
    subtractive
        ``-`` prefix: the client does *not* hold this.
    codestreams
        Codestream ranges from the last qualifier, ``"all"`` for ``[*]``, or
        ``None`` (no qualifier yet: the request's current codestream).
    kind
        ``Hm`` main header, ``H`` tile header, ``P`` precinct, ``M`` metadata,
        ``T`` tile, or ``implicit``.
    index
        In-class id of an explicit descriptor; ``None`` for ``*`` and for
        implicit descriptors (``Hm`` is id 0).
    implicit
        The ranges of an implicit descriptor, else ``None``.
    bytes_held, layers_held
        The ``:n`` / ``:Ln`` qualifier; both ``None`` means the whole bin.
    """

    subtractive: bool
    codestreams: Codestreams
    kind: Kind
    index: int | None
    implicit: ImplicitSpec | None = None
    bytes_held: int | None = None
    layers_held: int | None = None


@attrs.frozen
class CacheSpec:
    """A parsed ``model``/``need`` field; iterating yields its items.

    Attributes
    ----------
    items
        The descriptors, in request order.
    ignored
        Elements of unknown form that were skipped (each cut to 64
        characters), for logging.
    """

    items: tuple[CacheItem, ...] = ()
    ignored: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[CacheItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _bad(what: str) -> JpipRequestError:
    return JpipRequestError(400, f"malformed cache descriptor: {what}")


def _number(digits: str, maximum: int) -> int:
    if len(digits) > _MAX_DIGITS or int(digits) > maximum:
        raise _bad(f"{digits[:_MAX_DIGITS]} exceeds {maximum}")
    return int(digits)


def _range(first: str, last: str | None, maximum: int) -> range:
    lo = _number(first, maximum)
    hi = lo if last is None else _number(last, maximum)
    if lo > hi:
        raise _bad(f"descending range {first}-{last}")
    return range(lo, hi + 1)


def _parse_qualifier(inner: str) -> tuple[range, ...] | Literal["all"]:
    """Parse the text between ``[`` and ``]``."""
    ranges: list[range] = []
    everything = False
    for part in inner.split(";"):
        if part == "*":
            everything = True
            continue
        m = _CS_RANGE.fullmatch(part)
        if m is None:
            raise _bad(f"codestream qualifier [{inner[:_IGNORED_REPORT_LENGTH]}]")
        ranges.append(_range(m[1], m[2], _MAX_CODESTREAM))
    return "all" if everything else tuple(ranges)


def _parse_descriptor(text: str) -> tuple[Kind, int | None, ImplicitSpec | None] | None:
    """Return ``(kind, index, implicit)``, or ``None`` for an unknown form."""
    if text == "Hm":
        return "Hm", 0, None
    m = _EXPLICIT.fullmatch(text)
    if m is not None:
        return _EXPLICIT_KINDS[m[1]], None if m[2] == "*" else _number(m[2], _MAX_ID), None
    if text:
        m = _IMPLICIT.fullmatch(text)
        if m is not None:
            g = m.groups()
            spec = ImplicitSpec(
                *(
                    None if g[i] is None else _range(g[i], g[i + 1], _MAX_IMPLICIT)
                    for i in range(0, 8, 2)
                )
            )
            return "implicit", None, spec
    return None


def parse_cache_spec(text: str, *, allow_subtractive: bool) -> CacheSpec:
    """Parse the value of a ``model`` or ``need`` field.

    Parameters
    ----------
    text
        The %-decoded field value; empty means no descriptors.
    allow_subtractive
        ``True`` for ``model``; ``False`` for ``need``, where ``-`` is a 400.

    Returns
    -------
    CacheSpec
        The items in order plus the elements skipped as unknown forms.

    Raises
    ------
    JpipRequestError
        Status 400 for a malformed field (see the module docstring).
    """
    if not text:
        return CacheSpec()
    if text.count(",") >= MAX_ITEMS:
        raise _bad(f"more than {MAX_ITEMS} items")
    codestreams: Codestreams = None
    items: list[CacheItem] = []
    ignored: list[str] = []
    for element in text.split(","):
        if not element:
            raise _bad("empty item")
        body = element
        if body.startswith("["):
            close = body.find("]")
            if close < 0:
                raise _bad("unterminated codestream qualifier")
            codestreams = _parse_qualifier(body[1:close])
            body = body[close + 1 :]
            if not body:
                continue
        subtractive = body.startswith("-")
        if subtractive:
            if not allow_subtractive:
                raise _bad("subtractive items are not allowed here")
            body = body[1:]
        descriptor, colon, qualifier = body.partition(":")
        parsed = _parse_descriptor(descriptor)
        bytes_held = layers_held = None
        if parsed is not None and colon:
            kind = parsed[0]
            layers = _LAYERS_QUALIFIER.fullmatch(qualifier)
            if layers is not None and kind in ("P", "implicit"):
                layers_held = _number(layers[1], _MAX_LAYERS)
            elif _BYTES_QUALIFIER.fullmatch(qualifier):
                bytes_held = _number(qualifier, _MAX_BYTES)
            else:
                parsed = None
        if parsed is None:
            ignored.append(element[:_IGNORED_REPORT_LENGTH])
            continue
        kind, index, implicit = parsed
        items.append(
            CacheItem(
                subtractive=subtractive,
                codestreams=codestreams,
                kind=kind,
                index=index,
                implicit=implicit,
                bytes_held=bytes_held,
                layers_held=layers_held,
            )
        )
    return CacheSpec(tuple(items), tuple(ignored))
