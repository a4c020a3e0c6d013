#!/usr/bin/env python3
"""
WADO-URI benchmark: ImageShare against Orthanc, same objects, same run.

Objects: a 512x512 16-bit CT (``bench/ingest/corpus.py``) and a 1955x1841 15-bit CR
(``tests.helpers.make_cr``). ImageShare receives them by C-STORE; Orthanc (Debian's, with
the DICOMweb plugin, started with ``../shared/peers/dicom/start_orthanc.sh``) by its REST
API. For each object, wrk (1 thread, 1 keep-alive connection, ``--duration`` s per run)
measures, endpoints alternating between the servers, ``--reps`` times:

* ``application/dicom``: the object (Explicit VR Little Endian);
* ``image/jpeg``: a full-size rendering;
* ``image/jpeg`` with ``rows=256&columns=256``: a small rendering. Orthanc 1.10's WADO-URI
  ignores rows and columns (../shared/docs/peers-dicom.md section 4), so its answer is the
  full-size JPEG; ImageShare decodes a reduced resolution of its codestream.

wrk repeats one URL, so ImageShare answers from its cache of answers by ETag
(``[wado] cache_bytes``) after the first request; a second ImageShare with the cache off
(``imageshare-nocache``) shows what each answer costs to make.

Usage (needs Debian's wrk, dcmtk, orthanc and orthanc-dicomweb, and ../shared/peers/dicom)::

    python bench/wado/run.py [--duration 5] [--reps 3] [--json results.json]

Every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS = ROOT.parent / "shared" / "peers" / "dicom"
ORTHANC = "http://127.0.0.1:18042"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent / "ingest"))
from corpus import make_corpus  # noqa: E402  (bench/ingest/corpus.py)
from run import ImageShare, machine  # noqa: E402  (bench/ingest/run.py)

from tests.helpers import make_cr  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")
REPORT = """
done = function(s, lat, req)
  io.write(string.format("RESULT %.2f %d %d %d\\n", s.requests / (s.duration / 1e6),
    lat:percentile(50), lat:percentile(99),
    s.errors.status + s.errors.connect + s.errors.read + s.errors.timeout))
end
"""
ENDPOINTS = {
    "dicom": "contentType=application/dicom",
    "jpeg": "contentType=image/jpeg",
    "jpeg256": "contentType=image/jpeg&rows=256&columns=256",
}


def wrk(url: str, duration: int, script: Path) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", "-c1", f"-d{duration}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    m = re.search(r"^RESULT (\S+) (\d+) (\d+) (\d+)$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result for {url}:\n{out}")
    return {"req_s": float(m.group(1)), "p50_ms": int(m.group(2)) / 1000, "p99_ms": int(m.group(3)) / 1000,
            "errors": int(m.group(4))}


def fetch(url: str) -> tuple[int, str, int]:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.headers.get("Content-Type", ""), len(r.read())


def uids(path: Path) -> tuple[str, str, str]:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not 1 <= a.reps <= 100 or not 1 <= a.duration <= 600:
        p.error("--reps 1..100, --duration 1..600")
    for tool in ("wrk", "storescu"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (Debian packages wrk, dcmtk)")
    if not (PEERS / "start_orthanc.sh").exists():
        raise SystemExit(f"the Orthanc peer scripts are not at {PEERS}")

    work = Path(tempfile.mkdtemp(prefix="imageshare-wado-bench-"))
    script = work / "report.lua"
    script.write_text(REPORT)
    objects = {"ct": make_corpus(work / "ct", 1, seed="bench-wado")[0], "cr": make_cr(work)[0]}
    ours = ImageShare(work / "cached", [])
    bare = ImageShare(work / "nocache", ["wado.cache_bytes=0"])
    ours.start()
    bare.start()
    try:
        # A fresh peer: an Orthanc left running (or holding other objects) would skew it.
        subprocess.run([str(PEERS / "stop_orthanc.sh")], env=ENV, capture_output=True, timeout=60)
        subprocess.run([str(PEERS / "start_orthanc.sh"), "--wipe"], check=True, env=ENV, capture_output=True,
                       timeout=120)
        for path in objects.values():
            for server in (ours, bare):
                r = subprocess.run(["storescu", "-aec", "IMAGESHARE", "127.0.0.1", str(server.port), str(path)],
                                   capture_output=True, text=True, env=ENV, timeout=120)
                assert r.returncode == 0, r.stderr
            req = urllib.request.Request(f"{ORTHANC}/instances", data=path.read_bytes(), method="POST")
            urllib.request.urlopen(req, timeout=60).read()
        ours.wait_transcoded(len(objects))
        bare.wait_transcoded(len(objects))
        bases = {"imageshare": f"http://127.0.0.1:{ours.http}/wado",
                 "imageshare-nocache": f"http://127.0.0.1:{bare.http}/wado", "orthanc": f"{ORTHANC}/wado"}
        urls: dict[tuple[str, str, str], str] = {}
        for kind, path in objects.items():
            study, series, sop = uids(path)
            for server, base in bases.items():
                for name, query in ENDPOINTS.items():
                    url = f"{base}?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}&{query}"
                    urls[(kind, name, server)] = url
                    status, ctype, size = fetch(url)
                    print(f"  {kind} {name:8} {server:10} HTTP {status} {ctype:18} {size:9d} B", flush=True)
        runs: dict[tuple[str, str, str], list[dict[str, float]]] = {k: [] for k in urls}
        for _ in range(a.reps):
            for key, url in urls.items():  # servers alternate endpoint by endpoint
                runs[key].append(wrk(url, a.duration, script))
    finally:
        subprocess.run([str(PEERS / "stop_orthanc.sh")], capture_output=True, timeout=60)
        ours.stop()
        bare.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"WADO-URI, wrk 1 thread 1 connection, {a.duration} s x {a.reps} runs, medians")
    results: dict[str, Any] = {}
    for kind in objects:
        for name in ENDPOINTS:
            row = {}
            for server in bases:
                rs = runs[(kind, name, server)]
                row[server] = {f: statistics.median(r[f] for r in rs) for f in ("req_s", "p50_ms", "p99_ms")}
                row[server]["errors"] = sum(r["errors"] for r in rs)
                row[server]["runs"] = rs
            row["ratio"] = row["imageshare"]["req_s"] / max(row["orthanc"]["req_s"], 1e-9)
            row["ratio_nocache"] = row["imageshare-nocache"]["req_s"] / max(row["orthanc"]["req_s"], 1e-9)
            results[f"{kind}_{name}"] = row
            print(f"  {kind} {name:8} " + "  ".join(
                f"{server} {row[server]['req_s']:8.1f} req/s (p50 {row[server]['p50_ms']:6.2f} ms, "
                f"errors {row[server]['errors']})" for server in bases)
                + f"  ratio {row['ratio']:.2f}x (no cache {row['ratio_nocache']:.2f}x)", flush=True)
    info = machine()
    print(f"  machine: {info}")
    if a.json:
        a.json.write_text(json.dumps({"machine": info, "platform": platform.platform(), "results": results},
                                     indent=1))


if __name__ == "__main__":
    main()
