"""The SQLite catalog."""

from __future__ import annotations

import threading
from pathlib import Path

from zope.interface.verify import verifyObject

from imageshare.interfaces import ICatalog
from imageshare.store.catalog import SqliteCatalog
from imageshare.store.records import FrameRecord, InstanceRecord, State


def record(sop: str = "1.2.3.4", study: str = "1.2.3", series: str = "1.2.3.1", **kw: object) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="P1",
        patient_name="Doe^Jane",
        modality="CT",
        **kw,  # type: ignore[arg-type]
    )


def frame(n: int) -> FrameRecord:
    return FrameRecord(n, f"d/{n}.j2c", 10, f"d/{n}.idx", 4, 4, 1, 8, False)


def test_provides_interface(tmp_path: Path) -> None:
    """SqliteCatalog implements ICatalog."""
    c = SqliteCatalog(tmp_path / "c.db")
    assert verifyObject(ICatalog, c)
    c.close()


def test_lifecycle_and_generations(tmp_path: Path) -> None:
    """Receiving, completing and receiving again: generations and stale completions."""
    c = SqliteCatalog(tmp_path / "c.db")
    g1 = c.record_instance(record(), path="objects/x.dcm", size=5, incoming="a.part", calling_aet="PACS")
    assert g1 == 1
    row = c.get_instance("1.2.3.4")
    assert row is not None and row.state is State.PENDING and row.incoming == "a.part"
    assert c.pending(10) == ["1.2.3.4"]
    assert c.complete("1.2.3.4", 1, State.STREAMABLE, "", [frame(1), frame(2)])
    assert c.pending(10) == []
    assert [f.frame_number for f in c.frames("1.2.3.4")] == [1, 2]
    counts = c.counts()
    assert (counts.instances, counts.frames, counts.streamable, counts.transcode_pending) == (1, 2, 1, 0)
    # Received again: new generation, frames dropped, pending again.
    g2 = c.record_instance(record(), path="objects/x.dcm", size=6, incoming="b.part", calling_aet="PACS")
    assert g2 == 2
    assert c.frames("1.2.3.4") == []
    assert c.pending(10) == ["1.2.3.4"]
    # A completion for the old generation is refused.
    assert not c.complete("1.2.3.4", 1, State.STREAMABLE, "", [frame(1)])
    assert c.complete("1.2.3.4", 2, State.FAILED, "broken", [])
    counts = c.counts()
    assert (counts.transcode_failed, counts.frames, counts.studies, counts.series) == (1, 0, 1, 1)
    c.close()


def test_survives_reopen(tmp_path: Path) -> None:
    """Everything committed is there after closing and reopening."""
    c = SqliteCatalog(tmp_path / "c.db")
    c.record_instance(record(), path="p", size=1, incoming="i", calling_aet="")
    c.close()
    c = SqliteCatalog(tmp_path / "c.db")
    assert c.get_instance("1.2.3.4") is not None
    assert c.get_instance("9.9") is None
    c.close()


def test_pending_excludes_and_limits(tmp_path: Path) -> None:
    """pending() skips what the caller already has and honours the limit."""
    c = SqliteCatalog(tmp_path / "c.db")
    for i in range(5):
        c.record_instance(record(sop=f"1.2.3.4.{i}"), path="p", size=1, incoming="i", calling_aet="")
    assert c.pending(2) == ["1.2.3.4.0", "1.2.3.4.1"]
    assert c.pending(2, exclude={"1.2.3.4.0"}) == ["1.2.3.4.1", "1.2.3.4.2"]
    c.close()


def test_concurrent_writers(tmp_path: Path) -> None:
    """Writers in several threads all commit (they queue on SQLite's lock)."""
    c = SqliteCatalog(tmp_path / "c.db")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                c.record_instance(
                    record(sop=f"1.2.{t}.{i}", study=f"1.2.{t}", series=f"1.2.{t}.0"),
                    path="p", size=1, incoming="i", calling_aet="",
                )
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert c.counts().instances == 100
    assert c.counts().studies == 4
    c.close()


def test_schema_1_catalog_is_migrated(tmp_path: Path) -> None:
    """A catalog written before instance sources (schema 1) opens: every row gets its
    calling AE as source and no certificate; the same_source rule then applies to it."""
    import sqlite3

    import pytest

    from imageshare.store import catalog as catalog_module

    path = tmp_path / "old.sqlite3"
    c = SqliteCatalog(path)
    c.record_instance(record(), path="objects/x.dcm", size=5, incoming="a.part", calling_aet="PACS")
    c.close()
    with sqlite3.connect(path) as db:  # back to schema 1, as an older ImageShare left it
        db.execute("ALTER TABLE instances DROP COLUMN source_aet")
        db.execute("ALTER TABLE instances DROP COLUMN source_cert")
        db.execute("PRAGMA user_version = 1")
    c = SqliteCatalog(path)
    try:
        assert c.get_instance("1.2.3.4") is not None
        with c.reader() as conn:
            assert conn.execute("SELECT source_aet, source_cert FROM instances").fetchall() == [("PACS", "")]
            assert conn.execute("PRAGMA user_version").fetchone()[0] == catalog_module.SCHEMA_VERSION
        with pytest.raises(catalog_module.ReplaceRefused):
            c.record_instance(record(), path="p", size=1, incoming="b", calling_aet="OTHER", replace="same_source")
        assert c.record_instance(record(), path="p", size=1, incoming="b", calling_aet="PACS",
                                 replace="same_source") == 2
    finally:
        c.close()
