"""
Persistence of the embedded XDS.b repository and registry: ``<data_dir>/xds.sqlite3``.

Its own SQLite file (WAL, ``synchronous=FULL``), apart from the image catalog: the registry
is a separate actor and its writes never wait on ingest. Thread model as in
:mod:`imageshare.store.catalog`: one connection per thread; every method blocks and runs
on a worker pool, never on the reactor thread.

A Provide and Register stores the documents and registers their metadata in one
transaction: a registry error rolls the documents back too, so nothing is half-submitted.
Documents are kept as BLOBs: XDS-I.b manifests are small, and the database then makes them
durable with the metadata that points to them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Sequence

from imageshare.store.sqlite import SqliteDatabase

from imageshare.xds import metadata as md
from imageshare.xds.registry import (
    APPROVED,
    DEPRECATED,
    EntryRecord,
    Provided,
    Submission,
)
from imageshare.xds.responses import RegistryError, Severity

__all__ = ["XdsStore", "XdsStoreError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    unique_id TEXT PRIMARY KEY,
    repository_unique_id TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    stored_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS patients (
    patient_id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS submission_sets (
    entry_uuid TEXT PRIMARY KEY,
    unique_id TEXT NOT NULL UNIQUE,
    patient_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    submission_time TEXT NOT NULL,
    status TEXT NOT NULL,
    xml BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    entry_uuid TEXT PRIMARY KEY,
    unique_id TEXT NOT NULL UNIQUE,
    patient_id TEXT NOT NULL,
    status TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    repository_unique_id TEXT NOT NULL,
    creation_time TEXT NOT NULL,
    service_start TEXT NOT NULL,
    service_stop TEXT NOT NULL,
    codes TEXT NOT NULL,
    reference_ids TEXT NOT NULL,
    submission_uuid TEXT NOT NULL REFERENCES submission_sets(entry_uuid),
    xml BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_patient ON entries(patient_id, status);
CREATE TABLE IF NOT EXISTS associations (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    xml BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS associations_target ON associations(target);
"""


class XdsStoreError(Exception):
    """The store is closed."""


class _Refused(Exception):
    def __init__(self, errors: list[RegistryError]) -> None:
        super().__init__("refused")
        self.errors = errors


def _error(code: str, context: str, location: str = "") -> RegistryError:
    return RegistryError(code, context, location, Severity.ERROR)


class XdsStore(SqliteDatabase):
    """
    The repository's documents and the registry's objects.

    Parameters
    ----------
    path
        The SQLite file (created with its tables if missing).
    busy_timeout
        Seconds to wait for another writer.
    """

    closed_error = XdsStoreError
    what = "the XDS store"

    def __init__(self, path: Path, *, busy_timeout: float = 30.0, max_connections: int = 8) -> None:
        super().__init__(path, busy_timeout=busy_timeout, max_connections=max_connections)
        with self._connection() as c:
            c.executescript(_SCHEMA)

    # ------------------------------------------------------------------ writes

    def provide_and_register(
        self, documents: Sequence[Provided], repository_unique_id: str, submission: Submission
    ) -> list[RegistryError]:
        """
        Store the documents and register the submission, atomically (ITI-41).

        Returns
        -------
        list[RegistryError]
            Empty when registered; else the errors, and nothing was stored.
        """
        try:
            with self._write() as c:
                errors = self._store_documents(c, documents, repository_unique_id)
                if errors:
                    raise _Refused(errors)
                self._register(c, submission)
        except _Refused as refused:
            return refused.errors
        return []

    def register(self, submission: Submission) -> list[RegistryError]:
        """Register a submission (ITI-42); the errors, or empty when registered."""
        try:
            with self._write() as c:
                self._register(c, submission)
        except _Refused as refused:
            return refused.errors
        return []

    def _store_documents(
        self, c: sqlite3.Connection, documents: Sequence[Provided], repository_unique_id: str
    ) -> list[RegistryError]:
        errors = []
        now = time.time()
        for doc in documents:
            row = c.execute("SELECT sha1, size FROM documents WHERE unique_id=?", (doc.unique_id,)).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (doc.unique_id, repository_unique_id, doc.mime_type, doc.sha1, len(doc.data), doc.data, now),
                )
            elif row[1] != len(doc.data):
                errors.append(_error("XDSNonIdenticalSize", "a document with this uniqueId has another size", doc.unique_id))
            elif row[0] != doc.sha1:
                errors.append(_error("XDSNonIdenticalHash", "a document with this uniqueId has another hash", doc.unique_id))
            # identical content: already stored, not a repository error (ITI TF-2 3.41.4.1.3)
        return errors

    def _register(self, c: sqlite3.Connection, submission: Submission) -> None:
        ss = submission.submission_set
        duplicates = []
        for entry in submission.entries:
            row = c.execute("SELECT hash FROM entries WHERE unique_id=?", (entry.unique_id,)).fetchone()
            if row is not None and row[0] != entry.hash:
                duplicates.append(_error("XDSNonIdenticalHash", "uniqueId registered with another hash", entry.unique_id))
            elif row is not None:
                duplicates.append(
                    _error("XDSDuplicateUniqueIdInRegistry", "DocumentEntry uniqueId already registered", entry.unique_id)
                )
        if c.execute("SELECT 1 FROM submission_sets WHERE unique_id=?", (ss.unique_id,)).fetchone():
            duplicates.append(
                _error("XDSDuplicateUniqueIdInRegistry", "SubmissionSet uniqueId already registered", ss.unique_id)
            )
        if duplicates:
            # A re-sent submission: say only that, not what follows from it (its RPLC target
            # is deprecated by the first registration).
            raise _Refused(duplicates)
        errors = []
        ids = [ss.entry_uuid, *(e.entry_uuid for e in submission.entries), *(a.id for a in submission.associations)]
        for ident in ids:
            if self._id_taken(c, ident):
                errors.append(_error("XDSRegistryMetadataError", "an object with this id is already registered", ident))
        for association in submission.replaced:
            row = c.execute(
                "SELECT status, patient_id FROM entries WHERE entry_uuid=?", (association.target,)
            ).fetchone()
            if row is None:
                errors.append(_error("XDSRegistryMetadataError", "the RPLC target is not registered", association.target))
            elif row[0] != APPROVED:
                errors.append(
                    _error("XDSRegistryDeprecatedDocumentError", "the RPLC target is deprecated", association.target)
                )
            elif row[1] != ss.patient_id:
                errors.append(
                    _error("XDSPatientIdDoesNotMatch", "the RPLC target belongs to another patient", association.target)
                )
        if errors:
            raise _Refused(errors)
        now = time.time()
        c.execute("INSERT OR IGNORE INTO patients VALUES (?, ?)", (ss.patient_id, now))
        c.execute(
            "INSERT INTO submission_sets VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ss.entry_uuid, ss.unique_id, ss.patient_id, ss.source_id, ss.submission_time, APPROVED, ss.xml),
        )
        for e in submission.entries:
            c.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    e.entry_uuid, e.unique_id, e.patient_id, APPROVED, e.mime_type, e.hash, e.size,
                    e.repository_unique_id, e.creation_time, e.service_start, e.service_stop,
                    json.dumps({k: list(v) for k, v in e.codes.items()}), json.dumps(list(e.reference_ids)),
                    ss.entry_uuid, e.xml,
                ),
            )
        for a in submission.associations:
            c.execute("INSERT INTO associations VALUES (?, ?, ?, ?, ?, ?)", (a.id, a.type, a.source, a.target, APPROVED, a.xml))
            if a.type == md.RPLC:
                c.execute("UPDATE entries SET status=? WHERE entry_uuid=?", (DEPRECATED, a.target))

    @staticmethod
    def _id_taken(c: sqlite3.Connection, ident: str) -> bool:
        return any(
            c.execute(f"SELECT 1 FROM {table} WHERE {column}=?", (ident,)).fetchone()
            for table, column in (("submission_sets", "entry_uuid"), ("entries", "entry_uuid"), ("associations", "id"))
        )

    # ------------------------------------------------------------------ reads

    def document(self, unique_id: str, *, patient: str | None = None) -> tuple[str, str, bytes] | None:
        """
        (repositoryUniqueId, mimeType, bytes) of a stored document, or ``None``.

        ``patient`` given: ``None`` too unless the document's DocumentEntry has that patientId.
        """
        with self._connection() as c:
            if patient is None:
                row = c.execute(
                    "SELECT repository_unique_id, mime_type, data FROM documents WHERE unique_id=?", (unique_id,)
                ).fetchone()
            else:
                row = c.execute(
                    "SELECT d.repository_unique_id, d.mime_type, d.data FROM documents d"
                    " JOIN entries e ON e.unique_id = d.unique_id WHERE d.unique_id=? AND e.patient_id=?",
                    (unique_id, patient),
                ).fetchone()
        return (row[0], row[1], bytes(row[2])) if row else None

    def find_entries(self, patient_id: str, statuses: Sequence[str]) -> list[tuple[EntryRecord, str]]:
        """The entries of a patient with one of ``statuses``, with their status."""
        marks = ",".join("?" * len(statuses))
        with self._connection() as c:
            rows = c.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE patient_id=? AND status IN ({marks}) ORDER BY rowid",
                (patient_id, *statuses),
            ).fetchall()
        return [(_entry(row), row[-1]) for row in rows]

    def entries(self, *, uuids: Sequence[str] = (), unique_ids: Sequence[str] = ()) -> list[tuple[EntryRecord, str]]:
        """Entries by entryUUID or uniqueId, whatever their status."""
        column, keys = ("entry_uuid", uuids) if uuids else ("unique_id", unique_ids)
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        with self._connection() as c:
            rows = c.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE {column} IN ({marks}) ORDER BY rowid", tuple(keys)
            ).fetchall()
        return [(_entry(row), row[-1]) for row in rows]

    def submission_sets_of(self, entry_uuids: Sequence[str]) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]:
        """The SubmissionSets holding these entries and their HasMember associations (xml, status)."""
        if not entry_uuids:
            return [], []
        marks = ",".join("?" * len(entry_uuids))
        sets = []
        with self._connection() as c:
            associations = c.execute(
                f"SELECT xml, status, source FROM associations WHERE type=? AND target IN ({marks}) ORDER BY rowid",
                (md.HAS_MEMBER, *entry_uuids),
            ).fetchall()
            sources = list(dict.fromkeys(row[2] for row in associations))
            for source in sources:
                row = c.execute("SELECT xml, status FROM submission_sets WHERE entry_uuid=?", (source,)).fetchone()
                if row is not None:
                    sets.append((bytes(row[0]), row[1]))
        return sets, [(bytes(row[0]), row[1]) for row in associations]

    def counts(self) -> dict[str, int]:
        """Numbers of documents, entries and submission sets (for status and tests)."""
        with self._connection() as c:
            return {
                table: c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("documents", "entries", "submission_sets", "patients")
            }


_ENTRY_COLUMNS = (
    "entry_uuid, unique_id, patient_id, mime_type, hash, size, repository_unique_id, creation_time, "
    "service_start, service_stop, codes, reference_ids, xml, status"
)


def _entry(row: tuple) -> EntryRecord:  # type: ignore[type-arg]
    return EntryRecord(
        entry_uuid=row[0],
        unique_id=row[1],
        patient_id=row[2],
        mime_type=row[3],
        hash=row[4],
        size=row[5],
        repository_unique_id=row[6],
        creation_time=row[7],
        service_start=row[8],
        service_stop=row[9],
        codes={k: tuple(v) for k, v in json.loads(row[10]).items()},
        reference_ids=tuple(json.loads(row[11])),
        xml=bytes(row[12]),
    )
