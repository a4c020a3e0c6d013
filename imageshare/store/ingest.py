"""
Receiving one instance: check it, archive it durably, record it in the catalog.

:meth:`Ingestor.store` blocks and is thread-safe: the DICOM listener calls it from
pynetdicom's association threads, which are already off the reactor, so the file writes
and the catalog commit happen right there (style.md 4.1). When it returns, the instance is
on disk, fsynced, published and committed; only then may the C-STORE be acknowledged.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable

import attrs
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from imageshare.dicom.attributes import CATALOG_TAGS, extract_raw
from imageshare.dicom.filemeta import encode_file_meta
from imageshare.dicom.uids import is_valid_uid
from imageshare.dicom.wellformed import InflatedTooLarge, MalformedDataset, check_dataset, inflate_buffer
from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.store.archive import Archive
from imageshare.store.catalog import REPLACE_SAME_SOURCE, ReplaceRefused
from imageshare.store.records import InstanceRecord

_log = Logger(namespace="imageshare.store")

# DICOM C-STORE failure statuses (PS3.4 Table B.2-1).
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# PS3.7 C.5.x, listed for C-STORE in PS3.4 B.2.3: the sender may not change this instance.
NOT_AUTHORIZED = 0x0124

#: The default ``max_object_size``, as in ``[dicom]``.
DEFAULT_MAX_OBJECT_SIZE = 1 << 30


class IngestError(Exception):
    """The instance was not stored; ``status`` and ``comment`` go back to the sender."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        # Error Comment is LO: at most 64 characters, no backslash (the value separator)
        # and no control characters, whatever the exception text held.
        self.comment = re.sub(r"[^\x20-\x5b\x5d-\x7e]", "?", comment)[:64]


@attrs.frozen
class IdentityChange:
    """A stored instance changed patient identity (logged without values; audited with the new one)."""

    sop_instance_uid: str
    study_instance_uid: str
    calling_aet: str
    changes: tuple[str, ...]  # "instance patient identity", "study moved to another patient"
    # As stored now: the new identity, for the audit trail; kept out of repr (never logged).
    record: InstanceRecord = attrs.field(repr=False)


@attrs.frozen
class Stored:
    record: InstanceRecord
    generation: int
    path: str
    size: int


class Ingestor:
    """
    Checks, archives and catalogs received instances.

    Parameters
    ----------
    archive, catalog
        Where instances go.
    max_object_size
        Largest data set stored, in bytes; a deflated one counts inflated (``[dicom]
        max_object_size``). Larger ones are refused with Out of Resources.
    stripes
        Lock stripes, see below.
    """

    def __init__(
        self,
        archive: Archive,
        catalog: ICatalog,
        *,
        max_object_size: int = DEFAULT_MAX_OBJECT_SIZE,
        stripes: int = 64,
        replace: str = REPLACE_SAME_SOURCE,
        on_identity_change: Callable[[IdentityChange], Any] | None = None,
    ) -> None:
        self._archive = archive
        self._catalog = catalog
        self.max_object_size = max_object_size
        #: ``[dicom] replace``: who may change a stored instance (any, same_source, never).
        self.replace = replace
        #: Called (in the storing thread, after the commit) when an identity changed.
        self.on_identity_change = on_identity_change
        # Two associations sending the same instance at once must publish in the order
        # they committed, or the file and the catalog would disagree: lock per UID stripe.
        self._locks = [threading.Lock() for _ in range(stripes)]

    def parse(self, dataset: bytes | memoryview, transfer_syntax: str) -> InstanceRecord:
        """Check the encoding of a received data set and read the catalog attributes.

        Only the top-level elements the catalog needs are decoded: the structural check
        locates them on its way, which costs far less than a full pydicom parse.

        Raises
        ------
        IngestError
            When the data set is truncated, malformed or cannot be read.
        """
        ts = UID(transfer_syntax)
        if not ts.is_transfer_syntax:
            raise IngestError(CANNOT_UNDERSTAND, f"unknown transfer syntax {transfer_syntax}")
        # Our limit, not a fault of the data set: Out of Resources (PS3.4 B.2.3).
        too_large = IngestError(OUT_OF_RESOURCES, f"data set larger than {self.max_object_size} bytes")
        if len(dataset) > self.max_object_size:
            raise too_large
        plain: bytes | memoryview = dataset
        try:
            if ts == DeflatedExplicitVRLittleEndian:
                # Inflated piece by piece: a deflate bomb is refused at the limit.
                plain = memoryview(inflate_buffer(dataset, self.max_object_size))
            found = check_dataset(
                plain, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian, wanted=CATALOG_TAGS
            )
        except InflatedTooLarge:
            raise too_large from None
        except MalformedDataset as e:
            raise IngestError(CANNOT_UNDERSTAND, f"malformed data set: {e}") from None
        return extract_raw(
            plain, found, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
            transfer_syntax_uid=str(ts),
        )

    def store(
        self,
        dataset: bytes | memoryview,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_aet: str,
        source_cert: str = "",
    ) -> Stored:
        """
        Store one received instance durably.

        Parameters
        ----------
        dataset
            The data set as received (negotiated transfer syntax, no file meta).
        transfer_syntax, sop_class_uid, sop_instance_uid
            From the presentation context and the C-STORE request.
        calling_aet
            The sender, recorded with the instance.
        source_cert
            ``sha256:<hex>`` of the sender's certificate SPKI over TLS, else empty: with
            the calling AE, the source that alone may replace the instance
            (``replace = same_source``).

        Raises
        ------
        IngestError
            Nothing was stored; the status and comment say why.
        """
        record = self.parse(dataset, transfer_syntax)
        if not record.sop_instance_uid:
            raise IngestError(CANNOT_UNDERSTAND, "data set has no SOP Instance UID")
        for name, value in (
            ("SOP Instance UID", record.sop_instance_uid),
            ("SOP Class UID", record.sop_class_uid),
            ("Study Instance UID", record.study_instance_uid),
            ("Series Instance UID", record.series_instance_uid),
        ):
            if not is_valid_uid(value):
                raise IngestError(CANNOT_UNDERSTAND, f"missing or invalid {name}")
        if record.sop_instance_uid != sop_instance_uid:
            raise IngestError(CANNOT_UNDERSTAND, "SOP Instance UID differs from the request's")
        if record.sop_class_uid != sop_class_uid:
            raise IngestError(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request's")

        head = encode_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=str(transfer_syntax),
            source_aet=calling_aet,
        )
        try:
            incoming = self._archive.write_incoming(sop_instance_uid, (head, dataset))
        except OSError as e:
            raise IngestError(OUT_OF_RESOURCES, f"cannot write: {e.strerror}") from None
        lock = self._locks[hash(sop_instance_uid) % len(self._locks)]
        changes: list[str] = []
        with lock:
            try:
                generation = self._catalog.record_instance(
                    record,
                    path=self._archive.relative_path(sop_instance_uid),
                    size=incoming.size,
                    incoming=incoming.name,
                    calling_aet=calling_aet,
                    source_cert=source_cert,
                    replace=self.replace,
                    changes=changes,
                )
            except ReplaceRefused as e:
                self._archive.discard(incoming)
                raise IngestError(NOT_AUTHORIZED, str(e)) from None
            except Exception as e:
                self._archive.discard(incoming)
                raise IngestError(OUT_OF_RESOURCES, f"cannot record: {type(e).__name__}") from None
            try:
                path = self._archive.publish(incoming)
            except OSError as e:
                # Committed but not published: recovery at the next start finishes it.
                raise IngestError(OUT_OF_RESOURCES, f"cannot publish: {e.strerror}") from None
        if changes:
            self._identity_changed(IdentityChange(sop_instance_uid, record.study_instance_uid, calling_aet,
                                                  tuple(changes), record))
        return Stored(record, generation, path, incoming.size)

    def _identity_changed(self, change: IdentityChange) -> None:
        # Warning level, and never the values: which identifiers changed, not to what.
        _log.warn(
            "patient identity changed by {calling_aet} storing {sop_instance_uid} (study {study_instance_uid}):"
            " {changes}",
            calling_aet=change.calling_aet,
            sop_instance_uid=change.sop_instance_uid,
            study_instance_uid=change.study_instance_uid,
            changes=", ".join(change.changes),
        )
        if self.on_identity_change is not None:
            try:
                self.on_identity_change(change)
            except Exception:
                _log.failure("on_identity_change callback failed")

    def recover(self) -> tuple[int, int]:
        """Finish or undo what a crash left half-way; return (published, removed)."""

        def incoming_name_of(uid: str) -> str | None:
            row = self._catalog.get_instance(uid)
            return row.incoming if row is not None else None

        result = self._archive.recover(incoming_name_of)
        return len(result.published), len(result.removed)

