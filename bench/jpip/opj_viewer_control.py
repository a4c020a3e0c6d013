#!/usr/bin/env python3
"""
Control for ``tests/integration/test_opj_viewer.py``: the same OpenJPEG viewer session
(``tests/integration/opj_viewer_scenario.py``, the viewer talking to the server directly),
run once per tile-header layout, to show that the test's check sees what the layout does:

* ``openjpeg`` (the test's configuration, ``[jpip] openjpeg_user_agents = Java/``): the
  viewer's session gets OpenJPEG's tile-header bins, ``opj_dec_server`` decodes the first
  view and it is on screen;
* ``part9`` (``tile_header_layout = part9``, no User-Agent match, what every client got
  before): ``opj_dec_server`` rebuilds a broken codestream from the ISO/IEC 15444-9 bins and
  crashes, nothing is drawn, the same check fails;
* ``opj_server`` (the control): the same session, screenshot and check with the viewer
  pointed at OpenJPEG's own ``opj_server`` instead (behind lighttpd, started with
  ``../shared/peers/jpip/start_opj_server.sh`` inside the same private network namespace,
  port 18080 of that namespace's loopback), serving the same CR converted by
  ``../shared/peers/jpip/prepare_target.py`` to an indexed JP2 named ``<uid>.jp2``, the
  target the viewer asks for (RPCL, 6 resolutions, 128x128 precincts, 5 layers, lossless).
  The scenario is reused unchanged through its ``front`` hook, so ImageShare is started
  and given the CR as usual but stays idle: the run checks that it logged no JPIP session
  and that opj_server's lighttpd logged the viewer's requests. Expected on screen.

Until the server sent OpenJPEG's layout, ``JPIP-roff``/``JPIP-rsiz`` on every view and took
``<uid>.jp2`` targets, this script put a proxy between viewer and server that bridged those
gaps; nothing needs bridging now, so the proxy is gone.

Usage (root, for the namespace; Debian libopenjpip-viewer, xvfb, x11-apps; for
``opj_server`` and ``all`` also Debian libopenjpip-server and lighttpd, which ``make test``
does not install: ``apt-get install libopenjpip-server lighttpd``, plus
libopenjp2-tools for ``opj_compress`` and ``../shared/peers/jpip``)::

    python bench/jpip/opj_viewer_control.py [--layout openjpeg|part9|both|opj_server|all] [--json out.json]

``both`` (the default) runs openjpeg and part9; ``all`` runs opj_server, openjpeg and part9.
Exit status 0 if every run gave the expected outcome (opj_server and openjpeg on screen,
part9 not), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS = ROOT.parent / "shared" / "peers" / "jpip"
sys.path.insert(0, str(ROOT))

from tests.helpers import make_cr  # noqa: E402

#: The [jpip] lines of each run: the test's, and the layout every client got before.
CONFIGS = {
    "openjpeg": "openjpeg_user_agents = Java/\n",
    "part9": "tile_header_layout = part9\nopenjpeg_user_agents =\n",
}
EXPECTED_ON_SCREEN = {"openjpeg": True, "part9": False, "opj_server": True}
#: The control: OpenJPEG's own server in place of ours (not a [jpip] configuration).
OPJ_SERVER = "opj_server"
#: lighttpd's port for opj_server, on the private namespace's loopback (nothing else there).
PEER_PORT = 18080
PEER_TOOLS = ("opj_server", "lighttpd", "opj_compress", "setpriv", "ss")


def _peer_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def start_peer(env: dict[str, str], dicom: Path, uid: str) -> None:
    """Inside the namespace: the CR as ``<uid>.jp2`` for opj_server, then lighttpd and
    opj_server on this namespace's 127.0.0.1:PEER_PORT (the shared peer scripts, their
    directory ``env["JPIP_PEER_DIR"]``)."""
    subprocess.run([sys.executable, str(PEERS / "prepare_target.py"), str(dicom), uid],
                   check=True, env=env, capture_output=True, timeout=120)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)  # lighttpd binds 127.0.0.1
    subprocess.run([str(PEERS / "start_opj_server.sh")], check=True, env=env, capture_output=True,
                   text=True, timeout=30)


def stop_peer(env: dict[str, str], base: Path) -> None:
    """Stop lighttpd and opj_server by their pid files (``stop_opj_server.sh``), bounded. This
    process is the PID namespace's init, so the daemonised lighttpd (and opj_server, once
    lighttpd is gone) are its children: reap exactly those pids while the script waits for
    them, else it would wait on zombies."""
    pids = []
    for name in ("lighttpd.pid", "opj_server.pid"):
        try:
            pids.append(int((base / name).read_text().strip()))
        except (FileNotFoundError, ValueError):
            pass
    stop = subprocess.Popen([str(PEERS / "stop_opj_server.sh")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if stop.poll() is not None:
            break
        time.sleep(0.05)
    if stop.poll() is None:
        stop.kill()
        stop.wait(timeout=5)
    for pid in pids:  # whatever the script could not stop (the namespace ends with us anyway)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def inside(work: Path, dicom: Path, layout: str) -> dict[str, Any]:
    """Inside the namespace: the scenario with that layout, then the test's screen check."""
    import numpy as np
    from pydicom import dcmread

    from tests.integration.opj_viewer_scenario import run
    from tests.integration.test_opj_viewer import MIN_CORRELATION, first_view_size, locate_view, read_xwd, reduce_to

    if layout == OPJ_SERVER:
        # The same scenario with the viewer pointed at opj_server (its front hook); ImageShare
        # is started and fed as usual but must see no JPIP session.
        uid = str(dcmread(dicom, stop_before_pixels=True).SOPInstanceUID)
        base = work / "peer"
        env = dict(os.environ, JPIP_PEER_DIR=str(base), JPIP_PEER_PORT=str(PEER_PORT))
        try:
            start_peer(env, dicom, uid)
            result = run(work, dicom, 40.0, front=lambda _ours: PEER_PORT)
        finally:
            stop_peer(env, base)
        result["peer_requests"] = [line for line in _peer_tail(base / "lighttpd.access.log", 1 << 20).splitlines()
                                   if "/jpip?" in line]
        result["peer_error_log"] = _peer_tail(base / "lighttpd.error.log")
        result["wrong_server"] = ("the viewer reached ImageShare" if result["layouts"] else
                                  "opj_server's lighttpd logged no request" if not result["peer_requests"] else None)
    else:
        result = run(work, dicom, 40.0, jpip_config=CONFIGS[layout])
    pixels = dcmread(dicom).pixel_array
    w, h = first_view_size(*pixels.shape)
    score, where = 0.0, (0, 0)
    if result.get("screenshot"):
        score, where = locate_view(read_xwd(Path(result["screenshot"]).read_bytes()), reduce_to(pixels, w, h))
    on_screen = bool(score > MIN_CORRELATION) and not result.get("wrong_server")
    result.update(layout=layout, correlation=round(score, 4), at=where, view=(w, h), on_screen=on_screen)
    assert np.isfinite(score)
    return result


def one(layout: str) -> dict[str, Any]:
    """One session in a private network and PID namespace; its result."""
    with tempfile.TemporaryDirectory(prefix="opj-viewer-control-") as tmp:
        work = Path(tmp)
        dicom, _ = make_cr(work)
        proc = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--kill-child", "--", sys.executable, __file__,
             "--inside", str(work), str(dicom), "--layout", layout],
            cwd=ROOT, capture_output=True, text=True, timeout=180 if layout == OPJ_SERVER else 120,
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            sys.exit(f"the scenario failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def report(result: dict[str, Any]) -> None:
    keys = ("fw,fh", "rx,ry", "rw,rh", "cid:", "Requesting", "     done", "     failed")
    print(f"== layout {result['layout']}")
    print("server: " + ("\n  ".join(result.get("layouts") or ["(no session logged)"])))
    if result["layout"] == OPJ_SERVER:
        print("opj_server (lighttpd access log):\n  " + "\n  ".join(result.get("peer_requests") or ["(none)"]))
        if result.get("wrong_server"):
            print(f"NOT A VALID CONTROL: {result['wrong_server']}")
    print("viewer:\n  " + "\n  ".join(x for x in result["viewer_log"].splitlines() if x.startswith(keys)))
    print("decoder:\n  " + "\n  ".join(x for x in result["decoder_log"].splitlines() if x.strip())[-1500:])
    print(f"decoder exit: {result.get('decoder_exit')} (None: still running); error: {result.get('error')}")
    print(f"first view {result['view']}: correlation {result['correlation']} at {result['at']} "
          f"-> {'ON SCREEN' if result['on_screen'] else 'NOT on screen'} ({result['elapsed']} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=("openjpeg", "part9", "both", OPJ_SERVER, "all"), default="both")
    parser.add_argument("--json", type=Path, help="write the whole results here")
    parser.add_argument("--inside", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args.inside[0], args.inside[1], args.layout)))
        return
    if os.geteuid() != 0:
        sys.exit("needs root (a private network namespace for the viewer's decoder)")
    layouts = {"both": ("openjpeg", "part9"), "all": (OPJ_SERVER, "openjpeg", "part9")}.get(args.layout, (args.layout,))
    if OPJ_SERVER in layouts:
        missing = [t for t in PEER_TOOLS if shutil.which(t) is None]
        if missing or not (PEERS / "start_opj_server.sh").exists():
            sys.exit(f"--layout {args.layout} needs {', '.join(missing) or PEERS} (apt-get install"
                     " libopenjpip-server lighttpd libopenjp2-tools; ../shared/peers/jpip)")
    results = [one(layout) for layout in layouts]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for result in results:
        report(result)
    as_expected = all(r["on_screen"] == EXPECTED_ON_SCREEN[r["layout"]] for r in results)
    print("as expected" if as_expected else "NOT as expected")
    sys.exit(0 if as_expected else 1)


if __name__ == "__main__":
    main()
