"""Benchmark corpus: N 512x512 16-bit CT instances built from a real CT image.

pydicom ships a real 128x128 CT (CT_small.dcm); it is upsampled to 512x512 with bilinear
interpolation plus a small deterministic noise, so that it is as large as a clinical CT
slice and compresses like one (not like a flat synthetic image).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def ct_slice_512(seed: int = 0) -> tuple[np.ndarray, object]:
    src = dcmread(get_testdata_file("CT_small.dcm"))
    img = src.pixel_array.astype(np.float64)
    # Bilinear upsampling by 4 in each direction.
    y = np.linspace(0, img.shape[0] - 1, 512)
    x = np.linspace(0, img.shape[1] - 1, 512)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, img.shape[0] - 1), np.minimum(x0 + 1, img.shape[1] - 1)
    wy, wx = (y - y0)[:, None], (x - x0)[None, :]
    up = (img[y0][:, x0] * (1 - wy) * (1 - wx) + img[y1][:, x0] * wy * (1 - wx)
          + img[y0][:, x1] * (1 - wy) * wx + img[y1][:, x1] * wy * wx)
    rng = np.random.default_rng(seed)
    up += rng.normal(0, 6, up.shape)
    return np.clip(np.rint(up), -2048, 2047).astype(src.pixel_array.dtype), src


def make_corpus(folder: Path, count: int, seed: str = "bench-ingest") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pixels, src = ct_slice_512()
    base = copy.deepcopy(src)
    base.Rows, base.Columns = 512, 512
    base.PixelData = pixels.tobytes()
    base.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    study, series = generate_uid(entropy_srcs=[seed, "study"]), generate_uid(entropy_srcs=[seed, "series"])
    paths = []
    for i in range(count):
        ds = base
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = folder / f"ct_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
