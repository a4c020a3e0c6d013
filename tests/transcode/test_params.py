"""Tests for :mod:`imageshare.transcode.params`."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageshare.transcode.params import EncodeParams, resolutions_for


def test_defaults_are_the_streaming_profile() -> None:
    """The defaults are lossless 5/3, five layers ending lossless, 128 precincts,
    64x64 code-blocks, at most 8 resolutions down to 64 px, one encoder thread."""
    p = EncodeParams()
    assert p.lossless is True
    assert p.layer_rates == (80.0, 40.0, 20.0, 10.0, 1.0)
    assert p.precinct == 128
    assert p.codeblock == (64, 64)
    assert p.max_resolutions == 8
    assert p.smallest == 64
    assert p.threads == 1
    assert p.last_layer_lossless


def test_params_are_frozen_and_hashable() -> None:
    """EncodeParams is immutable (safe to share between worker threads) and hashable."""
    p = EncodeParams()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p.threads = 4  # type: ignore[misc]
    assert hash(p) == hash(EncodeParams())


def test_sequences_are_normalised_to_tuples() -> None:
    """Lists given for layer_rates/codeblock become tuples of the right types."""
    p = EncodeParams(layer_rates=[50, 20, 0], codeblock=[32, 32])
    assert p.layer_rates == (50.0, 20.0, 0.0)
    assert p.codeblock == (32, 32)


@pytest.mark.parametrize(
    "rates, message",
    [
        ((20.0, 1.0), "at least 3"),
        ((40.0, 40.0, 1.0), "strictly decreasing"),
        ((10.0, 20.0, 1.0), "strictly decreasing"),
        ((40.0, 1.0, 1.0), "only the last"),
        ((40.0, 0.5, 0.0), "only the last"),
        ((40.0, 20.0, 10.0), "must be 0 or 1"),
        ((40.0, 20.0, float("nan")), "finite"),
        (tuple(float(200 - i) for i in range(101)), "at most 100"),
    ],
)
def test_invalid_layer_rates_are_rejected(rates: tuple[float, ...], message: str) -> None:
    """Rates must be >= 3 layers, strictly decreasing, > 1 except a final 0/1,
    and the last layer must be lossless when lossless=True."""
    with pytest.raises(ValueError, match=message):
        EncodeParams(layer_rates=rates)


def test_lossy_params_accept_a_lossy_last_layer() -> None:
    """With lossless=False the last layer may be a ratio (below the previous one) or 0/1."""
    assert EncodeParams(lossless=False, layer_rates=(80, 40, 20)).layer_rates[-1] == 20.0
    assert not EncodeParams(lossless=False, layer_rates=(80, 40, 20)).last_layer_lossless
    assert EncodeParams(lossless=False, layer_rates=(80, 40, 0)).last_layer_lossless
    with pytest.raises(ValueError, match="ratio below"):
        EncodeParams(lossless=False, layer_rates=(80, 40, 40))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precinct": 100}, "precinct"),
        ({"precinct": 1}, "precinct"),
        ({"precinct": 65536}, "precinct"),
        ({"codeblock": (128, 64)}, "codeblock"),
        ({"codeblock": (2, 64)}, "codeblock"),
        ({"codeblock": (48, 64)}, "codeblock"),
        ({"max_resolutions": 0}, "max_resolutions"),
        ({"max_resolutions": 33}, "max_resolutions"),
        ({"smallest": 0}, "smallest"),
        ({"threads": 0}, "threads"),
    ],
)
def test_invalid_geometry_is_rejected(kwargs: dict[str, object], message: str) -> None:
    """Precinct/code-block sizes must be legal JPEG 2000 powers of two; resolutions
    1..32 (OpenJPEG's limit), smallest and threads at least 1."""
    with pytest.raises(ValueError, match=message):
        EncodeParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (1, 1, 1),
        (64, 64, 1),
        (65, 64, 2),
        (128, 128, 2),
        (512, 512, 4),
        (513, 512, 5),
        (3000, 2000, 7),
        (20000, 20000, 8),  # capped by max_resolutions
        (10000, 3, 2),  # capped by OpenJPEG: 2**(n-1) <= min side
        (4096, 1, 1),
    ],
)
def test_resolutions_for_examples(width: int, height: int, expected: int) -> None:
    """resolutions_for gives the fewest levels reaching <= 64 px, within the caps."""
    assert resolutions_for(width, height, EncodeParams()) == expected


def test_resolutions_for_rejects_empty_images() -> None:
    """A zero or negative side is an error, not 1 resolution."""
    with pytest.raises(ValueError):
        resolutions_for(0, 10, EncodeParams())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 70000),
    height=st.integers(1, 70000),
    smallest=st.integers(1, 300),
    max_res=st.integers(1, 32),
)
def test_resolutions_for_properties(width: int, height: int, smallest: int, max_res: int) -> None:
    """The result is within [1, max_resolutions], accepted by OpenJPEG
    (2**(n-1) <= both sides), reaches ceil(size/2**(n-1)) <= smallest unless a cap
    stopped it, and is minimal."""
    params = EncodeParams(smallest=smallest, max_resolutions=max_res)
    n = resolutions_for(width, height, params)

    def top(levels: int) -> int:
        return -(-max(width, height) // 2 ** (levels - 1))

    assert 1 <= n <= max_res
    assert 2 ** (n - 1) <= min(width, height)
    capped = n == max_res or 2**n > min(width, height)
    assert top(n) <= smallest or capped
    assert n == 1 or top(n - 1) > smallest
