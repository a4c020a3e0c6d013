"""Tests of :mod:`imageshare.protocols.jpip.request`: field splitting, decoding,
validation, the choice of return type, GET/POST carriage and every error status.

Request strings imitate what Kakadu (``kdu_show``), OpenJPEG's ``opj_viewer``
and JHelioviewer send (``docs/jpip.md`` 1.1-1.2).
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageshare.protocols.jpip.request import (
    MAX_FIELDS,
    RECOGNISED_FIELDS,
    Fsiz,
    JpipRequest,
    JpipRequestError,
    parse_fields,
    parse_request,
)

FORM = "application/x-www-form-urlencoded"


def _status(text: str | bytes) -> int:
    with pytest.raises(JpipRequestError) as info:
        parse_fields(text)
    return info.value.status


# ---------------------------------------------------------------- realistic clients


def test_kakadu_stateless_request() -> None:
    """Kakadu's window request with a %-encoded model parses to typed values."""
    req = parse_fields(
        "target=x&fsiz=640,480,round-up&roff=0,0&rsiz=640,480&type=jpp-stream"
        "&cnew=http-tcp,http&len=2000&model=%5B0%5D,Hm,H0,P12:345,-P13,M0"
    )
    assert req == JpipRequest(
        target="x",
        fsiz=Fsiz(640, 480, "round-up"),
        roff=(0, 0),
        rsiz=(640, 480),
        type="jpp-stream",
        cnew=("http-tcp", "http"),
        len=2000,
        model="[0],Hm,H0,P12:345,-P13,M0",
    )


def test_kakadu_first_request_and_session_request() -> None:
    """Kakadu's opening request (tid=0, subtarget, stream=0) and a later in-session one."""
    first = parse_fields(
        "type=jpp-stream&target=studies%2F1.2.3%2Fframe0.j2c&subtarget=1024-99999&tid=0"
        "&cnew=http-udp,http-tcp,http&len=2000&fsiz=512,512,closest&stream=0"
    )
    assert first.target == "studies/1.2.3/frame0.j2c"
    assert first.subtarget == (1024, 99999)
    assert first.tid == "0"
    assert first.cnew == ("http-udp", "http-tcp", "http")
    assert first.fsiz == Fsiz(512, 512, "closest")
    assert first.stream == ((0, 0, 1),)
    later = parse_fields(
        "cid=JPH_0123456789ABCDEF&fsiz=1024,1024,round-up&roff=256,128&rsiz=512,512"
        "&comps=0-2&layers=12&len=40000&wait=yes&qid=17&metareq=%5B*%5DR!!"
    )
    assert later.cid == "JPH_0123456789ABCDEF"
    assert later.comps == ((0, 2),)
    assert later.layers == 12 and later.len == 40000 and later.qid == 17
    assert later.wait is True and later.align is False
    assert later.metareq == "[*]R!!"
    assert later.type is None


def test_openjpeg_viewer_request() -> None:
    """opj_viewer's request (target, window, cnew=http, type) parses."""
    req = parse_fields(
        "fsiz=512,512&roff=0,0&rsiz=512,512&target=image.jp2&cnew=http&type=jpp-stream&len=2000"
    )
    assert req.fsiz == Fsiz(512, 512)
    assert req.fsiz.round == "round-down"
    assert req.cnew == ("http",)
    assert req.unknown == ()


def test_jhelioviewer_request() -> None:
    """A JHelioviewer-style request with tid=0, stream, closest rounding and metadata."""
    req = parse_fields(
        "target=/AIA/2024/01/01/AIA_171.jp2&tid=0&cnew=http&type=jpp-stream&len=524288"
        "&stream=0-29:1&fsiz=1024,1024,closest&rsiz=1024,1024&roff=0,0&layers=8&metareq=%5Bxml_%5D!!"
    )
    assert req.stream == ((0, 29, 1),)
    assert req.metareq == "[xml_]!!"
    assert req.target == "/AIA/2024/01/01/AIA_171.jp2"


# ---------------------------------------------------------------- decoding


def test_empty_input() -> None:
    """An empty field string (and one with only separators) is an empty request."""
    assert parse_fields("") == JpipRequest()
    assert parse_fields(b"") == JpipRequest()
    assert parse_fields("&&") == JpipRequest()


def test_split_before_decoding() -> None:
    """%26 and %3D inside a value are data, not separators; names are %-decoded too."""
    req = parse_fields("tar%67et=a%26b%3Dc&model=Hm")
    assert req.target == "a&b=c"
    assert req.model == "Hm"


def test_plus_is_literal() -> None:
    """'+' is kept as a plus sign, not turned into a space."""
    assert parse_fields("target=a+b.j2c").target == "a+b.j2c"
    assert parse_fields("target=a%20b.j2c").target == "a b.j2c"


def test_bad_escapes_kept_and_bad_utf8_rejected() -> None:
    """A '%' without two hex digits stays literal; invalid UTF-8 after decoding is a 400."""
    assert parse_fields("target=100%zz").target == "100%zz"
    assert parse_fields(b"target=caf\xc3\xa9").target == "café"
    assert parse_fields("target=caf%C3%A9").target == "café"
    assert _status("target=%ff") == 400
    assert _status(b"target=\xff") == 400
    assert _status("target=\ud800") == 400


def test_unknown_fields_listed_not_rejected() -> None:
    """Unrecognised fields (and value-less ones) are ignored but named, in order."""
    req = parse_fields("foo=1&target=x&handled&Target=y")
    assert req.target == "x"
    assert req.unknown == ("foo", "handled", "Target")


def test_duplicate_field_rejected() -> None:
    """A field given twice is a 400, also when one copy is %-encoded."""
    assert _status("len=1&len=2") == 400
    assert _status("len=1&l%65n=1") == 400
    assert _status("foo=1&foo=1") == 400


def test_empty_field_name_and_too_many_fields() -> None:
    """'=x' and more than MAX_FIELDS fields are 400s."""
    assert _status("=x") == 400
    assert _status("&".join(f"f{i}=1" for i in range(MAX_FIELDS + 1))) == 400
    assert len(parse_fields("&".join(f"f{i}=1" for i in range(MAX_FIELDS))).unknown) == MAX_FIELDS


def test_recognised_fields() -> None:
    """The recognised-name list covers the brief's fields and maps onto JpipRequest attributes."""
    assert {"target", "cnew", "fsiz", "model", "need", "mset", "metareq", "upload"} <= RECOGNISED_FIELDS
    assert RECOGNISED_FIELDS - {"upload"} <= {a.name for a in attrs.fields(JpipRequest)}


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    "text",
    [
        "len=-1",
        "len=+5",
        "len=1e3",
        "len= 5",
        "len=5 ",
        "len=",
        "len=\u0663",  # Arabic-Indic digit three: isdigit() but not a UINT
        f"len={2**40 + 1}",
        "len=" + "9" * 5000,
        "layers=65536",
        f"qid={2**32 + 1}",
        "quality=101",
        "fsiz=640",
        "fsiz=640,480,round-up,x",
        "fsiz=640,480,sideways",
        "fsiz=640,480,ROUND-UP",
        f"fsiz={2**32 + 1},1",
        "fsiz=1,1&roff=1",
        "fsiz=1,1&rsiz=1,2,3",
        "comps=3-1",
        "comps=",
        "comps=1,,2",
        "comps=-2",
        "comps=16384",
        "stream=0:0",
        "stream=5-2",
        "stream=0:x",
        "wait=true",
        "align=1",
        "subtarget=10",
        "subtarget=20-10",
        "subtarget=a-b",
        "cnew=",
        "cnew=http,,http-tcp",
        "cnew=ht tp",
        "cclose=*,JPH_1",
        "cclose=a,",
        "target=",
        "tid=",
        "tid=" + "x" * 256,
        "cid=",
        "type=",
        "type=jpp-stream,",
    ],
)
def test_malformed_values_are_400(text: str) -> None:
    """Signs, spaces, exponents, non-ASCII digits, out-of-bound numbers, bad lists: 400."""
    assert _status(text) == 400


def test_roff_rsiz_need_fsiz() -> None:
    """roff or rsiz without fsiz is a 400 (Kakadu does the same)."""
    assert _status("roff=0,0") == 400
    assert _status("rsiz=10,10") == 400
    assert parse_fields("fsiz=10,10&rsiz=10,10").rsiz == (10, 10)


def test_numeric_bounds_inclusive() -> None:
    """The documented maxima themselves are accepted; leading zeros are fine."""
    req = parse_fields(
        f"len={2**40}&layers=65535&qid={2**32}&quality=100&fsiz={2**32},{2**32}&roff=007,0"
    )
    assert (req.len, req.layers, req.qid, req.quality) == (2**40, 65535, 2**32, 100)
    assert req.fsiz == Fsiz(2**32, 2**32) and req.roff == (7, 0)
    assert parse_fields("len=0").len == 0


def test_comps_and_stream_forms() -> None:
    """comps takes n, a-b and open a-; stream takes ranges with an optional :step."""
    assert parse_fields("comps=0,1-2,3-").comps == ((0, 0), (1, 2), (3, None))
    assert parse_fields("stream=0,2-10:2,5-").stream == ((0, 0, 1), (2, 10, 2), (5, None, 1))


def test_channels_fields() -> None:
    """cnew is lower-cased, de-duplicated in order, unknown transports kept; cclose lists or '*'."""
    assert parse_fields("cnew=HTTP-TCP,http,Http,udp").cnew == ("http-tcp", "http", "udp")
    assert parse_fields("cclose=*").cclose == ("*",)
    assert parse_fields("cclose=JPH_1,JPH_2").cclose == ("JPH_1", "JPH_2")
    assert parse_fields("cclose=*&cid=JPH_1").cid == "JPH_1"


def test_wait_align_raw_fields() -> None:
    """yes/no flags become booleans; cache and other raw fields are kept as decoded text."""
    req = parse_fields(
        "wait=no&align=yes&need=r0-2&tpmodel=0.0&tpneed=1.0&mset=0,1&context=jpxl%3C0%3E"
        "&roi=dynamic&srate=2.5&drate=1&cap=config%3D32M&pref=fvq%2Fr"
    )
    assert (req.wait, req.align) == (False, True)
    assert (req.need, req.tpmodel, req.tpneed, req.mset) == ("r0-2", "0.0", "1.0", "0,1")
    assert (req.context, req.roi, req.srate, req.drate) == ("jpxl<0>", "dynamic", "2.5", "1")
    assert (req.cap, req.pref) == ("config=32M", "fvq/r")


# ---------------------------------------------------------------- return type


@pytest.mark.parametrize(
    ("value", "chosen"),
    [
        ("jpp-stream", "jpp-stream"),
        ("jpt-stream", "jpt-stream"),
        ("jpt-stream,jpp-stream", "jpt-stream"),
        ("raw,jpp-stream", "jpp-stream"),
        ("image/jpp-stream", "jpp-stream"),
        ("image/jpt-stream;ttype=ext", "jpt-stream"),
        ("jpp-stream;ptype=ext", "jpp-stream"),
        ("JPP-Stream", "jpp-stream"),
        ("foo,image/jpp-stream", "jpp-stream"),
    ],
)
def test_type_preferences(value: str, chosen: str) -> None:
    """The first type we can produce wins; media-type forms and ;ptype/;ttype are accepted."""
    assert parse_fields(f"type={value}").type == chosen


@pytest.mark.parametrize("value", ["raw", "image/jp2", "raw,foo"])
def test_unsupported_type_is_415(value: str) -> None:
    """A type list with nothing we produce is a 415."""
    assert _status(f"type={value}") == 415


def test_unsupported_features_are_501() -> None:
    """upload (Annex E) and codestream-form subtargets are 501."""
    assert _status("upload=jpp-stream") == 501
    assert _status("subtarget=[0]") == 501


def test_error_carries_status_reason_and_field() -> None:
    """JpipRequestError is a ValueError with a status, a readable reason and the field."""
    with pytest.raises(JpipRequestError) as info:
        parse_fields("layers=x")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.status == 400 and err.field == "layers"
    assert "layers" in err.reason and str(err) == err.reason


# ---------------------------------------------------------------- carriage


def test_get_uses_query_and_ignores_body() -> None:
    """GET takes the fields from the query string."""
    req = parse_request("GET", None, b"target=a&len=5", b"len=6", FORM, None)
    assert (req.target, req.len) == ("a", 5)


def test_post_body_fields_merge_with_query() -> None:
    """A form-encoded POST body adds its fields to the query's; a charset parameter is fine."""
    req = parse_request(
        "POST", None, b"cid=JPH_1", b"fsiz=10,10&model=%5B0%5DHm", FORM + "; charset=UTF-8", None
    )
    assert (req.cid, req.fsiz, req.model) == ("JPH_1", Fsiz(10, 10), "[0]Hm")
    assert parse_request("post", None, b"", b"len=1", None, None).len == 1


def test_post_errors() -> None:
    """Duplicates across query and body, and bodies of another media type, are 400s."""
    with pytest.raises(JpipRequestError) as info:
        parse_request("POST", None, b"len=1", b"len=1", FORM, None)
    assert info.value.status == 400
    with pytest.raises(JpipRequestError) as info:
        parse_request("POST", None, b"", b"len=1", "application/json", None)
    assert info.value.status == 400
    assert parse_request("POST", None, b"len=1", b"", "application/json", None).len == 1


@pytest.mark.parametrize("method", ["PUT", "HEAD", "DELETE", "OPTIONS"])
def test_other_methods_are_405(method: str) -> None:
    """Only GET and POST carry JPIP requests."""
    with pytest.raises(JpipRequestError) as info:
        parse_request(method, "x", b"", None, None, None)
    assert info.value.status == 405


def test_path_target() -> None:
    """The URL path names the target when no target field is given; the field wins otherwise."""
    assert parse_request("GET", "dir/a b.j2c", b"len=1", None, None, None).target == "dir/a b.j2c"
    assert parse_request("GET", "p", b"target=q", None, None, None).target == "q"
    assert parse_request("GET", "", b"", None, None, None).target is None


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("image/jpp-stream", "jpp-stream"),
        ("image/jpt-stream, image/jpp-stream", "jpt-stream"),
        ("image/jpt-stream;q=0, image/jpp-stream", "jpp-stream"),
        ("text/html, */*;q=0.8", None),
        ("*/*", None),
        ("image/*", None),
        ("", None),
        (None, None),
    ],
)
def test_accept_fallback(accept: str | None, chosen: str | None) -> None:
    """Without a type field, Accept's media types are the preferences; wildcards never 415."""
    assert parse_request("GET", "t", b"", None, None, accept).type == chosen


def test_accept_without_supported_type_is_415_and_type_field_wins() -> None:
    """Accept naming only other types is a 415; a type field overrides Accept entirely."""
    with pytest.raises(JpipRequestError) as info:
        parse_request("GET", "t", b"", None, None, "text/html")
    assert info.value.status == 415
    assert parse_request("GET", "t", b"type=jpt-stream", None, None, "text/html").type == "jpt-stream"


# ---------------------------------------------------------------- fuzzing

_NAMES = sorted(RECOGNISED_FIELDS) + ["x", "Target", ""]
_VALUE_ALPHABET = "0123456789,-:*;[]!<>/%=+&.abcdefHmLPMTtcrpjyesno"


@given(st.text(max_size=200))
def test_fuzz_text_only_request_errors(text: str) -> None:
    """parse_fields on arbitrary text returns a JpipRequest or raises JpipRequestError."""
    try:
        assert isinstance(parse_fields(text), JpipRequest)
    except JpipRequestError as e:
        assert e.status in (400, 415, 501)


@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.text(_VALUE_ALPHABET, max_size=16)), max_size=8))
def test_fuzz_field_shaped_only_request_errors(fields: list[tuple[str, str]]) -> None:
    """Field-shaped input with plausible values reaches every value parser without crashing."""
    text = "&".join(f"{n}={v}" for n, v in fields)
    try:
        parse_fields(text)
    except JpipRequestError as e:
        assert e.status in (400, 415, 501)


@given(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.one_of(st.none(), st.text(max_size=10)),
    st.binary(max_size=60),
    st.one_of(st.none(), st.binary(max_size=60)),
    st.one_of(st.none(), st.sampled_from([FORM, "text/plain", ""])),
    st.one_of(st.none(), st.text(max_size=40)),
)
def test_fuzz_parse_request_only_request_errors(
    method: str, path: str | None, query: bytes, body: bytes | None, ctype: str | None, accept: str | None
) -> None:
    """parse_request on arbitrary bytes and headers raises nothing but JpipRequestError."""
    try:
        parse_request(method, path, query, body, ctype, accept)
    except JpipRequestError:
        pass
