"""imageshare.xds.soap: SOAP 1.2 + WS-Addressing envelopes built, parsed and refused."""

from __future__ import annotations

import re

import pytest
from lxml import etree

from imageshare.xds import soap
from imageshare.xds.safexml import parse
from tests.xds.validator import RS, SAMPLES, XDSI, validate_message

SOAP_CT = soap.SOAP12_CONTENT_TYPE
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"


def _registry_response() -> etree._Element:
    return etree.Element(f"{{{RS}}}RegistryResponse", status=SUCCESS, nsmap={"rs": RS})


def _rad69_request() -> etree._Element:
    envelope = parse((SAMPLES / "rad69-request-soap.xml").read_bytes())
    return soap.parse_envelope(envelope).body


def _envelope(header: str, body: str = "<p xmlns='urn:x'/>", ns: str = soap.SOAP12_NS) -> etree._Element:
    return parse(
        f"<s:Envelope xmlns:s='{ns}' xmlns:a='{soap.WSA_NS}'><s:Header>{header}</s:Header>"
        f"<s:Body>{body}</s:Body></s:Envelope>".encode()
    )


ACTION = f"<a:Action s:mustUnderstand='1'>{soap.ITI18}</a:Action>"


def test_action_constants() -> None:
    """Action URIs are those of xds-i.md section 1; RAD-68 is ITI-41, RAD-69 accepts the legacy URI."""
    assert soap.ITI41 == "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
    assert soap.RAD68 == soap.ITI41 and soap.RAD68_RESPONSE == soap.ITI41_RESPONSE
    assert soap.RAD69 == "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
    assert soap.RAD69_LEGACY in soap.RAD69_ACTIONS and soap.RAD69 in soap.RAD69_ACTIONS
    assert soap.RAD69_RESPONSE == soap.ITI43_RESPONSE == "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
    assert soap.RESPONSE_ACTIONS[soap.ITI42] == "urn:ihe:iti:2007:RegisterDocumentSet-bResponse"
    assert soap.RESPONSE_ACTIONS[soap.ITI18] == "urn:ihe:iti:2007:RegistryStoredQueryResponse"


def test_request_round_trip_and_headers() -> None:
    """build_request gives Action (mustUnderstand=1), urn:uuid MessageID, anonymous ReplyTo, To."""
    payload = _rad69_request()
    data = soap.build_request(soap.RAD69, "http://127.0.0.1/xds/imaging-source", payload)
    root = parse(data)
    action = root.find(f"{{{soap.SOAP12_NS}}}Header/{{{soap.WSA_NS}}}Action")
    assert action.get(f"{{{soap.SOAP12_NS}}}mustUnderstand") == "1"
    envelope = soap.parse_envelope(root, request=True)
    assert envelope.action == soap.RAD69
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", envelope.message_id)
    assert envelope.reply_to == soap.ANONYMOUS
    assert envelope.to == "http://127.0.0.1/xds/imaging-source"
    assert envelope.relates_to is None and envelope.fault is None
    assert envelope.body.tag == f"{{{XDSI}}}RetrieveImagingDocumentSetRequest"
    assert payload.getparent() is not None  # the caller's element was copied, not moved


def test_built_messages_pass_the_validator() -> None:
    """A built RAD-69 request and ITI-42 response are valid SOAP/WS-A and schema-valid."""
    request = soap.build_request(soap.RAD69, "http://127.0.0.1/x", _rad69_request())
    assert validate_message(SOAP_CT, request) == []
    response = soap.build_response(soap.ITI42_RESPONSE, "urn:uuid:1", _registry_response())
    assert validate_message(SOAP_CT, response) == []


def test_response_carries_relates_to() -> None:
    """build_response has Action with mustUnderstand, a fresh MessageID and RelatesTo."""
    data = soap.build_response(soap.ITI41_RESPONSE, "urn:uuid:abc", _registry_response(), message_id="urn:uuid:def")
    envelope = soap.parse_envelope(parse(data))
    assert (envelope.action, envelope.relates_to, envelope.message_id) == (
        soap.ITI41_RESPONSE,
        "urn:uuid:abc",
        "urn:uuid:def",
    )
    assert parse(data).find(f".//{{{soap.WSA_NS}}}Action").get(f"{{{soap.SOAP12_NS}}}mustUnderstand") == "1"


def test_samples_parse() -> None:
    """Every copied SOAP sample parses as a request or response envelope."""
    for path in sorted(SAMPLES.glob("*_SOAP.xml")) + [SAMPLES / "rad69-request-soap.xml"]:
        envelope = soap.parse_envelope(parse(path.read_bytes()))
        assert envelope.action.startswith("urn:ihe:"), path.name


def test_soap11_is_version_mismatch() -> None:
    """A SOAP 1.1 envelope raises a VersionMismatch fault (HTTP 500) with an Upgrade header."""
    with pytest.raises(soap.SoapFault) as info:
        soap.parse_envelope(_envelope(ACTION.replace("s:mustUnderstand='1'", ""), ns=soap.SOAP11_NS))
    assert info.value.code == "VersionMismatch"
    assert info.value.http_status == 500
    fault = parse(info.value.to_bytes())
    assert fault.find(f".//{{{soap.SOAP12_NS}}}Upgrade/{{{soap.SOAP12_NS}}}SupportedEnvelope") is not None


def test_not_understood_header_is_must_understand_fault() -> None:
    """An unknown mustUnderstand header for us gives MustUnderstand with NotUnderstood; others pass."""
    unknown = "<x:Security xmlns:x='urn:sec' s:mustUnderstand='true'/>"
    with pytest.raises(soap.SoapFault) as info:
        soap.parse_envelope(_envelope(ACTION + unknown))
    assert info.value.code == "MustUnderstand"
    assert info.value.not_understood == ("{urn:sec}Security",)
    block = parse(info.value.to_bytes()).find(f".//{{{soap.SOAP12_NS}}}NotUnderstood")
    prefix, local = block.get("qname").split(":")
    assert (block.nsmap[prefix], local) == ("urn:sec", "Security")
    # Understood by the caller, optional, or addressed to another role: accepted.
    soap.parse_envelope(_envelope(ACTION + unknown), understood={"{urn:sec}Security"})
    soap.parse_envelope(_envelope(ACTION + "<x:Hint xmlns:x='urn:sec' s:mustUnderstand='0'/>"))
    soap.parse_envelope(
        _envelope(ACTION + "<x:S xmlns:x='urn:sec' s:mustUnderstand='1' s:role='http://www.w3.org/2003/05/soap-envelope/role/none'/>")
    )


@pytest.mark.parametrize(
    ("header", "body", "subcode"),
    [
        ("", "<p xmlns='urn:x'/>", "MessageAddressingHeaderRequired"),
        (ACTION + ACTION, "<p xmlns='urn:x'/>", "InvalidAddressingHeader"),
        (ACTION, "", None),
        (ACTION, "<p xmlns='urn:x'/><q xmlns='urn:x'/>", None),
        (ACTION.replace("'1'", "'maybe'"), "<p xmlns='urn:x'/>", None),
    ],
)
def test_malformed_envelopes_are_sender_faults(header: str, body: str, subcode: str | None) -> None:
    """Missing/repeated Action, empty or double Body content, bad mustUnderstand: Sender (400)."""
    with pytest.raises(soap.SoapFault) as info:
        soap.parse_envelope(_envelope(header, body))
    assert info.value.code == "Sender" and info.value.http_status == 400
    assert info.value.subcode == (f"{{{soap.WSA_NS}}}{subcode}" if subcode else None)


def test_structure_faults() -> None:
    """Two Body elements, Header after Body, or a non-envelope root are Sender faults."""
    two = f"<s:Envelope xmlns:s='{soap.SOAP12_NS}'><s:Body><p/></s:Body><s:Body><p/></s:Body></s:Envelope>"
    late = f"<s:Envelope xmlns:s='{soap.SOAP12_NS}'><s:Body><p/></s:Body><s:Header/></s:Envelope>"
    for text in (two, late, "<Other/>"):
        with pytest.raises(soap.SoapFault) as info:
            soap.parse_envelope(parse(text.encode()))
        assert info.value.code == "Sender", text


def test_request_rules() -> None:
    """As a request, MessageID is required and ReplyTo must be anonymous."""
    with pytest.raises(soap.SoapFault) as info:
        soap.parse_envelope(_envelope(ACTION), request=True)
    assert info.value.subcode == f"{{{soap.WSA_NS}}}MessageAddressingHeaderRequired"
    reply = "<a:MessageID>urn:uuid:1</a:MessageID><a:ReplyTo><a:Address>http://elsewhere/</a:Address></a:ReplyTo>"
    with pytest.raises(soap.SoapFault) as info:
        soap.parse_envelope(_envelope(ACTION + reply), request=True)
    assert info.value.subcode == f"{{{soap.WSA_NS}}}OnlyAnonymousAddressSupported"
    assert soap.parse_envelope(_envelope(ACTION + reply)).reply_to == "http://elsewhere/"


@pytest.mark.parametrize("code", ["Sender", "Receiver", "VersionMismatch", "MustUnderstand"])
def test_fault_round_trip(code: str) -> None:
    """build_fault output parses back (Envelope.fault) to the same code, reason and subcode."""
    data = soap.build_fault(
        code, "bad thing", subcode=f"{{{soap.WSA_NS}}}InvalidAddressingHeader", relates_to="urn:uuid:req"
    )
    envelope = soap.parse_envelope(parse(data))
    assert envelope.action == soap.FAULT_ACTION and envelope.relates_to == "urn:uuid:req"
    fault = envelope.fault
    assert (fault.code, fault.reason, fault.subcode) == (code, "bad thing", f"{{{soap.WSA_NS}}}InvalidAddressingHeader")
    errors = validate_message(SOAP_CT, data)
    assert len(errors) == 1 and "SOAP Fault" in errors[0]


def test_fault_with_foreign_subcode_and_unknown_code() -> None:
    """A subcode in another namespace survives; an unknown code from a peer reads as Receiver."""
    data = soap.build_fault("Receiver", "r", subcode="{urn:other}Busy")
    assert soap.parse_envelope(parse(data)).fault.subcode == "{urn:other}Busy"
    odd = _envelope("", f"<s:Fault><s:Code><s:Value>s:Weird</s:Value></s:Code></s:Fault>")
    fault = soap.parse_envelope(odd).fault
    assert fault.code == "Receiver" and fault.reason == "(no reason given)"
    with pytest.raises(ValueError):
        soap.build_fault("Client", "SOAP 1.1 code")
