"""Connection caps per address and in total."""

from __future__ import annotations

from hypothesis import given, strategies as st

from imageshare.conncaps import ConnectionCaps


def test_per_address_cap_leaves_room_for_others() -> None:
    """One address stops at its cap while another is still admitted."""
    caps = ConnectionCaps(max_total=64, max_per_address=16)
    assert [caps.admit("127.0.0.2") for _ in range(17)] == [None] * 16 + ["per-address"]
    assert caps.admit("127.0.0.1") is None
    assert caps.held("127.0.0.2") == 16 and caps.open == 17


def test_total_cap() -> None:
    """Past the total, every address is refused, until a connection ends."""
    caps = ConnectionCaps(max_total=3, max_per_address=2)
    assert [caps.admit(a) for a in ("a", "a", "a", "b", "c")] == [None, None, "per-address", None, "total"]
    caps.release("a")
    assert caps.admit("c") is None


def test_release_forgets_idle_addresses_and_never_goes_negative() -> None:
    """The table holds only addresses with connections; a release too many changes nothing."""
    caps = ConnectionCaps(max_total=4, max_per_address=4)
    caps.admit("a")
    caps.release("a")
    assert caps.held("a") == 0 and caps.open == 0 and not caps._by_address
    for address in ("a", "never"):
        caps.release(address)
    assert caps.open == 0 and not caps._by_address


@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcd")), max_size=200))
def test_counts_stay_consistent(ops: list[tuple[bool, str]]) -> None:
    """Any sequence of admits and releases keeps both caps and the counts exact."""
    caps = ConnectionCaps(max_total=5, max_per_address=2)
    model: dict[str, int] = {}
    for admit, address in ops:
        if admit:
            if caps.admit(address) is None:
                model[address] = model.get(address, 0) + 1
        else:
            caps.release(address)
            if model.get(address):
                model[address] -= 1
        assert caps.open == sum(model.values()) <= 5
        assert all(caps.held(a) == n <= 2 for a, n in model.items())
