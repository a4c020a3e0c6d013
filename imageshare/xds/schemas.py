"""
XML Schema validation of the XDS.b / XDS-I.b payloads the embedded endpoints receive
(``../shared/docs/xds-i.md`` section 9 B).

The schemas are package data (``imageshare/xds/xsd/schema``, the unmodified IHE and
OASIS ebRS 3.0 files; provenance in ``xsd/README.md``). The RAD-69 schema is the entry
point: it imports the XDS.b repository schema, which imports ebRS ``rs``, ``lcm``, ``rim``
and ``query``, so one schema set covers ITI-41/42/43/18 and RAD-69 payloads (requests and
responses). ``rim.xsd`` imports ``http://www.w3.org/2001/xml.xsd`` by absolute URL: a
resolver maps it to the local copy and the network is never used.

The schema set is loaded once, on first use. libxml2 keeps the errors of a validation in
the validator object, so validations are serialized by a lock; a payload validates in
milliseconds.
"""

from __future__ import annotations

import copy
import re
import threading
from importlib.resources import files

from lxml import etree

__all__ = ["MAX_ERRORS", "schema", "summary", "validate_payload"]

#: At most this many schema errors are reported for one payload.
MAX_ERRORS = 20

_XOP_INCLUDE = "{http://www.w3.org/2004/08/xop/include}Include"
_W3C_XML = "http://www.w3.org/2001/xml.xsd"
_CLARK_NAMESPACE = re.compile(r"\{[^{}\s]*\}")

_load_lock = threading.Lock()
_validate_lock = threading.Lock()
_schema: list[etree.XMLSchema] = []


def _schema_dir():  # type: ignore[no-untyped-def]
    return files("imageshare.xds") / "xsd" / "schema"


class _LocalCopies(etree.Resolver):
    """Map the absolute ``xml.xsd`` URL to the packaged copy; resolve nothing else."""

    def resolve(self, system_url, public_id, context):  # type: ignore[no-untyped-def]
        if system_url == _W3C_XML:
            return self.resolve_filename(str(_schema_dir() / "w3c" / "xml.xsd"), context)
        return None


def schema() -> etree.XMLSchema:
    """The XDS.b + XDS-I.b + ebRS 3.0 schema set (loaded once, thread-safe)."""
    with _load_lock:
        if not _schema:
            parser = etree.XMLParser(no_network=True, resolve_entities=False)
            parser.resolvers.add(_LocalCopies())
            entry = _schema_dir() / "IHE" / "XDSI.b_ImagingDocumentSource.xsd"
            _schema.append(etree.XMLSchema(etree.parse(str(entry), parser)))
        return _schema[0]


def validate_payload(element: etree._Element) -> list[str]:
    """
    Validate one SOAP Body payload against the schemas.

    ``element`` is not modified: a copy is validated, in which each ``xop:Include`` is
    removed (an XOP include stands for base64 content, which the MIME part holds; the
    MTOM parser has already checked that it resolves).

    Parameters
    ----------
    element
        The payload, e.g. ``xds:ProvideAndRegisterDocumentSetRequest``,
        ``xds:RetrieveDocumentSetRequest``, ``lcm:SubmitObjectsRequest``,
        ``query:AdhocQueryRequest`` or ``xdsi:RetrieveImagingDocumentSetRequest``.

    Returns
    -------
    list of str
        The schema errors as ``line N: message`` (libxml2's wording; the line when the
        payload was parsed from text; at most
        :data:`MAX_ERRORS`); empty if the payload is valid.
    """
    payload = copy.deepcopy(element)
    for included in list(payload.iter(_XOP_INCLUDE)):
        parent = included.getparent()
        if parent is None:
            continue
        previous = included.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + (included.tail or "")
        else:
            parent.text = (parent.text or "") + (included.tail or "")
        parent.remove(included)
    validator = schema()
    with _validate_lock:
        if validator.validate(payload):
            return []
        errors = [f"line {e.line}: {e.message}" if e.line else e.message for e in validator.error_log]
    if not errors:  # libxml2 said invalid without saying why
        errors = ["the payload is not valid against the XDS.b / XDS-I.b schemas"]
    return errors[:MAX_ERRORS]


def summary(payload: etree._Element, errors: list[str], limit: int = 200) -> str:
    """
    A one-line account of a schema-invalid payload for a ``codeContext``: its name and the
    first error, ``{namespace}`` prefixes dropped so element names fit, at most ``limit``
    characters. libxml2's wording may quote a value of the request.
    """
    text = f"schema-invalid {etree.QName(payload).localname}: {_CLARK_NAMESPACE.sub('', errors[0])}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
