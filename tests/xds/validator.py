"""The project's own checker for XDS.b / XDS-I.b messages, for tests only.

It validates the SOAP Body payload against the copied IHE / ebRS schemas
(``tests/xds/schemas``; the absolute ``xml.xsd`` URL is mapped to the local copy, the
network is never used) and checks the SOAP 1.2, WS-Addressing and MTOM/XOP rules of ITI TF-2
Appendix V (xds-i.md sections 1 and 9.A-B). Its MIME handling uses the standard library's
``email`` parser, independently of :mod:`imageshare.xds.mtom`, so it can catch that
module's mistakes.
"""

from __future__ import annotations

import base64
import copy
import email.parser
import email.policy
import functools
import re
from pathlib import Path
from urllib.parse import unquote

from lxml import etree

SCHEMAS = Path(__file__).resolve().parent / "schemas"
SAMPLES = SCHEMAS / "samples"
_ENTRY = SCHEMAS / "schema" / "IHE" / "XDSI.b_ImagingDocumentSource.xsd"
_LOCAL = {"http://www.w3.org/2001/xml.xsd": SCHEMAS / "schema" / "w3c" / "xml.xsd"}

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
XOP = "http://www.w3.org/2004/08/xop/include"
XDS = "urn:ihe:iti:xds-b:2007"
XDSI = "urn:ihe:rad:xdsi-b:2009"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"

# payload root -> (is a request, accepted wsa:Action values)
PAYLOADS = {
    f"{{{XDS}}}ProvideAndRegisterDocumentSetRequest": (True, {"urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"}),
    f"{{{RS}}}RegistryResponse": (
        False,
        {"urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse", "urn:ihe:iti:2007:RegisterDocumentSet-bResponse"},
    ),
    f"{{{LCM}}}SubmitObjectsRequest": (True, {"urn:ihe:iti:2007:RegisterDocumentSet-b"}),
    f"{{{QUERY}}}AdhocQueryRequest": (True, {"urn:ihe:iti:2007:RegistryStoredQuery"}),
    f"{{{QUERY}}}AdhocQueryResponse": (False, {"urn:ihe:iti:2007:RegistryStoredQueryResponse"}),
    f"{{{XDS}}}RetrieveDocumentSetRequest": (True, {"urn:ihe:iti:2007:RetrieveDocumentSet"}),
    f"{{{XDS}}}RetrieveDocumentSetResponse": (False, {"urn:ihe:iti:2007:RetrieveDocumentSetResponse"}),
    f"{{{XDSI}}}RetrieveImagingDocumentSetRequest": (
        True,
        {"urn:ihe:rad:2009:RetrieveImagingDocumentSet", "urn:ihe:rad:xdsi-b:2009:RetrieveImagingDocumentSet"},
    ),
}
# ITI-41 both ways, ITI-43 both ways and RAD-69 (inherits ITI-43) are MTOM/XOP only.
MTOM_ONLY_PAYLOADS = {
    f"{{{XDS}}}ProvideAndRegisterDocumentSetRequest",
    f"{{{XDS}}}RetrieveDocumentSetRequest",
    f"{{{XDS}}}RetrieveDocumentSetResponse",
    f"{{{XDSI}}}RetrieveImagingDocumentSetRequest",
}
MTOM_ONLY_ACTIONS = {"urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"}


class _LocalCopies(etree.Resolver):
    def resolve(self, url, pubid, context):  # type: ignore[no-untyped-def]
        local = _LOCAL.get(url)
        return self.resolve_filename(str(local), context) if local else None


@functools.cache
def schema() -> etree.XMLSchema:
    """The XDS.b + XDS-I.b + ebRS 3.0 schema set (loaded once)."""
    parser = etree.XMLParser(no_network=True, resolve_entities=False)
    parser.resolvers.add(_LocalCopies())
    return etree.XMLSchema(etree.parse(str(_ENTRY), parser))


def split_http(raw: bytes) -> tuple[str | None, bytes]:
    """Split a stored HTTP message (start line, headers, body) into Content-Type and body."""
    match = re.search(rb"\r?\n\r?\n", raw)
    if match is None:
        return None, raw
    content_type = None
    for line in raw[: match.start()].decode("latin-1").splitlines()[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            content_type = value.strip()
    return content_type, raw[match.end() :]


def validate_message(content_type: str | None, body: bytes, *, require_mtom: bool = False) -> list[str]:
    """Check one message as sent over HTTP; return the errors (empty: valid).

    Parameters
    ----------
    content_type
        The HTTP Content-Type header, or ``None`` for a bare XML document (file samples).
    body
        The HTTP body.
    require_mtom
        Flag ITI-41, ITI-43 and RAD-69 messages that are not MTOM packages.
    """
    errors: list[str] = []
    try:
        xml, parts, is_mtom = _unpack(content_type, body, errors)
        root = etree.fromstring(
            xml, etree.XMLParser(no_network=True, resolve_entities=False, load_dtd=False, huge_tree=True)
        )
    except (ValueError, etree.XMLSyntaxError) as exc:
        return errors + [f"unreadable message: {exc}"]
    if root.getroottree().docinfo.doctype:
        errors.append("document has a DOCTYPE")
    _inline_includes(root, parts, is_mtom, errors)

    payload, action = root, None
    if etree.QName(root).localname == "Envelope":
        payload, action = _check_envelope(root, errors)
        if payload is None:
            return errors
    expected = PAYLOADS.get(payload.tag)
    if expected is None:
        errors.append(f"unexpected payload element {payload.tag}")
        return errors
    if require_mtom and not is_mtom and (payload.tag in MTOM_ONLY_PAYLOADS or action in MTOM_ONLY_ACTIONS):
        errors.append(f"{etree.QName(payload).localname} must be sent as an MTOM/XOP package")
    validator = schema()
    if not validator.validate(copy.deepcopy(payload)):
        errors += [f"schema: line {e.line}: {e.message}" for e in validator.error_log]
    if payload.tag == f"{{{XDS}}}ProvideAndRegisterDocumentSetRequest":
        _check_documents(payload, errors)
    if payload.tag == f"{{{XDSI}}}RetrieveImagingDocumentSetRequest":
        _check_rad69(payload, errors)
    return errors


def validate_http(raw: bytes, *, require_mtom: bool = False) -> list[str]:
    """:func:`validate_message` for a stored HTTP message (start line + headers + body)."""
    content_type, body = split_http(raw)
    if content_type is None:
        return ["HTTP message has no Content-Type header"]
    return validate_message(content_type, body, require_mtom=require_mtom)


def _unpack(content_type: str | None, body: bytes, errors: list[str]) -> tuple[bytes, dict[str, bytes], bool]:
    """Return (root XML, parts by Content-ID, is MTOM), recording packaging errors."""
    if content_type is None:
        return body, {}, False
    head = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    )
    media = head.get_content_type()
    if media == "application/soap+xml":
        return body, {}, False
    if media != "multipart/related":
        errors.append(f"Content-Type {media} is neither application/soap+xml nor multipart/related")
        return body, {}, False
    if (head.get_param("type") or "").lower() != "application/xop+xml":
        errors.append('MTOM: Content-Type lacks type="application/xop+xml"')
    if (head.get_param("start-info") or "").lower() != "application/soap+xml":
        errors.append('MTOM: Content-Type lacks start-info="application/soap+xml"')
    boundary = head.get_boundary()
    if not boundary:
        raise ValueError("multipart/related without boundary")
    if re.search(rb"(?:^|\r?\n)--" + re.escape(boundary.encode()) + rb"--", body) is None:
        errors.append("MTOM: no closing boundary delimiter")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    for defect in message.defects:
        errors.append(f"MIME: {type(defect).__name__}")
    if not message.is_multipart():
        raise ValueError("multipart body could not be split")
    parts: dict[str, bytes] = {}
    types: dict[str, str] = {}
    order: list[str] = []
    for part in message.iter_parts():
        cid = (part.get("Content-ID") or "").strip().strip("<>")
        if not cid:
            errors.append("MTOM: a MIME part has no Content-ID")
        if cid in parts:
            errors.append(f"MTOM: duplicate Content-ID <{cid}>")
        data = part.get_payload(decode=True)
        parts[cid] = data if isinstance(data, bytes) else b""
        types[cid] = part.get("Content-Type", "")
        order.append(cid)
    if not order:
        raise ValueError("multipart body has no parts")
    start = (head.get_param("start") or "").strip().strip("<>")
    if not start:
        errors.append("MTOM: Content-Type lacks the start parameter")
    root_cid = start if start in parts else order[0]
    if start and start not in parts:
        errors.append(f"MTOM: start <{start}> matches no part")
    root_head = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {types[root_cid]}\r\n\r\n".encode("latin-1")
    )
    if root_head.get_content_type() != "application/xop+xml":
        errors.append(f"MTOM: root part is {root_head.get_content_type()}, expected application/xop+xml")
    if (root_head.get_param("type") or "").lower() != "application/soap+xml":
        errors.append('MTOM: root part lacks type="application/soap+xml"')
    xml = parts.pop(root_cid)
    return xml, parts, True


def _inline_includes(root: etree._Element, parts: dict[str, bytes], is_mtom: bool, errors: list[str]) -> None:
    for included in list(root.iter(f"{{{XOP}}}Include")):
        href = included.get("href", "")
        parent = included.getparent()
        if not is_mtom:
            errors.append("xop:Include outside an MTOM package")
            continue
        if not href.startswith("cid:") or unquote(href[4:]) not in parts:
            errors.append(f"xop:Include {href!r} does not resolve to a MIME part")
            continue
        if len(parent) != 1 or (parent.text or "").strip() or (included.tail or "").strip():
            errors.append(f"xop:Include is not the only content of {parent.tag}")
        parent.remove(included)
        parent.text = base64.b64encode(parts[unquote(href[4:])]).decode("ascii")


def _check_envelope(env: etree._Element, errors: list[str]) -> tuple[etree._Element | None, str | None]:
    if env.tag != f"{{{SOAP12}}}Envelope":
        errors.append(f"not a SOAP 1.2 envelope: {env.tag}")
        return None, None
    bodies = env.findall(f"{{{SOAP12}}}Body")
    if len(bodies) != 1:
        errors.append(f"envelope has {len(bodies)} Body elements")
        return None, None
    children = [c for c in bodies[0] if isinstance(c.tag, str)]
    if len(children) != 1:
        errors.append(f"soap:Body holds {len(children)} elements, expected 1")
        return None, None
    payload = children[0]
    if payload.tag == f"{{{SOAP12}}}Fault":
        errors.append("SOAP Fault: " + " ".join(" ".join(payload.itertext()).split())[:300])
        return None, None
    header = env.find(f"{{{SOAP12}}}Header")
    wsa: dict[str, list[etree._Element]] = {}
    for block in header if header is not None else ():
        if isinstance(block.tag, str) and etree.QName(block).namespace == WSA:
            wsa.setdefault(etree.QName(block).localname, []).append(block)
    for name, blocks in wsa.items():
        if len(blocks) > 1:
            errors.append(f"wsa:{name} occurs {len(blocks)} times")
    expected = PAYLOADS.get(payload.tag)
    action = None
    if "Action" not in wsa:
        errors.append("missing wsa:Action")
    else:
        element = wsa["Action"][0]
        action = (element.text or "").strip()
        if element.get(f"{{{SOAP12}}}mustUnderstand") not in ("1", "true"):
            errors.append('wsa:Action lacks mustUnderstand="1"')
        if expected and action not in expected[1]:
            errors.append(f"wsa:Action {action!r} does not match the payload {etree.QName(payload).localname}")
    if expected and expected[0]:
        for name in ("MessageID", "ReplyTo", "To"):
            if name not in wsa:
                errors.append(f"request lacks wsa:{name}")
        if "MessageID" in wsa and not (wsa["MessageID"][0].text or "").strip():
            errors.append("empty wsa:MessageID")
    elif expected and "RelatesTo" not in wsa:
        errors.append("response lacks wsa:RelatesTo")
    return payload, action


def _check_documents(payload: etree._Element, errors: list[str]) -> None:
    metadata = {e.get("id") for e in payload.iter(f"{{{RIM}}}ExtrinsicObject")}
    documents = [d.get("id") for d in payload.findall(f"{{{XDS}}}Document")]
    for missing in sorted(set(documents) - metadata):
        errors.append(f"Document {missing!r} has no ExtrinsicObject (XDSMissingDocumentMetadata)")
    for missing in sorted(metadata - set(documents)):
        errors.append(f"ExtrinsicObject {missing!r} has no Document (XDSMissingDocument)")
    for doubled in sorted({d for d in documents if documents.count(d) > 1}):
        errors.append(f"Document {doubled!r} occurs more than once")


def _check_rad69(payload: etree._Element, errors: list[str]) -> None:
    for element in payload.iter():
        for attribute in ("studyInstanceUID", "seriesInstanceUID"):
            if attribute in element.attrib and not element.get(attribute).strip():
                errors.append(f"empty {attribute}")
        if element.tag in (f"{{{XDS}}}RepositoryUniqueId", f"{{{XDS}}}DocumentUniqueId", f"{{{XDSI}}}TransferSyntaxUID"):
            if not (element.text or "").strip():
                errors.append(f"empty {etree.QName(element).localname}")
