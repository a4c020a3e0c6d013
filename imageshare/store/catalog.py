"""
The catalog in SQLite: one file in the data directory, WAL mode, durable commits.

Thread model: every operation checks a connection out of a small pool for its duration
(:mod:`imageshare.store.sqlite`), all opened in WAL mode so that readers (status, queries)
never wait for the writer. Writes use ``BEGIN IMMEDIATE`` so that concurrent writers queue on
SQLite's lock (busy timeout) instead of failing half-way. ``synchronous=FULL`` makes a
commit durable before it returns: the C-STORE response is sent only after that.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from contextlib import contextmanager

from zope.interface import implementer

from imageshare.dicom.manifest import InstanceRef, ManifestSources, StudySummary
from imageshare.interfaces import ICatalog
from imageshare.store.records import Counts, FrameRecord, InstanceRecord, InstanceRow, State
from imageshare.store.sqlite import SqliteDatabase

SCHEMA_VERSION = 2

# Who may change a stored instance ([dicom] replace, issue 12).
REPLACE_ANY = "any"
REPLACE_SAME_SOURCE = "same_source"
REPLACE_NEVER = "never"

# Schema 2: the source of an instance, the calling AE (and the SHA-256 of its certificate's
# SubjectPublicKeyInfo, "sha256:<hex>", when it came over TLS) that stored it first.
# Added to existing catalogs on open; rows of schema 1 take their calling_aet (the last
# sender, the best that is known) and no certificate.
_MIGRATE_2 = (
    "ALTER TABLE instances ADD COLUMN source_aet TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE instances ADD COLUMN source_cert TEXT NOT NULL DEFAULT ''",
    "UPDATE instances SET source_aet = calling_aet",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    pk INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL,
    patient_name TEXT NOT NULL,
    patient_birth_date TEXT NOT NULL,
    patient_sex TEXT NOT NULL,
    UNIQUE (patient_id, issuer_of_patient_id)
);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    patient_pk INTEGER NOT NULL REFERENCES patients(pk),
    study_date TEXT NOT NULL,
    study_time TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    study_id TEXT NOT NULL,
    study_description TEXT NOT NULL,
    referring_physician_name TEXT NOT NULL,
    specific_character_set TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_pk);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession_number);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    series_number INTEGER,
    series_description TEXT NOT NULL,
    body_part_examined TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_instance_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    instance_number INTEGER,
    content_date TEXT NOT NULL,
    content_time TEXT NOT NULL,
    rows INTEGER,
    columns INTEGER,
    number_of_frames INTEGER,
    bits_allocated INTEGER,
    bits_stored INTEGER,
    samples_per_pixel INTEGER,
    photometric_interpretation TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    incoming TEXT,
    calling_aet TEXT NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_instance_uid);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state, received_at);
CREATE TABLE IF NOT EXISTS frames (
    sop_instance_uid TEXT NOT NULL REFERENCES instances(sop_instance_uid) ON DELETE CASCADE,
    frame_number INTEGER NOT NULL,
    codestream_path TEXT NOT NULL,
    codestream_size INTEGER NOT NULL,
    index_path TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    components INTEGER NOT NULL,
    precision INTEGER NOT NULL,
    signed INTEGER NOT NULL,
    PRIMARY KEY (sop_instance_uid, frame_number)
);
-- Every study manifest (KOS) we made and still hold: current = 1 for the one in force, 0 for
-- one being built or superseded (to be removed). Instances named here are never listed in
-- a manifest nor counted as changes of their study. instances/receives are the count and
-- the sum of generations of what the manifest lists; checked_at the studies.updated_at up
-- to which it is known to be up to date.
CREATE TABLE IF NOT EXISTS manifests (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    current INTEGER NOT NULL,
    instances INTEGER NOT NULL,
    receives INTEGER NOT NULL,
    checked_at REAL NOT NULL,
    built_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS manifests_current ON manifests(study_instance_uid) WHERE current = 1;
CREATE INDEX IF NOT EXISTS manifests_stale ON manifests(current) WHERE current = 0;
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class CatalogError(Exception):
    """The catalog cannot be opened or is of an unknown version."""


class ReplaceRefused(Exception):
    """The instance (or its study's patient) may not be changed by this sender; nothing was."""


@implementer(ICatalog)
class SqliteCatalog(SqliteDatabase):
    """:class:`ICatalog` on an SQLite file."""

    closed_error = CatalogError
    what = "the catalog"

    def __init__(self, path: Path, *, busy_timeout: float = 30.0, max_connections: int = 8) -> None:
        super().__init__(path, busy_timeout=busy_timeout, max_connections=max_connections)
        with self._connection() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self.close()
                raise CatalogError(f"{path} was written by a newer ImageShare (schema {version})")
            # executescript commits on its own; every statement is idempotent (IF NOT EXISTS).
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(instances)")}
            if "source_aet" not in columns:
                with conn:  # one transaction: the columns and their values, or nothing
                    for statement in _MIGRATE_2:
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """
        A connection for read-only queries kept in other modules (C-FIND), for the block.

        Fetch every row inside the block: the connection goes back to the pool when it ends.
        Blocking: never use it on the reactor thread.
        """
        with self._connection() as conn:
            yield conn

    def record_instance(
        self,
        record: InstanceRecord,
        *,
        path: str,
        size: int,
        incoming: str,
        calling_aet: str,
        source_cert: str = "",
        replace: str = REPLACE_ANY,
        changes: list[str] | None = None,
    ) -> int:
        """
        Insert or replace an instance; see :class:`ICatalog`.

        ``replace`` says who may change a stored instance (and the patient of a stored
        study): ``any`` sender, the ``same_source`` (the calling AE that stored it first,
        and its certificate ``source_cert`` if that one was recorded), or ``never``. A
        refused change raises :class:`ReplaceRefused` and the transaction is rolled back.
        Identity changes that are made (Patient ID or Issuer of a re-sent instance, a
        study moved to another patient) are appended to ``changes``, without values.
        """
        now = time.time()
        r = record
        with self._write() as c:
            self._check_replace(c, r, calling_aet, source_cert, replace, changes)
            c.execute(
                "INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name, patient_birth_date, patient_sex)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET"
                " patient_name=excluded.patient_name, patient_birth_date=excluded.patient_birth_date,"
                " patient_sex=excluded.patient_sex",
                (r.patient_id, r.issuer_of_patient_id, r.patient_name, r.patient_birth_date, r.patient_sex),
            )
            (patient_pk,) = c.execute(
                "SELECT pk FROM patients WHERE patient_id=? AND issuer_of_patient_id=?",
                (r.patient_id, r.issuer_of_patient_id),
            ).fetchone()
            c.execute(
                "INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (study_instance_uid) DO UPDATE SET"
                " patient_pk=excluded.patient_pk, study_date=excluded.study_date, study_time=excluded.study_time,"
                " accession_number=excluded.accession_number, study_id=excluded.study_id,"
                " study_description=excluded.study_description,"
                " referring_physician_name=excluded.referring_physician_name,"
                " specific_character_set=excluded.specific_character_set, updated_at=excluded.updated_at",
                (r.study_instance_uid, patient_pk, r.study_date, r.study_time, r.accession_number, r.study_id,
                 r.study_description, r.referring_physician_name, r.specific_character_set, now),
            )
            c.execute(
                "INSERT INTO series VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (series_instance_uid) DO UPDATE SET"
                " study_instance_uid=excluded.study_instance_uid, modality=excluded.modality,"
                " series_number=excluded.series_number, series_description=excluded.series_description,"
                " body_part_examined=excluded.body_part_examined",
                (r.series_instance_uid, r.study_instance_uid, r.modality, r.series_number,
                 r.series_description, r.body_part_examined),
            )
            row = c.execute(
                "SELECT generation FROM instances WHERE sop_instance_uid=?", (r.sop_instance_uid,)
            ).fetchone()
            generation = (row[0] if row else 0) + 1
            # A re-sent instance replaces the old one: its frames are stale from now on.
            c.execute("DELETE FROM frames WHERE sop_instance_uid=?", (r.sop_instance_uid,))
            source = c.execute(
                "SELECT source_aet, source_cert FROM instances WHERE sop_instance_uid=?", (r.sop_instance_uid,)
            ).fetchone() or (calling_aet, source_cert)
            c.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid,"
                " sop_class_uid, transfer_syntax_uid, instance_number, content_date, content_time, rows, columns,"
                " number_of_frames, bits_allocated, bits_stored, samples_per_pixel, photometric_interpretation,"
                " path, size, generation, state, reason, incoming, calling_aet, received_at, updated_at,"
                " source_aet, source_cert) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                "  COALESCE((SELECT received_at FROM instances WHERE sop_instance_uid=?), ?), ?, ?, ?)",
                (r.sop_instance_uid, r.series_instance_uid, r.study_instance_uid, r.sop_class_uid,
                 r.transfer_syntax_uid, r.instance_number, r.content_date, r.content_time, r.rows, r.columns,
                 r.number_of_frames, r.bits_allocated, r.bits_stored, r.samples_per_pixel,
                 r.photometric_interpretation, path, size, generation, State.PENDING.value, "", incoming,
                 calling_aet, r.sop_instance_uid, now, now, *source),
            )
        return generation

    @staticmethod
    def _check_replace(
        c: sqlite3.Connection, r: InstanceRecord, calling_aet: str, source_cert: str, replace: str,
        changes: list[str] | None,
    ) -> None:
        """In the write transaction: refuse what ``replace`` forbids, note identity changes."""
        def same_source(aet: str, cert: str) -> bool:
            return aet == calling_aet and (not cert or cert == source_cert)

        old = c.execute(
            "SELECT i.source_aet, i.source_cert, p.patient_id, p.issuer_of_patient_id FROM instances i"
            " LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid"
            " LEFT JOIN patients p ON p.pk = s.patient_pk WHERE i.sop_instance_uid=?",
            (r.sop_instance_uid,),
        ).fetchone()
        if old is not None:
            if replace == REPLACE_NEVER:
                raise ReplaceRefused("instance already stored; replacing is disabled")
            if replace == REPLACE_SAME_SOURCE and not same_source(old[0], old[1]):
                raise ReplaceRefused("instance already stored by another source")
        study = c.execute(
            "SELECT p.patient_id, p.issuer_of_patient_id FROM studies s JOIN patients p ON p.pk = s.patient_pk"
            " WHERE s.study_instance_uid=?",
            (r.study_instance_uid,),
        ).fetchone()
        moved = study is not None and tuple(study) != (r.patient_id, r.issuer_of_patient_id)
        if moved and replace != REPLACE_ANY:
            others = c.execute(
                "SELECT source_aet, source_cert FROM instances WHERE study_instance_uid=? AND sop_instance_uid!=?",
                (r.study_instance_uid, r.sop_instance_uid),
            ).fetchall()
            if replace == REPLACE_NEVER or not all(same_source(aet, cert) for aet, cert in others):
                raise ReplaceRefused("Patient ID differs from the stored study's")
        if changes is not None:
            if old is not None and old[2] is not None and (old[2], old[3]) != (r.patient_id, r.issuer_of_patient_id):
                changes.append("instance patient identity")
            if moved:
                changes.append("study moved to another patient")

    def get_instance(self, sop_instance_uid: str) -> InstanceRow | None:
        with self._connection() as c:
            row = c.execute(
                "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,"
                " transfer_syntax_uid, path, size, generation, state, reason, incoming"
                " FROM instances WHERE sop_instance_uid=?",
                (sop_instance_uid,),
            ).fetchone()
        if row is None:
            return None
        return InstanceRow(*row[:8], State(row[8]), *row[9:])  # type: ignore[misc]

    def pending(self, limit: int, exclude: Iterable[str] = ()) -> list[str]:
        skip = set(exclude)
        with self._connection() as c:
            rows = c.execute(
                "SELECT sop_instance_uid FROM instances WHERE state=? ORDER BY received_at LIMIT ?",
                (State.PENDING.value, limit + len(skip)),
            ).fetchall()
        return [uid for (uid,) in rows if uid not in skip][:limit]

    def complete(
        self,
        sop_instance_uid: str,
        generation: int,
        state: State,
        reason: str,
        frames: Sequence[FrameRecord],
    ) -> bool:
        with self._write() as c:
            cur = c.execute(
                "UPDATE instances SET state=?, reason=?, updated_at=? WHERE sop_instance_uid=? AND generation=?",
                (state.value, reason, time.time(), sop_instance_uid, generation),
            )
            if cur.rowcount != 1:
                return False
            c.execute("DELETE FROM frames WHERE sop_instance_uid=?", (sop_instance_uid,))
            c.executemany(
                "INSERT INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (sop_instance_uid, f.frame_number, f.codestream_path, f.codestream_size, f.index_path,
                     f.width, f.height, f.components, f.precision, int(f.signed))
                    for f in frames
                ],
            )
        return True

    def frames(self, sop_instance_uid: str) -> list[FrameRecord]:
        with self._connection() as c:
            rows = c.execute(
                "SELECT frame_number, codestream_path, codestream_size, index_path, width, height, components,"
                " precision, signed FROM frames WHERE sop_instance_uid=? ORDER BY frame_number",
                (sop_instance_uid,),
            ).fetchall()
        return [FrameRecord(*row[:8], bool(row[8])) for row in rows]  # type: ignore[misc]

    def counts(self) -> Counts:
        with self._connection() as c:
            by_state = dict(c.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall())
            return Counts(
                instances=sum(by_state.values()),
                frames=c.execute("SELECT COUNT(*) FROM frames").fetchone()[0],
                transcode_pending=by_state.get(State.PENDING.value, 0),
                transcode_failed=by_state.get(State.FAILED.value, 0),
                not_streamable=by_state.get(State.NOT_STREAMABLE.value, 0),
                streamable=by_state.get(State.STREAMABLE.value, 0),
                not_image=by_state.get(State.NOT_IMAGE.value, 0),
                studies=c.execute("SELECT COUNT(*) FROM studies").fetchone()[0],
                series=c.execute("SELECT COUNT(*) FROM series").fetchone()[0],
            )

    # -- study manifests (imageshare/manifests.py); one manifest service per catalog --------

    def manifest_candidates(self, limit: int) -> list[tuple[str, float]]:
        with self._connection() as c:
            rows = c.execute(
                "SELECT s.study_instance_uid, s.updated_at FROM studies s"
                " LEFT JOIN manifests m ON m.study_instance_uid = s.study_instance_uid AND m.current = 1"
                " WHERE m.sop_instance_uid IS NULL OR s.updated_at > m.checked_at"
                " ORDER BY s.updated_at LIMIT ?",
                (limit,),
            ).fetchall()
        return [(uid, updated_at) for uid, updated_at in rows]

    def manifest_sources(self, study_instance_uid: str) -> ManifestSources | None:
        with self._read() as c:
            row = c.execute(
                "SELECT s.study_instance_uid, p.patient_id, p.issuer_of_patient_id, p.patient_name,"
                " p.patient_birth_date, p.patient_sex, s.study_date, s.study_time, s.accession_number,"
                " s.study_id, s.study_description, s.referring_physician_name, s.specific_character_set,"
                " s.updated_at FROM studies s JOIN patients p ON p.pk = s.patient_pk"
                " WHERE s.study_instance_uid=?",
                (study_instance_uid,),
            ).fetchone()
            if row is None:
                return None
            listed = c.execute(
                "SELECT i.sop_class_uid, i.sop_instance_uid, i.series_instance_uid, i.generation,"
                " se.series_number FROM instances i"
                " LEFT JOIN series se ON se.series_instance_uid = i.series_instance_uid"
                " WHERE i.study_instance_uid=?"
                " AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.sop_instance_uid = i.sop_instance_uid)"
                " ORDER BY se.series_number, i.series_instance_uid, i.instance_number, i.sop_instance_uid",
                (study_instance_uid,),
            ).fetchall()
            current = c.execute(
                "SELECT sop_instance_uid, instances, receives FROM manifests"
                " WHERE study_instance_uid=? AND current=1",
                (study_instance_uid,),
            ).fetchone()
        numbers = [n for *_, n in listed if n is not None]
        return ManifestSources(
            study=StudySummary(*row[:13]),
            instances=tuple(InstanceRef(cls, uid, series) for cls, uid, series, _, _ in listed),
            receives=sum(generation for _, _, _, generation, _ in listed),
            updated_at=row[13],
            series_number=max(numbers, default=0) + 1,
            current_uid=current[0] if current else None,
            current_instances=current[1] if current else 0,
            current_receives=current[2] if current else 0,
        )

    def begin_manifest(self, study_instance_uid: str, sop_instance_uid: str) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO manifests VALUES (?, ?, 0, 0, 0, 0, ?)",
                (sop_instance_uid, study_instance_uid, time.time()),
            )

    def adopt_manifest(
        self, study_instance_uid: str, sop_instance_uid: str, *, instances: int, receives: int, updated_at: float
    ) -> None:
        with self._write() as c:
            now_instances, now_receives = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(generation), 0) FROM instances i WHERE study_instance_uid=?"
                " AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.sop_instance_uid = i.sop_instance_uid)",
                (study_instance_uid,),
            ).fetchone()
            (study_updated_at,) = c.execute(
                "SELECT updated_at FROM studies WHERE study_instance_uid=?", (study_instance_uid,)
            ).fetchone()
            # Storing the manifest itself moved the study's updated_at: that is no change.
            # But if anything else arrived since the sources were read, the study must
            # stay a candidate.
            checked_at = study_updated_at if (now_instances, now_receives) == (instances, receives) else updated_at
            c.execute(
                "UPDATE manifests SET current=0 WHERE study_instance_uid=? AND current=1", (study_instance_uid,)
            )
            c.execute(
                "UPDATE manifests SET current=1, instances=?, receives=?, checked_at=? WHERE sop_instance_uid=?",
                (instances, receives, checked_at, sop_instance_uid),
            )

    def mark_manifest_checked(self, study_instance_uid: str, updated_at: float) -> None:
        with self._write() as c:
            c.execute(
                "UPDATE manifests SET checked_at=? WHERE study_instance_uid=? AND current=1 AND checked_at < ?",
                (updated_at, study_instance_uid, updated_at),
            )

    def stale_manifests(self) -> list[str]:
        with self._connection() as c:
            rows = c.execute("SELECT sop_instance_uid FROM manifests WHERE current=0").fetchall()
        return [uid for (uid,) in rows]

    def forget_manifest(self, sop_instance_uid: str) -> None:
        with self._write() as c:
            c.execute("DELETE FROM manifests WHERE sop_instance_uid=? AND current=0", (sop_instance_uid,))

    def manifest_count(self) -> int:
        with self._connection() as c:
            return int(c.execute("SELECT COUNT(*) FROM manifests WHERE current=1").fetchone()[0])

    def current_manifests(self) -> list[tuple[str, str, str]]:
        with self._connection() as c:
            rows = c.execute(
                "SELECT m.study_instance_uid, m.sop_instance_uid, i.path FROM manifests m"
                " JOIN instances i ON i.sop_instance_uid = m.sop_instance_uid"
                " WHERE m.current = 1 ORDER BY m.built_at, m.sop_instance_uid"
            ).fetchall()
        return [(str(study), str(uid), str(path)) for study, uid, path in rows]

    def remove_instance(self, sop_instance_uid: str) -> InstanceRow | None:
        with self._write() as c:
            row = self.get_instance(sop_instance_uid)  # nested: the same connection, inside this transaction
            if row is None:
                return None
            c.execute("DELETE FROM frames WHERE sop_instance_uid=?", (sop_instance_uid,))
            c.execute("DELETE FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
            # Queries must not find a series, study or patient left without instances.
            c.execute(
                "DELETE FROM series WHERE series_instance_uid=? AND NOT EXISTS"
                " (SELECT 1 FROM instances WHERE series_instance_uid=?)",
                (row.series_instance_uid, row.series_instance_uid),
            )
            patient = c.execute(
                "SELECT patient_pk FROM studies WHERE study_instance_uid=?", (row.study_instance_uid,)
            ).fetchone()
            c.execute(
                "DELETE FROM studies WHERE study_instance_uid=? AND NOT EXISTS"
                " (SELECT 1 FROM instances WHERE study_instance_uid=?)",
                (row.study_instance_uid, row.study_instance_uid),
            )
            if patient is not None:
                c.execute(
                    "DELETE FROM patients WHERE pk=? AND NOT EXISTS (SELECT 1 FROM studies WHERE patient_pk=?)",
                    (patient[0], patient[0]),
                )
        return row

    def ensure_setting(self, key: str, value: str) -> str:
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (key, value))
            (stored,) = c.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return str(stored)

