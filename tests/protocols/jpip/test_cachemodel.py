"""Tests of :mod:`imageshare.protocols.jpip.cachemodel`: the cache model and ``model=`` statements."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageshare.codestream.index import CodestreamIndex, build_index, compute_precinct_grid
from imageshare.codestream.markers import SIZ, CodingStyle, ImageComponent
from imageshare.protocols.jpip.cachemodel import (
    MAIN_HEADER,
    METADATA,
    PRECINCT,
    TILE,
    TILE_HEADER,
    CacheModel,
    CacheSpecTooLarge,
    apply_spec,
)
from imageshare.protocols.jpip.cachespec import parse_cache_spec
from imageshare.protocols.jpip.plan import TargetBins
from tests.codestream.test_markers import (
    cod_segment,
    coc_segment,
    make_codestream,
    plt_segments,
    qcd_segment,
    segment,
    siz_segment,
    tile_part,
)


def varied_codestream(
    seed: int, width: int = 100, height: int = 80, *, tile: tuple[int, int] | None = None, components: int = 2,
    levels: int = 2, layers: int = 3, precinct: int = 5, progression: int = 2,
) -> tuple[bytes, CodestreamIndex]:  # fmt: skip
    """A synthetic codestream with random packet lengths (1..40 bytes) and random packet bytes.

    Tile-part headers carry a COM segment besides PLT, so tile-header bins are not empty.
    """
    rng = random.Random(seed)
    comps = [(8, False, 1, 1)] * components
    xtsiz, ytsiz = tile if tile is not None else (width, height)
    main = siz_segment(width, height, 0, 0, xtsiz, ytsiz, components=comps)
    main += cod_segment(progression=progression, layers=layers, levels=levels,
                        precincts=[(precinct, precinct)] * (levels + 1))  # fmt: skip
    main += qcd_segment(levels)
    geometry = SIZ(0, width, height, 0, 0, xtsiz, ytsiz, 0, 0, tuple(ImageComponent(*c) for c in comps))
    style = CodingStyle(levels, 4, 4, 0, 1, ((precinct, precinct),) * (levels + 1))
    parts = []
    for t in range(geometry.num_tiles):
        grid = compute_precinct_grid(geometry.tile_bounds(t), geometry.components[0], style)
        count = sum(cols * rows for cols, rows in grid) * layers * components
        lengths = [rng.randint(1, 40) for _ in range(count)]
        body = bytes(rng.randrange(256) for _ in range(sum(lengths)))
        header = segment(0xFF64, b"\x00\x01tile %d" % t) + plt_segments(lengths)
        parts.append(tile_part(t, header, body))
    data = make_codestream(main, parts)
    return data, build_index(data)


DATA, INDEX = varied_codestream(1, tile=(64, 48))
BINS = TargetBins(INDEX)


def apply(text: str, model: CacheModel | None = None, csn: int = 0, **kwargs: object) -> CacheModel:
    """Parse a model= value with the real parser and apply it to a (new) model."""
    model = model if model is not None else CacheModel()
    spec = parse_cache_spec(text, allow_subtractive=True)
    apply_spec(model, spec, INDEX, csn, bin_lengths=BINS.length, **kwargs)  # type: ignore[arg-type]
    return model


# --- CacheModel ------------------------------------------------------------------------


def test_add_is_monotonic() -> None:
    """add() only grows what is held; completeness, once recorded, stays."""
    model = CacheModel()
    key = (PRECINCT, 0, 7)
    assert model.held(key) == 0 and not model.is_complete(key) and key not in model
    model.add(key, 10)
    model.add(key, 4)
    assert model.held(key) == 10 and not model.is_complete(key)
    model.add(key, 25, complete=True)
    model.add(key, 3, complete=False)
    assert model.held(key) == 25 and model.is_complete(key)
    assert model.entries == len(model) == 1 and list(model) == [key]
    assert model.complete_count(PRECINCT, 0) == 1 and model.complete_count(PRECINCT, 1) == 0


def test_remove_truncate_and_copy() -> None:
    """remove() forgets a bin; truncate() cuts it (and clears completeness); copies are independent."""
    model = CacheModel()
    model.add((MAIN_HEADER, 0, 0), 100, complete=True)
    model.add((PRECINCT, 0, 1), 50, complete=True)
    other = model.copy()
    model.truncate((PRECINCT, 0, 1), 60)  # holds less than 60 already: nothing changes
    assert model.is_complete((PRECINCT, 0, 1))
    model.truncate((PRECINCT, 0, 1), 20)
    assert model.held((PRECINCT, 0, 1)) == 20 and not model.is_complete((PRECINCT, 0, 1))
    model.truncate((PRECINCT, 0, 1), 0)
    assert (PRECINCT, 0, 1) not in model
    model.remove((MAIN_HEADER, 0, 0))
    model.remove((MAIN_HEADER, 0, 0))
    assert model.entries == 0 and model.complete_count(MAIN_HEADER, 0) == 0
    assert other.held((PRECINCT, 0, 1)) == 50 and other.is_complete((MAIN_HEADER, 0, 0))
    assert other.complete_count(PRECINCT, 0) == 1


def test_bad_arguments() -> None:
    """Negative byte counts and malformed keys are programming errors."""
    model = CacheModel()
    with pytest.raises(ValueError):
        model.add((PRECINCT, 0, 1), -1)
    with pytest.raises(ValueError):
        model.add((PRECINCT, -1, 1), 1)
    with pytest.raises(ValueError):
        model.truncate((PRECINCT, 0, 1), -5)


def test_memory_estimate_grows_with_entries() -> None:
    """approx_bytes() is a per-entry estimate in the right order of magnitude."""
    model = CacheModel()
    empty = model.approx_bytes()
    for i in range(10_000):
        model.add((PRECINCT, 0, 100_000 + i), 1000 + i, complete=i % 2 == 0)
    grown = model.approx_bytes() - empty
    assert 100 * 10_000 <= grown <= 400 * 10_000


@given(st.lists(st.tuples(st.sampled_from(["add", "truncate", "remove"]), st.integers(0, 3), st.integers(0, 50),
                          st.booleans()), max_size=60))  # fmt: skip
def test_model_matches_a_reference(ops: list[tuple[str, int, int, bool]]) -> None:
    """Any sequence of add/truncate/remove agrees with a plain reference dict, counts included."""
    model = CacheModel()
    ref: dict[tuple[int, int, int], tuple[int, bool]] = {}
    for op, bin_id, n, complete in ops:
        key = (PRECINCT, 0, bin_id)
        held, done = ref.get(key, (0, False))
        if op == "add":
            model.add(key, n, complete)
            ref[key] = (max(held, n), done or complete)
        elif op == "truncate":
            model.truncate(key, n)
            if held > n:
                ref[key] = (n, False)
        else:
            model.remove(key)
            ref.pop(key, None)
        ref = {k: v for k, v in ref.items() if v != (0, False)}
    for bin_id in range(4):
        key = (PRECINCT, 0, bin_id)
        assert (model.held(key), model.is_complete(key)) == ref.get(key, (0, False))
    assert model.complete_count(PRECINCT, 0) == sum(done for _, done in ref.values())


# --- apply_spec ------------------------------------------------------------------------


def test_explicit_descriptors_whole_bins() -> None:
    """Hm, H<t>, P<I>, M0 and T<t> without a qualifier mark the whole bin as held and complete."""
    model = apply("Hm,H1,P5,M0,T2")
    for key in [(MAIN_HEADER, 0, 0), (TILE_HEADER, 0, 1), (PRECINCT, 0, 5), (METADATA, 0, 0), (TILE, 0, 2)]:
        assert model.is_complete(key)
        assert model.held(key) == BINS.length(key[0], key[2])
    assert model.entries == 5
    assert BINS.length(METADATA, 0) == 0 and BINS.length(TILE_HEADER, 1) > 0


def test_byte_and_layer_qualifiers() -> None:
    """:n holds the first n bytes; :Ln the first n layers, through the precinct's layer offsets."""
    t, c, r, p = INDEX.precinct_from_bin_id(9)
    offsets = INDEX.layer_offsets(t, c, r, p)
    model = apply("P9:L2,P10:3,H0:2")
    assert model.held((PRECINCT, 0, 9)) == offsets[2] and not model.is_complete((PRECINCT, 0, 9))
    assert model.held((PRECINCT, 0, 10)) == 3
    assert model.held((TILE_HEADER, 0, 0)) == 2 and not model.is_complete((TILE_HEADER, 0, 0))
    model = apply("P9:L3,P10:100000")
    assert model.is_complete((PRECINCT, 0, 9)) and model.held((PRECINCT, 0, 9)) == offsets[3]
    assert model.is_complete((PRECINCT, 0, 10)) and model.held((PRECINCT, 0, 10)) == BINS.length(PRECINCT, 10)


def test_wildcards_cover_every_bin_of_their_class() -> None:
    """H*, P*, T* and M* expand over every bin of their class in the codestream."""
    model = apply("H*,P*:L1,M*")
    tiles = INDEX.num_tiles
    assert all(model.is_complete((TILE_HEADER, 0, t)) for t in range(tiles))
    precinct_keys = [k for k in BINS.keys(0) if k[0] == PRECINCT]
    assert len(precinct_keys) == BINS.precinct_bins > 50
    for key in precinct_keys:
        assert model.held(key) == INDEX.layer_offsets(*INDEX.precinct_from_bin_id(key[2]))[1]
    assert model.entries == tiles + len(precinct_keys) + 1
    assert apply("T*").entries == tiles


def test_implicit_descriptors() -> None:
    """t/c/r/p ranges name exactly the precincts of those tiles, components, resolutions and indices."""
    model = apply("t1c1r1-2p0-1:L1")
    want = set()
    for r in (1, 2):
        for p in range(min(2, INDEX.precinct_grid(1, 1, r)[0] * INDEX.precinct_grid(1, 1, r)[1])):
            want.add((PRECINCT, 0, INDEX.precinct_bin_id(1, 1, r, p)))
    assert set(model) == want and len(want) >= 3
    everything = apply("t0-99999")
    assert everything.entries == BINS.precinct_bins


def test_subtractive_items() -> None:
    """-X removes a bin; -X:n and -X:Ln cut what is held down to that much."""
    model = apply("Hm,P3,P4,P5,H0")
    offsets = INDEX.layer_offsets(*INDEX.precinct_from_bin_id(4))
    apply("-Hm,-P3:5,-P4:L1,-P5:100000,-H*", model)
    assert (MAIN_HEADER, 0, 0) not in model and (TILE_HEADER, 0, 0) not in model
    assert model.held((PRECINCT, 0, 3)) == 5 and not model.is_complete((PRECINCT, 0, 3))
    assert model.held((PRECINCT, 0, 4)) == offsets[1]
    assert model.is_complete((PRECINCT, 0, 5))  # it holds less than 100000 bytes: no news


def test_codestream_qualifiers() -> None:
    """Items under a codestream qualifier apply only to the codestreams it names."""
    assert apply("[1],Hm,P0").entries == 0
    assert apply("[0-2],Hm").is_complete((MAIN_HEADER, 0, 0))
    assert apply("[3;5],Hm", csn=5).is_complete((MAIN_HEADER, 5, 0))
    assert apply("[*],Hm", csn=7).is_complete((MAIN_HEADER, 7, 0))
    assert apply("Hm", csn=4).is_complete((MAIN_HEADER, 4, 0))


def test_bins_that_do_not_exist_are_ignored() -> None:
    """Ids the codestream does not have (precinct, tile, metadata-bin) leave the model alone."""
    model = apply(f"P{10**9},H{INDEX.num_tiles},M3,T999,t5000c9")
    assert model.entries == 0


def test_work_is_bounded() -> None:
    """A statement touching more bins than allowed is refused before anything is applied; huge
    implicit ranges over a small codestream only visit what exists."""
    model = apply("Hm")
    with pytest.raises(CacheSpecTooLarge):
        apply("P0,P*", model, max_bins=BINS.precinct_bins)
    assert model.entries == 1
    start = time.perf_counter()
    model = apply("t0-4294967295c0-4294967295r0-4294967295p0-4294967295:L1")
    assert model.entries == BINS.precinct_bins
    assert time.perf_counter() - start < 1.0


def test_wildcards_over_a_large_image() -> None:
    """A wildcard over a 4096x4096 image with 16 tiles, 3 components and 32x32 precincts (~100k
    precinct bins) is applied within a bound and in reasonable time."""
    data, index = varied_codestream(2, 4096, 4096, tile=(1024, 1024), components=3, levels=5, layers=1)
    bins = TargetBins(index)
    model = CacheModel()
    start = time.perf_counter()
    touched = apply_spec(model, parse_cache_spec("P*", allow_subtractive=True), index, 0, bin_lengths=bins.length)
    elapsed = time.perf_counter() - start
    assert touched == bins.precinct_bins == model.entries > 50_000
    assert elapsed < 5.0
    with pytest.raises(CacheSpecTooLarge):
        apply_spec(CacheModel(), parse_cache_spec("P*", allow_subtractive=True), index, 0,
                   bin_lengths=bins.length, max_bins=10_000)  # fmt: skip


def test_tile_components_with_different_levels() -> None:
    """Implicit resolutions are clipped per tile-component (COC gives component 1 fewer levels)."""
    main = siz_segment(64, 64, components=[(8, False, 1, 1)] * 2)
    main += cod_segment(levels=2, precincts=[(4, 4)] * 3) + coc_segment(1, 2, 1, precincts=[(4, 4)] * 2)
    main += qcd_segment(2)
    count = (1 + 4 + 16) + (4 + 16)  # component 1: 32x32 then 64x64 samples in 16x16 precincts
    data = make_codestream(main, [tile_part(0, plt_segments([2] * count), bytes(2 * count))])
    index = build_index(data)
    bins = TargetBins(index)
    model = CacheModel()
    apply_spec(model, parse_cache_spec("r2", allow_subtractive=True), index, 0, bin_lengths=bins.length)
    assert model.entries == 16
