"""Tests for :mod:`imageshare.wado.query`: WADO-URI parameters parsed, checked and negotiated."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from imageshare.wado.query import (
    DEFAULT_QUALITY,
    DICOM,
    EXPLICIT_VR_LITTLE_ENDIAN,
    JPEG,
    MAX_QUERY_LENGTH,
    PNG,
    Region,
    WadoError,
    WadoQuery,
    Window,
    negotiate,
    parse_query,
)

STUDY, SERIES, OBJECT = "1.2.3", "1.2.3.4", "1.2.3.4.5"
BASE = f"requestType=WADO&studyUID={STUDY}&seriesUID={SERIES}&objectUID={OBJECT}"
ORIGINAL = "1.2.840.10008.1.2.4.70"
INJECTIONS = [
    "'",
    '"',
    "1.2.3'--",
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%00",
    "1.2%00.3",
    "%0d%0aSet-Cookie:%20x=y",
    "<script>alert(1)</script>",
    "%ff%fe",
    "9" * 500,
    "1" * 65,
    "1,2,3,4",
    "-1",
    "NaN",
    "inf",
    "1e999",
    "$(rm -rf /)",
]


def parse(extra: str = "", accept: bytes | None = None) -> WadoQuery:
    return parse_query((BASE + extra).encode("latin-1"), accept)


def refused(extra: str, accept: bytes | None = None) -> WadoError:
    with pytest.raises(WadoError) as info:
        parse(extra, accept)
    return info.value


def image(query: WadoQuery, **kw: object) -> object:
    return negotiate(query, is_image=True, streamable=True, original_syntax=ORIGINAL, **kw)  # type: ignore[arg-type]


def test_minimal_request() -> None:
    """The three UIDs and requestType are enough; nothing else is set."""
    q = parse()
    assert (q.study_uid, q.series_uid, q.object_uid) == (STUDY, SERIES, OBJECT)
    assert q.content_types == () and q.transfer_syntax is None and not q.anonymize
    assert q.rows is q.columns is q.region is q.window is q.frame_number is q.quality is None


@pytest.mark.parametrize(
    "query, reason",
    [
        (f"studyUID={STUDY}&seriesUID={SERIES}&objectUID={OBJECT}", "requestType is required"),
        (BASE.replace("=WADO", "=wado"), "requestType must be WADO"),
        (BASE.replace("=WADO", "=RS"), "requestType must be WADO"),
        (BASE.replace(f"&studyUID={STUDY}", ""), "studyUID is required"),
        (BASE.replace(f"&seriesUID={SERIES}", ""), "seriesUID is required"),
        (BASE.replace(f"&objectUID={OBJECT}", ""), "objectUID is required"),
        (BASE.replace(f"objectUID={OBJECT}", "objectUID="), "objectUID is required"),
        (BASE.replace(f"studyUID={STUDY}", "studyUID=1..2"), "studyUID is malformed"),
        (BASE.replace(f"seriesUID={SERIES}", "seriesUID=1.2.a"), "seriesUID is malformed"),
        (BASE.replace(f"objectUID={OBJECT}", "objectUID=" + "1." * 32 + "1"), "objectUID is malformed"),
    ],
)
def test_required_parameters(query: str, reason: str) -> None:
    """requestType must be WADO and the three UIDs present and valid (400, named)."""
    with pytest.raises(WadoError) as info:
        parse_query(query.encode())
    assert info.value.status == 400 and info.value.reason.startswith(reason)


@pytest.mark.parametrize(
    "name",
    ["requestType", "studyUID", "seriesUID", "objectUID", "contentType", "transferSyntax", "anonymize",
     "annotation", "rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber", "imageQuality",
     "presentationUID", "presentationSeriesUID"],
)
@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_in_every_parameter(name: str, value: str) -> None:
    """Quotes, path traversal, NUL, CRLF, markup, non-ASCII, huge and non-finite numbers in
    any recognised parameter give a clean 400 whose reason repeats nothing from the request."""
    fields = dict(pair.split("=") for pair in BASE.split("&"))
    fields[name] = value
    if name in ("windowCenter", "windowWidth"):  # present as a pair, so the value is judged
        fields.setdefault("windowCenter", "40")
        fields.setdefault("windowWidth", "400")
    if name.startswith("presentation"):
        fields.setdefault("presentationUID", "1.2.3.9")
        fields.setdefault("presentationSeriesUID", "1.2.3.8")
    query = "&".join(f"{k}={v}" for k, v in fields.items()).encode("latin-1")
    if (name, value) == ("windowCenter", "-1"):
        parse_query(query)  # a legitimate centre
        return
    with pytest.raises(WadoError) as info:
        parse_query(query)
    assert info.value.status == 400
    for fragment in ("passwd", "script", "Cookie", "rm -rf", "999"):
        assert fragment not in info.value.reason


def test_injection_in_an_unknown_parameter() -> None:
    """Unknown parameters are ignored, whatever they hold, unless it is a control character."""
    assert parse("&foo=../../x&bar='%22&x-y=<b>").object_uid == OBJECT
    assert refused("&foo=%00").status == 400
    assert refused("&foo=%0d%0a").status == 400


def test_unknown_parameters_are_ignored() -> None:
    """Parameters WADO-URI does not define (and charset, annotation) change nothing."""
    assert parse("&charset=UTF-8&annotation=patient,technique&zoom=2&Rows=5") == parse()


def test_repeated_parameter() -> None:
    """A parameter given twice is a 400 (which value was meant is unknown)."""
    error = refused(f"&objectUID={OBJECT}")
    assert error.status == 400 and "objectUID is given more than once" in error.reason
    assert refused("&rows=1&rows=2").status == 400


def test_query_too_long_or_too_many_fields() -> None:
    """Over MAX_QUERY_LENGTH bytes is 414; more than 64 parameters is 400."""
    with pytest.raises(WadoError) as info:
        parse_query((BASE + "&x=" + "a" * MAX_QUERY_LENGTH).encode())
    assert info.value.status == 414
    assert refused("".join(f"&p{i}=1" for i in range(70))).status == 400


def test_non_ascii_query() -> None:
    """Raw or %-encoded bytes outside ASCII are a 400."""
    with pytest.raises(WadoError):
        parse_query(BASE.encode() + b"&x=\xc3\xa9")
    assert refused("&x=%C3%A9").status == 400


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("&contentType=image/jpeg", ("image/jpeg",)),
        ("&contentType=image/png,image/jpeg", ("image/png", "image/jpeg")),
        ("&contentType=" + quote("image/png; q=0.5, Application/DICOM"), ("image/png", "application/dicom")),
        ("&contentType=image/*", ("image/*",)),
    ],
)
def test_content_type_lists(extra: str, expected: tuple[str, ...]) -> None:
    """contentType is a list of media types, kept in order, lower case, parameters dropped."""
    assert parse(extra).content_types == expected


@pytest.mark.parametrize("value", ["jpeg", "image/", "/png", "image/jpeg/x", "image/png,,image/jpeg", ""])
def test_malformed_content_type(value: str) -> None:
    """A contentType that is not a list of media types is a 400."""
    assert refused("&contentType=" + quote(value)).status == 400


def test_accept_header_by_preference() -> None:
    """The Accept header is ranked by q (stable), q=0 and malformed entries dropped."""
    q = parse(accept=b"text/html, image/png;q=0.9, bad, image/jpeg;q=1, application/dicom;q=0, */*;q=0.1")
    assert q.accept == ("text/html", "image/jpeg", "image/png", "*/*")
    assert parse(accept=b"\xff\xfe").accept == ()


@pytest.mark.parametrize(
    "extra, rows, columns",
    [("&rows=64", 64, None), ("&columns=%20128%20", None, 128), ("&rows=%2B10&columns=8192", 10, 8192)],
)
def test_rows_and_columns(extra: str, rows: int | None, columns: int | None) -> None:
    """rows/columns are IS: digits, an optional plus sign, surrounding spaces."""
    q = parse(extra)
    assert (q.rows, q.columns) == (rows, columns)


@pytest.mark.parametrize("value", ["0", "-1", "8193", "1e3", "1.5", "abc", "", "99999999999999999999"])
@pytest.mark.parametrize("name", ["rows", "columns"])
def test_bad_rows_and_columns(name: str, value: str) -> None:
    """rows/columns must be integers from 1 to 8192."""
    error = refused(f"&{name}={quote(value)}")
    assert error.status == 400 and error.reason == f"{name} must be an integer from 1 to 8192"


def test_region() -> None:
    """region is four fractions xmin,ymin,xmax,ymax."""
    assert parse("&region=0.25,0,1.0,.5").region == Region(0.25, 0.0, 1.0, 0.5)
    assert parse("&region=0,0,1,1").region == Region(0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "value",
    ["0,0,1", "0,0,1,1,1", "0.5,0,0.5,1", "0.6,0,0.5,1", "0,0.5,1,0.5", "0,0,1.1,1", "-0.1,0,1,1",
     "0,0,1e0,1", "0,0,nan,1", "0,0,inf,1", "a,b,c,d", "", "0;0;1;1"],
)
def test_bad_region(value: str) -> None:
    """An ill-defined region (count, order, range, syntax) is a 400."""
    assert refused("&region=" + quote(value)).status == 400


def test_window() -> None:
    """windowCenter/windowWidth are DS values, kept as floats."""
    assert parse("&windowCenter=-600&windowWidth=1.5e3").window == Window(-600.0, 1500.0)
    assert parse("&windowCenter=40.&windowWidth=1").window == Window(40.0, 1.0)


@pytest.mark.parametrize(
    "extra, reason",
    [
        ("&windowCenter=40", "windowCenter and windowWidth go together"),
        ("&windowWidth=400", "windowCenter and windowWidth go together"),
        ("&windowCenter=40&windowWidth=0", "windowWidth must be at least 1"),
        ("&windowCenter=40&windowWidth=0.5", "windowWidth must be at least 1"),
        ("&windowCenter=40&windowWidth=-400", "windowWidth must be at least 1"),
        ("&windowCenter=nan&windowWidth=400", "windowCenter must be a decimal"),
        ("&windowCenter=1e999&windowWidth=400", "windowCenter must be a finite"),
        ("&windowCenter=40&windowWidth=12345678901234567", "windowWidth must be a decimal"),
        ("&windowCenter=4,0&windowWidth=400", "windowCenter must be a decimal"),
    ],
)
def test_bad_window(extra: str, reason: str) -> None:
    """Both or neither, finite DS values, width at least 1 (PS3.3 C.11.2.1.2.1)."""
    error = refused(extra)
    assert error.status == 400 and error.reason.startswith(reason)


def test_frame_quality_anonymize_presentation() -> None:
    """frameNumber >= 1, imageQuality 1..100, anonymize=yes, presentation UIDs as a pair."""
    q = parse("&frameNumber=3&imageQuality=55&anonymize=yes&presentationUID=1.2.9&presentationSeriesUID=1.2.8")
    assert (q.frame_number, q.quality, q.anonymize, q.presentation) == (3, 55, True, True)
    for extra in ("&frameNumber=0", "&imageQuality=0", "&imageQuality=101", "&anonymize=no", "&anonymize=YES",
                  "&presentationUID=1.2.9", "&presentationSeriesUID=1.2.8", "&annotation=name",
                  "&transferSyntax=1.2.840.10008.1.2.4.9x"):
        assert refused(extra).status == 400, extra


# --- negotiation -----------------------------------------------------------------------


def test_defaults() -> None:
    """An image defaults to JPEG (quality 90, frame 1); a non-image to DICOM in Explicit VR LE."""
    d = image(parse())
    assert (d.content_type, d.quality, d.frame_number, d.transfer_syntax) == (JPEG, DEFAULT_QUALITY, 1, None)
    d = negotiate(parse(), is_image=False, streamable=False, original_syntax=ORIGINAL)
    assert (d.content_type, d.transfer_syntax) == (DICOM, EXPLICIT_VR_LITTLE_ENDIAN)


@pytest.mark.parametrize(
    "content_type, is_image, expected",
    [
        ("image/png", True, PNG),
        ("image/*", True, JPEG),
        ("image/gif,image/png,image/jpeg", True, PNG),
        ("*/*", True, JPEG),
        ("application/dicom", True, DICOM),
        ("image/jpeg,application/dicom", False, DICOM),
        ("*/*", False, DICOM),
        ("application/*", False, DICOM),
    ],
)
def test_content_type_choice(content_type: str, is_image: bool, expected: str) -> None:
    """The first type the object can be given in wins; wildcards resolve to the default."""
    d = negotiate(parse("&contentType=" + content_type), is_image=is_image, streamable=is_image,
                  original_syntax=ORIGINAL)
    assert d.content_type == expected


@pytest.mark.parametrize(
    "content_type, is_image",
    [("image/gif", True), ("text/html", True), ("image/jpeg", False), ("image/png,image/*", False)],
)
def test_not_acceptable(content_type: str, is_image: bool) -> None:
    """No producible type among those asked is a 406 (a rendered type for a non-image too)."""
    with pytest.raises(WadoError) as info:
        negotiate(parse("&contentType=" + content_type), is_image=is_image, streamable=False,
                  original_syntax=ORIGINAL)
    assert info.value.status == 406


def test_accept_fallback() -> None:
    """Without contentType the Accept header decides; with it, Accept is ignored."""
    assert image(parse(accept=b"image/png")).content_type == PNG
    assert image(parse(accept=b"text/html,application/xhtml+xml,*/*;q=0.8")).content_type == JPEG
    assert image(parse(accept=b"application/dicom")).content_type == DICOM
    assert image(parse("&contentType=image/jpeg", accept=b"image/png")).content_type == JPEG
    with pytest.raises(WadoError) as info:
        image(parse(accept=b"text/html"))
    assert info.value.status == 406


@pytest.mark.parametrize("extra", ["&rows=10", "&columns=10", "&region=0,0,1,1", "&windowCenter=1&windowWidth=2",
                                   "&frameNumber=1", "&presentationUID=1.2&presentationSeriesUID=1.3"])
def test_rendering_parameters_with_dicom(extra: str) -> None:
    """Rendering parameters cannot apply to application/dicom: 400."""
    with pytest.raises(WadoError) as info:
        image(parse("&contentType=application/dicom" + extra))
    assert info.value.status == 400 and "only apply to rendered images" in info.value.reason


def test_dicom_parameters_with_rendered_types() -> None:
    """transferSyntax and anonymize only go with application/dicom (400); a presentation
    state is not applied (406); imageQuality is ignored for PNG."""
    for extra in ("&transferSyntax=1.2.840.10008.1.2.1", "&anonymize=yes"):
        with pytest.raises(WadoError) as info:
            image(parse("&contentType=image/jpeg" + extra))
        assert info.value.status == 400
    with pytest.raises(WadoError) as info:
        image(parse("&presentationUID=1.2&presentationSeriesUID=1.3"))
    assert info.value.status == 406
    assert image(parse("&contentType=image/png&imageQuality=10")).quality is None
    assert image(parse("&imageQuality=10")).quality == 10


@pytest.mark.parametrize(
    "syntax, streamable, expected",
    [
        (None, False, EXPLICIT_VR_LITTLE_ENDIAN),
        (EXPLICIT_VR_LITTLE_ENDIAN, False, EXPLICIT_VR_LITTLE_ENDIAN),
        (ORIGINAL, False, ORIGINAL),
        ("1.2.840.10008.1.2.4.94", True, "1.2.840.10008.1.2.4.94"),
        ("1.2.840.10008.1.2.4.95", True, "1.2.840.10008.1.2.4.95"),
        ("1.2.840.10008.1.2.4.90", True, "1.2.840.10008.1.2.4.90"),
        ("1.2.840.10008.1.2.4.94", False, 406),
        ("1.2.840.10008.1.2.4.90", False, 406),
        ("1.2.840.10008.1.2", True, 406),
        ("1.2.840.10008.1.2.4.50", True, 406),
        ("1.2.3.4", True, 406),
    ],
)
def test_transfer_syntax(syntax: str | None, streamable: bool, expected: str | int) -> None:
    """Explicit VR LE (default), the archived syntax, and .90/.94/.95 for streamable
    objects; any other valid UID is a 406."""
    q = parse("&contentType=application/dicom" + (f"&transferSyntax={syntax}" if syntax else ""))
    if isinstance(expected, int):
        with pytest.raises(WadoError) as info:
            negotiate(q, is_image=True, streamable=streamable, original_syntax=ORIGINAL)
        assert info.value.status == expected
    else:
        assert negotiate(q, is_image=True, streamable=streamable, original_syntax=ORIGINAL).transfer_syntax == expected


def test_anonymized_jpip_header_is_refused() -> None:
    """A de-identified JPIP Referenced object would name the original instance: 406."""
    q = parse("&contentType=application/dicom&anonymize=yes&transferSyntax=1.2.840.10008.1.2.4.94")
    with pytest.raises(WadoError) as info:
        image(q)
    assert info.value.status == 406
    assert image(parse("&contentType=application/dicom&anonymize=yes")).anonymize


def test_delivery_key() -> None:
    """The ETag key is the same for equivalent requests and differs for different bodies."""
    key = lambda extra: image(parse(extra)).key()  # noqa: E731
    assert key("") == key("&contentType=image/*") == key("&imageQuality=90&frameNumber=1&charset=x")
    assert key("&rows=%2064") == key("&rows=64")
    variants = ["", "&contentType=image/png", "&rows=64", "&columns=64", "&region=0,0,.5,.5",
                "&windowCenter=1&windowWidth=2", "&frameNumber=2", "&imageQuality=80",
                "&contentType=application/dicom", "&contentType=application/dicom&anonymize=yes",
                "&contentType=application/dicom&transferSyntax=1.2.840.10008.1.2.4.94"]
    assert len({key(v) for v in variants}) == len(variants)
