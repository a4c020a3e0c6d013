"""
A bounded cache of WADO answers, keyed by their ETag.

An ETag names exactly one body (the object's generation and state, the server's salt and
public URL, and the normalised request are all in it), so an entry never goes stale: a
re-received object gets new ETags and its old entries simply age out. Viewers ask for the
same renderings and objects again and again (a study list's thumbnails, a series scrolled
back and forth); rendering or re-encoding them each time costs tens of milliseconds.

Thread-safe: the WADO pool's threads share one cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class ResponseCache:
    """Least-recently-used ``etag -> (content type, body)``, at most ``max_bytes`` of bodies.

    Bodies larger than a quarter of the budget are not kept: one huge object must not
    push out everything else.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, etag: str) -> tuple[str, bytes] | None:
        with self._lock:
            entry = self._entries.get(etag)
            if entry is not None:
                self._entries.move_to_end(etag)
            return entry

    def put(self, etag: str, content_type: str, body: bytes) -> None:
        if len(body) > self.max_bytes // 4:
            return
        with self._lock:
            old = self._entries.pop(etag, None)
            if old is not None:
                self.size -= len(old[1])
            self._entries[etag] = (content_type, body)
            self.size += len(body)
            while self.size > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.size -= len(dropped)
