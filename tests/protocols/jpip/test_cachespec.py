"""Tests of :mod:`imageshare.protocols.jpip.cachespec`: the ``model=``/``need=`` grammar.

Covers Kakadu's example string, codestream qualifiers and their scope, every
explicit and implicit descriptor with ``:n``/``:Ln``, subtractive items, what
is skipped as an unknown form versus rejected as malformed, a render -> parse
round trip, and fuzzing that only JpipRequestError escapes.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageshare.protocols.jpip.cachespec import (
    MAX_ITEMS,
    CacheItem,
    CacheSpec,
    Codestreams,
    ImplicitSpec,
    Kind,
    parse_cache_spec,
)
from imageshare.protocols.jpip.request import JpipRequestError


def _model(text: str) -> CacheSpec:
    return parse_cache_spec(text, allow_subtractive=True)


def _status(text: str, *, allow_subtractive: bool = True) -> int:
    with pytest.raises(JpipRequestError) as info:
        parse_cache_spec(text, allow_subtractive=allow_subtractive)
    return info.value.status


def test_kakadu_example() -> None:
    """Kakadu's model string: qualifier [0] scopes Hm, H0, P12:345, -P13 and M0."""
    cs0 = (range(0, 1),)
    spec = _model("[0],Hm,H0,P12:345,-P13,M0")
    assert spec == CacheSpec(
        (
            CacheItem(False, cs0, "Hm", 0),
            CacheItem(False, cs0, "H", 0),
            CacheItem(False, cs0, "P", 12, bytes_held=345),
            CacheItem(True, cs0, "P", 13),
            CacheItem(False, cs0, "M", 0),
        )
    )
    assert len(spec) == 5 and list(spec) == list(spec.items)


def test_empty_spec() -> None:
    """An empty field has no items and nothing ignored."""
    assert parse_cache_spec("", allow_subtractive=False) == CacheSpec()
    assert not parse_cache_spec("", allow_subtractive=False)


def test_qualifier_scope() -> None:
    """Items before any qualifier have codestreams None; each qualifier applies until the next."""
    spec = _model("Hm,[2-4],P1,P2,[*],H*,[1;3-5;9],M0")
    assert [i.codestreams for i in spec] == [
        None,
        (range(2, 5),),
        (range(2, 5),),
        "all",
        (range(1, 2), range(3, 6), range(9, 10)),
    ]


def test_qualifier_glued_to_item() -> None:
    """A qualifier may also prefix an item directly, as in '[1]Hm'."""
    assert _model("[1]Hm,P3") == CacheSpec(
        (CacheItem(False, (range(1, 2),), "Hm", 0), CacheItem(False, (range(1, 2),), "P", 3))
    )


@pytest.mark.parametrize(
    ("text", "item"),
    [
        ("Hm", CacheItem(False, None, "Hm", 0)),
        ("Hm:120", CacheItem(False, None, "Hm", 0, bytes_held=120)),
        ("H7", CacheItem(False, None, "H", 7)),
        ("H*", CacheItem(False, None, "H", None)),
        ("P0", CacheItem(False, None, "P", 0)),
        ("P*:L3", CacheItem(False, None, "P", None, layers_held=3)),
        ("P123456789012:L0", CacheItem(False, None, "P", 123456789012, layers_held=0)),
        ("P5:0", CacheItem(False, None, "P", 5, bytes_held=0)),
        ("M4", CacheItem(False, None, "M", 4)),
        ("M*", CacheItem(False, None, "M", None)),
        ("T2:99", CacheItem(False, None, "T", 2, bytes_held=99)),
        ("T*", CacheItem(False, None, "T", None)),
        ("-H3", CacheItem(True, None, "H", 3)),
    ],
)
def test_explicit_descriptors(text: str, item: CacheItem) -> None:
    """Every explicit form, with wildcard ids and byte or layer qualifiers."""
    assert _model(text) == CacheSpec((item,))


@pytest.mark.parametrize(
    ("text", "implicit", "layers", "nbytes"),
    [
        ("t0", ImplicitSpec(tiles=range(0, 1)), None, None),
        ("c0-2", ImplicitSpec(components=range(0, 3)), None, None),
        ("r3", ImplicitSpec(resolutions=range(3, 4)), None, None),
        ("p4-9", ImplicitSpec(precincts=range(4, 10)), None, None),
        (
            "t0c0-2r0-3p1",
            ImplicitSpec(range(0, 1), range(0, 3), range(0, 4), range(1, 2)),
            None,
            None,
        ),
        ("t1p2:L4", ImplicitSpec(tiles=range(1, 2), precincts=range(2, 3)), 4, None),
        ("c1r0:10", ImplicitSpec(components=range(1, 2), resolutions=range(0, 1)), None, 10),
    ],
)
def test_implicit_descriptors(
    text: str, implicit: ImplicitSpec, layers: int | None, nbytes: int | None
) -> None:
    """Implicit t/c/r/p forms in order, absent parts meaning 'all', with qualifiers."""
    [item] = _model(text)
    assert item == CacheItem(False, None, "implicit", None, implicit, nbytes, layers)


def test_subtractive_only_in_model() -> None:
    """'-' is accepted with allow_subtractive and a 400 without it (need=)."""
    assert [i.subtractive for i in _model("-Hm,P1,-t0r1")] == [True, False, True]
    assert parse_cache_spec("P1,t0", allow_subtractive=False).items[0].subtractive is False
    assert _status("P1,-P2", allow_subtractive=False) == 400
    assert _status("-Ht3", allow_subtractive=False) == 400


@pytest.mark.parametrize(
    "unknown",
    ["Ht3", "Hp5", "P0-3", "Hm:L2", "H3:L1", "P3:*", "P3:L*", "P3:", "t*", "c0t0", "X9", "Hm5", "-", "P", "t0-"],
)
def test_unknown_forms_skipped_and_reported(unknown: str) -> None:
    """Forms outside the grammar (OpenHTJ2K's Ht/Hp, id ranges, wildcard qualifiers...) are ignored."""
    spec = _model(f"Hm,{unknown},P1")
    assert [i.kind for i in spec] == ["Hm", "P"]
    assert spec.ignored == (unknown,)


def test_ignored_report_is_truncated() -> None:
    """Ignored elements are cut to 64 characters so logs stay bounded."""
    assert _model("Z" * 1000).ignored == ("Z" * 64,)


@pytest.mark.parametrize(
    "text",
    [
        ",",
        "Hm,",
        ",Hm",
        "Hm,,P1",
        "[",
        "[0",
        "[]",
        "[x],Hm",
        "[3-1],Hm",
        "[0;],Hm",
        "[-1]",
        "[0:2]",
        f"[{2**32 + 1}]",
        "P" + "9" * 25,
        f"P{2**63}",
        f"P1:{2**63}",
        "P1:L65536",
        "t5-2",
        "c" + "1" * 30,
        "p1-" + "9" * 5000,
    ],
)
def test_malformed_is_400(text: str) -> None:
    """Empty items, bad qualifiers, descending ranges and out-of-bound numbers are 400s."""
    assert _status(text) == 400


def test_item_count_bounded() -> None:
    """At most MAX_ITEMS elements are accepted."""
    assert len(_model(",".join(["P1"] * MAX_ITEMS))) == MAX_ITEMS
    assert _status(",".join(["P1"] * (MAX_ITEMS + 1))) == 400


# ---------------------------------------------------------------- round trip and fuzzing

_SMALL = st.integers(0, 50) | st.integers(0, 2**32)
_RANGES = st.builds(lambda a, n: range(a, a + n + 1), st.integers(0, 2**31), st.integers(0, 5))


def _render_range(r: range) -> str:
    return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


@st.composite
def _elements(draw: st.DrawFn) -> tuple[str | None, Codestreams, CacheItem]:
    """An optional qualifier (text and value) and an item with codestreams left None."""
    qualifier: str | None = None
    codestreams: Codestreams = None
    if draw(st.booleans()):
        if draw(st.booleans()):
            qualifier, codestreams = "[*]", "all"
        else:
            ranges = tuple(draw(st.lists(_RANGES, min_size=1, max_size=3)))
            qualifier = "[" + ";".join(_render_range(r) for r in ranges) + "]"
            codestreams = ranges
    kind: Kind = draw(st.sampled_from(["Hm", "H", "P", "M", "T", "implicit"]))
    implicit = None
    index: int | None = 0
    if kind == "implicit":
        parts = draw(st.lists(st.none() | _RANGES, min_size=4, max_size=4).filter(any))
        implicit = ImplicitSpec(*parts)
        index = None
    elif kind != "Hm":
        index = draw(st.none() | _SMALL | st.integers(0, 2**63 - 1))
    layers = nbytes = None
    qualifier_kind = draw(st.sampled_from(["none", "bytes", "layers"]))
    if qualifier_kind == "bytes":
        nbytes = draw(_SMALL)
    elif qualifier_kind == "layers" and kind in ("P", "implicit"):
        layers = draw(st.integers(0, 65535))
    item = CacheItem(draw(st.booleans()), None, kind, index, implicit, nbytes, layers)
    return qualifier, codestreams, item


def _render(item: CacheItem) -> str:
    out = "-" if item.subtractive else ""
    if item.kind == "Hm":
        out += "Hm"
    elif item.implicit is not None:
        spec = item.implicit
        for letter, r in zip("tcrp", (spec.tiles, spec.components, spec.resolutions, spec.precincts)):
            if r is not None:
                out += letter + _render_range(r)
    else:
        out += item.kind + ("*" if item.index is None else str(item.index))
    if item.bytes_held is not None:
        out += f":{item.bytes_held}"
    if item.layers_held is not None:
        out += f":L{item.layers_held}"
    return out


@given(st.lists(_elements(), max_size=12))
def test_render_parse_round_trip(elements: list[tuple[str | None, Codestreams, CacheItem]]) -> None:
    """Any well-formed descriptor list parses back to the values it was rendered from."""
    texts: list[str] = []
    expected: list[CacheItem] = []
    current: Codestreams = None
    for qualifier, codestreams, item in elements:
        if qualifier is not None:
            texts.append(qualifier)
            current = codestreams
        texts.append(_render(item))
        expected.append(attrs.evolve(item, codestreams=current))
    assert _model(",".join(texts)) == CacheSpec(tuple(expected))


@given(st.text(max_size=200), st.booleans())
def test_fuzz_arbitrary_text(text: str, allow: bool) -> None:
    """Arbitrary text parses or raises JpipRequestError(400); nothing else escapes."""
    try:
        parse_cache_spec(text, allow_subtractive=allow)
    except JpipRequestError as e:
        assert e.status == 400


@given(st.text("0123456789,-:*;[]HmPMTtcrpLx", max_size=80), st.booleans())
def test_fuzz_grammar_alphabet(text: str, allow: bool) -> None:
    """Text from the grammar's own alphabet reaches deep paths and still only raises 400s."""
    try:
        spec = parse_cache_spec(text, allow_subtractive=allow)
    except JpipRequestError as e:
        assert e.status == 400
    else:
        assert len(spec.items) + len(spec.ignored) <= text.count(",") + 1
