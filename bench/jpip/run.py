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

Before those, a viewer session of 20 windows (``WALK``: open, zoom in, pan, zoom out, full
image) is replayed with ``imageshare.jpip_cli.JpipClient``, one request after the other, each
repetition in a fresh session (``--walk-reps`` timed, after one untimed warm-up): the median
total time of the 20 requests and the bytes received (JPP stream in the HTTP bodies, or
http-tcp chunks with their headers) and held by the client cache, over

* ImageShare, ``cnew=http``;
* ImageShare, ``cnew=http-tcp`` (Annex G: requests on HTTP, data on the auxiliary TCP
  connection announced as ``auxport``); both ImageShare caches are checked to rebuild the
  exact DICOM pixels (untimed);
* opj_server, ``cnew=http``, its sessions left open (``cclose`` crashes it). Its http-tcp is
  not measured: it crashes after each response (../shared/docs/peers-jpip.md, 3.6 item 5).

Usage (needs wrk, lighttpd and opj_server from Debian, and ../shared/peers/jpip)::

    python bench/jpip/run.py [--duration 5] [--walk-reps 5] [--json results.json]

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
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS = ROOT.parent / "shared" / "peers" / "jpip"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent / "ingest"))
from run import ImageShare, machine  # noqa: E402  (bench/ingest/run.py)

from imageshare.jpip_cli import JpipClient  # noqa: E402
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


# The viewer session: (fsiz, roff, rsiz) per request, for the 1955x1841 image, whose levels are
# 1955x1841, 978x921, 489x461, 245x231, ... (ceil of halves: 921, not 920, since fsiz rounds
# down and 978,920 would get 489x461). Open at 1/8 and zoom in to 1/2; pan at 1/2 (all cached
# by then: round trips only); zoom to full resolution and pan a 512x512 view in a snake of 10
# steps of 384 px (overlapping by 128 px = one precinct: only the new precincts should come);
# zoom out (cached: EOR only); finally the whole image at full resolution (the rest of it).
Window = tuple[str, str | None, str | None]
WALK: tuple[Window, ...] = (
    ("245,231", None, None), ("489,461", None, None), ("978,921", None, None),
    *(("978,921", f"{x},{y}", "512,512") for x, y in ((0, 0), (233, 0), (466, 204), (466, 409))),
    *(("1955,1841", f"{x},{y}", "512,512")
      for x, y in ((0, 0), (384, 0), (768, 0), (1152, 0), (1152, 384), (768, 384), (384, 384),
                   (384, 768), (768, 768), (1152, 768))),
    ("489,461", None, None), ("978,921", None, None), ("1955,1841", None, None),
)
assert len(WALK) == 20


class CountingClient(JpipClient):
    """A JpipClient that counts the bytes it receives: HTTP bodies and aux-channel data."""

    received = 0

    def _get(self, fields: dict[str, Any]) -> tuple[dict[str, str], bytes]:
        headers, body = super()._get(fields)
        self.received += len(body)
        return headers, body

    def _fill(self, n: int) -> None:
        before = len(self._aux_buffer)  # _fill only appends to the buffer (or raises)
        super()._fill(n)
        self.received += len(self._aux_buffer) - before


def walk(name: str, url: str, transport: str, reps: int, close: bool,
         pixels: np.ndarray | None) -> dict[str, Any]:
    """Replay WALK ``reps`` times (plus one warm-up), a fresh session each; the median time.

    ``close``: end each session with cclose (untimed). ``pixels``: check once, untimed, that
    the last session's cache rebuilds them exactly at full resolution.
    """
    times: list[float] = []
    for rep in range(reps + 1):  # rep 0 warms up (first use of the target, connections)
        client = CountingClient(url, session=True, transport=transport, timeout=60)
        reasons: list[int] = []
        t0 = time.perf_counter()
        for i, (fsiz, roff, rsiz) in enumerate(WALK):
            # opj_server needs the return type on the session's first request
            reasons.append(client.request(fsiz=fsiz, roff=roff, rsiz=rsiz, type="jpp-stream" if i == 0 else None))
        elapsed = time.perf_counter() - t0
        if close:
            client.close()
        if client.transport != transport:
            raise RuntimeError(f"{name}: asked for {transport}, granted {client.transport}")
        if rep:
            times.append(elapsed * 1000)
    exact = None
    if pixels is not None:
        exact = bool(np.array_equal(client.view(0, "1955,1841")[0], pixels))
    r = {"transport": client.transport, "median_ms": statistics.median(times), "times_ms": times,
         "bytes": client.received, "cached_bytes": client.cache.size, "eor_reasons": reasons,
         "pixels_exact": exact}
    check = "" if exact is None else "  pixels exact" if exact else "  PIXELS DIFFER"
    print(f"  {name:10} walk {transport:8} {len(WALK)} requests  median {r['median_ms']:8.1f} ms  "
          f"{r['bytes']:9d} B received  {r['cached_bytes']:9d} B cached{check}", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--walk-reps", type=int, default=5, help="timed repetitions of the 20-window session")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not 1 <= a.walk_reps <= 1000:
        p.error("--walk-reps must be 1..1000")
    for tool in ("wrk", "opj_server", "lighttpd", "storescu"):
        if not shutil.which(tool) and not Path(f"/usr/bin/{tool}").exists() and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed (Debian package wrk, libopenjpip-server, lighttpd or dcmtk)")
    if not PEERS.exists():
        raise SystemExit(f"the opj_server peer scripts are not at {PEERS}")

    work = Path(tempfile.mkdtemp(prefix="imageshare-jpip-bench-"))
    dcm, pixels = make_cr(work)
    from pydicom import dcmread

    uid = str(dcmread(dcm, stop_before_pixels=True).SOPInstanceUID)
    # Sessions in (a) are never closed by the load generator: allow plenty, as opj_server does.
    # tcp_listen: the http-tcp aux listener on a free loopback port (announced in JPIP-cnew).
    ours = ImageShare(work, ["jpip.max_sessions=1000000", "jpip.session_timeout=600",
                             "jpip.tcp_listen=tcp:0:interface=127.0.0.1"])
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
        # The walks first, on fresh servers: the wrk runs leave thousands of open sessions.
        print(f"1955x1841 15-bit CR, {len(WALK)}-window viewer session, median of {a.walk_reps}", flush=True)
        ours_url = f"http://127.0.0.1:{ours.http}/jpip?target={uid}"
        walks = {
            "imageshare_http": walk("imageshare", ours_url, "http", a.walk_reps, True, pixels),
            "imageshare_http-tcp": walk("imageshare", ours_url, "http-tcp", a.walk_reps, True, pixels),
            # No cclose: any cclose (with or without a window) segfaults opj_server; a bare one
            # can leave its temp file behind, and the respawned server then answers 503 to all.
            "opj_server_http": walk("opj_server", f"{url}?target=CR.jp2", "http", a.walk_reps, False, None),
        }
        print("  opj_server walk http-tcp: skipped (opj_server crashes after each http-tcp response,"
              " ../shared/docs/peers-jpip.md 3.6 item 5; its aux port 60000 is also inside its"
              " private network namespace)", flush=True)
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
    ms = {k: v["median_ms"] for k, v in walks.items()}
    walk_ratios = {
        "imageshare_http/imageshare_http-tcp": ms["imageshare_http"] / ms["imageshare_http-tcp"],
        "imageshare_http/opj_server_http": ms["imageshare_http"] / ms["opj_server_http"],
        "imageshare_http-tcp/opj_server_http": ms["imageshare_http-tcp"] / ms["opj_server_http"],
    }
    print("  walk time ratio (below 1: the first is faster): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in walk_ratios.items()))
    info = machine()
    info["opj_server"] = "Debian libopenjpip-server"
    print(f"  machine: {info}")
    if a.json:
        for r in results.values():
            for v in r.values():
                v.pop("raw", None)
        a.json.write_text(json.dumps({"machine": info, "results": results, "ratios": ratios,
                                      "walk": {"windows": WALK, "reps": a.walk_reps, "results": walks,
                                               "ratios": walk_ratios},
                                      "platform": platform.platform()}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
