"""The WADO pool shared between clients against the running server, over real sockets:
a client that fires dozens of renderings neither makes another client wait behind all of
them nor queues more than its cap, and renderings of a client that left are never run."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import threads
from twisted.internet.threads import blockingCallFromThread

from imageshare.transcode import openjpeg
from imageshare.web.wado import WadoRetriever
from tests.helpers import get_from, make_cr, scu_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
]

FLOODER = "127.0.0.2"  # all of 127/8 is loopback on Linux: another client address
VIEWER = "127.0.0.1"
WORKERS = 2
CAP = 8
FLOOD = 40
TIMEOUT = 60.0


def get(port: int, path: str, source: str) -> tuple[int, dict[str, str], bytes]:
    return get_from(port, path, source, TIMEOUT)


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` (from a thread) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


async def serve_cr(start_server: Any, tmp_path: Path) -> tuple[Any, str]:
    """A server with 2 WADO workers, no answer cache and a queue cap of 8 per client,
    holding a 1955x1841 CR; the path of its full-size PNG rendering."""
    server = await start_server(wado={"workers": str(WORKERS), "max_queue_per_client": str(CAP),
                                      "cache_bytes": "0"})
    path, _ = make_cr(tmp_path)
    assert await threads.deferToThread(scu_store, server.dicom_port, [path]) == [0]
    await server.service.transcoder.when_idle()
    ds = dcmread(path, stop_before_pixels=True)
    query = urllib.parse.urlencode({"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
                                    "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
                                    "contentType": "image/png"})
    return server, f"/wado?{query}"


@pytest_twisted.ensureDeferred
async def test_a_flood_of_renderings_does_not_hold_up_another_client(start_server: Any, tmp_path: Path) -> None:
    """Client A fires 40 renderings at once: 2 run, 8 wait, the other 30 get 503 with
    Retry-After at once. Client B then asks for one: at most workers + 2 of A's renderings
    end before B's answer, not all of A's running and waiting ones."""
    from twisted.internet import reactor

    server, path = await serve_cr(start_server, tmp_path)
    queue = server.service.wado_queue
    port = server.http_port

    def scenario() -> dict[str, Any]:
        done: list[tuple[str, int, float]] = []
        lock = threading.Lock()

        def one(source: str, who: str) -> tuple[int, dict[str, str], bytes]:
            reply = get(port, path, source)
            with lock:
                done.append((who, reply[0], time.monotonic()))
            return reply

        def settled() -> bool:
            # Every request of A is answered (503 or done), waiting or running.
            with lock:
                answered = sum(1 for who, _, _ in done if who == "A")
            in_server = blockingCallFromThread(reactor, lambda: queue.waiting_for(FLOODER) + queue.running)
            return answered + in_server == FLOOD

        with ThreadPoolExecutor(max_workers=FLOOD + 1) as pool:
            started = time.monotonic()
            flood = [pool.submit(one, FLOODER, "A") for _ in range(FLOOD)]
            wait_for(settled)
            waiting = blockingCallFromThread(reactor, queue.waiting_for, FLOODER)
            with lock:
                before = len(done)
            b_sent = time.monotonic()
            viewer = pool.submit(one, VIEWER, "B")
            replies = [f.result(timeout=TIMEOUT) for f in flood]
            b_reply = viewer.result(timeout=TIMEOUT)
        return {"done": done, "before": before, "waiting": waiting, "replies": replies, "b": b_reply,
                "started": started, "b_sent": b_sent, "end": time.monotonic()}

    result = await threads.deferToThread(scenario)
    replies = result["replies"]
    refused = [(h, body) for code, h, body in replies if code == 503]
    rendered = [body for code, _, body in replies if code == 200]
    assert len(refused) + len(rendered) == FLOOD
    assert result["waiting"] == CAP  # A's queue was full when B asked
    assert len(refused) >= FLOOD - WORKERS - CAP - result["before"]
    for headers, body in refused:
        assert headers["retry-after"] == "1"
        assert body == f"this client has {CAP} requests waiting already; try again\n".encode()
    code, headers, body = result["b"]
    assert code == 200 and headers["content-type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(b == body for b in rendered)
    # Renderings finished after B asked, in the order they finished: B's comes early. It
    # waits for a worker to free up and then renders alongside one of A's, so typically 2
    # or 3 of A's end first; FIFO would put it after all 10 (the old code: last of 41).
    after = [who for who, code, _ in result["done"][result["before"]:] if code == 200]
    position = after.index("B")
    assert position <= WORKERS + 2, after
    assert after.count("A") >= CAP - WORKERS  # most of A's waiting renderings came after B's
    b_done = next(t for who, _, t in result["done"] if who == "B")
    t0 = result["started"]
    print(f"\nA: {len(rendered)} rendered, {len(refused)} refused; B asked at {result['b_sent'] - t0:.2f} s, "
          f"answered {b_done - result['b_sent']:.2f} s later as rendering {position + 1} of {len(after)} "
          f"after it; all done at {result['end'] - t0:.2f} s")


@pytest_twisted.ensureDeferred
async def test_renderings_of_a_client_that_left_are_never_run(start_server: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sends 10 renderings (2 run, 8 wait) and closes its connections: the 8 waiting
    ones are dropped without being rendered, the running 2 end, and the pool is free for
    the next client at once."""
    from twisted.internet import reactor

    server, path = await serve_cr(start_server, tmp_path)
    queue = server.service.wado_queue
    calls: list[str] = []
    call = WadoRetriever.__call__

    def counting(self: WadoRetriever, *args: Any, **kwargs: Any) -> Any:
        calls.append(threading.current_thread().name)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(WadoRetriever, "__call__", counting)

    def scenario() -> None:
        sockets = []
        try:
            for _ in range(WORKERS + CAP):
                sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=TIMEOUT,
                                                source_address=(FLOODER, 0))
                sockets.append(sock)
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii"))
            wait_for(lambda: blockingCallFromThread(reactor, queue.waiting_for, FLOODER) == CAP)
        finally:
            for sock in sockets:
                sock.close()
        wait_for(lambda: blockingCallFromThread(reactor, lambda: queue.waiting + queue.running) == 0)

    await threads.deferToThread(scenario)
    assert len(calls) == WORKERS  # only the renderings already running when A left
    code, _, body = await threads.deferToThread(get, server.http_port, path, VIEWER)
    assert code == 200 and body[:4] == b"\x89PNG" and len(calls) == WORKERS + 1
