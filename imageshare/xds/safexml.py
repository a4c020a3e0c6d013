"""Parse untrusted XML with lxml, refusing what could attack the parser.

What is refused, each with an :class:`UnsafeXml` carrying a short ``reason`` code:

``too-large``
    More than ``max_bytes`` of input (checked before parsing).
``encoding``
    A declared encoding other than UTF-8 (or US-ASCII, a subset), a UTF-16/32 byte order
    mark, or bytes that are not UTF-8. SOAP 1.2 over HTTP in IHE profiles is UTF-8, and
    refusing the rest keeps the byte-level checks below sound.
``doctype``
    Any document type declaration, internal or external. This removes XXE (file and network
    entities), entity expansion ("billion laughs") and external DTD fetches in one rule:
    SOAP 1.2 forbids a DTD in an envelope anyway (SOAP 1.2 Part 1, 5).
``too-deep`` / ``too-many-elements``
    More than ``max_depth`` nested elements or ``max_elements`` elements in all; checked
    while parsing, so a hostile document stops early.
``malformed``
    Anything libxml2 rejects (not well-formed, undefined entity, ...).

The lxml parser is also configured defensively (``resolve_entities=False``,
``no_network=True``, ``load_dtd=False``, ``dtd_validation=False``, ``huge_tree=False``):
``huge_tree=False`` keeps libxml2's own limits (a text node at most 10 MB, element nesting
at most 256 levels), which bound what slips past the checks above.
"""

from __future__ import annotations

import re

from lxml import etree

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_ELEMENTS",
    "UnsafeXml",
    "parse",
]

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# XDS metadata nests about 10 levels deep inside a SOAP envelope; 100 leaves room.
DEFAULT_MAX_DEPTH = 100
DEFAULT_MAX_ELEMENTS = 500_000

_FEED_CHUNK = 64 * 1024
_UTF8_NAMES = {"utf-8", "utf8", "us-ascii", "ascii"}
_BOMS = (b"\xfe\xff", b"\xff\xfe", b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00")
_DECLARATION = re.compile(rb"<\?xml\s[^>]*?\?>")
_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]*)["']""")
# The prolog before the root element: declaration, whitespace, comments and PIs.
_PROLOG_ITEM = re.compile(rb"\s+|<!--.*?-->|<\?.*?\?>", re.DOTALL)


class UnsafeXml(ValueError):
    """The input was refused; ``reason`` is a short code, the message explains it.

    Parameters
    ----------
    reason
        One of ``too-large``, ``encoding``, ``doctype``, ``too-deep``,
        ``too-many-elements``, ``malformed``.
    message
        Human-readable explanation (safe to return to the sender).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> etree._Element:
    """Parse ``data`` as a UTF-8 XML document without a DTD and return its root element.

    Parameters
    ----------
    data
        The document bytes.
    max_bytes, max_depth, max_elements
        Limits; see the module docstring.

    Returns
    -------
    lxml.etree._Element
        The root element.

    Raises
    ------
    UnsafeXml
        If the input is refused (too large, not UTF-8, has a DOCTYPE, too deep, too many
        elements, or malformed).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("safexml.parse takes bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise UnsafeXml("too-large", f"XML document of {len(data)} bytes exceeds the limit of {max_bytes}")
    _check_encoding(data)
    _check_prolog(data)
    return _parse_bounded(data, max_depth, max_elements)


def _check_encoding(data: bytes) -> None:
    if data.startswith(_BOMS):
        raise UnsafeXml("encoding", "XML must be UTF-8; a UTF-16/UTF-32 byte order mark was found")
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    declaration = _DECLARATION.match(body)
    if declaration:
        declared = _ENCODING.search(declaration.group(0))
        if declared and declared.group(1).decode("ascii").lower() not in _UTF8_NAMES:
            name = declared.group(1).decode("ascii", "replace")
            raise UnsafeXml("encoding", f"XML must be UTF-8; the document declares encoding {name!r}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeXml("encoding", f"XML is not valid UTF-8 at byte {exc.start}") from None


def _check_prolog(data: bytes) -> None:
    """Refuse a DOCTYPE before libxml2 ever sees its internal subset."""
    pos = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    while True:
        item = _PROLOG_ITEM.match(data, pos)
        if item is None or item.end() == pos:
            break
        pos = item.end()
    if data[pos : pos + 9].upper() == b"<!DOCTYPE":
        raise UnsafeXml("doctype", "XML with a document type declaration (DOCTYPE) is not accepted")


def _parse_bounded(data: bytes, max_depth: int, max_elements: int) -> etree._Element:
    parser = etree.XMLPullParser(
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    depth = 0
    count = 0
    try:
        for offset in range(0, max(len(data), 1), _FEED_CHUNK):
            parser.feed(data[offset : offset + _FEED_CHUNK])
            for event, _element in parser.read_events():
                if event == "start":
                    depth += 1
                    count += 1
                    if depth > max_depth:
                        raise UnsafeXml("too-deep", f"XML nests deeper than {max_depth} elements")
                    if count > max_elements:
                        raise UnsafeXml("too-many-elements", f"XML has more than {max_elements} elements")
                else:
                    depth -= 1
        root = parser.close()
    except etree.XMLSyntaxError as exc:
        raise UnsafeXml("malformed", f"malformed XML: {exc}") from None
    tree = root.getroottree()
    # Belt and braces: a DTD that slipped past the prolog scan is still refused.
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise UnsafeXml("doctype", "XML with a document type declaration (DOCTYPE) is not accepted")
    return root
