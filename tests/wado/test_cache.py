"""The WADO answer cache: bounded by bytes, least recently used out first."""

from __future__ import annotations

import pytest

from imageshare.wado.cache import ResponseCache


def test_lru_within_the_byte_budget() -> None:
    """Entries past the budget leave oldest-used first; a body over a quarter is not kept."""
    cache = ResponseCache(400)
    for name in "abcd":
        cache.put(name, "image/png", bytes(100))
    assert cache.size == 400 and cache.get("a") == ("image/png", bytes(100))
    cache.put("e", "image/jpeg", bytes(100))  # "b" is now the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.size == 400
    cache.put("huge", "application/dicom", bytes(101))
    assert cache.get("huge") is None and len(cache) == 4
    cache.put("a", "image/png", bytes(50))  # replacing counts the new size only
    assert cache.size == 350


def test_zero_budget_keeps_nothing_and_negative_is_refused() -> None:
    """A zero budget keeps nothing; a negative one is a programming error."""
    cache = ResponseCache(0)
    cache.put("a", "image/png", b"x")
    assert cache.get("a") is None
    with pytest.raises(ValueError):
        ResponseCache(-1)
