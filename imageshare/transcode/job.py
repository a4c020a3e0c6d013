"""
Transcoding one instance: archive file in, one indexed codestream per frame out.

:class:`TranscodeJob` is the blocking unit of work the transcode pool runs. It reads the
archived instance, decides what it is (image, non-image, image we cannot stream), encodes
every frame, indexes every codestream once, and records the outcome in the catalog. The
outcome applies only if the instance was not received again meanwhile (its generation is
unchanged); otherwise the work is dropped and the newer receive is transcoded instead.

Layout under the data directory, one folder per generation so that a re-send never mixes
old and new codestreams::

    derived/<h2>/<h2>/<SOP Instance UID>/g<generation>/f00001.j2k  (+ .idx index)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Protocol

from pydicom import dcmread

from imageshare.codestream.errors import CodestreamError
from imageshare.codestream.index import build_index
from imageshare.interfaces import ICatalog
from imageshare.store.archive import Archive, fsync_dir
from imageshare.store.records import FrameRecord, State
from imageshare.transcode import openjpeg
from imageshare.transcode.errors import NotAnImage, NotStreamable, TranscodeError
from imageshare.transcode.params import EncodeParams
from imageshare.transcode.pixels import classify, iter_frames


class Cancelled(Exception):
    """The server is stopping; the instance stays pending."""


class StopFlag(Protocol):
    """Set when the server stops: a ``threading.Event`` or :class:`imageshare.workers.SharedFlag`."""

    def is_set(self) -> bool: ...


def mark_failed(catalog: ICatalog, sop_instance_uid: str, reason: str) -> bool:
    """Record a failure decided outside the job (e.g. its worker process kept crashing)."""
    row = catalog.get_instance(sop_instance_uid)
    if row is None or row.state is not State.PENDING:
        return False
    return catalog.complete(sop_instance_uid, row.generation, State.FAILED, reason, [])


class TranscodeJob:
    """Blocking; safe to run for different instances on several threads at once."""

    def __init__(
        self,
        data_dir: Path,
        archive: Archive,
        catalog: ICatalog,
        params: EncodeParams,
        stopping: StopFlag,
    ) -> None:
        self._data_dir = data_dir
        self._archive = archive
        self._catalog = catalog
        self._params = params
        self._stopping = stopping

    def instance_dir(self, sop_instance_uid: str) -> str:
        h = hashlib.sha1(sop_instance_uid.encode("ascii")).hexdigest()
        return f"derived/{h[:2]}/{h[2:4]}/{sop_instance_uid}"

    def __call__(self, sop_instance_uid: str) -> str:
        """Transcode one instance; return a short summary for the log."""
        row = self._catalog.get_instance(sop_instance_uid)
        if row is None or row.state is not State.PENDING:
            return "nothing to do"
        generation = row.generation
        rel_dir = f"{self.instance_dir(sop_instance_uid)}/g{generation}"
        out_dir = self._data_dir / rel_dir
        try:
            frames = self._transcode(self._archive.path(row.path), out_dir, rel_dir)
        except Cancelled:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
        except NotAnImage:
            return self._finish(sop_instance_uid, generation, State.NOT_IMAGE, "no pixel data", [], out_dir)
        except NotStreamable as e:
            return self._finish(sop_instance_uid, generation, State.NOT_STREAMABLE, str(e), [], out_dir)
        except (TranscodeError, CodestreamError, OSError, ValueError, MemoryError) as e:
            reason = f"{type(e).__name__}: {e}"[:500]
            return self._finish(sop_instance_uid, generation, State.FAILED, reason, [], out_dir)
        except Exception as e:
            # pydicom's decoders raise a wide range of exceptions for corrupt pixel data.
            reason = f"cannot decode pixel data: {type(e).__name__}: {e}"[:500]
            return self._finish(sop_instance_uid, generation, State.FAILED, reason, [], out_dir)
        return self._finish(sop_instance_uid, generation, State.STREAMABLE, "", frames, out_dir)

    def _transcode(self, source: Path, out_dir: Path, rel_dir: str) -> list[FrameRecord]:
        ds = dcmread(source)
        info = classify(ds)
        # Left over from a run that was killed: this generation starts from scratch.
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        frames: list[FrameRecord] = []
        for number, frame in enumerate(iter_frames(ds, info), start=1):
            if self._stopping.is_set():
                raise Cancelled()
            name = f"f{number:05d}"
            j2c = out_dir / f"{name}.j2k"
            precision = info.precision_of(frame)
            size = openjpeg.encode(
                frame,
                j2c,
                precision=precision,
                signed=info.signed,
                colour_transform=info.colour_transform,
                params=self._params,
            )
            index = build_index(j2c.read_bytes())
            (out_dir / f"{name}.idx").write_bytes(index.to_json())
            frames.append(
                FrameRecord(
                    frame_number=number,
                    codestream_path=f"{rel_dir}/{name}.j2k",
                    codestream_size=size,
                    index_path=f"{rel_dir}/{name}.idx",
                    width=info.columns,
                    height=info.rows,
                    components=info.samples,
                    precision=precision,
                    signed=info.signed,
                )
            )
        # Derived data can always be made again, but the catalog must never point at files
        # that a crash could lose: make them durable before the catalog names them.
        for f in out_dir.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(out_dir)
        return frames

    def _finish(
        self,
        sop_instance_uid: str,
        generation: int,
        state: State,
        reason: str,
        frames: list[FrameRecord],
        out_dir: Path,
    ) -> str:
        if not frames:
            shutil.rmtree(out_dir, ignore_errors=True)
        if not self._catalog.complete(sop_instance_uid, generation, state, reason, frames):
            # Received again while we worked: this output is stale.
            shutil.rmtree(out_dir, ignore_errors=True)
            return "superseded by a newer receive"
        # Older generations are no longer referenced by the catalog.
        parent = out_dir.parent
        if parent.exists():
            for old in parent.iterdir():
                if old.name != out_dir.name:
                    shutil.rmtree(old, ignore_errors=True)
        if state is State.STREAMABLE:
            return f"{len(frames)} frame(s) streamable"
        return f"{state.value}: {reason}" if reason else state.value
