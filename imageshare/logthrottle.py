"""
Refusals logged without letting a flood of them flood the log.

Every refusal a stranger can provoke (a connection over a cap, a 408, a 413, a 503 from a
full queue or session table) is worth a line, but not one line each: a client that sends
a thousand requests a second would otherwise write a thousand lines a second.

- :class:`LogThrottle` counts events per key and says when a line is due: at most one
  per key and interval, with the count of the events it stands for;
- :class:`RefusalLog` puts one in front of a :class:`~imageshare.logsafe.Logger`.

Pure: no reactor; ``now`` comes from the caller or from a clock function. The table of
keys is bounded, so many addresses cannot grow it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable

from twisted.logger import LogLevel

from imageshare.logsafe import Logger

__all__ = ["LogThrottle", "RefusalLog"]


class LogThrottle:
    """
    At most one log line per key every ``interval`` seconds.

    :meth:`hit` counts an event and says whether to log it now, with how many events of
    that key the line stands for (itself and those held back since the last line).
    Not locked: callers on several threads serialise access (:class:`RefusalLog` does).

    Parameters
    ----------
    interval
        Seconds between two lines for one key.
    max_keys
        Keys remembered at once; beyond, keys whose interval has passed are forgotten
        (with their held-back count), and if none has, new keys share one entry
        (:attr:`OVERFLOW`), so an attacker with many addresses cannot grow the table.
    """

    OVERFLOW = ("*",)

    def __init__(self, interval: float = 10.0, max_keys: int = 4096) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._keys: dict[Hashable, list[float]] = {}  # key -> [last line at, held back]

    def hit(self, key: Hashable, now: float) -> int | None:
        """Count one event; the number to report if a line is due now, else ``None``."""
        entry = self._keys.get(key)
        if entry is None:
            if len(self._keys) >= self.max_keys:
                self._forget(now)
                if len(self._keys) >= self.max_keys:
                    key = self.OVERFLOW
                    entry = self._keys.get(key)
            if entry is None:
                self._keys[key] = [now, 0]
                return 1
        if now - entry[0] >= self.interval:
            count = int(entry[1]) + 1
            entry[0], entry[1] = now, 0
            return count
        entry[1] += 1
        return None

    def _forget(self, now: float) -> None:
        for key in [k for k, (at, _) in self._keys.items() if now - at >= self.interval]:
            del self._keys[key]


class RefusalLog:
    """
    A logger for refusals: one line per key (say, client and status) and interval.

    The line's format gets ``{count}`` (events it stands for) and ``{interval}`` fields;
    :data:`SUFFIX` is appended so that a reader knows lines were held back.

    Safe from any thread.
    """

    SUFFIX = " ({count} such since the last line; at most one every {interval:.0f} s)"

    def __init__(
        self,
        log: Logger,
        interval: float = 10.0,
        *,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._throttle = LogThrottle(interval, max_keys)
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def interval(self) -> float:
        return self._throttle.interval

    def emit(self, level: LogLevel, key: Hashable, format: str, **fields: Any) -> bool:
        """Log ``format`` at ``level`` if a line for ``key`` is due; whether it was."""
        with self._lock:
            count = self._throttle.hit(key, self._clock())
        if count is None:
            return False
        self._log.emit(level, format + self.SUFFIX, count=count, interval=self._throttle.interval, **fields)
        return True

    def info(self, key: Hashable, format: str, **fields: Any) -> bool:
        return self.emit(LogLevel.info, key, format, **fields)

    def warn(self, key: Hashable, format: str, **fields: Any) -> bool:
        return self.emit(LogLevel.warn, key, format, **fields)
