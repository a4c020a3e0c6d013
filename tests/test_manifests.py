"""The manifest service on a Clock: quiet period, rebuilds, removal, failures, recovery.

A real SQLite catalog, archive and ingestor in a temporary folder; the catalog pool is a
synchronous fake, and time is a ``task.Clock``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger

from imageshare.dicom.manifest import KOS_SOP_CLASS
from imageshare.manifests import LOCATION_UID_SETTING, ManifestBuilder, ManifestService
from imageshare.store.archive import Archive
from imageshare.store.catalog import SqliteCatalog
from imageshare.store.ingest import OUT_OF_RESOURCES, IngestError, Ingestor, Stored
from imageshare.store.records import InstanceRecord, State
from tests.helpers import make_instances, wire_dataset

STABLE = 60.0


class SyncPool:
    """Runs the job at once, on the calling thread."""

    def run(self, f: Any, *args: Any) -> Any:
        return maybeDeferred(f, *args)


class Env:
    def __init__(self, tmp_path: Path, *, location: str = "1.2.826.0.1.3680043.10.1489.7", enabled: bool = True) -> None:
        self.tmp_path = tmp_path
        self.catalog = SqliteCatalog(tmp_path / "catalog.sqlite3")
        self.archive = Archive(tmp_path / "archive")
        self.ingestor = Ingestor(self.archive, self.catalog)
        self.clock = Clock()
        self.builder = ManifestBuilder(
            self.catalog, self.archive, self.ingestor, retrieve_ae_title="IMAGESHARE",
            retrieve_url="http://127.0.0.1:8080/wado",
        )
        self.stored: list[Stored] = []
        self.events: list[dict[str, Any]] = []
        self.service = ManifestService(
            self.builder, self.catalog, SyncPool(), self.clock, stable_after=STABLE, location_uid=location,
            enabled=enabled, on_stored=self.stored.append,
        )
        self.service.log = Logger(namespace="test", observer=self.events.append)
        self.made = 0

    def receive(self, count: int, *, seed: str = "study") -> list[str]:
        """Store ``count`` more CT instances of one study, as the DICOM listener would."""
        paths = make_instances(self.tmp_path / f"in{self.made}", self.made + count, seed=seed)[self.made:]
        self.made += count
        uids = []
        for path in paths:
            data, ts, cls, uid = wire_dataset(path)
            self.ingestor.store(data, transfer_syntax=ts, sop_class_uid=cls, sop_instance_uid=uid, calling_aet="CT1")
            uids.append(uid)
        return uids

    @property
    def study(self) -> str:
        return str(dcmread(self.tmp_path / "in0" / "0000.dcm", stop_before_pixels=True).StudyInstanceUID)

    def current(self) -> str | None:
        sources = self.catalog.manifest_sources(self.study)
        return sources.current_uid if sources else None

    def manifest_file(self, uid: str) -> Path:
        row = self.catalog.get_instance(uid)
        assert row is not None
        return self.archive.path(row.path)

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass in poll-sized steps."""
        step = self.service.interval
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    if e.service.running:
        e.service.stopService()
    e.catalog.close()


def listed(path: Path) -> set[str]:
    ds = dcmread(path)
    return {r.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence}


def test_built_once_the_study_is_quiet(env: Env) -> None:
    """No manifest before stable_after seconds of quiet; then one KOS, stored as an instance
    of the study (sent to the transcoder) listing every instance."""
    uids = env.receive(3)
    env.service.startService()
    assert env.service.interval == 10
    env.wait(STABLE - 10)
    assert env.current() is None and env.stored == []
    env.wait(10)
    kos = env.current()
    assert kos is not None
    row = env.catalog.get_instance(kos)
    assert row is not None and row.sop_class_uid == KOS_SOP_CLASS and row.study_instance_uid == env.study
    assert row.state is State.PENDING  # the transcoder classifies it (not_image) when told
    assert [s.record.sop_instance_uid for s in env.stored] == [kos]
    assert listed(env.manifest_file(kos)) == set(uids)
    ds = dcmread(env.manifest_file(kos))
    assert ds.file_meta.SourceApplicationEntityTitle == "IMAGESHARE"
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert (series.RetrieveAETitle, series.RetrieveLocationUID) == ("IMAGESHARE", "1.2.826.0.1.3680043.10.1489.7")
    assert env.service.count == 1 and env.catalog.manifest_count() == 1
    built = [e for e in env.events if e.get("sop_instance_uid") == kos]
    assert built and built[0]["study_instance_uid"] == env.study and built[0]["instances"] == 3


def test_arrivals_restart_the_quiet_period(env: Env) -> None:
    """An instance received during the quiet period pushes the build back by stable_after."""
    env.receive(2)
    env.service.startService()
    env.wait(40)
    env.receive(1)
    env.wait(40)
    assert env.current() is None
    env.wait(30)
    assert env.current() is not None


def test_rebuilt_with_a_new_uid_and_the_old_one_removed(env: Env) -> None:
    """A later arrival rebuilds after a new quiet period: new SOP Instance UID, same series,
    the superseded manifest gone from the catalog and the archive."""
    first = env.receive(3)
    env.service.startService()
    env.wait(STABLE)
    old = env.current()
    assert old is not None
    old_file = env.manifest_file(old)
    old_series = dcmread(old_file).SeriesInstanceUID
    later = env.receive(1)
    env.wait(STABLE - 10)
    assert env.current() == old
    env.wait(20)  # the arrival is noticed at the next poll: quiet is judged from then
    new = env.current()
    assert new is not None and new != old
    assert env.catalog.get_instance(old) is None and not old_file.exists()
    assert listed(env.manifest_file(new)) == set(first + later)  # never itself nor the old one
    assert dcmread(env.manifest_file(new)).SeriesInstanceUID == old_series
    assert env.catalog.stale_manifests() == []
    assert env.catalog.manifest_count() == 1
    assert env.catalog.counts().instances == 4 + 1


def test_own_manifest_is_no_change(env: Env) -> None:
    """Storing the manifest moves the study's updated_at, yet nothing is rebuilt afterwards."""
    env.receive(2)
    env.service.startService()
    env.wait(STABLE * 10)
    assert len(env.stored) == 1 and env.service.built == 1
    assert env.catalog.manifest_candidates(10) == []


def test_resent_instance_rebuilds(env: Env) -> None:
    """Receiving an instance again (it may carry corrected attributes) makes the study due."""
    env.receive(2)
    env.service.startService()
    env.wait(STABLE)
    old = env.current()
    path = env.tmp_path / "in0" / "0000.dcm"
    data, ts, cls, uid = wire_dataset(path)
    env.ingestor.store(data, transfer_syntax=ts, sop_class_uid=cls, sop_instance_uid=uid, calling_aet="CT1")
    env.wait(STABLE + 10)
    assert env.current() not in (None, old)


def test_failed_build_is_retried(env: Env) -> None:
    """A store that fails is logged as an error (no traceback) and retried at the next poll;
    what the interrupted build left is swept."""
    env.receive(2)
    real_store = env.ingestor.store
    calls = []

    def failing_store(*args: Any, **kw: Any) -> Stored:
        calls.append(1)
        if len(calls) == 1:
            raise IngestError(OUT_OF_RESOURCES, "cannot write: No space left on device")
        return real_store(*args, **kw)

    env.ingestor.store = failing_store  # type: ignore[method-assign]
    env.service.startService()
    env.wait(STABLE)
    assert env.current() is None and env.service.failed == 1
    errors = [e for e in env.events if e.get("log_level").name == "error"]
    assert errors and errors[0]["study_instance_uid"] == env.study and "log_failure" not in errors[0]
    assert len(env.catalog.stale_manifests()) == 1  # the note taken before storing
    env.wait(10)
    assert env.current() is not None and env.catalog.stale_manifests() == []


def test_a_bug_is_logged_with_its_traceback_and_the_loop_goes_on(env: Env) -> None:
    """An unexpected exception is a log.failure; the next poll runs normally."""
    env.receive(1)
    real = env.builder.build
    calls = []

    def broken(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return real(*args)

    env.builder.build = broken  # type: ignore[method-assign]
    env.service.startService()
    env.wait(STABLE)
    assert any("log_failure" in e for e in env.events)
    env.wait(10)
    assert env.current() is not None


def test_interrupted_replacement_is_recovered(env: Env, tmp_path: Path) -> None:
    """A crash between storing a manifest and making it current leaves a stray manifest: the
    next service (after a restart) removes it, file included, and never lists it."""
    env.receive(2)
    real = env.catalog.adopt_manifest

    def crash(*args: Any, **kw: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    env.catalog.adopt_manifest = crash  # type: ignore[method-assign]
    env.service.startService()
    env.wait(STABLE)
    (stray,) = env.catalog.stale_manifests()
    stray_file = env.manifest_file(stray)
    env.service.stopService()
    env.catalog.adopt_manifest = real  # type: ignore[method-assign]

    restarted = ManifestService(env.builder, env.catalog, SyncPool(), env.clock, stable_after=STABLE,
                                location_uid="1.2.3", on_stored=env.stored.append)
    restarted.startService()
    assert env.catalog.get_instance(stray) is None and not stray_file.exists()
    for _ in range(7):
        env.clock.advance(10)
    kos = env.current()
    assert kos is not None and kos != stray
    assert stray not in listed(env.manifest_file(kos))
    restarted.stopService()


def test_location_uid_generated_once(tmp_path: Path) -> None:
    """An empty retrieve_location_uid is generated once and kept in the catalog; a
    configured one is used as it is."""
    e = Env(tmp_path, location="")
    generated = e.builder.location_uid("")
    assert generated.startswith("2.25.")
    assert e.builder.location_uid("") == generated
    assert e.builder.location_uid("1.2.3") == "1.2.3"
    e.catalog.close()
    reopened = SqliteCatalog(tmp_path / "catalog.sqlite3")
    assert reopened.ensure_setting(LOCATION_UID_SETTING, "9.9") == generated
    reopened.close()


def test_disabled(tmp_path: Path) -> None:
    """enabled = no: nothing is scheduled, nothing is built."""
    e = Env(tmp_path, enabled=False)
    e.receive(1)
    e.service.startService()
    assert e.clock.getDelayedCalls() == []
    e.clock.advance(STABLE * 2)
    assert e.catalog.manifest_count() == 0
    e.service.stopService()
    e.catalog.close()


def test_stop_cancels_the_loop(env: Env) -> None:
    """After stopService nothing is scheduled any more."""
    env.service.startService()
    d = env.service.stopService()
    assert d is not None and d.called
    assert env.clock.getDelayedCalls() == []


def test_remove_instance_drops_empty_series_study_and_patient(tmp_path: Path) -> None:
    """remove_instance returns the row and deletes frames, then the series, study and patient
    once nothing is left in them; others stay."""
    c = SqliteCatalog(tmp_path / "c.db")

    def rec(sop: str, series: str, study: str, patient: str) -> InstanceRecord:
        return InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", study, series, "1.2.840.10008.1.2.1",
                              patient_id=patient)

    for r in (rec("1.1", "1.10", "1.100", "P1"), rec("1.2", "1.10", "1.100", "P1"), rec("1.3", "1.11", "1.101", "P2")):
        c.record_instance(r, path=f"objects/{r.sop_instance_uid}.dcm", size=1, incoming="x", calling_aet="A")
    row = c.remove_instance("1.1")
    assert row is not None and row.path == "objects/1.1.dcm"
    assert c.remove_instance("1.1") is None
    assert (c.counts().instances, c.counts().series, c.counts().studies) == (2, 2, 2)
    c.remove_instance("1.3")
    assert (c.counts().instances, c.counts().series, c.counts().studies) == (1, 1, 1)
    with c.reader() as conn:
        patients = [p for (p,) in conn.execute("SELECT patient_id FROM patients")]
    assert patients == ["P1"]
    c.close()


def test_sources_never_list_our_manifests(env: Env) -> None:
    """manifest_sources leaves out every manifest we noted, current or not, and reports the
    marks of the one in force."""
    uids = env.receive(2)
    env.service.startService()
    env.wait(STABLE)
    sources = env.catalog.manifest_sources(env.study)
    assert sources is not None
    assert {i.sop_instance_uid for i in sources.instances} == set(uids)
    assert (sources.current_instances, sources.receives, sources.changed) == (2, 2, False)
    assert sources.series_number == 2  # CT_small's series is number 1
    assert env.catalog.manifest_sources(generate_uid()) is None
