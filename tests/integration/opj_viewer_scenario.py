"""
One OpenJPEG JPIP viewer session against a real ImageShare server (test helper).

Run by ``tests/integration/test_opj_viewer.py`` inside a private network namespace,
because ``opj_dec_server`` (the viewer's decoder) listens on all interfaces at a fixed
port::

    unshare --net --pid --fork --kill-child -- \
        python -m tests.integration.opj_viewer_scenario WORKDIR DICOM [--timeout S]

(``--pid``: this script is the namespace's first process, so whatever is left of its
children dies with it.) Inside the namespace only loopback exists; it is brought up, then
this starts ``twistd -n
imageshare`` on port 0 (``[jpip] openjpeg_user_agents = Java/``: the viewer sends Java's
default ``User-Agent: Java/17...``, so it gets OpenJPEG's tile-header layout), stores
DICOM over C-STORE, waits until it is streamable, starts
Xvfb (display chosen by Xvfb itself), ``opj_dec_server`` and ``opj_jpip_viewer`` (Java),
waits for the viewer's first decode, takes a screenshot of the root window with ``xwd``
and prints one JSON object: ports, the viewer's and decoder's logs, exit codes, the
screenshot path. Judging the screenshot is the test's job. Every wait is bounded and every
child is killed on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from pydicom import dcmread

from tests.helpers import scu_store
from tests.integration.conftest import TwistdProcess

VIEWER_JAR = Path("/usr/share/opj_jpip_viewer/opj_jpip_viewer.jar")
#: The [jpip] keys the test runs with; a control experiment may pass others.
JPIP_CONFIG = "openjpeg_user_agents = Java/\n"
DECODER_PORT = 50000  # opj_dec_server's default, and the viewer's: fine in a namespace of our own
TOOLS = ("ip", "Xvfb", "xwd", "java", "opj_dec_server")


def missing_tools() -> list[str]:
    """The programs (and the viewer's jar) this scenario needs that are not installed."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    return missing + ([str(VIEWER_JAR)] if not VIEWER_JAR.exists() else [])


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _java_log(path: Path, limit: int = 8000) -> str:
    """The viewer's output without Java stack frames (one per failed paint), from the start."""
    text = _tail(path, 1 << 20)
    lines = [x for x in text.splitlines() if not re.match(r"^\s+(at |\.\.\. \d+ more)", x)]
    return "\n".join(lines)[:limit]


def _listening(port: int) -> bool:
    # /proc/net/tcp of this namespace: no probe connection, which the decoder would take
    # for a (malformed) client message.
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                return True
    return False


def _wait(predicate: Any, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise TimeoutError(f"{what}: not within {timeout} s")


def _start_xvfb(work: Path, stack: list[subprocess.Popen[bytes]]) -> int:
    """Xvfb on the first free display (it picks and reports it: no clash with others)."""
    read, write = os.pipe()
    try:
        log = open(work / "xvfb.log", "wb")
        stack.append(subprocess.Popen(
            ["Xvfb", "-displayfd", str(write), "-nolisten", "tcp", "-br", "-screen", "0", "640x480x24"],
            pass_fds=(write,), stdout=log, stderr=subprocess.STDOUT,
        ))
        log.close()
        os.close(write)
        write = -1
        text = b""
        deadline = time.monotonic() + 15
        while not text.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(read, 64)
            if not chunk:
                break
            text += chunk
        if not text.strip().isdigit():
            raise TimeoutError(f"Xvfb reported no display: {text!r}, log: {_tail(work / 'xvfb.log')}")
        return int(text)
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def _viewer_settled(log: Path, since: list[tuple[int, float]]) -> bool:
    """True once the viewer has decoded (or given up on) its first view and its log has been
    quiet for a second (a resize may follow the first view with a second request)."""
    text = log.read_bytes() if log.exists() else b""
    now = time.monotonic()
    if not since or since[-1][0] != len(text):
        since.append((len(text), now))
    decoded = b"decoding to PNM image" in text and (b"     done" in text or b"     failed" in text)
    return decoded and now - since[-1][1] >= 1.0


def run(
    work: Path, dicom: Path, timeout: float, front: Callable[[int], int] | None = None, jpip_config: str = JPIP_CONFIG
) -> dict[str, Any]:
    """
    The session; see the module docstring.

    Parameters
    ----------
    front
        Given the server's HTTP port, the port the viewer is pointed at instead (something
        put between them, e.g. a recorder); ``None``: the server itself, as the test has it.
    jpip_config
        Lines of the server's ``[jpip]`` section (``bench/jpip/opj_viewer_control.py``
        runs the session with ``tile_header_layout = part9`` too, to see it fail).
    """
    started = time.monotonic()
    result: dict[str, Any] = {"error": None}
    stack: list[subprocess.Popen[bytes]] = []
    server: TwistdProcess | None = None
    try:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
        config = work / "imageshare.ini"
        config.write_text(
            "[storage]\ndata_dir = var\n"
            "[dicom]\nlisten = tcp:0:interface=127.0.0.1\n"
            "[http]\nlisten = tcp:0:interface=127.0.0.1\n"
            "[jpip]\ntcp_listen =\n" + jpip_config +
            # Debug: the server logs the tile-header layout each session gets, and for whom.
            "[log]\nlevel = debug\n"
        )
        server = TwistdProcess(config, work / "twistd.log").start(timeout=60)
        result["http_port"] = server.ports["http"]
        assert scu_store(server.ports["dicom"], [dicom]) == [0], "C-STORE failed"
        server.wait_status(lambda s: s["streamable"] >= 1, timeout=60)
        uid = str(dcmread(dicom, stop_before_pixels=True).SOPInstanceUID)
        result["uid"] = uid
        result["t_streamable"] = round(time.monotonic() - started, 2)

        viewer_port = front(server.ports["http"]) if front is not None else server.ports["http"]
        display = _start_xvfb(work, stack)
        result["display"] = display
        cache = work / "cache"
        cache.mkdir(exist_ok=True)
        decoder_log = open(work / "decoder.log", "wb")
        stack.append(subprocess.Popen(["opj_dec_server", str(DECODER_PORT)], cwd=cache,
                                      stdout=decoder_log, stderr=subprocess.STDOUT))
        decoder_log.close()
        _wait(lambda: _listening(DECODER_PORT), 10, "opj_dec_server listening")

        # opj_dec_server registers a stream under its target name only if the name contains
        # "jp2" (receive_JPIPstream: strstr(target, "jp2")); otherwise it reads the name as
        # the stream length and crashes. The server takes <uid>.jp2 for <uid>.
        target = f"{uid}.jp2"
        viewer_log = open(work / "viewer.log", "wb")
        env = dict(os.environ, DISPLAY=f":{display}")
        stack.append(subprocess.Popen(
            ["java", "-jar", str(VIEWER_JAR), f"http://127.0.0.1:{viewer_port}/jpip", target,
             "127.0.0.1", str(DECODER_PORT), "session", "JPP"],
            cwd=work, env=env, stdout=viewer_log, stderr=subprocess.STDOUT,
        ))
        viewer_log.close()
        since: list[tuple[int, float]] = []
        left = max(5.0, timeout - (time.monotonic() - started))
        try:
            _wait(lambda: _viewer_settled(work / "viewer.log", since) or stack[-1].poll() is not None,
                  left, "the viewer's first view", step=0.1)
        except TimeoutError as e:
            result["error"] = str(e)  # still take the screenshot: it shows what there is
        shot = work / "screen.xwd"
        subprocess.run(["xwd", "-root", "-silent", "-display", f":{display}", "-out", str(shot)],
                       check=True, timeout=20)
        result["screenshot"] = str(shot)
        result["t_screenshot"] = round(time.monotonic() - started, 2)
    except Exception as e:  # reported to the test, which shows it with the logs
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        # Exit codes before killing: the decoder's tells whether it crashed by itself.
        if len(stack) >= 2:
            result["decoder_exit"] = stack[1].poll()
        if len(stack) >= 3:
            result["viewer_exit"] = stack[2].poll()
        for proc in reversed(stack):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(stack):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if server is not None:
            try:
                server.stop(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        result["viewer_log"] = _java_log(work / "viewer.log")
        result["decoder_log"] = _tail(work / "decoder.log")
        result["twistd_log"] = _tail(work / "twistd.log", 3000)
        # The layout each JPIP session got, and the User-Agent it was chosen by.
        result["layouts"] = [line for line in _tail(work / "twistd.log", 1 << 22).splitlines()
                             if "tile headers (User-Agent" in line]
        result["elapsed"] = round(time.monotonic() - started, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("dicom", type=Path)
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds for the whole session (bounded)")
    args = parser.parse_args()
    print(json.dumps(run(args.workdir.resolve(), args.dicom.resolve(), args.timeout)))


if __name__ == "__main__":
    main()
