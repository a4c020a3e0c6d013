#!/usr/bin/env python3
"""
JPIP benchmark: ImageShare against OpenJPEG's opj_server, same image, same run.

The image is a 1955x1841 15-bit CR-sized frame (smooth structure plus noise). ImageShare
receives it by C-STORE and serves its own codestream; opj_server serves the same pixels
prepared by ``../shared/peers/jpip/prepare_target.py`` (same coding: RPCL, 128x128
precincts, 5 layers, lossless). wrk (1 thread, keep-alive, 1 connection, bounded by
``--duration``) measures, for each server in turn:

(a) first view in a new session:  ``target=..&fsiz=256,256&type=jpp-stream&cnew=http``
(b) full resolution, stateless:   ``target=..&fsiz=99999,99999&type=jpp-stream``
(c) repeat in a session:          ``cid=..&fsiz=256,256`` (everything cached: EOR only)

Usage (needs wrk, lighttpd and opj_server from Debian, and ../shared/peers/jpip)::

    python bench/jpip/run.py [--duration 5] [--json results.json]

Every server listens on 127.0.0.1 only; opj_server is started and stopped with the peer
scripts (in a private network namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS = ROOT.parent / "shared" / "peers" / "jpip"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent / "ingest"))
from run import ImageShare, machine  # noqa: E402  (bench/ingest/run.py)

from tests.helpers import make_cr  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")


def wrk(url: str, duration: int) -> dict[str, Any]:
    """Run wrk once; return requests/s, transfer and latency percentiles (ms)."""
    out = subprocess.run(
        ["wrk", "-t1", "-c1", f"-d{duration}s", "--latency", url],
        capture_output=True, text=True, timeout=duration + 60,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "req_s": float(rps.group(1)) if rps else 0.0,
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "raw": out,
    }


def get(url: str) -> tuple[dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=60) as r:
        return {k.lower(): v for k, v in r.headers.items()}, r.read()


def cid_of(headers: dict[str, str]) -> str:
    return dict(i.split("=", 1) for i in headers["jpip-cnew"].split(","))["cid"]


def measure(name: str, base: str, target: str, duration: int) -> dict[str, Any]:
    """The three runs against one server; sizes checked with one request each."""
    results: dict[str, Any] = {}
    headers, body = get(f"{base}?target={target}&fsiz=256,256&type=jpp-stream&cnew=http")
    cid = cid_of(headers)
    queries = {
        "repeat_in_session": f"cid={cid}&fsiz=256,256",
        "first_view_new_session": f"target={target}&fsiz=256,256&type=jpp-stream&cnew=http",
        "full_resolution": f"target={target}&fsiz=99999,99999&type=jpp-stream",
    }
    for label, query in queries.items():
        _, sample = get(f"{base}?{query}")
        r = wrk(f"{base}?{query}", duration)
        r["bytes"] = len(sample)
        results[label] = r
        print(f"  {name:10} {label:24} {r['req_s']:9.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "
              f"p99 {r['p99_ms']:7.2f} ms  {len(sample):9d} B  non-2xx {r['non_2xx']}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    for tool in ("wrk", "opj_server", "lighttpd", "storescu"):
        if not shutil.which(tool) and not Path(f"/usr/bin/{tool}").exists() and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed (Debian package wrk, libopenjpip-server, lighttpd or dcmtk)")
    if not PEERS.exists():
        raise SystemExit(f"the opj_server peer scripts are not at {PEERS}")

    work = Path(tempfile.mkdtemp(prefix="imageshare-jpip-bench-"))
    dcm, _ = make_cr(work)
    from pydicom import dcmread

    uid = str(dcmread(dcm, stop_before_pixels=True).SOPInstanceUID)
    # Sessions in (a) are never closed by the load generator: allow plenty, as opj_server does.
    ours = ImageShare(work, ["jpip.max_sessions=1000000", "jpip.session_timeout=600"])
    ours.start()
    peer_env = dict(ENV, JPIP_PEER_DIR=str(work / "peer"), PYTHON=sys.executable)
    try:
        r = subprocess.run(["storescu", "-aec", "IMAGESHARE", "127.0.0.1", str(ours.port), str(dcm)],
                           capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode == 0, r.stderr
        ours.wait_transcoded(1)
        subprocess.run([sys.executable, str(PEERS / "prepare_target.py"), str(dcm), "CR"],
                       check=True, env=peer_env, timeout=300, capture_output=True)
        url = subprocess.run([str(PEERS / "start_opj_server.sh")], check=True, env=peer_env,
                             capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
        time.sleep(0.5)
        print(f"1955x1841 15-bit CR, wrk 1 thread 1 connection {a.duration} s per run", flush=True)
        results = {
            "imageshare": measure("imageshare", f"http://127.0.0.1:{ours.http}/jpip", uid, a.duration),
            "opj_server": measure("opj_server", url, "CR.jp2", a.duration),
        }
    finally:
        subprocess.run([str(PEERS / "stop_opj_server.sh")], env=peer_env, capture_output=True, timeout=60)
        ours.stop()
    ratios = {k: results["imageshare"][k]["req_s"] / max(results["opj_server"][k]["req_s"], 1e-9)
              for k in results["imageshare"]}
    print("  ratio ImageShare/opj_server (req/s): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    info = machine()
    info["opj_server"] = "Debian libopenjpip-server"
    print(f"  machine: {info}")
    if a.json:
        for r in results.values():
            for v in r.values():
                v.pop("raw", None)
        a.json.write_text(json.dumps({"machine": info, "results": results, "ratios": ratios,
                                      "platform": platform.platform()}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
