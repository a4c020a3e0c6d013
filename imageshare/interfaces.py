"""The seams between the parts of the server (zope interfaces)."""

from __future__ import annotations

from typing import Iterable, Sequence

from zope.interface import Interface

from imageshare.store.records import Counts, FrameRecord, InstanceRecord, InstanceRow, State


class ICatalog(Interface):
    """
    The index of everything stored: patients, studies, series, instances and frames.

    Every method blocks and is thread-safe; call them from worker or association threads,
    never from the reactor thread. SQLite implements it today; a server database can
    replace it without touching the callers.
    """

    def record_instance(
        record: InstanceRecord, *, path: str, size: int, incoming: str, calling_aet: str
    ) -> int:
        """Insert or replace an instance (state pending); return its new generation."""

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

    def close() -> None:
        """Release every connection."""
