"""
The archive: received instances as Part 10 files, written so that none is ever lost.

A receive goes through three durable steps, and only then is the C-STORE acknowledged:

1. :meth:`Archive.write_incoming` writes the file under ``incoming/`` with a unique name
   and fsyncs it;
2. the catalog commits the instance, naming that incoming file;
3. :meth:`Archive.publish` renames it to its final place (atomically replacing an older
   version of the same instance) and fsyncs the directory.

A kill between 1 and 2 leaves an incoming file that no catalog row names: recovery
deletes it (it was never acknowledged). A kill between 2 and 3 leaves an incoming file
the catalog names: recovery finishes the rename. So a reader never sees a half-written
file under ``objects/``, and every acknowledged instance is complete there.

All methods block; they run on association or worker threads.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable

import attrs

from imageshare.dicom.uids import is_valid_uid

_SUFFIX = ".part"


@attrs.frozen
class Incoming:
    """A fully written, fsynced file waiting to be published."""

    sop_instance_uid: str
    name: str  # file name inside incoming/
    size: int


@attrs.frozen
class Recovery:
    published: tuple[str, ...]  # SOP Instance UIDs whose rename was finished
    removed: tuple[str, ...]  # incoming file names deleted (never acknowledged)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename or a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    """Files under ``root``: ``objects/`` (published) and ``incoming/`` (in flight)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.incoming = root / "incoming"
        for d in (root, self.objects, self.incoming):
            d.mkdir(parents=True, exist_ok=True)

    def relative_path(self, sop_instance_uid: str) -> str:
        """Where an instance lives, relative to the archive root.

        Two levels of hashed fan-out keep directories small at millions of instances.
        """
        if not is_valid_uid(sop_instance_uid):
            raise ValueError(f"not a valid UID: {sop_instance_uid!r}")
        h = hashlib.sha1(sop_instance_uid.encode("ascii")).hexdigest()
        return f"objects/{h[:2]}/{h[2:4]}/{sop_instance_uid}.dcm"

    def write_incoming(self, sop_instance_uid: str, chunks: Iterable[bytes]) -> Incoming:
        """Write and fsync a new incoming file holding ``chunks``."""
        if not is_valid_uid(sop_instance_uid):
            raise ValueError(f"not a valid UID: {sop_instance_uid!r}")
        name = f"{sop_instance_uid}.{uuid.uuid4().hex}{_SUFFIX}"
        path = self.incoming / name
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return Incoming(sop_instance_uid, name, size)

    def discard(self, incoming: Incoming) -> None:
        (self.incoming / incoming.name).unlink(missing_ok=True)

    def publish(self, incoming: Incoming) -> str:
        """Move an incoming file to its final place, durably; return the relative path."""
        rel = self.relative_path(incoming.sop_instance_uid)
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.incoming / incoming.name, final)
        fsync_dir(final.parent)
        return rel

    def path(self, relative: str) -> Path:
        return self.root / relative

    def recover(self, incoming_name_of: Callable[[str], str | None]) -> Recovery:
        """
        Settle what a crash left in ``incoming/``.

        Parameters
        ----------
        incoming_name_of
            Gives, for a SOP Instance UID, the incoming file name the catalog recorded
            for its last receive (``None`` if the catalog does not know the instance).
        """
        published, removed = [], []
        for path in sorted(self.incoming.iterdir()):
            name = path.name
            uid = name.split(".")
            # name = <uid>.<32 hex>.part, and the UID itself contains dots
            sop_uid = ".".join(uid[:-2]) if len(uid) >= 3 and name.endswith(_SUFFIX) else ""
            if sop_uid and is_valid_uid(sop_uid) and incoming_name_of(sop_uid) == name:
                self.publish(Incoming(sop_uid, name, path.stat().st_size))
                published.append(sop_uid)
            else:
                path.unlink(missing_ok=True)
                removed.append(name)
        if removed:
            fsync_dir(self.incoming)
        return Recovery(tuple(published), tuple(removed))
