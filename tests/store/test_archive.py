"""The archive's durable write, publish and crash recovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageshare.store.archive import Archive

UID = "1.2.826.0.1.3680043.8.498.1"


def test_write_publish_replace(tmp_path: Path) -> None:
    """An incoming file becomes visible only when published, and a new version replaces the old."""
    a = Archive(tmp_path)
    first = a.write_incoming(UID, [b"one", b"-two"])
    assert first.size == 7
    final = a.path(a.relative_path(UID))
    assert not final.exists()
    assert a.publish(first) == a.relative_path(UID)
    assert final.read_bytes() == b"one-two"
    second = a.write_incoming(UID, [b"three"])
    a.publish(second)
    assert final.read_bytes() == b"three"
    assert list(a.incoming.iterdir()) == []


@pytest.mark.parametrize("uid", ["../etc/passwd", "1.2/3", "", "1.2.", "a" * 10, "1." * 40 + "1"])
def test_unsafe_uids_are_refused(tmp_path: Path, uid: str) -> None:
    """Nothing but a well-formed UID is ever used in a file name."""
    a = Archive(tmp_path)
    with pytest.raises(ValueError):
        a.write_incoming(uid, [b"x"])
    with pytest.raises(ValueError):
        a.relative_path(uid)


def test_recovery_rolls_forward_committed_and_removes_the_rest(tmp_path: Path) -> None:
    """After a crash: files the catalog names are published, strays are deleted."""
    a = Archive(tmp_path)
    committed = a.write_incoming(UID, [b"committed"])
    stray = a.write_incoming("1.2.3", [b"never acknowledged"])
    old = a.write_incoming(UID + "9", [b"old"])
    newer = a.write_incoming(UID + "9", [b"newer"])
    (a.incoming / "junk").write_bytes(b"?")
    names = {UID: committed.name, UID + "9": newer.name}
    result = a.recover(names.get)
    assert sorted(result.published) == sorted([UID, UID + "9"])
    assert set(result.removed) == {stray.name, old.name, "junk"}
    assert a.path(a.relative_path(UID)).read_bytes() == b"committed"
    assert a.path(a.relative_path(UID + "9")).read_bytes() == b"newer"
    assert list(a.incoming.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    """An exception while writing removes the partial incoming file."""
    a = Archive(tmp_path)

    def chunks():
        yield b"part"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        a.write_incoming(UID, chunks())
    assert list(a.incoming.iterdir()) == []
