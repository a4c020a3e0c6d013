"""The XDS outbox: its state machine on a temporary SQLite file, and the Clock-driven retries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.logger import Logger

from imageshare.config import load
from imageshare.store.catalog import SqliteCatalog
from imageshare.store.records import InstanceRecord
from imageshare.xds.outbox import Outbox, State, backoff
from imageshare.xds.responses import Outcome
from imageshare.xds.submitter import Answer, SubmitterService


def test_backoff_doubles_then_caps() -> None:
    """The delay doubles from retry_initial after each failed attempt and stops at retry_max."""
    assert [backoff(n, 5, 60) for n in range(0, 7)] == [0, 5, 10, 20, 40, 60, 60]
    assert backoff(10_000, 5, 600) == 600


def test_add_is_idempotent_and_fixes_identifiers(tmp_path: Path) -> None:
    """A row is pending and due at once; adding the same manifest again returns the same row with the
    same entry, submission and message UUIDs."""
    outbox = Outbox(tmp_path / "o.sqlite3")
    row = outbox.add("1.2.3", "1.2", "a/b.dcm", replaces_uid=None, now=10.0)
    again = outbox.add("1.2.3", "1.2", "a/b.dcm", replaces_uid=None, now=20.0)
    assert row == again and row.state is State.PENDING and row.attempts == 0
    assert len({row.entry_uuid, row.submission_uuid, row.message_id}) == 3
    assert all(u.startswith("urn:uuid:") for u in (row.entry_uuid, row.submission_uuid, row.message_id))
    assert [r.id for r in outbox.due(10.0)] == [row.id]
    assert outbox.due(9.0) == []


def test_retry_backoff_then_failed(tmp_path: Path) -> None:
    """Transient failures reschedule with backoff; the max_attempts-th one leaves the row failed, with
    its reason kept."""
    outbox = Outbox(tmp_path / "o.sqlite3")
    row = outbox.add("1.2.3", "1.2", "p", replaces_uid=None, now=0.0)
    assert outbox.retry(row.id, "HTTP 503", now=0.0, initial=5, maximum=600, max_attempts=3) is State.PENDING
    assert outbox.next_due_at() == 5.0
    assert outbox.retry(row.id, "HTTP 503", now=5.0, initial=5, maximum=600, max_attempts=3) is State.PENDING
    assert outbox.next_due_at() == 15.0
    assert outbox.retry(row.id, "HTTP 503", now=15.0, initial=5, maximum=600, max_attempts=3) is State.FAILED
    got = outbox.get("1.2.3")
    assert got is not None and got.state is State.FAILED and got.attempts == 3 and "HTTP 503" in got.last_error
    assert outbox.counts()[State.FAILED] == 1 and outbox.next_due_at() is None


def test_prepared_message_kept_until_registered(tmp_path: Path) -> None:
    """The message kept at the first attempt survives a reopen (restart) unchanged and is dropped once
    registered; the registered entry is what an RPLC of the next manifest points to."""
    path = tmp_path / "o.sqlite3"
    outbox = Outbox(path)
    row = outbox.add("1.2.3", "1.2", "p", replaces_uid=None, now=0.0)
    outbox.prepare(row.id, replaces=None, content_type="multipart/related", body=b"message", now=0.0)
    outbox.prepare(row.id, replaces=None, content_type="other", body=b"other", now=0.0)  # first one wins
    outbox.retry(row.id, "timeout", now=0.0, initial=1, maximum=10, max_attempts=5)
    outbox.close()
    reopened = Outbox(path)
    (due,) = reopened.due(1.0)
    assert (due.content_type, due.body, due.attempts) == ("multipart/related", b"message", 1)
    assert reopened.replaced_entry("1.2.3") is None
    reopened.registered(due.id, now=1.0)
    got = reopened.get("1.2.3")
    assert got is not None and got.state is State.REGISTERED and got.body is None
    assert reopened.replaced_entry("1.2.3") == row.entry_uuid


def test_study_order_and_superseding(tmp_path: Path) -> None:
    """A newer manifest supersedes an older one never sent; one already sent stays pending and goes
    first, the newer row of the study waiting for it."""
    outbox = Outbox(tmp_path / "o.sqlite3")
    a = outbox.add("1.2.3.1", "1.2", "p1", replaces_uid=None, now=0.0)
    b = outbox.add("1.2.3.2", "1.2", "p2", replaces_uid="1.2.3.1", now=0.0)
    assert outbox.get("1.2.3.1").state is State.SUPERSEDED  # type: ignore[union-attr]
    outbox.prepare(b.id, replaces=None, content_type="t", body=b"x", now=0.0)
    outbox.retry(b.id, "down", now=0.0, initial=1, maximum=10, max_attempts=5)
    c = outbox.add("1.2.3.3", "1.2", "p3", replaces_uid="1.2.3.2", now=0.5)
    assert outbox.get("1.2.3.2").state is State.PENDING  # type: ignore[union-attr]
    assert outbox.due(0.5) == []  # c waits for b
    assert [r.id for r in outbox.due(1.0)] == [b.id]
    outbox.registered(b.id, now=1.0)
    assert [r.id for r in outbox.due(1.0)] == [c.id]
    assert a.id < b.id < c.id


class SyncPool:
    """Runs the blocking work at once (unit tests only)."""

    def run(self, f: Any, *args: Any, **kw: Any) -> Any:
        return succeed(f(*args, **kw))


class ScriptedBuilder:
    def prepare(self, row: Any, now: float) -> tuple[str, bytes]:
        return "application/soap+xml", b"<request/>"


@pytest.fixture
def xds_config(tmp_path: Path, config_file: Any) -> Any:
    config = load(config_file(xds={"retry_initial": "2", "retry_max": "5", "max_attempts": "4", "timeout": "3"}))
    return config.xds


def test_submitter_retries_on_the_clock(tmp_path: Path, xds_config: Any) -> None:
    """Driven by task.Clock: transient answers are retried after 2, 4, 5 s (capped), then the row is
    registered; nothing happens between the scheduled times."""
    outbox = Outbox(tmp_path / "o.sqlite3")
    answers = [Outcome.TRANSIENT, Outcome.TRANSIENT, Outcome.TRANSIENT, Outcome.SUCCESS]
    sent: list[float] = []
    clock = task.Clock()
    service = SubmitterService(outbox, ScriptedBuilder(), SyncPool(), None, clock, xds_config)  # type: ignore[arg-type]

    async def exchange(content_type: str, body: bytes) -> Answer:
        sent.append(clock.seconds())
        return Answer(answers.pop(0), "scripted")

    service._exchange = exchange  # type: ignore[method-assign]
    service.startService()
    service.enqueue("1.2.3", "1.2", "p", None)
    assert sent == [0.0]
    for step in (1.9, 0.1, 3.9, 0.1, 4.9, 0.1):
        clock.advance(step)
    assert sent == [0.0, 2.0, 6.0, 11.0]
    assert outbox.get("1.2.3").state is State.REGISTERED  # type: ignore[union-attr]
    assert service.counts[State.REGISTERED] == 1 and service.counts[State.PENDING] == 0
    assert clock.getDelayedCalls() == []
    service.stopService()


def test_submitter_resumes_pending_rows_at_start(tmp_path: Path, xds_config: Any) -> None:
    """A row left pending by a previous run is sent when a new submitter starts on the same file;
    a permanent answer leaves it failed and counted."""
    path = tmp_path / "o.sqlite3"
    first = Outbox(path)
    first.add("1.2.3", "1.2", "p", replaces_uid=None, now=0.0)
    first.close()
    outbox = Outbox(path)
    clock = task.Clock()
    service = SubmitterService(outbox, ScriptedBuilder(), SyncPool(), None, clock, xds_config)  # type: ignore[arg-type]

    async def exchange(content_type: str, body: bytes) -> Answer:
        return Answer(Outcome.PERMANENT, "XDSRegistryMetadataError")

    service._exchange = exchange  # type: ignore[method-assign]
    service.startService()
    got = outbox.get("1.2.3")
    assert got is not None and got.state is State.FAILED and got.last_error == "XDSRegistryMetadataError"
    assert service.counts[State.FAILED] == 1
    service.stopService()


KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def make_current(catalog: SqliteCatalog, study: str, manifest: str) -> str:
    """Store a manifest of ``study`` in the catalog and make it the one in force; return its path."""
    path = f"objects/{manifest}.dcm"
    record = InstanceRecord(manifest, KOS, study, f"{study}.9", "1.2.840.10008.1.2.1", modality="KO")
    catalog.begin_manifest(study, manifest)
    catalog.record_instance(record, path=path, size=1, incoming="x", calling_aet="A")
    catalog.adopt_manifest(study, manifest, instances=0, receives=0, updated_at=0.0)
    return path


def test_current_manifests_lists_the_ones_in_force(tmp_path: Path) -> None:
    """current_manifests gives (study, manifest, archive path) of each manifest in force only, not
    the superseded one."""
    catalog = SqliteCatalog(tmp_path / "c.sqlite3")
    make_current(catalog, "1.2.1", "1.2.1.100")
    path = make_current(catalog, "1.2.1", "1.2.1.101")
    other = make_current(catalog, "1.2.2", "1.2.2.100")
    assert sorted(catalog.current_manifests()) == [("1.2.1", "1.2.1.101", path), ("1.2.2", "1.2.2.100", other)]
    catalog.close()


def test_start_queues_current_manifests_without_a_row_once(tmp_path: Path, xds_config: Any) -> None:
    """A manifest in force in the catalog with no outbox row (lost between becoming current and its
    enqueue, or built with [xds] off) is queued and sent when the submitter starts, with the
    catalog's archive path; a second start queues and sends nothing more; the count is logged."""
    catalog = SqliteCatalog(tmp_path / "c.sqlite3")
    path = make_current(catalog, "1.2.1", "1.2.1.100")
    outbox = Outbox(tmp_path / "o.sqlite3")
    sent: list[str] = []
    events: list[dict[str, Any]] = []

    def start() -> SubmitterService:
        service = SubmitterService(outbox, ScriptedBuilder(), SyncPool(), None, task.Clock(), xds_config,
                                   catalog=catalog)
        service.log = Logger(namespace="imageshare.xds", observer=events.append)

        async def exchange(content_type: str, body: bytes) -> Answer:
            sent.append(body.decode())
            return Answer(Outcome.SUCCESS, "scripted")

        service._exchange = exchange  # type: ignore[method-assign]
        service.startService()
        return service

    first = start()
    row = outbox.get("1.2.1.100")
    assert row is not None and row.state is State.REGISTERED and row.path == path and row.replaces_uid is None
    assert sent == ["<request/>"]
    first.stopService()
    start().stopService()
    assert sent == ["<request/>"] and outbox.counts()[State.REGISTERED] == 1
    assert [e["count"] for e in events if "count" in e] == [1, 0]
    catalog.close()


def test_reconcile_leaves_known_manifests_alone(tmp_path: Path) -> None:
    """A manifest in force that already has an outbox row, in any state (pending, registered, failed,
    superseded), gets no new row and its row is left as it was."""
    catalog = SqliteCatalog(tmp_path / "c.sqlite3")
    outbox = Outbox(tmp_path / "o.sqlite3")
    rows = {}
    for n, state in enumerate(State, start=1):
        study, manifest = f"1.2.{n}", f"1.2.{n}.100"
        rows[manifest] = outbox.add(manifest, study, make_current(catalog, study, manifest), replaces_uid=None,
                                    now=0.0)
        if state is State.REGISTERED:
            outbox.registered(rows[manifest].id, now=0.0)
        elif state is State.FAILED:
            outbox.fail(rows[manifest].id, "XDSRegistryMetadataError", now=0.0)
        elif state is State.SUPERSEDED:
            outbox.supersede(rows[manifest].id, "gone", now=0.0)
        rows[manifest] = outbox.get(manifest)
    assert {r.state for r in rows.values()} == set(State)
    assert outbox.reconcile(catalog.current_manifests, now=5.0) == []
    assert {uid: outbox.get(uid) for uid in rows} == rows
    catalog.close()


def test_reconcile_replaces_the_registered_entry(tmp_path: Path) -> None:
    """A study whose earlier manifest was registered has its unqueued manifest in force queued with
    RPLC to that entry; an unsent row in between is superseded (RPLC still points to the registered
    entry), while a row already sent stays first and is the one replaced."""
    catalog = SqliteCatalog(tmp_path / "c.sqlite3")
    outbox = Outbox(tmp_path / "o.sqlite3")
    # Study 1.2.1: 100 registered, then 101 queued but never sent, 102 in force and not queued.
    old = outbox.add("1.2.1.100", "1.2.1", "p", replaces_uid=None, now=0.0)
    outbox.registered(old.id, now=0.0)
    outbox.add("1.2.1.101", "1.2.1", "p", replaces_uid="1.2.1.100", now=0.0)
    make_current(catalog, "1.2.1", "1.2.1.102")
    # Study 1.2.2: 200 registered, 201 sent and waiting for a retry, 202 in force and not queued.
    outbox.registered(outbox.add("1.2.2.200", "1.2.2", "p", replaces_uid=None, now=0.0).id, now=0.0)
    sent = outbox.add("1.2.2.201", "1.2.2", "p", replaces_uid="1.2.2.200", now=0.0)
    outbox.prepare(sent.id, replaces=None, content_type="t", body=b"x", now=0.0)
    outbox.retry(sent.id, "down", now=0.0, initial=1, maximum=10, max_attempts=5)
    make_current(catalog, "1.2.2", "1.2.2.202")

    added = outbox.reconcile(catalog.current_manifests, now=1.0)
    assert {(r.manifest_uid, r.replaces_uid) for r in added} == {("1.2.1.102", "1.2.1.100"),
                                                                  ("1.2.2.202", "1.2.2.201")}
    assert outbox.get("1.2.1.101").state is State.SUPERSEDED  # type: ignore[union-attr]
    assert outbox.replaced_entry("1.2.1.100") == old.entry_uuid
    assert outbox.get("1.2.2.201").state is State.PENDING  # type: ignore[union-attr]
    assert {r.manifest_uid for r in outbox.due(2.0)} == {"1.2.1.102", "1.2.2.201"}  # 202 waits for 201
    assert outbox.reconcile(catalog.current_manifests, now=2.0) == []
    catalog.close()
