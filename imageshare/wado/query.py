"""
WADO-URI request parameters (PS3.18 chapter 9, IHE RAD-55), parsed and checked. No I/O.

Two steps, because what a request may ask for depends on the object it names:

* :func:`parse_query` checks every parameter on its own (syntax, ranges, pairs) and
  returns a :class:`WadoQuery`;
* :func:`negotiate` then settles, for the object found in the catalog, what to send: a
  :class:`Delivery` (media type, transfer syntax, rendering settings), whose
  :meth:`~Delivery.key` is the canonical text the ETag is made from.

Both raise :class:`WadoError` with the HTTP status and a reason that is safe to show and
to log: it never repeats a value from the request (UIDs may be patient data, and any
text could be an injection attempt). Unknown parameters are ignored (Sup 183).

Choices where PS3.18 leaves room (see docs/architecture.md, "WADO-URI"):

* Rendering parameters (``rows``, ``columns``, ``region``, ``windowCenter``,
  ``windowWidth``, ``frameNumber``, ``presentationUID``) with ``application/dicom``, and
  ``transferSyntax`` or ``anonymize`` with a rendered type, are 400: they cannot apply.
  ``imageQuality`` is ignored where it means nothing (PNG, DICOM: we never encode lossy).
* ``annotation`` and ``charset`` are accepted and ignored (nothing is burnt in).
* Presentation states are not applied: ``presentationUID`` is 406 (the image would look
  different from what was asked).
* ``transferSyntax`` follows the current PS3.18: 400 if not a UID, 406 if one we do not
  produce (not the older fallback to Explicit VR Little Endian).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl

import attrs

from imageshare.dicom.uids import is_valid_uid

__all__ = [
    "DICOM",
    "JPEG",
    "PNG",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "JPIP_SYNTAXES",
    "JPEG2000_LOSSLESS",
    "MAX_DIMENSION",
    "MAX_QUERY_LENGTH",
    "DEFAULT_QUALITY",
    "WadoError",
    "Region",
    "Window",
    "WadoQuery",
    "Delivery",
    "parse_query",
    "negotiate",
]

DICOM = "application/dicom"
JPEG = "image/jpeg"
PNG = "image/png"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
JPIP_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"})
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"

#: Longest query string accepted (longer: 414). Real WADO-URI queries are ~250 bytes.
MAX_QUERY_LENGTH = 4096
#: Largest ``rows``/``columns`` value.
MAX_DIMENSION = 8192
DEFAULT_QUALITY = 90
_MAX_FIELDS = 64

_MEDIA_TYPE = re.compile(r"^(\*/\*|[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/(\*|[a-z0-9][a-z0-9!#$&^_.+-]{0,63}))$")
_INTEGER = re.compile(r"^\+?[0-9]{1,9}$")  # IS, never negative here
_DECIMAL = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$")  # DS
_FRACTION = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")

# Parameters that only mean something for a rendered image.
_RENDERING = ("rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber", "presentationUID")


class WadoError(Exception):
    """The request cannot be answered: HTTP ``status`` and a ``reason`` safe to show and log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


def _bad(reason: str) -> WadoError:
    return WadoError(400, reason)


@attrs.frozen
class Region:
    """Normalised ``region``: fractions of the image, ``0 <= min < max <= 1``."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float


@attrs.frozen
class Window:
    """A linear VOI window in modality units (after Rescale Slope/Intercept)."""

    center: float
    width: float


@attrs.frozen
class WadoQuery:
    """Every recognised parameter, checked on its own; see :func:`negotiate` for the rest."""

    study_uid: str
    series_uid: str
    object_uid: str
    content_types: tuple[str, ...] = ()  # contentType, in the client's order; () if absent
    accept: tuple[str, ...] = ()  # the Accept header by preference, used without contentType
    transfer_syntax: str | None = None
    anonymize: bool = False
    rows: int | None = None
    columns: int | None = None
    region: Region | None = None
    window: Window | None = None
    frame_number: int | None = None
    quality: int | None = None
    presentation: bool = False  # presentationUID (with presentationSeriesUID) was given

    def rendering_given(self) -> list[str]:
        """Names of the rendering-only parameters present."""
        present = {
            "rows": self.rows is not None,
            "columns": self.columns is not None,
            "region": self.region is not None,
            "windowCenter": self.window is not None,
            "windowWidth": self.window is not None,
            "frameNumber": self.frame_number is not None,
            "presentationUID": self.presentation,
        }
        return [name for name in _RENDERING if present[name]]


@attrs.frozen
class Delivery:
    """What to send for one object: the outcome of :func:`negotiate`.

    ``transfer_syntax`` is set for ``application/dicom`` only, the rendering settings for
    the image types only (``frame_number`` then defaults to 1, ``quality`` is set for
    JPEG only).
    """

    content_type: str
    transfer_syntax: str | None = None
    anonymize: bool = False
    rows: int | None = None
    columns: int | None = None
    region: Region | None = None
    window: Window | None = None
    frame_number: int = 1
    quality: int | None = None

    @property
    def rendered(self) -> bool:
        return self.content_type != DICOM

    def key(self) -> str:
        """Canonical text of everything that shapes the response body (for the ETag)."""
        if not self.rendered:
            return f"{self.content_type};ts={self.transfer_syntax};anon={int(self.anonymize)}"
        region = self.region and (self.region.xmin, self.region.ymin, self.region.xmax, self.region.ymax)
        window = self.window and (self.window.center, self.window.width)
        return (
            f"{self.content_type};rows={self.rows};columns={self.columns};region={region!r};"
            f"window={window!r};frame={self.frame_number};quality={self.quality}"
        )


# --- parsing ------------------------------------------------------------------------------


def _fields(query: bytes) -> dict[str, str]:
    """Split and decode the query: ASCII only, no control characters, no repeats."""
    if len(query) > MAX_QUERY_LENGTH:
        raise WadoError(414, f"the query is longer than {MAX_QUERY_LENGTH} bytes")
    try:
        text = query.decode("ascii")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=_MAX_FIELDS, encoding="ascii", errors="strict")
    except UnicodeDecodeError:
        raise _bad("the query is not ASCII") from None
    except ValueError:
        raise _bad(f"more than {_MAX_FIELDS} parameters") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if not _PRINTABLE.match(name) or len(name) > 64:
            raise _bad("a parameter name holds control characters or is too long")
        if name in fields:
            raise _bad(f"{_safe_name(name)} is given more than once")
        if not _PRINTABLE.match(value):
            raise _bad(f"{_safe_name(name)} holds control characters")
        fields[name] = value
    return fields


def _safe_name(name: str) -> str:
    # Only names we know are ever repeated back; anything else could be an injection.
    return name if name in _KNOWN else "a parameter"


def _uid(fields: dict[str, str], name: str, *, required: bool) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise _bad(f"{name} is required")
        return None
    if not is_valid_uid(value):
        raise _bad(f"{name} is malformed (not a UID)")
    return value


def _integer(fields: dict[str, str], name: str, low: int, high: int) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    text = value.strip()
    if not _INTEGER.match(text) or not low <= int(text) <= high:
        raise _bad(f"{name} must be an integer from {low} to {high}")
    return int(text)


def _decimal(fields: dict[str, str], name: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    text = value.strip()
    if len(text) > 16 or not _DECIMAL.match(text):  # DS: at most 16 characters
        raise _bad(f"{name} must be a decimal number (DS)")
    number = float(text)
    if not math.isfinite(number):
        raise _bad(f"{name} must be a finite number")
    return number


def _region(fields: dict[str, str]) -> Region | None:
    value = fields.get("region")
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 4 or not all(len(p) <= 16 and _FRACTION.match(p) for p in parts):
        raise _bad("region must be four decimals xmin,ymin,xmax,ymax from 0.0 to 1.0")
    xmin, ymin, xmax, ymax = (float(p) for p in parts)
    if not (0.0 <= xmin < xmax <= 1.0 and 0.0 <= ymin < ymax <= 1.0):
        raise _bad("region must satisfy 0 <= xmin < xmax <= 1 and 0 <= ymin < ymax <= 1")
    return Region(xmin, ymin, xmax, ymax)


def _window(fields: dict[str, str]) -> Window | None:
    center = _decimal(fields, "windowCenter")
    width = _decimal(fields, "windowWidth")
    if (center is None) != (width is None):
        raise _bad("windowCenter and windowWidth go together")
    if center is None or width is None:
        return None
    if width < 1:
        # PS3.3 C.11.2.1.2.1: a linear window is at least 1 wide.
        raise _bad("windowWidth must be at least 1")
    return Window(center, width)


def _media_types(value: str, name: str) -> tuple[str, ...]:
    """``contentType``: a comma-separated list; parameters (``;q=``) are dropped."""
    types = []
    for item in value.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if not _MEDIA_TYPE.match(media):
            raise _bad(f"{name} must be a list of media types")
        types.append(media)
    return tuple(types)


def _accept(header: bytes | None) -> tuple[str, ...]:
    """The Accept header's media types, most preferred first; malformed entries are skipped."""
    if not header:
        return ()
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return ()
    ranked: list[tuple[float, int, str]] = []
    for position, item in enumerate(text.split(",")[:_MAX_FIELDS]):
        media, _, params = item.partition(";")
        media = media.strip().lower()
        if not _MEDIA_TYPE.match(media):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val.strip())
                except ValueError:
                    q = 0.0
        if 0.0 < q <= 1.0:
            ranked.append((-q, position, media))
    return tuple(media for _, _, media in sorted(ranked))


_KNOWN = frozenset({
    "requestType", "studyUID", "seriesUID", "objectUID", "contentType", "charset", "anonymize",
    "annotation", "rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber",
    "imageQuality", "presentationUID", "presentationSeriesUID", "transferSyntax",
})


def parse_query(query: bytes, accept: bytes | None = None) -> WadoQuery:
    """Parse a WADO-URI query string.

    Parameters
    ----------
    query : bytes
        The raw query string (after ``?``), still %-encoded.
    accept : bytes or None
        The request's Accept header: the wanted types when ``contentType`` is absent.

    Returns
    -------
    WadoQuery

    Raises
    ------
    WadoError
        400 for a missing, malformed, out-of-range or repeated parameter; 414 for a
        query longer than :data:`MAX_QUERY_LENGTH`.
    """
    fields = _fields(query)
    request_type = fields.get("requestType")
    if request_type is None:
        raise _bad("requestType is required")
    if request_type != "WADO":
        raise _bad("requestType must be WADO")
    study = _uid(fields, "studyUID", required=True)
    series = _uid(fields, "seriesUID", required=True)
    instance = _uid(fields, "objectUID", required=True)
    assert study is not None and series is not None and instance is not None

    content_types: tuple[str, ...] = ()
    if "contentType" in fields:
        content_types = _media_types(fields["contentType"], "contentType")
    anonymize = fields.get("anonymize")
    if anonymize is not None and anonymize != "yes":
        raise _bad("anonymize must be yes")
    for name, allowed in (("annotation", {"patient", "technique"}),):
        value = fields.get(name)
        if value is not None and not set(value.split(",")) <= allowed:
            raise _bad("annotation must be patient and/or technique")
    presentation = _uid(fields, "presentationUID", required=False)
    presentation_series = _uid(fields, "presentationSeriesUID", required=False)
    if (presentation is None) != (presentation_series is None):
        raise _bad("presentationUID and presentationSeriesUID go together")

    return WadoQuery(
        study_uid=study,
        series_uid=series,
        object_uid=instance,
        content_types=content_types,
        accept=_accept(accept),
        transfer_syntax=_uid(fields, "transferSyntax", required=False),
        anonymize=anonymize == "yes",
        rows=_integer(fields, "rows", 1, MAX_DIMENSION),
        columns=_integer(fields, "columns", 1, MAX_DIMENSION),
        region=_region(fields),
        window=_window(fields),
        frame_number=_integer(fields, "frameNumber", 1, 2**31 - 1),
        quality=_integer(fields, "imageQuality", 1, 100),
        presentation=presentation is not None,
    )


# --- negotiation ----------------------------------------------------------------------------


def _pick(wanted: Iterable[str], is_image: bool) -> str | None:
    """The first wanted type we can produce for this object (wildcards allowed)."""
    for media in wanted:
        if media in (DICOM, "application/*"):
            return DICOM
        if media == "*/*":
            return JPEG if is_image else DICOM
        if is_image and media in (JPEG, "image/*"):
            return JPEG
        if is_image and media == PNG:
            return PNG
    return None


def negotiate(query: WadoQuery, *, is_image: bool, streamable: bool, original_syntax: str) -> Delivery:
    """Decide what to send for the object ``query`` names.

    Parameters
    ----------
    query : WadoQuery
        From :func:`parse_query`.
    is_image : bool
        Whether the object has pixels to render (not an SR, KOS, ...).
    streamable : bool
        Whether its frames have our JPEG 2000 codestreams (JPIP and .90 need them).
    original_syntax : str
        The transfer syntax it is archived in (sent as is when asked for).

    Returns
    -------
    Delivery

    Raises
    ------
    WadoError
        406 when no acceptable type or transfer syntax can be produced, 400 when the
        parameters contradict the chosen type.
    """
    wanted = query.content_types or query.accept or ("*/*",)
    content_type = _pick(wanted, is_image)
    if content_type is None:
        what = "the requested content types" if query.content_types else "the Accept header's types"
        kind = "this object" if is_image else "a non-image object (only application/dicom)"
        raise WadoError(406, f"none of {what} can be produced for {kind}")

    if content_type == DICOM:
        given = query.rendering_given()
        if given:
            raise _bad(f"{', '.join(given)} only apply to rendered images, not application/dicom")
        syntax = query.transfer_syntax or EXPLICIT_VR_LITTLE_ENDIAN
        if query.anonymize and syntax in JPIP_SYNTAXES:
            # The Pixel Data Provider URL names the original instance.
            raise WadoError(406, "a de-identified object cannot reference the original's JPIP target")
        if syntax in JPIP_SYNTAXES or syntax == JPEG2000_LOSSLESS:
            if not streamable:
                raise WadoError(406, "that transfer syntax needs the object's JPEG 2000 codestreams, "
                                     "which this object does not have (yet)")
        elif syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, original_syntax):
            raise WadoError(406, "that transfer syntax is not produced here (offered: Explicit VR Little "
                                 "Endian, the archived one, .4.90, .4.94, .4.95)")
        return Delivery(DICOM, transfer_syntax=syntax, anonymize=query.anonymize)

    if query.transfer_syntax is not None:
        raise _bad("transferSyntax only applies to application/dicom")
    if query.anonymize:
        raise _bad("anonymize only applies to application/dicom")
    if query.presentation:
        raise WadoError(406, "presentation states are not applied by this server")
    return Delivery(
        content_type,
        rows=query.rows,
        columns=query.columns,
        region=query.region,
        window=query.window,
        frame_number=query.frame_number or 1,
        quality=(query.quality or DEFAULT_QUALITY) if content_type == JPEG else None,
    )
