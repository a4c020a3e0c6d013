"""Helpers shared by the tests."""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE


def wire_dataset(path: str | Path) -> tuple[bytes, UID, str, str]:
    """A Part 10 file's data set as it travels in a C-STORE: (bytes, syntax, class, instance)."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL, explicit LE
    ds = dcmread(path, stop_before_pixels=True)
    return (
        raw[144 + group_length :],
        ds.file_meta.TransferSyntaxUID,
        str(ds.get("SOPClassUID", "")),
        str(ds.get("SOPInstanceUID", "")),
    )


def make_instances(folder: Path, count: int, *, source: str = "CT_small.dcm", seed: str = "t") -> list[Path]:
    """Copies of a pydicom test image with fresh, deterministic UIDs (one study, one series)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    src = dcmread(sample_file(source))
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    paths = []
    for i in range(count):
        src.StudyInstanceUID, src.SeriesInstanceUID = study, series
        src.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(i)])
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.InstanceNumber = i + 1
        path = folder / f"{i:04d}.dcm"
        src.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sample_file(name: str) -> Path:
    """A test file bundled with pydicom; never downloads (CI has no network)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with pydicom"
    return Path(path)


def part10_file(path: Path, dataset: bytes, *, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str) -> Path:
    """A Part 10 file whose data set bytes are exactly ``dataset`` (which may be broken).

    pynetdicom sends a file given by path without decoding it, so this is how a test puts
    truncated or garbage data sets on the wire.
    """
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1489.99"
    head = io.BytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    path.write_bytes(head.getvalue() + dataset)
    return path


def scu_store(port: int, paths: list[Path], *, ae_title: str = "TESTSCU", called: str = "IMAGESHARE",
              max_pdu: int = 16382, contexts: Any = None) -> list[int | None]:
    """Send files in one association; return the status of each (None if no response)."""
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    if contexts is None:
        seen = set()
        for ds in (dcmread(p, stop_before_pixels=True) for p in paths):
            key = (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            if key not in seen:
                seen.add(key)
                ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    else:
        ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [None] * len(paths)
    statuses: list[int | None] = []
    try:
        for path in paths:
            status = assoc.send_c_store(path)  # sent as the file holds it, no re-encoding
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        assoc.release()
    return statuses


def make_cr(folder: Path) -> tuple[Path, np.ndarray]:
    """A 1955x1841 15-bit CR-sized image of smooth structure plus noise, as a DICOM file."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:1841, 0:1955]
    img = 12000 + 6000 * np.sin(x / 97.0) * np.cos(y / 131.0) + rng.normal(0, 40, (1841, 1955))
    pixels = np.clip(img, 0, 32767).astype(np.uint16)
    ds = dcmread(sample_file("CT_small.dcm"))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["jpip-cr"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 14, 0
    for kw in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    ds.PixelData = pixels.tobytes()
    path = folder / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pixels


def rss(pid: int | str = "self") -> int:
    """Resident memory of a process (this one by default), in bytes (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def get_from(port: int, path: str, source: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One GET to 127.0.0.1:``port`` on a new connection from ``source`` (another loopback
    address stands for another client); blocking, so call it in a thread."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()
