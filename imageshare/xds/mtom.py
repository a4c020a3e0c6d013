"""MTOM/XOP packaging of SOAP 1.2 messages (W3C SOAP MTOM, XOP 1.0; ITI TF-2 Appendix V.8).

An MTOM message is a ``multipart/related`` body whose root part (``application/xop+xml``)
holds the envelope; each optimized binary is its own part, referenced from the XML by
``<xop:Include href="cid:..."/>`` in place of the element's base64 content. :func:`parse`
also accepts a plain ``application/soap+xml`` body (receivers must take both forms).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from typing import Mapping
from urllib.parse import quote, unquote

from lxml import etree

from imageshare.xds import safexml

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PARTS",
    "XOP_NS",
    "Attachments",
    "MtomError",
    "build",
    "content_id_href",
    "element_bytes",
    "include",
    "is_mtom",
    "optimize",
    "parse",
    "resolve_includes",
]

XOP_NS = "http://www.w3.org/2004/08/xop/include"
XOP_INCLUDE = f"{{{XOP_NS}}}Include"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_PARTS = 1000
_MAX_HEADER_BLOCK = 16 * 1024

Attachments = dict[str, tuple[str, bytes]]
"""Content-ID (without angle brackets) -> (Content-Type, bytes)."""

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})', re.ASCII)
_CID = re.compile(r"[\x21-\x7e]+", re.ASCII)  # printable ASCII, no space
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]", re.ASCII)  # RFC 2046 bchars


class MtomError(ValueError):
    """An MTOM/XOP package is malformed, inconsistent or over a limit."""


def is_mtom(content_type: str) -> bool:
    """Whether an HTTP Content-Type header announces a ``multipart/related`` package."""
    return _media_type(content_type)[0] == "multipart/related"


def content_id_href(cid: str) -> str:
    """The ``xop:Include`` href for a Content-ID: ``cid:`` plus the URL-escaped id."""
    return "cid:" + quote(cid, safe="@.-_~!$&'()*+,;=:")


def build(
    envelope: bytes,
    attachments: Mapping[str, tuple[str, bytes]],
    *,
    root_cid: str | None = None,
) -> tuple[str, bytes]:
    """Package an envelope (already holding its ``xop:Include`` elements) and its parts.

    Parameters
    ----------
    envelope
        The SOAP 1.2 envelope, UTF-8 XML.
    attachments
        Content-ID (no angle brackets) -> (Content-Type, bytes). Every ``xop:Include`` in
        the envelope must refer to one of them.
    root_cid
        Content-ID of the root part; generated if not given.

    Returns
    -------
    tuple[str, bytes]
        The HTTP ``Content-Type`` header value and the multipart body.

    Raises
    ------
    MtomError
        For an invalid Content-ID or Content-Type, or an ``xop:Include`` without its part.
    """
    root_cid = root_cid or f"root.{uuid.uuid4()}@imageshare"
    for cid, (content_type, _data) in attachments.items():
        _check_cid(cid)
        if not content_type or "\r" in content_type or "\n" in content_type:
            raise MtomError(f"invalid Content-Type for part <{cid}>")
    _check_cid(root_cid)
    if root_cid in attachments:
        raise MtomError(f"Content-ID <{root_cid}> is used twice")
    _check_includes(safexml.parse(envelope), attachments)

    parts = [
        (
            'application/xop+xml; charset=UTF-8; type="application/soap+xml"',
            root_cid,
            envelope,
        )
    ]
    parts += [(content_type, cid, bytes(data)) for cid, (content_type, data) in attachments.items()]
    boundary = _fresh_boundary([data for _type, _cid, data in parts])
    out = bytearray()
    for content_type, cid, data in parts:
        out += (
            f"--{boundary}\r\n"
            f"Content-Type: {content_type}\r\n"
            "Content-Transfer-Encoding: binary\r\n"
            f"Content-ID: <{cid}>\r\n\r\n"
        ).encode("ascii")
        out += data
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    header = (
        f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
        f'start="<{root_cid}>"; start-info="application/soap+xml"'
    )
    return header, bytes(out)


def parse(
    content_type: str,
    body: bytes,
    *,
    max_parts: int = DEFAULT_MAX_PARTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[bytes, Attachments]:
    """Split an MTOM package (or take a plain SOAP 1.2 body) into root XML and parts.

    Parameters
    ----------
    content_type
        The HTTP ``Content-Type`` header value.
    body
        The HTTP body.
    max_parts, max_bytes
        Limits on the number of MIME parts and on the body size.

    Returns
    -------
    tuple[bytes, Attachments]
        The root part (the envelope XML, with its ``xop:Include`` elements left in place)
        and the other parts by Content-ID. A plain ``application/soap+xml`` body gives
        ``(body, {})``.

    Raises
    ------
    MtomError
        Wrong media type or parameters, missing boundary, missing or unterminated parts,
        missing or duplicate Content-IDs, ``start`` matching no part, a root part that is
        not ``application/xop+xml; type="application/soap+xml"``, an ``xop:Include`` that
        is not a ``cid:`` reference to a part or not its element's only content, or a limit.
    imageshare.xds.safexml.UnsafeXml
        If the root part is refused by the safe XML parser (checked for its includes).
    """
    if len(body) > max_bytes:
        raise MtomError(f"message body of {len(body)} bytes exceeds the limit of {max_bytes}")
    media, params = _media_type(content_type)
    if media == "application/soap+xml":
        return bytes(body), {}
    if media != "multipart/related":
        raise MtomError(f"Content-Type {media or content_type!r} is neither application/soap+xml nor multipart/related")
    if params.get("type", "").lower() != "application/xop+xml":
        raise MtomError('multipart/related Content-Type must have type="application/xop+xml"')
    start_info = params.get("start-info")
    if start_info is not None and _media_type(start_info)[0] != "application/soap+xml":
        raise MtomError(f'start-info is {start_info!r}, expected "application/soap+xml" (SOAP 1.2)')
    boundary = params.get("boundary", "")
    if not boundary:
        raise MtomError("multipart/related Content-Type has no boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise MtomError("invalid multipart boundary")

    parts = _split(bytes(body), boundary, max_parts)
    by_cid: dict[str, tuple[str, bytes]] = {}
    order: list[str] = []
    for headers, data in parts:
        raw_cid = headers.get("content-id")
        if raw_cid is None:
            raise MtomError("a MIME part has no Content-ID")
        cid = _strip_cid(raw_cid)
        if cid in by_cid:
            raise MtomError(f"duplicate Content-ID <{cid}>")
        encoding = headers.get("content-transfer-encoding", "binary").lower()
        if encoding == "base64":
            try:
                data = base64.b64decode(data, validate=False)
            except binascii.Error:
                raise MtomError(f"part <{cid}> is not valid base64") from None
        elif encoding not in ("binary", "8bit", "7bit"):
            raise MtomError(f"part <{cid}> has unsupported Content-Transfer-Encoding {encoding!r}")
        by_cid[cid] = (headers.get("content-type", "application/octet-stream"), data)
        order.append(cid)

    start = params.get("start")
    root_cid = _strip_cid(start) if start else order[0]
    if root_cid not in by_cid:
        raise MtomError(f"start parameter <{root_cid}> matches no MIME part")
    root_type, root_xml = by_cid.pop(root_cid)
    root_media, root_params = _media_type(root_type)
    if root_media != "application/xop+xml":
        raise MtomError(f"root part Content-Type is {root_media!r}, expected application/xop+xml")
    if _media_type(root_params.get("type", ""))[0] != "application/soap+xml":
        raise MtomError('root part Content-Type must have type="application/soap+xml"')
    charset = root_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise MtomError(f"root part charset {charset!r} is not UTF-8")
    _check_includes(safexml.parse(root_xml, max_bytes=max_bytes), by_cid)
    return root_xml, by_cid


def include(element: etree._Element, cid: str) -> None:
    """Make ``<xop:Include href="cid:..."/>`` the only content of ``element``."""
    _check_cid(cid)
    for child in list(element):
        element.remove(child)
    element.text = None
    etree.SubElement(element, XOP_INCLUDE, href=content_id_href(cid), nsmap={"xop": XOP_NS})


def optimize(element: etree._Element, cid: str) -> bytes:
    """Replace ``element``'s base64 text by an ``xop:Include`` of ``cid``; return the bytes.

    Only canonical base64 may be optimized (XOP 1.0, 3.1): the caller puts the returned
    bytes in the attachments under ``cid``.
    """
    if len(element):
        raise MtomError(f"<{element.tag}> has child elements, not base64 text")
    text = "".join((element.text or "").split())
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise MtomError(f"<{element.tag}> does not hold valid base64") from None
    if base64.b64encode(data).decode("ascii") != text:
        raise MtomError(f"<{element.tag}> holds non-canonical base64, which XOP must not optimize")
    include(element, cid)
    return data


def element_bytes(element: etree._Element, attachments: Mapping[str, tuple[str, bytes]]) -> bytes:
    """The binary content of ``element``: its ``xop:Include``'d part, or its inline base64.

    Raises
    ------
    MtomError
        If the include does not resolve, or the inline text is not base64.
    """
    included = element.find(XOP_INCLUDE)
    if included is not None:
        return attachments[_include_cid(included, attachments)][1]
    if len(element):
        raise MtomError(f"<{element.tag}> has child elements, not base64 text")
    try:
        return base64.b64decode("".join((element.text or "").split()), validate=True)
    except binascii.Error:
        raise MtomError(f"<{element.tag}> does not hold valid base64") from None


def resolve_includes(root: etree._Element, attachments: Mapping[str, tuple[str, bytes]]) -> set[str]:
    """Replace every ``xop:Include`` under ``root`` by the base64 of its part, in place.

    This rebuilds the infoset the sender serialized (e.g. for schema validation).

    Returns
    -------
    set[str]
        The Content-IDs that were used.
    """
    used: set[str] = set()
    for included in list(root.iter(XOP_INCLUDE)):
        cid = _include_cid(included, attachments)
        parent = included.getparent()
        _check_sole_content(included)
        parent.remove(included)
        parent.text = base64.b64encode(attachments[cid][1]).decode("ascii")
        used.add(cid)
    return used


# ---------------------------------------------------------------- internals


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split ``type/sub; a=b; c="d"`` into the lowercased media type and its parameters."""
    media, sep, rest = value.partition(";")
    params: dict[str, str] = {}
    rest = sep + rest
    pos = 0
    while pos < len(rest.rstrip()):
        match = _PARAM.match(rest, pos)
        if match is None:
            raise MtomError(f"malformed Content-Type parameters in {value!r}")
        raw = match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        name = match.group(1).lower()
        if name in params:
            raise MtomError(f"Content-Type parameter {name!r} is repeated")
        params[name] = raw
        pos = match.end()
    return media.strip().lower(), params


def _split(body: bytes, boundary: str, max_parts: int) -> list[tuple[dict[str, str], bytes]]:
    """RFC 2046 multipart split: delimiters start a line; a closing delimiter is required."""
    delimiter = re.compile(
        rb"(?:\A|\r?\n)--" + re.escape(boundary.encode("ascii")) + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    )
    parts: list[tuple[dict[str, str], bytes]] = []
    previous = None
    closed = False
    for match in delimiter.finditer(body):
        if previous is not None:
            if len(parts) >= max_parts:
                raise MtomError(f"more than {max_parts} MIME parts")
            parts.append(_part(body[previous.end() : match.start()]))
        if match.group(1):
            closed = True
            break
        previous = match
    if previous is None:
        raise MtomError("no MIME part found for the declared boundary")
    if not closed:
        raise MtomError("multipart body has no closing boundary delimiter")
    if not parts:
        raise MtomError("multipart body holds no parts")
    return parts


def _part(raw: bytes) -> tuple[dict[str, str], bytes]:
    match = re.search(rb"\r?\n\r?\n", raw[: _MAX_HEADER_BLOCK + 4])
    if raw.startswith((b"\r\n", b"\n")):
        head, data = b"", raw[2 if raw.startswith(b"\r\n") else 1 :]
    elif match is None:
        raise MtomError("MIME part headers are not terminated by an empty line, or too long")
    else:
        head, data = raw[: match.start()], raw[match.end() :]
    headers: dict[str, str] = {}
    for line in re.split(rb"\r?\n(?![ \t])", head) if head else ():
        name, colon, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise MtomError(f"malformed MIME part header line {line[:80]!r}")
        if name in headers:
            raise MtomError(f"MIME part header {name!r} is repeated")
        headers[name] = " ".join(value.split())
    return headers, data


def _strip_cid(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    if not _CID.fullmatch(value) or "<" in value or ">" in value:
        raise MtomError(f"invalid Content-ID {value[:80]!r}")
    return value


def _check_cid(cid: str) -> None:
    if not _CID.fullmatch(cid) or "<" in cid or ">" in cid:
        raise MtomError(f"invalid Content-ID {cid[:80]!r}")


def _fresh_boundary(datas: list[bytes]) -> str:
    # A random 128-bit boundary practically never occurs; checking makes it certain.
    for _attempt in range(10):
        boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
        if not any(boundary.encode("ascii") in data for data in datas):
            return boundary
    raise MtomError("could not find a boundary absent from the parts")


def _include_cid(included: etree._Element, attachments: Mapping[str, object]) -> str:
    href = included.get("href") or ""
    if not href.startswith("cid:"):
        raise MtomError(f"xop:Include href {href[:80]!r} is not a cid: URI")
    cid = unquote(href[4:])
    if cid not in attachments:
        raise MtomError(f"xop:Include {href[:80]!r} matches no MIME part")
    return cid


def _check_sole_content(included: etree._Element) -> None:
    parent = included.getparent()
    if parent is None or len(parent) != 1 or (parent.text or "").strip() or (included.tail or "").strip():
        raise MtomError("xop:Include must be the only content of its element")


def _check_includes(root: etree._Element, attachments: Mapping[str, object]) -> None:
    for included in root.iter(XOP_INCLUDE):
        _include_cid(included, attachments)
        _check_sole_content(included)
