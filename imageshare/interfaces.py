"""The seams between the parts of the server (zope interfaces)."""

from __future__ import annotations

from typing import Iterable, Sequence

from zope.interface import Interface

from imageshare.dicom.manifest import ManifestSources
from imageshare.store.records import Counts, FrameRecord, InstanceRecord, InstanceRow, State


class ICatalog(Interface):
    """
    The index of everything stored: patients, studies, series, instances and frames.

    Every method blocks and is thread-safe; call them from worker or association threads,
    never from the reactor thread. SQLite implements it today; a server database can
    replace it without touching the callers.
    """

    def record_instance(
        record: InstanceRecord, *, path: str, size: int, incoming: str, calling_aet: str,
        source_cert: str = "", replace: str = "any", changes: list[str] | None = None,
    ) -> int:
        """Insert or replace an instance (state pending); return its new generation.

        ``replace`` (any, same_source, never) says who may change a stored instance or the
        patient of a stored study; ``source_cert`` is the sender's certificate digest
        (``sha256:<hex>``, or empty); identity changes made are appended to ``changes``.
        Raises ``ReplaceRefused`` (``store.catalog``) with nothing changed."""

    def get_instance(sop_instance_uid: str) -> InstanceRow | None:
        """The instance, or ``None``."""

    def pending(limit: int, exclude: Iterable[str] = ()) -> list[str]:
        """Up to ``limit`` instances waiting for transcoding, oldest first."""

    def complete(
        sop_instance_uid: str,
        generation: int,
        state: State,
        reason: str,
        frames: Sequence[FrameRecord],
    ) -> bool:
        """Record a transcoding outcome; ``False`` if the generation is no longer current."""

    def frames(sop_instance_uid: str) -> list[FrameRecord]:
        """The frames of an instance, in frame order."""

    def counts() -> Counts:
        """Totals for the status page."""

    def remove_instance(sop_instance_uid: str) -> InstanceRow | None:
        """Drop an instance, its frames, and its series, study and patient once empty.

        Returns the removed row (``None`` if unknown). Only the catalog changes: the
        caller deletes the archive file (and any derived files) after this commits, so a
        crash in between leaves a stray file, never a row without its file.
        """

    def ensure_setting(key: str, value: str) -> str:
        """The stored value of ``key``, storing ``value`` first if there is none."""

    # Study manifests (imageshare/manifests.py). One manifest service per catalog.

    def manifest_candidates(limit: int) -> list[tuple[str, float]]:
        """(Study Instance UID, last receive time) of studies received since their manifest
        was last known to be up to date, or that have none; oldest first."""

    def manifest_sources(study_instance_uid: str) -> ManifestSources | None:
        """What the study's manifest lists (never our own manifests) and the one in force."""

    def begin_manifest(study_instance_uid: str, sop_instance_uid: str) -> None:
        """Note a manifest about to be stored, so that it never counts as the study's own
        instance, even if the build is interrupted."""

    def adopt_manifest(
        study_instance_uid: str, sop_instance_uid: str, *, instances: int, receives: int, updated_at: float
    ) -> None:
        """Make a stored manifest the study's one in force, built from sources with these
        marks; the one before becomes stale."""

    def mark_manifest_checked(study_instance_uid: str, updated_at: float) -> None:
        """The manifest in force is up to date with the study as of ``updated_at``."""

    def stale_manifests() -> list[str]:
        """Manifests superseded, or whose build was interrupted: to be removed."""

    def forget_manifest(sop_instance_uid: str) -> None:
        """Stop tracking a stale manifest once its instance and file are gone."""

    def manifest_count() -> int:
        """Studies with a manifest in force."""

    def current_manifests() -> list[tuple[str, str, str]]:
        """(Study Instance UID, SOP Instance UID, archive path) of every manifest in force,
        oldest first."""

    def close() -> None:
        """Release every connection."""
