"""
A ``twisted.logger.Logger`` whose field values cannot flood or forge the log.

Log events carry values a stranger chose: JPIP field names, SOAP headers, AE titles, URLs,
exception messages. Written verbatim, one anonymous request could write a 300 MB line, or a
``&#10;`` in a SOAP header could start a second, forged line. Every module logs through
:class:`Logger` from here, which bounds and escapes each field before the event is
emitted, so no observer (file, syslog, JSON) ever sees the raw value:

* control characters (C0, DEL, C1, and the Unicode line and paragraph separators) are
  written as ``\\xNN``/``\\uNNNN`` escapes, so one event is one line;
* a value longer than :data:`MAX_VALUE_CHARS` is cut, with a note of how much was cut;
* numbers, booleans and ``None`` pass unchanged (format specs such as ``{status:#06x}``
  still apply), and so do Twisted's own ``log_*`` keys (the failure, the level, the format).

Events below the level set with :func:`set_minimum_level` (``[log] level``, info by
default) are not emitted at all: twistd writes every level it is given, and debug events
may name what info events must not (pydicom's warnings quote data-set values).

Pure: no reactor; safe to call from any thread, as twisted.logger is.
"""

from __future__ import annotations

import enum
import re
from typing import Any

from twisted.logger import Logger as _TwistedLogger, LogLevel

__all__ = ["Logger", "MAX_VALUE_CHARS", "clip", "set_minimum_level"]

#: Characters of one field value, after escaping, that reach the log.
MAX_VALUE_CHARS = 256

_minimum = LogLevel.debug

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PASS = (int, float, bool, type(None), enum.Enum)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clip(value: Any, limit: int = MAX_VALUE_CHARS) -> Any:
    """
    A log-safe form of ``value``: numbers unchanged, anything else a bounded escaped string.

    Only the first ``4 * limit`` characters of a long text are looked at, so a huge value
    costs no more than a short one.
    """
    if isinstance(value, _PASS):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[: 4 * limit])
        text, total = raw.decode("ascii", "backslashreplace"), len(value)
    else:
        try:
            text = value if isinstance(value, str) else str(value)
        except Exception:
            text = f"<unprintable {type(value).__name__}>"
        total = len(text)
        text = text[: 4 * limit]
    text = _CONTROL.sub(_escape, text)
    if len(text) > limit or total > 4 * limit:
        text = f"{text[:limit]}…[{total} chars]"
    return text


def set_minimum_level(name: str) -> None:
    """Emit only events at ``name`` (``debug``, ``info``, ``warn``, ``error``) or above."""
    global _minimum
    _minimum = LogLevel.levelWithName(name)


class Logger(_TwistedLogger):
    """``twisted.logger.Logger`` that passes every field through :func:`clip`."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level < _minimum:
            return
        for key, value in kwargs.items():
            if not key.startswith("log_"):
                kwargs[key] = clip(value)
        super().emit(level, format, **kwargs)
