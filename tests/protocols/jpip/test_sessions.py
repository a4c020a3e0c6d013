"""JPIP sessions and channels: creation, limits, cclose, idle expiry."""

from __future__ import annotations

import pytest

from imageshare.protocols.jpip.sessions import SessionError, SessionLimit, SessionRegistry, UnknownChannel


def registry(**kw: object) -> SessionRegistry[dict[str, int]]:
    return SessionRegistry(idle_timeout=kw.get("idle", 60.0), max_sessions=kw.get("sessions", 3),  # type: ignore[arg-type]
                           max_channels=kw.get("channels", 2))  # type: ignore[arg-type]


def test_channels_share_the_session_model() -> None:
    """A second channel of a session sees the same model object; cids are unguessable and typed."""
    r = registry()
    first = r.open("target", {"bins": 1}, "http", now=0)
    second = r.add_channel(first.cid, "http-tcp", now=1)
    assert first.session is second.session
    assert first.cid.startswith("JPH_") and second.cid.startswith("JPHT")
    assert len(first.cid) == 36 and first.cid != second.cid
    assert r.channel(second.cid, now=2).session.model == {"bins": 1}


def test_limits() -> None:
    """Sessions and channels per session are capped with 503 errors."""
    r = registry(sessions=2, channels=2)
    a = r.open("t", {}, "http", now=0)
    r.open("t", {}, "http", now=0)
    with pytest.raises(SessionLimit) as info:
        r.open("t", {}, "http", now=0)
    assert info.value.status == 503
    r.add_channel(a.cid, "http", now=0)
    with pytest.raises(SessionLimit):
        r.add_channel(a.cid, "http", now=0)


def test_idle_expiry_is_driven_by_now() -> None:
    """A session idle for longer than the timeout is gone (404), and frees its slot."""
    r = registry(idle=10, sessions=1)
    a = r.open("t", {}, "http", now=0)
    r.channel(a.cid, now=9)  # touching keeps it alive
    r.channel(a.cid, now=18)
    with pytest.raises(UnknownChannel) as info:
        r.channel(a.cid, now=29)
    assert info.value.status == 404
    r.open("t", {}, "http", now=29)  # the slot is free again
    assert len(r) == 1
    assert len(r.expire(now=100)) == 1 and len(r) == 0


def test_cclose() -> None:
    """cclose closes listed channels or all (*); the session ends with its last channel."""
    r = registry()
    a = r.open("t", {}, "http", now=0)
    b = r.add_channel(a.cid, "http", now=0)
    assert r.close(None, [b.cid], now=1) == [b.cid]
    with pytest.raises(UnknownChannel):
        r.channel(b.cid, now=1)
    r.channel(a.cid, now=1)
    c = r.add_channel(a.cid, "http", now=1)
    assert sorted(r.close(a.cid, ["*"], now=2)) == sorted([a.cid, c.cid])
    assert len(r) == 0
    with pytest.raises(SessionError):
        r.close(None, ["*"], now=2)
    other = r.open("t", {}, "http", now=3)
    third = r.open("t", {}, "http", now=3)
    with pytest.raises(SessionError):
        r.close(None, [other.cid, third.cid], now=3)


def test_unknown_cid() -> None:
    """A cid that never existed gives 404, whatever it looks like."""
    r = registry()
    for cid in ["", "JPH_00", "x" * 10000]:
        with pytest.raises(UnknownChannel):
            r.channel(cid, now=0)


def test_every_ending_channel_is_reported_once() -> None:
    """cclose, a dropped session and expiry all report the channels that end; find()
    looks a channel up without keeping its session alive."""
    ended: list[str] = []
    reg: SessionRegistry[object] = SessionRegistry(
        idle_timeout=10, max_sessions=10, on_close=lambda c: ended.append(c.cid)
    )
    a = reg.open("t", object(), "http", 0)
    b = reg.add_channel(a.cid, "http-tcp", 0)
    assert reg.find(b.cid) is b and reg.find("nope") is None
    reg.close(a.cid, [b.cid], 1)
    assert ended == [b.cid] and reg.find(b.cid) is None and reg.find(a.cid) is a
    c = reg.add_channel(a.cid, "http-tcp", 1)
    reg.close(a.cid, ["*"], 2)
    assert sorted(ended[1:]) == sorted([a.cid, c.cid]) and len(reg) == 0
    d = reg.open("t", object(), "http", 3)
    assert reg.find(d.cid) is d
    reg.find(d.cid)  # does not touch: the session still expires from its last request
    reg.expire(13.5)
    assert ended[-1] == d.cid and reg.find(d.cid) is None


def test_sessions_are_capped_per_client() -> None:
    """A client at its cap gets 503 with the seconds until its least recently used session
    would expire; other clients still open sessions, and the global cap still holds."""
    r: SessionRegistry[object] = SessionRegistry(idle_timeout=60, max_sessions=5, max_sessions_per_client=2)
    r.open("t", object(), "http", 0, client="10.0.0.1")
    r.open("t", object(), "http", 10, client="10.0.0.1")
    with pytest.raises(SessionLimit) as info:
        r.open("t", object(), "http", 15, client="10.0.0.1")
    assert info.value.status == 503 and info.value.retry_after == 45  # the first one, opened at 0
    assert "client" in info.value.reason
    with pytest.raises(SessionLimit):
        r.admit("10.0.0.1", 15)  # the check alone refuses the same way
    assert r.count("10.0.0.1") == 2 and len(r) == 2
    r.admit("10.0.0.2", 15)
    r.open("t", object(), "http", 15, client="10.0.0.2")
    r.open("t", object(), "http", 15, client="10.0.0.3")
    r.open("t", object(), "http", 15, client="10.0.0.3")
    with pytest.raises(SessionLimit) as info:
        r.open("t", object(), "http", 15, client="10.0.0.4")  # 5 sessions: the global cap
    assert "client" not in info.value.reason and info.value.retry_after == 45


def test_a_client_at_its_cap_gets_its_idle_slots_back() -> None:
    """At its cap, a client's idle sessions are dropped (and reported closed) before it is
    refused; an active client's sessions are kept."""
    ended: list[str] = []
    r: SessionRegistry[object] = SessionRegistry(idle_timeout=10, max_sessions=100, max_sessions_per_client=2,
                                                 on_close=lambda c: ended.append(c.cid))
    old = r.open("t", object(), "http", 0, client="a")
    r.open("t", object(), "http", 5, client="a")
    busy = r.open("t", object(), "http", 0, client="b")
    fresh = r.open("t", object(), "http", 12, client="a")  # the one opened at 0 is idle: it goes
    assert ended == [old.cid] and r.count("a") == 2
    assert r.find(fresh.cid) is fresh and r.find(busy.cid) is busy  # not swept: another client's


def test_every_teardown_frees_the_client_slot_exactly_once() -> None:
    """cclose of the last channel, cclose=*, an expired lookup, the periodic sweep and a
    second teardown of the same session: each session frees its client's slot once; a
    session with channels left keeps it."""
    r: SessionRegistry[object] = SessionRegistry(idle_timeout=10, max_sessions=100, max_sessions_per_client=3)

    def full() -> list[str]:
        cids = [r.open("t", object(), "http", 0, client="c").cid for _ in range(3 - r.count("c"))]
        with pytest.raises(SessionLimit):
            r.open("t", object(), "http", 0, client="c")
        return cids

    a, b, c = full()
    second = r.add_channel(a, "http-tcp", 0)
    r.close(None, [second.cid], 0)  # the aux channel dropped: its session lives on
    assert r.count("c") == 3
    r.close(None, [a], 0)  # its last channel: the session ends
    assert r.count("c") == 2
    with pytest.raises(UnknownChannel):
        r.close(None, [a], 0)  # twice: nothing more is freed
    r.close(b, ["*"], 0)  # as the session memory limit ends a session
    assert r.count("c") == 1
    full()
    with pytest.raises(UnknownChannel):
        r.channel(c, 11)  # found expired on use
    assert r.count("c") == 2
    assert len(r.expire(11)) == 2 and r.count("c") == 0 and len(r) == 0
    assert r.expire(30) == [] and r.count("c") == 0
    full()  # the cap holds exactly as before: no slot was freed twice
    assert r.count("c") == 3
