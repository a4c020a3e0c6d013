"""
``rs:RegistryResponse``: build it, parse it, and judge it for the submission outbox (pure).

The repository and registry answer ITI-41/ITI-42 with a status and, on failure (and
sometimes with success, as warnings), a ``RegistryErrorList`` (``../shared/docs/xds-i.md``
section 7). :func:`classify` tells the outbox what to do with an answer: done, try again
later, or give up and keep the submission visible as failed.

Which errors are worth a retry
------------------------------
Transient (:data:`TRANSIENT_CODES`): the codes that say the other side could not work *now*
— ``XDSRegistryBusy``, ``XDSRepositoryBusy``, ``XDSRegistryOutOfResources``,
``XDSRepositoryOutOfResources``, and ``XDSRegistryNotAvailable`` (the repository could not
reach its registry). Also ``XDSRegistryError`` and ``XDSRepositoryError``: ITI TF-3 4.2.4
defines them as *internal* errors of the registry/repository, the XDS form of an HTTP 500,
and the outbox retries HTTP 5xx too (issue 6). A deterministic internal error would be
retried until the outbox's own limit turns it into a permanent failure; callers that want
them permanent pass ``transient_codes=TRANSIENT_CODES - GENERIC_ERROR_CODES``.

Everything else is permanent: the submission itself is wrong (metadata, codes, patient,
duplicate or conflicting uniqueId) and sending it again cannot help. ``XDSUnknownPatientId``
is permanent too: it needs a Patient Identity Feed; an operator re-queues the submission.
A failure without any error is malformed and permanent. A ``PartialSuccess`` cannot answer
ITI-41 (T41 3.41.4.2.2): with one document it is ambiguous, so it is permanent as well.

A duplicate uniqueId after a re-send (the first attempt registered but its answer was
lost) is reported as :attr:`Verdict.duplicate_only`; the outbox decides whether that counts
as registered.
"""

from __future__ import annotations

import enum
from typing import Iterable, Sequence

import attrs
from lxml import etree

__all__ = [
    "Status",
    "Severity",
    "RegistryError",
    "RegistryResponse",
    "ResponseError",
    "Outcome",
    "Verdict",
    "registry_response",
    "parse_registry_response",
    "classify",
    "TRANSIENT_CODES",
    "GENERIC_ERROR_CODES",
    "DUPLICATE_CODES",
]

RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
_RESPONSE = f"{{{RS}}}RegistryResponse"
_ERROR_LIST = f"{{{RS}}}RegistryErrorList"
_ERROR = f"{{{RS}}}RegistryError"


class Status(str, enum.Enum):
    """``RegistryResponse/@status`` values."""

    SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
    PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"


class Severity(str, enum.Enum):
    """``RegistryError/@severity`` values."""

    ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
    WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"


# Error codes (ITI TF-3 4.2.4, as listed in xds-i.md section 7).
XDS_MISSING_DOCUMENT = "XDSMissingDocument"
XDS_MISSING_DOCUMENT_METADATA = "XDSMissingDocumentMetadata"
XDS_REGISTRY_NOT_AVAILABLE = "XDSRegistryNotAvailable"
XDS_REGISTRY_ERROR = "XDSRegistryError"
XDS_REPOSITORY_ERROR = "XDSRepositoryError"
XDS_REGISTRY_DUPLICATE_UNIQUE_ID_IN_MESSAGE = "XDSRegistryDuplicateUniqueIdInMessage"
XDS_REPOSITORY_DUPLICATE_UNIQUE_ID_IN_MESSAGE = "XDSRepositoryDuplicateUniqueIdInMessage"
XDS_DUPLICATE_UNIQUE_ID_IN_REGISTRY = "XDSDuplicateUniqueIdInRegistry"
XDS_NON_IDENTICAL_HASH = "XDSNonIdenticalHash"
XDS_NON_IDENTICAL_SIZE = "XDSNonIdenticalSize"
XDS_REGISTRY_BUSY = "XDSRegistryBusy"
XDS_REPOSITORY_BUSY = "XDSRepositoryBusy"
XDS_REGISTRY_OUT_OF_RESOURCES = "XDSRegistryOutOfResources"
XDS_REPOSITORY_OUT_OF_RESOURCES = "XDSRepositoryOutOfResources"
XDS_REGISTRY_METADATA_ERROR = "XDSRegistryMetadataError"
XDS_REPOSITORY_METADATA_ERROR = "XDSRepositoryMetadataError"
XDS_TOO_MANY_RESULTS = "XDSTooManyResults"
XDS_EXTRA_METADATA_NOT_SAVED = "XDSExtraMetadataNotSaved"
XDS_UNKNOWN_PATIENT_ID = "XDSUnknownPatientId"
XDS_PATIENT_ID_DOES_NOT_MATCH = "XDSPatientIdDoesNotMatch"
XDS_UNKNOWN_STORED_QUERY = "XDSUnknownStoredQuery"
XDS_STORED_QUERY_MISSING_PARAM = "XDSStoredQueryMissingParam"
XDS_STORED_QUERY_PARAM_NUMBER = "XDSStoredQueryParamNumber"
XDS_REGISTRY_DEPRECATED_DOCUMENT_ERROR = "XDSRegistryDeprecatedDocumentError"
XDS_UNKNOWN_REPOSITORY_ID = "XDSUnknownRepositoryId"
XDS_DOCUMENT_UNIQUE_ID_ERROR = "XDSDocumentUniqueIdError"
XDS_RESULT_NOT_SINGLE_PATIENT = "XDSResultNotSinglePatient"

TRANSIENT_BUSY_CODES = frozenset({
    XDS_REGISTRY_BUSY,
    XDS_REPOSITORY_BUSY,
    XDS_REGISTRY_OUT_OF_RESOURCES,
    XDS_REPOSITORY_OUT_OF_RESOURCES,
    XDS_REGISTRY_NOT_AVAILABLE,
})
GENERIC_ERROR_CODES = frozenset({XDS_REGISTRY_ERROR, XDS_REPOSITORY_ERROR})
TRANSIENT_CODES = TRANSIENT_BUSY_CODES | GENERIC_ERROR_CODES
DUPLICATE_CODES = frozenset({XDS_DUPLICATE_UNIQUE_ID_IN_REGISTRY})


class ResponseError(ValueError):
    """The element is not a well-formed ``rs:RegistryResponse``."""


@attrs.frozen
class RegistryError:
    """
    One ``rs:RegistryError``.

    Parameters
    ----------
    code
        ``errorCode`` (``XDSRegistryMetadataError``...).
    context
        ``codeContext``: what went wrong, for a human.
    location
        ``location``: where (a uniqueId, an element); empty for none.
    severity
        Error or warning.
    """

    code: str
    context: str
    location: str = ""
    severity: Severity = Severity.ERROR

    def __attrs_post_init__(self) -> None:
        if not self.code.strip():
            raise ResponseError("a RegistryError needs an errorCode")


@attrs.frozen
class RegistryResponse:
    """A parsed ``rs:RegistryResponse``: the status and its errors and warnings."""

    status: Status
    errors: tuple[RegistryError, ...] = attrs.field(default=(), converter=tuple)
    request_id: str = ""

    @property
    def error_codes(self) -> tuple[str, ...]:
        """The codes of the errors of severity Error, in order."""
        return tuple(e.code for e in self.errors if e.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[RegistryError, ...]:
        """The warnings."""
        return tuple(e for e in self.errors if e.severity is Severity.WARNING)


def registry_response(
    status: Status,
    errors: Iterable[RegistryError] = (),
    *,
    request_id: str = "",
) -> etree._Element:
    """
    Build an ``rs:RegistryResponse``.

    Raises
    ------
    ResponseError
        A Failure without an error of severity Error (ITI TF-3 4.2.4 needs one), or a
        Success carrying errors (only warnings may accompany success).
    """
    errors = tuple(errors)
    has_error = any(e.severity is Severity.ERROR for e in errors)
    if status is Status.FAILURE and not has_error:
        raise ResponseError("a Failure response needs at least one error")
    if status is Status.SUCCESS and has_error:
        raise ResponseError("a Success response may carry warnings only")
    response = etree.Element(_RESPONSE, nsmap={"rs": RS}, status=status.value)
    if request_id:
        response.set("requestId", request_id)
    if errors:
        highest = Severity.ERROR if has_error else Severity.WARNING
        error_list = etree.SubElement(response, _ERROR_LIST, highestSeverity=highest.value)
        for error in errors:
            element = etree.SubElement(
                error_list, _ERROR, codeContext=error.context, errorCode=error.code, severity=error.severity.value
            )
            if error.location:
                element.set("location", error.location)
    return response


def parse_registry_response(element: etree._Element) -> RegistryResponse:
    """
    Read an ``rs:RegistryResponse`` element (the SOAP body child, or inside an ITI-43 answer).

    An unknown status or severity is refused rather than guessed: the outbox treats a
    :class:`ResponseError` like a malformed answer.

    Raises
    ------
    ResponseError
        Not a RegistryResponse, unknown status or severity, a RegistryError without errorCode.
    """
    if element.tag != _RESPONSE:
        raise ResponseError(f"expected rs:RegistryResponse, got {element.tag!r}")
    try:
        status = Status(element.get("status", ""))
    except ValueError:
        raise ResponseError(f"unknown RegistryResponse status {element.get('status')!r}") from None
    errors = []
    for error_list in element.iterchildren(_ERROR_LIST):
        for item in error_list.iterchildren(_ERROR):
            severity_text = item.get("severity", Severity.ERROR.value)
            try:
                severity = Severity(severity_text)
            except ValueError:
                raise ResponseError(f"unknown RegistryError severity {severity_text!r}") from None
            context = item.get("codeContext") or (item.text or "").strip()
            errors.append(
                RegistryError(
                    code=(item.get("errorCode") or "").strip(),
                    context=context,
                    location=item.get("location", ""),
                    severity=severity,
                )
            )
    return RegistryResponse(status, tuple(errors), element.get("requestId", ""))


class Outcome(str, enum.Enum):
    """What the outbox does with a submission after an answer."""

    SUCCESS = "success"  # registered; warnings may be logged
    TRANSIENT = "transient"  # retry later with backoff
    PERMANENT = "permanent"  # keep as failed, visible; do not retry


@attrs.frozen
class Verdict:
    """The outcome of a RegistryResponse and why."""

    outcome: Outcome
    reason: str
    response: RegistryResponse

    @property
    def duplicate_only(self) -> bool:
        """A failure whose only errors say the uniqueId is already registered."""
        codes = self.response.error_codes
        return self.response.status is Status.FAILURE and bool(codes) and set(codes) <= DUPLICATE_CODES


def classify(
    response: RegistryResponse,
    *,
    transient_codes: Sequence[str] | frozenset[str] = TRANSIENT_CODES,
) -> Verdict:
    """
    Judge an ITI-41 answer for the outbox (the rules are in the module docstring).

    A failure is transient only if every error of severity Error has a transient code: one
    permanent error means the same submission would fail again.
    """
    codes = response.error_codes
    if response.status is Status.SUCCESS:
        return Verdict(Outcome.SUCCESS, "registered", response)
    if response.status is Status.PARTIAL_SUCCESS:
        return Verdict(Outcome.PERMANENT, "PartialSuccess is not a valid ITI-41 answer", response)
    if not codes:
        return Verdict(Outcome.PERMANENT, "Failure without an error", response)
    permanent = [code for code in codes if code not in transient_codes]
    if permanent:
        return Verdict(Outcome.PERMANENT, ", ".join(dict.fromkeys(permanent)), response)
    return Verdict(Outcome.TRANSIENT, ", ".join(dict.fromkeys(codes)), response)
