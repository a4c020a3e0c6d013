"""
RFC 5424 framing of audit messages (ITI-20), and the RFC 5425 octet-counting frame.

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import datetime
import re

__all__ = ["BOM", "FACILITY", "MSGID", "format_message", "frame", "parse_frames", "split_message"]

FACILITY = 10  # security/authorization (authpriv)
SEVERITY = 5  # notice
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"

_PRINTABLE = re.compile(r"[^\x21-\x7e]")


def _field(value: str, limit: int) -> str:
    value = _PRINTABLE.sub("", value)[:limit]
    return value or "-"


def format_message(xml: bytes, *, when: datetime.datetime, hostname: str, app_name: str, procid: str) -> bytes:
    """``<85>1 TIMESTAMP HOSTNAME APP-NAME PROCID IHE+RFC-3881 - BOM XML`` (RFC 5424 section 6)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    timestamp = when.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = (f"<{FACILITY * 8 + SEVERITY}>1 {timestamp} {_field(hostname, 255)} {_field(app_name, 48)} "
              f"{_field(procid, 128)} {MSGID} - ")
    return header.encode("ascii") + BOM + xml


def split_message(message: bytes) -> tuple[list[str], bytes]:
    """The seven header fields of an RFC 5424 message and its MSG (BOM removed)."""
    parts = message.split(b" ", 7)
    if len(parts) < 8:
        raise ValueError("not an RFC 5424 message")
    body = parts[7]
    if body.startswith(BOM):
        body = body[len(BOM):]
    return [p.decode("ascii") for p in parts[:7]], body


def frame(message: bytes) -> bytes:
    """RFC 5425 section 4.3: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d " % len(message) + message


def parse_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete octet-counted frames in ``data``, and the bytes left over."""
    out = []
    while True:
        space = data.find(b" ", 0, 12)
        if space <= 0:
            return out, data
        length = int(data[:space])
        end = space + 1 + length
        if len(data) < end:
            return out, data
        out.append(data[space + 1:end])
        data = data[end:]
