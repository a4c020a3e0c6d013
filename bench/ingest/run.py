#!/usr/bin/env python3
"""
Ingest benchmark: dcmtk storescu sends N 512x512 16-bit CT instances, in one association,
to four receivers in the same run, alternating, and the medians are compared:

- ImageShare (``twistd -n imageshare``): parse, structural check, write, fsync file and
  folder, commit to the catalog, atomic publish, then acknowledge; transcoding runs behind;
- dcmtk ``storescp``: parses and writes files (no fsync);
- a bare pynetdicom SCP (``bare_scp.py``): writes the received bytes (no parse, no fsync);
- the same bare SCP with ``--fsync``: file and folder fsynced before the answer.

For ImageShare it also reports the time until every instance is transcoded (end to end).
Every receiver listens on 127.0.0.1 only. Usage::

    python bench/ingest/run.py [--count 200] [--reps 3] [--json results.json]

Needs dcmtk (storescu, storescp) on PATH and the project installed (make venv).
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from corpus import make_corpus  # noqa: E402

PYTHON = sys.executable
TWISTD = str(Path(sys.executable).parent / "twistd")
ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk waits on delayed ACKs otherwise


def free_port() -> int:
    # storescp has no "port 0 then tell me" mode; pick a free port and hand it over.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_echo(port: int, aet: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["echoscu", "-aec", aet, "127.0.0.1", str(port)], capture_output=True, env=ENV)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no C-ECHO answer on port {port}")


class Receiver:
    name = ""
    aet = ""
    port = 0

    def reset(self) -> None: ...
    def count(self) -> int: ...
    def stop(self) -> None: ...


class ImageShare(Receiver):
    name, aet = "imageshare", "IMAGESHARE"

    def __init__(self, work: Path, settings: list[str]) -> None:
        self.work = work
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = 0

    def start(self) -> None:
        data = self.work / "imageshare"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        cfg = data / "imageshare.ini"
        ini = configparser.ConfigParser()
        # Every listener on a free loopback port: several servers may run side by side.
        ini.read_dict({"storage": {"data_dir": "var"}, "dicom": {"listen": "tcp:0:interface=127.0.0.1"},
                       "http": {"listen": "tcp:0:interface=127.0.0.1"},
                       "jpip": {"tcp_listen": "tcp:0:interface=127.0.0.1"}})
        for setting in self.settings:  # section.key=value
            name, value = setting.split("=", 1)
            section, key = name.split(".", 1)
            ini.setdefault(section, {})
            ini[section][key] = value
        with open(cfg, "w") as f:
            ini.write(f)
        log = data / "twistd.log"
        self.port = self.http = 0
        self.proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "imageshare", "--config", str(cfg)],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=data)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (self.port and self.http):
            text = log.read_text(errors="replace")
            m = re.search(r"DICOM listener \S+ listening on [\d.]+:(\d+)", text)
            h = re.search(r"HTTP listening on [\d.]+:(\d+)", text)
            self.port = int(m.group(1)) if m else 0
            self.http = int(h.group(1)) if h else 0
            time.sleep(0.1)
        if not (self.port and self.http):
            raise RuntimeError("imageshare did not start:\n" + log.read_text()[-2000:])

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/status", timeout=10) as r:
            return json.load(r)  # type: ignore[no-any-return]

    def reset(self) -> None:
        self.stop()
        self.start()

    def count(self) -> int:
        return int(self.status()["instances"])

    def wait_transcoded(self, n: int, timeout: float = 600) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            s = self.status()
            if s["streamable"] + s["transcode_failed"] >= n and s["transcode_pending"] == 0:
                if s["transcode_failed"]:
                    raise RuntimeError(f"transcoding failed: {s}")
                return time.monotonic()
            time.sleep(0.05)
        raise RuntimeError("transcoding did not finish")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self.proc = None


class FolderReceiver(Receiver):
    """A receiver that writes one file per instance into ``self.out``."""

    out: Path

    def reset(self) -> None:
        for f in self.out.iterdir():
            f.unlink()

    def count(self) -> int:
        return len(list(self.out.iterdir()))


class StoreScp(FolderReceiver):
    name, aet = "storescp", "STORESCP"

    def __init__(self, work: Path) -> None:
        self.out = work / "storescp"
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # storescp binds every interface and has no option against it; the benchmark
        # sends only over loopback and stops it at the end.
        self.proc = subprocess.Popen(["storescp", "-aet", self.aet, "-dhl", "-od", str(self.out), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        wait_echo(self.port, self.aet)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class BareScp(FolderReceiver):
    aet = "BARESCP"

    def __init__(self, work: Path, fsync: bool = False) -> None:
        self.name = "pynetdicom+fsync" if fsync else "pynetdicom"
        self.out = work / self.name
        self.proc = subprocess.Popen([PYTHON, str(HERE / "bare_scp.py"), "--out", str(self.out)] + (["--fsync"] if fsync else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        self.port = int(line.split()[1])
        wait_echo(self.port, self.aet)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "dcmtk": dcmtk[0] if dcmtk else "?",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override an ImageShare setting, e.g. --set transcode.workers=1")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imageshare-bench-"))
    corpus = work / "corpus"
    files = make_corpus(corpus, a.count)
    total_bytes = sum(f.stat().st_size for f in files)
    imageshare = ImageShare(work, a.set)
    imageshare.start()
    receivers: list[Receiver] = [imageshare, StoreScp(work), BareScp(work), BareScp(work, fsync=True)]
    runs: dict[str, list[float]] = {r.name: [] for r in receivers}
    e2e: list[float] = []
    try:
        for rep in range(a.reps):
            for r in receivers:
                r.reset()
                subprocess.run(["sync"])
                t0 = time.monotonic()
                out = subprocess.run(["storescu", "-aec", r.aet, "127.0.0.1", str(r.port), "+sd", str(corpus)],
                                     capture_output=True, text=True, env=ENV, timeout=600)
                t1 = time.monotonic()
                stored = r.count()
                if out.returncode != 0 or stored != a.count:
                    raise RuntimeError(f"{r.name}: storescu rc={out.returncode}, stored {stored}/{a.count}\n{(out.stdout + out.stderr)[-2000:]}")
                runs[r.name].append(t1 - t0)
                line = f"rep {rep + 1} {r.name:17} {t1 - t0:6.2f} s  {a.count / (t1 - t0):7.1f} inst/s"
                if r is imageshare:
                    done = imageshare.wait_transcoded(a.count)
                    e2e.append(done - t0)
                    line += f"   transcoded after {done - t0:6.2f} s"
                print(line, flush=True)
    finally:
        for r in receivers:
            r.stop()

    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "machine": machine(),
        "count": a.count,
        "bytes": total_bytes,
        "reps": a.reps,
        "imageshare_settings": a.set,
        "runs_s": runs,
        "median_s": med,
        "inst_per_s": {k: a.count / v for k, v in med.items()},
        "mb_per_s": {k: total_bytes / 1e6 / v for k, v in med.items()},
        "ratio_vs_bare_pynetdicom": med["pynetdicom"] / med["imageshare"],
        "ratio_vs_storescp": med["storescp"] / med["imageshare"],
        "ratio_vs_bare_pynetdicom_fsync": med["pynetdicom+fsync"] / med["imageshare"],
        "imageshare_end_to_end_s": statistics.median(e2e),
        "imageshare_end_to_end_frames_per_s": a.count / statistics.median(e2e),
    }
    print(f"\n{a.count} x 512x512x16 CT, {total_bytes / 1e6:.1f} MB, one association, medians of {a.reps}:")
    for k in runs:
        print(f"  {k:17} {med[k]:6.2f} s {result['inst_per_s'][k]:7.1f} inst/s {result['mb_per_s'][k]:6.1f} MB/s")
    print(f"  ImageShare / bare pynetdicom: {result['ratio_vs_bare_pynetdicom']:.2f}x   "
          f"ImageShare / bare pynetdicom+fsync: {result['ratio_vs_bare_pynetdicom_fsync']:.2f}x   "
          f"ImageShare / storescp: {result['ratio_vs_storescp']:.2f}x")
    print(f"  ImageShare received and transcoded everything in {result['imageshare_end_to_end_s']:.2f} s "
          f"({result['imageshare_end_to_end_frames_per_s']:.1f} frames/s)")
    print(f"  machine: {result['machine']}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
