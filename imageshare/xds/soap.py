"""SOAP 1.2 envelopes with WS-Addressing 1.0 headers, as IHE ITI TF-2 Appendix V wants them.

Requests carry ``wsa:Action`` (``mustUnderstand="1"``), ``wsa:MessageID`` (``urn:uuid:``),
``wsa:ReplyTo`` (anonymous: the answer comes on the same HTTP exchange) and ``wsa:To``;
responses carry ``wsa:Action`` (``mustUnderstand="1"``), ``wsa:MessageID`` and
``wsa:RelatesTo``. :func:`parse_envelope` checks a received envelope and raises
:class:`SoapFault` describing the fault to answer with; a received fault is returned as
``Envelope.fault``.
"""

from __future__ import annotations

import uuid
from copy import deepcopy
from typing import Iterable

import attrs
from lxml import etree

__all__ = [
    "ANONYMOUS",
    "FAULT_ACTION",
    "ITI18",
    "ITI18_RESPONSE",
    "ITI41",
    "ITI41_RESPONSE",
    "ITI42",
    "ITI42_RESPONSE",
    "ITI43",
    "ITI43_RESPONSE",
    "RAD68",
    "RAD68_RESPONSE",
    "RAD69",
    "RAD69_ACTIONS",
    "RAD69_LEGACY",
    "RAD69_RESPONSE",
    "RESPONSE_ACTIONS",
    "SOAP11_NS",
    "SOAP12_NS",
    "SOAP12_CONTENT_TYPE",
    "WSA_NS",
    "Envelope",
    "SoapFault",
    "build_fault",
    "build_request",
    "build_response",
    "new_message_id",
    "parse_envelope",
    "parse_fault",
]

SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
WSA_NS = "http://www.w3.org/2005/08/addressing"
XML_NS = "http://www.w3.org/XML/1998/namespace"
SOAP12_CONTENT_TYPE = "application/soap+xml; charset=UTF-8"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
FAULT_ACTION = "http://www.w3.org/2005/08/addressing/soap/fault"

# Actions (xds-i.md section 1; ITI TF-2 3.41, 3.42, 3.18, 3.43; RAD TF-3 4.68, 4.69).
ITI41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ITI41_RESPONSE = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"
RAD68 = ITI41  # Provide and Register Imaging Document Set-MTOM/XOP uses the ITI-41 action.
RAD68_RESPONSE = ITI41_RESPONSE
ITI42 = "urn:ihe:iti:2007:RegisterDocumentSet-b"
ITI42_RESPONSE = "urn:ihe:iti:2007:RegisterDocumentSet-bResponse"
ITI18 = "urn:ihe:iti:2007:RegistryStoredQuery"
ITI18_RESPONSE = "urn:ihe:iti:2007:RegistryStoredQueryResponse"
ITI43 = "urn:ihe:iti:2007:RetrieveDocumentSet"
ITI43_RESPONSE = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
RAD69 = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
# The action printed in the original IHE XDS-I.b WSDL; accepted, never sent.
RAD69_LEGACY = "urn:ihe:rad:xdsi-b:2009:RetrieveImagingDocumentSet"
RAD69_ACTIONS = frozenset({RAD69, RAD69_LEGACY})
RAD69_RESPONSE = ITI43_RESPONSE
RESPONSE_ACTIONS = {
    ITI41: ITI41_RESPONSE,
    ITI42: ITI42_RESPONSE,
    ITI18: ITI18_RESPONSE,
    ITI43: ITI43_RESPONSE,
    RAD69: RAD69_RESPONSE,
    RAD69_LEGACY: RAD69_RESPONSE,
}

FAULT_CODES = ("VersionMismatch", "MustUnderstand", "DataEncodingUnknown", "Sender", "Receiver")
_TRUE = ("1", "true")
_FALSE = ("0", "false")
# Roles this node plays: absent role means ultimateReceiver (SOAP 1.2 Part 1, 5.2.2).
_OUR_ROLES = (
    None,
    "http://www.w3.org/2003/05/soap-envelope/role/next",
    "http://www.w3.org/2003/05/soap-envelope/role/ultimateReceiver",
)
_UNDERSTOOD_WSA = frozenset(
    f"{{{WSA_NS}}}{name}" for name in ("Action", "MessageID", "To", "ReplyTo", "From", "FaultTo", "RelatesTo")
)
_NSMAP = {"soap": SOAP12_NS, "wsa": WSA_NS}


def _s(name: str) -> str:
    return f"{{{SOAP12_NS}}}{name}"


def _a(name: str) -> str:
    return f"{{{WSA_NS}}}{name}"


def new_message_id() -> str:
    """Return a fresh WS-Addressing message id, ``urn:uuid:`` plus a random UUID."""
    return f"urn:uuid:{uuid.uuid4()}"


class SoapFault(Exception):
    """A SOAP 1.2 fault: raised by :func:`parse_envelope`, or parsed from a received one.

    Parameters
    ----------
    code
        ``Sender``, ``Receiver``, ``VersionMismatch``, ``MustUnderstand`` or
        ``DataEncodingUnknown`` (the local name of the SOAP 1.2 fault code).
    reason
        Human-readable reason text.
    subcode
        Optional subcode as a Clark name ``{namespace}local`` (e.g.
        ``{http://www.w3.org/2005/08/addressing}MessageAddressingHeaderRequired``).
    not_understood
        For ``MustUnderstand``: the Clark names of the header blocks not understood.
    """

    def __init__(
        self,
        code: str,
        reason: str,
        *,
        subcode: str | None = None,
        not_understood: Iterable[str] = (),
    ) -> None:
        if code not in FAULT_CODES:
            raise ValueError(f"unknown SOAP 1.2 fault code {code!r}")
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.subcode = subcode
        self.not_understood = tuple(not_understood)

    @property
    def http_status(self) -> int:
        """HTTP status for this fault (SOAP 1.2 Part 2, 7.5.2.2): 400 for Sender, else 500."""
        return 400 if self.code == "Sender" else 500

    def to_bytes(self, *, relates_to: str | None = None) -> bytes:
        """Serialize as a SOAP 1.2 fault envelope (see :func:`build_fault`)."""
        return build_fault(
            self.code,
            self.reason,
            subcode=self.subcode,
            relates_to=relates_to,
            not_understood=self.not_understood,
        )


@attrs.frozen
class Envelope:
    """A parsed SOAP 1.2 envelope.

    Attributes
    ----------
    action
        ``wsa:Action`` value (``None`` only on a received fault without one).
    message_id
        ``wsa:MessageID`` or ``None``.
    relates_to
        ``wsa:RelatesTo`` or ``None``.
    to
        ``wsa:To`` or ``None``.
    reply_to
        ``wsa:ReplyTo/wsa:Address`` or ``None``.
    body
        The single child element of ``soap:Body`` (the payload, or a ``soap:Fault``).
    """

    action: str | None
    message_id: str | None
    relates_to: str | None
    to: str | None
    reply_to: str | None
    body: etree._Element

    @property
    def fault(self) -> SoapFault | None:
        """The received fault if the body is a ``soap:Fault``, else ``None``."""
        return parse_fault(self.body) if self.body.tag == _s("Fault") else None


def build_request(
    action: str,
    to: str,
    body: etree._Element,
    *,
    message_id: str | None = None,
) -> bytes:
    """Build a SOAP 1.2 request envelope with WS-Addressing headers.

    Parameters
    ----------
    action
        ``wsa:Action`` value, sent with ``mustUnderstand="1"``.
    to
        Endpoint URL for ``wsa:To`` (sent with ``mustUnderstand="1"`` as the IHE samples do).
    body
        Payload element; a copy is placed in ``soap:Body``.
    message_id
        ``wsa:MessageID``; a fresh ``urn:uuid:`` by default.

    Returns
    -------
    bytes
        UTF-8 XML with an XML declaration.
    """
    envelope, header = _skeleton()
    _header(header, "Action", action, must_understand=True)
    _header(header, "MessageID", message_id or new_message_id())
    reply_to = etree.SubElement(header, _a("ReplyTo"))
    etree.SubElement(reply_to, _a("Address")).text = ANONYMOUS
    _header(header, "To", to, must_understand=True)
    return _finish(envelope, body)


def build_response(
    action: str,
    relates_to: str | None,
    body: etree._Element,
    *,
    message_id: str | None = None,
) -> bytes:
    """Build a SOAP 1.2 response envelope: ``wsa:Action`` (mustUnderstand), ``wsa:MessageID``
    and ``wsa:RelatesTo`` (omitted if the request had no MessageID).

    Parameters
    ----------
    action
        Response action, e.g. :data:`ITI41_RESPONSE`.
    relates_to
        The request's ``wsa:MessageID``.
    body
        Payload element; a copy is placed in ``soap:Body``.
    message_id
        ``wsa:MessageID``; a fresh ``urn:uuid:`` by default.
    """
    envelope, header = _skeleton()
    _header(header, "Action", action, must_understand=True)
    _header(header, "MessageID", message_id or new_message_id())
    if relates_to:
        _header(header, "RelatesTo", relates_to)
    return _finish(envelope, body)


def build_fault(
    code: str,
    reason: str,
    *,
    subcode: str | None = None,
    relates_to: str | None = None,
    not_understood: Iterable[str] = (),
) -> bytes:
    """Build a SOAP 1.2 fault envelope.

    Parameters
    ----------
    code
        ``Sender``, ``Receiver``, ``VersionMismatch``, ``MustUnderstand`` or
        ``DataEncodingUnknown``.
    reason
        ``soap:Reason/soap:Text`` (``xml:lang="en"``); do not put patient data here.
    subcode
        Optional Clark name ``{namespace}local`` for ``soap:Subcode/soap:Value``.
    relates_to
        The request's MessageID, if known.
    not_understood
        Clark names reported in ``soap:NotUnderstood`` header blocks (MustUnderstand).

    Returns
    -------
    bytes
        UTF-8 XML. A VersionMismatch fault also carries the ``soap:Upgrade`` header.
    """
    if code not in FAULT_CODES:
        raise ValueError(f"unknown SOAP 1.2 fault code {code!r}")
    envelope, header = _skeleton()
    _header(header, "Action", FAULT_ACTION, must_understand=True)
    _header(header, "MessageID", new_message_id())
    if relates_to:
        _header(header, "RelatesTo", relates_to)
    for index, name in enumerate(not_understood):
        block = _declaring(header, _s("NotUnderstood"), name, f"nu{index}")
        block.set("qname", _qname_value(block, name))
    if code == "VersionMismatch":
        upgrade = etree.SubElement(header, _s("Upgrade"))
        etree.SubElement(upgrade, _s("SupportedEnvelope"), qname="soap:Envelope")
    # Built in place, not copied: the QName-valued text needs its prefix declarations kept.
    fault = etree.SubElement(etree.SubElement(envelope, _s("Body")), _s("Fault"))
    code_element = etree.SubElement(fault, _s("Code"))
    etree.SubElement(code_element, _s("Value")).text = f"soap:{code}"
    if subcode:
        sub = etree.SubElement(code_element, _s("Subcode"))
        value = _declaring(sub, _s("Value"), subcode, "sub")
        value.text = _qname_value(value, subcode)
    reason_element = etree.SubElement(fault, _s("Reason"))
    text = etree.SubElement(reason_element, _s("Text"))
    text.set(f"{{{XML_NS}}}lang", "en")
    text.text = reason
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def parse_fault(fault: etree._Element) -> SoapFault:
    """Read a received ``soap:Fault`` element into a :class:`SoapFault`.

    Unknown or unreadable codes become ``Receiver``: the peer failed, whatever it said.
    """
    value = fault.find(f"{_s('Code')}/{_s('Value')}")
    code = _resolve_qname(value)
    local = code.localname if code is not None and code.namespace == SOAP12_NS else None
    sub_value = fault.find(f"{_s('Code')}/{_s('Subcode')}/{_s('Value')}")
    sub = _resolve_qname(sub_value)
    texts = [t.text or "" for t in fault.iterfind(f"{_s('Reason')}/{_s('Text')}")]
    english = [
        t.text or "" for t in fault.iterfind(f"{_s('Reason')}/{_s('Text')}") if (t.get(f"{{{XML_NS}}}lang") or "").startswith("en")
    ]
    reason = (english or texts or ["(no reason given)"])[0].strip()
    return SoapFault(
        local if local in FAULT_CODES else "Receiver",
        reason,
        subcode=sub.text if sub is not None else None,
    )


def parse_envelope(
    root: etree._Element,
    *,
    request: bool = False,
    understood: Iterable[str] = (),
) -> Envelope:
    """Check a received SOAP envelope and return its addressing headers and payload.

    Parameters
    ----------
    root
        Root element, from :func:`imageshare.xds.safexml.parse`.
    request
        The message starts an exchange: ``wsa:MessageID`` is then required, and
        ``wsa:ReplyTo``, if present, must be anonymous.
    understood
        Clark names of extra header blocks the caller processes (the WS-Addressing
        headers are always understood).

    Returns
    -------
    Envelope

    Raises
    ------
    SoapFault
        ``VersionMismatch`` for a SOAP 1.1 (or other non-1.2) envelope; ``MustUnderstand``
        for a ``mustUnderstand`` header block addressed to us that we do not process;
        ``Sender`` for a malformed envelope (no or several Body elements, not exactly one
        payload element, missing or repeated WS-Addressing headers).
    """
    qname = etree.QName(root)
    if qname.localname == "Envelope" and qname.namespace != SOAP12_NS:
        version = "SOAP 1.1" if qname.namespace == SOAP11_NS else f"namespace {qname.namespace!r}"
        raise SoapFault("VersionMismatch", f"{version} envelope received; only SOAP 1.2 is supported")
    if root.tag != _s("Envelope"):
        raise SoapFault("Sender", f"root element is {qname.localname!r}, not a SOAP 1.2 Envelope")
    children = [c for c in root if isinstance(c.tag, str)]
    headers = [c for c in children if c.tag == _s("Header")]
    bodies = [c for c in children if c.tag == _s("Body")]
    if len(bodies) != 1:
        raise SoapFault("Sender", f"a SOAP envelope has exactly one Body, found {len(bodies)}")
    if len(headers) > 1 or (headers and children[0] is not headers[0]):
        raise SoapFault("Sender", "a SOAP envelope has at most one Header, before the Body")
    if len(children) != len(headers) + 1 or children[-1] is not bodies[0]:
        raise SoapFault("Sender", "unexpected element in the SOAP envelope")
    payloads = [c for c in bodies[0] if isinstance(c.tag, str)]
    if len(payloads) != 1:
        raise SoapFault("Sender", f"the SOAP Body must hold exactly one element, found {len(payloads)}")
    payload = payloads[0]

    blocks = [b for b in headers[0] if isinstance(b.tag, str)] if headers else []
    known = _UNDERSTOOD_WSA | frozenset(understood)
    missed = [b.tag for b in blocks if _must_understand(b) and _for_us(b) and b.tag not in known]
    if missed:
        names = ", ".join(missed)
        raise SoapFault("MustUnderstand", f"header block(s) not understood: {names}", not_understood=missed)

    wsa: dict[str, etree._Element] = {}
    for block in blocks:
        if block.tag in _UNDERSTOOD_WSA:
            name = etree.QName(block).localname
            if name in wsa:
                raise _addressing_fault("InvalidAddressingHeader", f"wsa:{name} occurs more than once")
            wsa[name] = block
    is_fault = payload.tag == _s("Fault")
    action = _text(wsa.get("Action"))
    if action is None and not is_fault:
        raise _addressing_fault("MessageAddressingHeaderRequired", "missing wsa:Action header")
    message_id = _text(wsa.get("MessageID"))
    reply_to = _text(wsa["ReplyTo"].find(_a("Address"))) if "ReplyTo" in wsa else None
    if request:
        if message_id is None:
            raise _addressing_fault("MessageAddressingHeaderRequired", "missing wsa:MessageID header")
        if "ReplyTo" in wsa and reply_to != ANONYMOUS:
            raise _addressing_fault("OnlyAnonymousAddressSupported", "wsa:ReplyTo must be the anonymous address")
    return Envelope(
        action=action,
        message_id=message_id,
        relates_to=_text(wsa.get("RelatesTo")),
        to=_text(wsa.get("To")),
        reply_to=reply_to,
        body=payload,
    )


def _skeleton() -> tuple[etree._Element, etree._Element]:
    envelope = etree.Element(_s("Envelope"), nsmap=_NSMAP)
    header = etree.SubElement(envelope, _s("Header"))
    return envelope, header


def _header(header: etree._Element, name: str, value: str, *, must_understand: bool = False) -> None:
    element = etree.SubElement(header, _a(name))
    if must_understand:
        element.set(_s("mustUnderstand"), "1")
    element.text = value


def _finish(envelope: etree._Element, payload: etree._Element) -> bytes:
    body = etree.SubElement(envelope, _s("Body"))
    # A copy, so the caller's tree is left as it was.
    body.append(deepcopy(payload))
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def _must_understand(block: etree._Element) -> bool:
    value = (block.get(_s("mustUnderstand")) or "0").strip()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SoapFault("Sender", f"invalid mustUnderstand value {value!r} on {block.tag}")


def _for_us(block: etree._Element) -> bool:
    return block.get(_s("role")) in _OUR_ROLES


def _text(element: etree._Element | None) -> str | None:
    if element is None:
        return None
    return (element.text or "").strip() or None


def _addressing_fault(subcode: str, reason: str) -> SoapFault:
    return SoapFault("Sender", reason, subcode=_a(subcode))


def _declaring(parent: etree._Element, tag: str, name: str, prefix: str) -> etree._Element:
    """Add a child element that has the namespace of Clark ``name`` in scope."""
    namespace = etree.QName(name).namespace
    return etree.SubElement(parent, tag, nsmap={prefix: namespace} if namespace else None)


def _qname_value(element: etree._Element, name: str) -> str:
    """Return ``prefix:local`` for Clark ``name`` with a prefix in scope at ``element``."""
    qname = etree.QName(name)
    if not qname.namespace:
        return qname.localname
    prefix = next(p for p, uri in element.nsmap.items() if p and uri == qname.namespace)
    return f"{prefix}:{qname.localname}"


def _resolve_qname(element: etree._Element | None) -> etree.QName | None:
    """Resolve a ``prefix:local`` element value against the element's namespace map."""
    if element is None or not (element.text or "").strip():
        return None
    prefix, _, local = element.text.strip().rpartition(":")
    namespace = element.nsmap.get(prefix or None)
    return etree.QName(namespace, local) if namespace else etree.QName(local)
