"""
C-FIND attribute matching (PS3.4 C.2.2.2) turned into SQL fragments. Pure: no database here.

:func:`condition` takes one key of a query identifier (a column, the key's VR and its value
as text) and gives the SQL ``WHERE`` fragment and parameters that select the matching rows,
or ``None`` for universal matching. The rules:

* empty value, or only ``*``: universal matching (no condition);
* ``UI``: single value, or a list of UIDs separated by ``\\``;
* ``DA``, ``TM``, ``DT``: single value, or a range ``a-b``, ``a-`` or ``-b`` (bounds
  included; an upper bound of lower precision covers everything it is a prefix of, so
  ``-1200`` includes 12:00:59). Empty stored values never match a range. Date and time
  keys match independently (no combined date-time matching), and DT time-zone offsets are
  compared as written;
* text VRs (``AE``, ``CS``, ``LO``, ``PN``, ``SH``...): single value, or wildcards ``*``
  (any run) and ``?`` (one character); several values separated by ``\\`` match any of
  them (e.g. ``ModalitiesInStudy=CT\\MR``). Matching is case-sensitive, except ``PN``
  which is case-insensitive for ASCII letters (PS3.4 allows it): ``PN`` uses SQL ``LIKE``
  with ``%``, ``_`` and ``\\`` escaped, the others ``GLOB`` with ``[`` escaped;
* numbers (``IS``, ``US``...): single value, or a list.

Values arrive as text already decoded from the identifier's character set and stored
strings are decoded too, so both sides compare as Unicode.
"""

from __future__ import annotations

import re
from typing import Iterable

import attrs
from pydicom.charset import convert_encodings


class MatchingError(ValueError):
    """A key's value cannot be used for matching (malformed date, number...)."""


@attrs.frozen
class Condition:
    """An SQL ``WHERE`` fragment and its parameters, in order."""

    sql: str
    params: tuple[object, ...] = ()


#: Text VRs on which wildcard matching applies (PS3.4 C.2.2.2.4).
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
#: Text VRs whose values may not hold a backslash, so one splits multiple values.
_MULTI_VALUED = frozenset({"AE", "CS", "LO", "PN", "SH", "UC"})
NUMBER_VRS = frozenset({"IS", "US", "SS", "UL", "SL", "UV", "SV"})
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DATETIME = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
# Sorts after every character of a date, time or datetime: "hi" + this is an upper bound
# that includes every value having "hi" as a prefix.
_AFTER = "~"


def is_universal(value: str) -> bool:
    """Empty, or only ``*``: matches everything (PS3.4 C.2.2.2.3 and C.2.2.2.4)."""
    return value.strip(" *") == ""


def has_wildcards(value: str) -> bool:
    return "*" in value or "?" in value


def condition(column: str, vr: str, value: str) -> Condition | None:
    """
    The SQL that matches ``column`` against a key value, or ``None`` for universal matching.

    Parameters
    ----------
    column
        An SQL expression naming the stored value (trusted: never from the request).
    vr
        The key's value representation.
    value
        The key's value as text, ``\\`` separating multiple values.

    Raises
    ------
    MatchingError
        The value cannot be used with this VR.
    """
    value = value.strip(" \x00")
    if is_universal(value):
        return None
    if vr == "UI":
        uids = [u.strip(" \x00") for u in value.split("\\") if u.strip(" \x00")]
        if len(uids) == 1:
            return Condition(f"{column} = ?", (uids[0],))
        return Condition(f"{column} IN ({', '.join('?' * len(uids))})", tuple(uids))
    if vr in ("DA", "TM", "DT"):
        return _date_condition(column, vr, value)
    if vr in NUMBER_VRS:
        try:
            numbers = tuple(int(v.strip()) for v in value.split("\\"))
        except ValueError:
            raise MatchingError(f"{value!r} is not a number") from None
        if len(numbers) == 1:
            return Condition(f"{column} = ?", numbers)
        return Condition(f"{column} IN ({', '.join('?' * len(numbers))})", numbers)
    if vr in TEXT_VRS:
        values = value.split("\\") if vr in _MULTI_VALUED else [value]
        parts = [_text_condition(column, vr, v.strip(" ")) for v in values]
        if any(p is None for p in parts):
            return None  # one universal alternative matches everything
        return _any_of([p for p in parts if p is not None])
    raise MatchingError(f"matching on VR {vr} is not supported")


def _any_of(parts: list[Condition]) -> Condition:
    if len(parts) == 1:
        return parts[0]
    return Condition(
        "(" + " OR ".join(p.sql for p in parts) + ")", tuple(x for p in parts for x in p.params)
    )


def _text_condition(column: str, vr: str, value: str) -> Condition | None:
    if vr == "PN":
        value = "=".join(g.rstrip("^ ") for g in value.split("="))  # as stored (attributes._tidy_name)
    if is_universal(value):
        return None
    if not has_wildcards(value):
        if vr == "PN":
            return Condition(f"{column} = ? COLLATE NOCASE", (value,))
        return Condition(f"{column} = ?", (value,))
    if vr == "PN":
        return Condition(f"{column} LIKE ? ESCAPE '\\'", (like_pattern(value),))
    return Condition(f"{column} GLOB ?", (glob_pattern(value),))


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQL ``LIKE`` pattern with escape character ``\\``."""
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQLite ``GLOB`` pattern (``*`` and ``?`` are the same;
    ``[`` opens a character class in GLOB, so it is matched literally as ``[[]``)."""
    return value.replace("[", "[[]")


def _date_condition(column: str, vr: str, value: str) -> Condition:
    lo, hi, is_range = _split_range(vr, value)
    if not is_range:
        if vr == "DA":
            return Condition(f"{column} = ?", (lo,))
        # A time of lower precision names a span: 12 is 12:00:00 to 12:59:59.999999.
        return Condition(f"({column} >= ? AND {column} <= ?)", (lo, lo + _AFTER))
    sql, params = [f"{column} <> ''"], []
    if lo:
        sql.append(f"{column} >= ?")
        params.append(lo)
    if hi:
        sql.append(f"{column} <= ?")
        params.append(hi + _AFTER)
    return Condition("(" + " AND ".join(sql) + ")", tuple(params))


def _normalize(vr: str, text: str) -> str | None:
    """The value in the stored form (old ACR-NEMA separators dropped), or None if invalid."""
    if vr == "DA":
        text = text.replace(".", "") if len(text) == 10 else text
        return text if _DATE.match(text) else None
    if vr == "TM":
        text = text.replace(":", "")
        return text if _TIME.match(text) else None
    return text if _DATETIME.match(text) else None


def _split_range(vr: str, value: str) -> tuple[str, str, bool]:
    """(low, high, is_range) of a DA/TM/DT key; a missing bound is empty."""
    single = _normalize(vr, value)
    if single is not None:
        return single, single, False
    # A DT value may itself hold '-' (a negative time-zone offset): try every split.
    for i, ch in enumerate(value):
        if ch != "-":
            continue
        left, right = value[:i].strip(), value[i + 1 :].strip()
        lo = _normalize(vr, left) if left else ""
        hi = _normalize(vr, right) if right else ""
        if lo is not None and hi is not None and (lo or hi):
            return lo, hi, True
    raise MatchingError(f"{value!r} is not a valid {vr} value or range")


def response_charset(stored: str, texts: Iterable[str]) -> str | None:
    """
    The Specific Character Set to answer with.

    The study's own set when it can carry every value (or when all are ASCII, where it
    changes nothing), else ``ISO_IR 192`` (UTF-8). ``None`` when nothing was stored and
    every value is ASCII: the default repertoire needs no declaration.
    """
    texts = [t for t in texts if t]
    if all(t.isascii() for t in texts):
        return stored or None
    terms = [t.strip() for t in stored.split("\\")] if stored else []
    if len(terms) == 1 and "2022" not in terms[0]:
        try:
            codec = convert_encodings(terms)[0]
            for t in texts:
                t.encode(codec)
            return stored
        except (LookupError, UnicodeError):
            pass
    return "ISO_IR 192"
