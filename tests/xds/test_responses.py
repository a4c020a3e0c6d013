"""
rs:RegistryResponse building, parsing and classification for the outbox (imageshare.xds.responses).

Built responses are validated against ebRS rs.xsd from the schema copy in tests/xds/schemas.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from imageshare.xds.responses import (
    DUPLICATE_CODES,
    GENERIC_ERROR_CODES,
    TRANSIENT_CODES,
    Outcome,
    RegistryError,
    RegistryResponse,
    ResponseError,
    Severity,
    Status,
    classify,
    parse_registry_response,
    registry_response,
)

SCHEMAS = Path(__file__).parent / "schemas"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"


class _Resolver(etree.Resolver):
    """Maps the absolute xml.xsd URL of rim.xsd to the local copy: no network."""

    def resolve(self, url, pubid, context):  # type: ignore[no-untyped-def]
        if url == "http://www.w3.org/2001/xml.xsd":
            return self.resolve_filename(str(SCHEMAS / "schema" / "w3c" / "xml.xsd"), context)
        return None


@pytest.fixture(scope="module")
def rs_schema() -> etree.XMLSchema:
    """ebRS 3.0 rs.xsd (imports rim.xsd)."""
    parser = etree.XMLParser(no_network=True)
    parser.resolvers.add(_Resolver())
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "schema" / "ebRS" / "rs.xsd"), parser))


def reparsed(element: etree._Element) -> etree._Element:
    return etree.fromstring(etree.tostring(element))


def failure(*codes: str) -> RegistryResponse:
    return RegistryResponse(Status.FAILURE, tuple(RegistryError(code, f"{code} happened") for code in codes))


CASES = [
    RegistryResponse(Status.SUCCESS),
    RegistryResponse(
        Status.SUCCESS,
        (RegistryError("XDSExtraMetadataNotSaved", "slot urn:x:y dropped", "urn:uuid:1",
                       Severity.WARNING),),
    ),
    RegistryResponse(
        Status.FAILURE,
        (
            RegistryError("XDSRegistryMetadataError", "classCode missing", "urn:uuid:0b6a"),
            RegistryError("XDSPatientIdDoesNotMatch", "two patients"),
            RegistryError("XDSExtraMetadataNotSaved", "dropped", severity=Severity.WARNING),
        ),
        request_id="urn:uuid:6d296e90-e5dc-43d0-b455-7c1f3eb35d83",
    ),
    RegistryResponse(
        Status.PARTIAL_SUCCESS,
        (RegistryError("XDSDocumentUniqueIdError", "unknown document", "2.25.7"),),
    ),
]


@pytest.mark.parametrize("response", CASES, ids=["success", "warning", "failure", "partial"])
def test_build_validates_and_round_trips(rs_schema: etree.XMLSchema, response: RegistryResponse) -> None:
    """Every built response is valid against rs.xsd and parses back to the same value."""
    element = registry_response(response.status, response.errors, request_id=response.request_id)
    assert rs_schema.validate(reparsed(element)), rs_schema.error_log
    assert parse_registry_response(reparsed(element)) == response


def test_error_list_shape() -> None:
    """Errors go in one RegistryErrorList whose highestSeverity is the worst; no list on a plain success."""
    success = registry_response(Status.SUCCESS)
    assert success.get("status") == "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    assert len(success) == 0
    element = registry_response(CASES[2].status, CASES[2].errors)
    (error_list,) = element.findall(f"{{{RS}}}RegistryErrorList")
    assert error_list.get("highestSeverity") == Severity.ERROR.value
    first = error_list[0]
    assert (first.get("errorCode"), first.get("codeContext"), first.get("location"), first.get("severity")) == (
        "XDSRegistryMetadataError", "classCode missing", "urn:uuid:0b6a", Severity.ERROR.value
    )
    assert error_list[1].get("location") is None
    warning = registry_response(CASES[1].status, CASES[1].errors)
    assert warning.find(f"{{{RS}}}RegistryErrorList").get("highestSeverity") == Severity.WARNING.value


def test_build_refuses_inconsistent_status() -> None:
    """A Failure without an error, or a Success carrying an error, cannot be built."""
    with pytest.raises(ResponseError):
        registry_response(Status.FAILURE)
    with pytest.raises(ResponseError):
        registry_response(Status.FAILURE, [RegistryError("XDSExtraMetadataNotSaved", "x", severity=Severity.WARNING)])
    with pytest.raises(ResponseError):
        registry_response(Status.SUCCESS, [RegistryError("XDSRegistryError", "x")])
    with pytest.raises(ResponseError):
        RegistryError(" ", "no code")


def test_parse_ihe_sample_response() -> None:
    """The IHE sample ITI-41 response (inside its SOAP envelope) parses as a plain Success."""
    envelope = etree.parse(str(SCHEMAS / "samples" / "ProvideAndRegisterDocumentSet-bResponse_SOAP.xml"))
    (element,) = envelope.getroot().iter(f"{{{RS}}}RegistryResponse")
    assert parse_registry_response(element) == RegistryResponse(Status.SUCCESS)


def test_parse_defaults_and_lenient_text() -> None:
    """Missing severity means Error (rs.xsd default); the element text stands in for an empty codeContext."""
    element = etree.fromstring(
        f'<rs:RegistryResponse xmlns:rs="{RS}" status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure">'
        '<rs:RegistryErrorList><rs:RegistryError errorCode="XDSRegistryBusy" codeContext="">try later'
        "</rs:RegistryError></rs:RegistryErrorList></rs:RegistryResponse>"
    )
    response = parse_registry_response(element)
    assert response.errors == (RegistryError("XDSRegistryBusy", "try later"),)
    assert response.error_codes == ("XDSRegistryBusy",)
    assert response.warnings == ()


@pytest.mark.parametrize(
    "xml",
    [
        f'<rs:Other xmlns:rs="{RS}" status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"/>',
        f'<rs:RegistryResponse xmlns:rs="{RS}" status="Success"/>',
        f'<rs:RegistryResponse xmlns:rs="{RS}"/>',
        f'<rs:RegistryResponse xmlns:rs="{RS}" status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure">'
        '<rs:RegistryErrorList><rs:RegistryError codeContext="x"/></rs:RegistryErrorList></rs:RegistryResponse>',
        f'<rs:RegistryResponse xmlns:rs="{RS}" status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure">'
        '<rs:RegistryErrorList><rs:RegistryError errorCode="XDSRegistryError" codeContext="x" severity="Fatal"/>'
        "</rs:RegistryErrorList></rs:RegistryResponse>",
        '<RegistryResponse status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"/>',
    ],
    ids=["wrong-element", "short-status", "no-status", "no-error-code", "bad-severity", "no-namespace"],
)
def test_parse_refuses_malformed(xml: str) -> None:
    """Wrong element, unknown or missing status, an error without errorCode or with an unknown severity: ResponseError."""
    with pytest.raises(ResponseError):
        parse_registry_response(etree.fromstring(xml))


# ------------------------------------------------------------------------------ classification table

TABLE = [
    # (status, error codes, expected outcome)
    (Status.SUCCESS, (), Outcome.SUCCESS),
    (Status.FAILURE, ("XDSRegistryBusy",), Outcome.TRANSIENT),
    (Status.FAILURE, ("XDSRepositoryBusy",), Outcome.TRANSIENT),
    (Status.FAILURE, ("XDSRegistryOutOfResources",), Outcome.TRANSIENT),
    (Status.FAILURE, ("XDSRepositoryOutOfResources",), Outcome.TRANSIENT),
    (Status.FAILURE, ("XDSRegistryNotAvailable",), Outcome.TRANSIENT),
    (Status.FAILURE, ("XDSRegistryError",), Outcome.TRANSIENT),
    (Status.FAILURE, ("XDSRepositoryError",), Outcome.TRANSIENT),
    (Status.FAILURE, ("XDSRegistryBusy", "XDSRepositoryError"), Outcome.TRANSIENT),
    (Status.FAILURE, ("XDSRegistryMetadataError",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSRepositoryMetadataError",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSMissingDocument",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSMissingDocumentMetadata",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSPatientIdDoesNotMatch",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSUnknownPatientId",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSDocumentUniqueIdError",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSDuplicateUniqueIdInRegistry",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSNonIdenticalHash",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSNonIdenticalSize",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSUnknownRepositoryId",), Outcome.PERMANENT),
    (Status.FAILURE, ("XDSRegistryBusy", "XDSRegistryMetadataError"), Outcome.PERMANENT),
    (Status.FAILURE, ("SomeVendorCode",), Outcome.PERMANENT),
    (Status.FAILURE, (), Outcome.PERMANENT),
    (Status.PARTIAL_SUCCESS, ("XDSRegistryBusy",), Outcome.PERMANENT),
]


@pytest.mark.parametrize("status,codes,expected", TABLE, ids=[f"{s.name}-{'+'.join(c) or 'none'}" for s, c, _ in TABLE])
def test_classification_table(status: Status, codes: tuple[str, ...], expected: Outcome) -> None:
    """Success is done; a failure is transient only if every error code is a busy/resources/internal one."""
    response = RegistryResponse(status, tuple(RegistryError(code, "ctx") for code in codes))
    verdict = classify(response)
    assert verdict.outcome is expected
    assert verdict.response is response
    assert verdict.reason


def test_warnings_do_not_change_the_outcome() -> None:
    """Warnings alongside success stay a success; warnings never make a failure transient or permanent."""
    warning = RegistryError("XDSExtraMetadataNotSaved", "dropped", severity=Severity.WARNING)
    assert classify(RegistryResponse(Status.SUCCESS, (warning,))).outcome is Outcome.SUCCESS
    busy = RegistryResponse(Status.FAILURE, (RegistryError("XDSRegistryBusy", "busy"), warning))
    assert classify(busy).outcome is Outcome.TRANSIENT
    only_warning = RegistryResponse(Status.FAILURE, (warning,))
    assert classify(only_warning).outcome is Outcome.PERMANENT


def test_permanent_reason_names_the_permanent_codes() -> None:
    """The reason of a permanent verdict lists the codes that made it permanent, once each."""
    verdict = classify(failure("XDSRegistryBusy", "XDSUnknownPatientId", "XDSUnknownPatientId"))
    assert verdict.reason == "XDSUnknownPatientId"


def test_generic_errors_can_be_made_permanent() -> None:
    """With transient_codes excluding the generic internal errors, XDSRegistryError is permanent."""
    strict = TRANSIENT_CODES - GENERIC_ERROR_CODES
    assert classify(failure("XDSRegistryError"), transient_codes=strict).outcome is Outcome.PERMANENT
    assert classify(failure("XDSRegistryBusy"), transient_codes=strict).outcome is Outcome.TRANSIENT


def test_duplicate_only() -> None:
    """duplicate_only flags a failure whose only errors are duplicate uniqueIds (an earlier attempt registered)."""
    assert DUPLICATE_CODES == {"XDSDuplicateUniqueIdInRegistry"}
    assert classify(failure("XDSDuplicateUniqueIdInRegistry")).duplicate_only
    assert not classify(failure("XDSDuplicateUniqueIdInRegistry", "XDSRegistryMetadataError")).duplicate_only
    assert not classify(RegistryResponse(Status.SUCCESS)).duplicate_only
    assert not classify(failure()).duplicate_only


def test_parse_then_classify() -> None:
    """A received Failure with a busy registry parses and classifies as transient."""
    element = registry_response(Status.FAILURE, [RegistryError("XDSRegistryBusy", "queue full")])
    assert classify(parse_registry_response(reparsed(element))).outcome is Outcome.TRANSIENT
