"""
The durable outbox of manifest registrations (ITI-41/RAD-68), in its own SQLite file.

A row is written when a manifest is made current, before anything is sent, so a crash or a
stop never loses a registration. Its entryUUID, submission UUID and WS-Addressing MessageID
are fixed when the row is made, and the whole HTTP message is kept from the first attempt
on: every retry re-sends the identical request, so a registry that already took it answers
``XDSDuplicateUniqueIdInRegistry`` and the row counts as registered ("exactly once").

States: ``pending`` (to send, at ``next_attempt_at``), ``registered``, ``failed`` (a
permanent error, or ``max_attempts`` transient ones: kept and visible), and ``superseded``
(a newer manifest of the same study came before this one was ever sent: there is nothing
to register any more, the newer one is). A pending row that was sent at least once is never
superseded: the registry may hold it, and the newer manifest has to replace it (RPLC), so
a study's rows are sent in order.

Every method blocks: call them on a worker pool, never on the reactor thread.
"""

from __future__ import annotations

import enum
import sqlite3
import uuid
from pathlib import Path
from typing import Callable, Iterable

import attrs

from imageshare.store.sqlite import SqliteDatabase

__all__ = ["Outbox", "State", "Submission", "backoff"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest_uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    entry_uuid TEXT NOT NULL,
    submission_uuid TEXT NOT NULL,
    message_id TEXT NOT NULL,
    replaces_uid TEXT,
    replaces TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    content_type TEXT,
    body BLOB,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS submissions_due ON submissions(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS submissions_study ON submissions(study_uid, id);
"""

_COLUMNS = (
    "id, manifest_uid, study_uid, path, entry_uuid, submission_uuid, message_id, replaces_uid, replaces,"
    " state, attempts, next_attempt_at, last_error, content_type, body"
)


class State(str, enum.Enum):
    """Where a registration stands."""

    PENDING = "pending"
    REGISTERED = "registered"
    FAILED = "failed"
    SUPERSEDED = "superseded"


@attrs.frozen
class Submission:
    """One outbox row.

    Attributes
    ----------
    manifest_uid, study_uid
        The KOS SOP Instance UID (the DocumentEntry uniqueId) and its study.
    path
        The archived KOS, relative to the archive root.
    entry_uuid, submission_uuid, message_id
        Fixed at creation (``urn:uuid:`` form).
    replaces_uid
        The SOP Instance UID of the manifest this one superseded, if any.
    replaces
        The entryUUID of the registered entry this one replaces (RPLC), fixed with the message.
    content_type, body
        The HTTP message, kept from the first attempt until registered.
    """

    id: int
    manifest_uid: str
    study_uid: str
    path: str
    entry_uuid: str
    submission_uuid: str
    message_id: str
    replaces_uid: str | None
    replaces: str | None
    state: State
    attempts: int
    next_attempt_at: float
    last_error: str
    content_type: str | None
    body: bytes | None

    @property
    def prepared(self) -> bool:
        """Whether the HTTP message was built (then it is re-sent as is)."""
        return self.body is not None and self.content_type is not None


def backoff(attempts: int, initial: float, maximum: float) -> float:
    """Delay before the next try after ``attempts`` failed ones: doubling from ``initial``, capped."""
    if attempts < 1:
        return 0.0
    return float(min(maximum, initial * 2 ** min(attempts - 1, 62)))


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


class Outbox(SqliteDatabase):
    """
    The outbox table. Thread-safe: each operation checks a connection out of a small pool.

    Parameters
    ----------
    path
        The SQLite file (``<data_dir>/xds-outbox.sqlite3``); created if missing.
    """

    what = "the XDS outbox"

    def __init__(self, path: Path, *, busy_timeout: float = 30.0, max_connections: int = 8) -> None:
        super().__init__(path, busy_timeout=busy_timeout, max_connections=max_connections)
        with self._write() as conn:
            # One statement at a time: executescript would commit the transaction early.
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)

    def add(self, manifest_uid: str, study_uid: str, path: str, *, replaces_uid: str | None, now: float) -> Submission:
        """
        Record a manifest to register, due now; return its row (the existing one if known).

        Older rows of the study that were never sent are superseded: the new manifest
        includes everything they did.
        """
        with self._write() as conn:
            existing = conn.execute(
                f"SELECT {_COLUMNS} FROM submissions WHERE manifest_uid=?", (manifest_uid,)
            ).fetchone()
            if existing is not None:
                return _row(existing)
            # The manifest it superseded may never have been sent (and is superseded here):
            # the entry to replace is the study's last one that is or will be registered.
            previous = self._previous(conn, study_uid)
            return self._insert(conn, manifest_uid, study_uid, path, replaces_uid=previous, now=now)

    def reconcile(self, current: Callable[[], Iterable[tuple[str, str, str]]], *, now: float) -> list[Submission]:
        """
        Record every manifest in force that has no row yet (in any state); return the new rows.

        This catches what a crash between a manifest becoming current and its :meth:`add`
        lost, and what was built while registration was off. ``current`` lists
        ``(study_uid, manifest_uid, path)`` (the catalog's manifests in force); it is read
        inside this write transaction, so an :meth:`add` of a manifest made current meanwhile
        comes after, and an older manifest is never queued behind a newer one. Each new row
        replaces the study's last entry that is or will be registered before it.
        """
        with self._write() as conn:
            known = {uid for (uid,) in conn.execute("SELECT manifest_uid FROM submissions").fetchall()}
            added = []
            for study_uid, manifest_uid, path in current():
                if manifest_uid in known:
                    continue
                known.add(manifest_uid)
                replaces_uid = self._previous(conn, study_uid)
                added.append(self._insert(conn, manifest_uid, study_uid, path, replaces_uid=replaces_uid, now=now))
            return added

    def _previous(self, conn: sqlite3.Connection, study_uid: str) -> str | None:
        # Registered, or pending and not to be superseded by a new row (see add): sent first.
        found = conn.execute(
            "SELECT manifest_uid FROM submissions WHERE study_uid=? AND (state=?"
            " OR (state=? AND (attempts>0 OR body IS NOT NULL))) ORDER BY id DESC LIMIT 1",
            (study_uid, State.REGISTERED.value, State.PENDING.value),
        ).fetchone()
        return None if found is None else str(found[0])

    def _insert(self, conn: sqlite3.Connection, manifest_uid: str, study_uid: str, path: str, *,
                replaces_uid: str | None, now: float) -> Submission:
        conn.execute(
            "UPDATE submissions SET state=?, last_error=?, updated_at=? "
            "WHERE study_uid=? AND state=? AND attempts=0 AND body IS NULL",
            (State.SUPERSEDED.value, f"superseded by {manifest_uid}", now, study_uid, State.PENDING.value),
        )
        conn.execute(
            "INSERT INTO submissions (manifest_uid, study_uid, path, entry_uuid, submission_uuid, message_id,"
            " replaces_uid, state, next_attempt_at, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (manifest_uid, study_uid, path, _urn(), _urn(), _urn(), replaces_uid, State.PENDING.value,
             now, now, now),
        )
        return _row(conn.execute(f"SELECT {_COLUMNS} FROM submissions WHERE manifest_uid=?",
                                 (manifest_uid,)).fetchone())

    def get(self, manifest_uid: str) -> Submission | None:
        """The row of a manifest, if any."""
        with self._connection() as conn:
            found = conn.execute(
                f"SELECT {_COLUMNS} FROM submissions WHERE manifest_uid=?", (manifest_uid,)
            ).fetchone()
        return _row(found) if found is not None else None

    def due(self, now: float, limit: int = 10) -> list[Submission]:
        """Pending rows whose time has come, oldest first; a study's rows one after the other."""
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM submissions AS s WHERE state=? AND next_attempt_at<=? AND NOT EXISTS"
                " (SELECT 1 FROM submissions AS o WHERE o.study_uid=s.study_uid AND o.state=? AND o.id<s.id)"
                " ORDER BY next_attempt_at, id LIMIT ?",
                (State.PENDING.value, now, State.PENDING.value, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def next_due_at(self) -> float | None:
        """When the earliest pending row is due (``None``: nothing pending)."""
        with self._connection() as conn:
            found = conn.execute(
                "SELECT MIN(next_attempt_at) FROM submissions WHERE state=?", (State.PENDING.value,)
            ).fetchone()
        return None if found is None or found[0] is None else float(found[0])

    def replaced_entry(self, replaces_uid: str) -> str | None:
        """The entryUUID of a manifest's row if it is registered (what an RPLC points to)."""
        with self._connection() as conn:
            found = conn.execute(
                "SELECT entry_uuid FROM submissions WHERE manifest_uid=? AND state=?",
                (replaces_uid, State.REGISTERED.value),
            ).fetchone()
        return None if found is None else str(found[0])

    def prepare(self, id_: int, *, replaces: str | None, content_type: str, body: bytes, now: float) -> None:
        """Keep the HTTP message of a pending row: every later attempt re-sends exactly it."""
        with self._write() as conn:
            conn.execute(
                "UPDATE submissions SET replaces=?, content_type=?, body=?, updated_at=? WHERE id=? AND body IS NULL",
                (replaces, content_type, body, now, id_),
            )

    def registered(self, id_: int, *, now: float) -> None:
        """The registry has it (also after a superseding or a failure: the registry is right)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE submissions SET state=?, attempts=attempts+1, last_error='', body=NULL, updated_at=?"
                " WHERE id=?",
                (State.REGISTERED.value, now, id_),
            )

    def retry(self, id_: int, error: str, *, now: float, initial: float, maximum: float, max_attempts: int) -> State:
        """Count a transient failure: pending again after the backoff, or failed after the last try."""
        with self._write() as conn:
            found = conn.execute("SELECT attempts FROM submissions WHERE id=? AND state=?",
                                 (id_, State.PENDING.value)).fetchone()
            if found is None:
                return State.REGISTERED if self._state(conn, id_) is State.REGISTERED else State.FAILED
            attempts = int(found[0]) + 1
            state = State.FAILED if attempts >= max_attempts else State.PENDING
            reason = error if state is State.PENDING else f"gave up after {attempts} attempts: {error}"
            conn.execute(
                "UPDATE submissions SET state=?, attempts=?, next_attempt_at=?, last_error=?, updated_at=? WHERE id=?",
                (state.value, attempts, now + backoff(attempts, initial, maximum), reason, now, id_),
            )
            return state

    def fail(self, id_: int, error: str, *, now: float, count: bool = True) -> None:
        """A permanent failure: kept as ``failed`` with its reason, never retried."""
        with self._write() as conn:
            conn.execute(
                "UPDATE submissions SET state=?, attempts=attempts+?, last_error=?, updated_at=? WHERE id=?",
                (State.FAILED.value, 1 if count else 0, error, now, id_),
            )

    def supersede(self, id_: int, reason: str, *, now: float) -> None:
        """Drop a row that was never sent and whose manifest is gone."""
        with self._write() as conn:
            conn.execute(
                "UPDATE submissions SET state=?, last_error=?, updated_at=? WHERE id=? AND state=? AND body IS NULL",
                (State.SUPERSEDED.value, reason, now, id_, State.PENDING.value),
            )

    def counts(self) -> dict[State, int]:
        """Rows per state (every state present)."""
        out = {state: 0 for state in State}
        with self._connection() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM submissions GROUP BY state").fetchall()
        for state, count in rows:
            out[State(state)] = int(count)
        return out

    def _state(self, conn: sqlite3.Connection, id_: int) -> State | None:
        found = conn.execute("SELECT state FROM submissions WHERE id=?", (id_,)).fetchone()
        return None if found is None else State(found[0])



def _row(r: tuple[object, ...]) -> Submission:
    return Submission(
        id=int(r[0]),  # type: ignore[call-overload]
        manifest_uid=str(r[1]),
        study_uid=str(r[2]),
        path=str(r[3]),
        entry_uuid=str(r[4]),
        submission_uuid=str(r[5]),
        message_id=str(r[6]),
        replaces_uid=None if r[7] is None else str(r[7]),
        replaces=None if r[8] is None else str(r[8]),
        state=State(r[9]),
        attempts=int(r[10]),  # type: ignore[call-overload]
        next_attempt_at=float(r[11]),  # type: ignore[arg-type]
        last_error=str(r[12]),
        content_type=None if r[13] is None else str(r[13]),
        body=None if r[14] is None else bytes(r[14]),  # type: ignore[arg-type]
    )
