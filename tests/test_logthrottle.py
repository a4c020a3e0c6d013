"""The refusal log throttle: one line per key and interval, a bounded table."""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel

from imageshare.logsafe import Logger
from imageshare.logthrottle import LogThrottle, RefusalLog


def test_one_line_per_key_and_interval_with_a_count() -> None:
    """The first event logs; later ones within the interval are counted into the next line."""
    throttle = LogThrottle(10.0, max_keys=3)
    assert throttle.hit("a", 0.0) == 1
    assert [throttle.hit("a", t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert throttle.hit("b", 5.0) == 1  # keys are separate
    assert throttle.hit("a", 10.0) == 4  # three held back and this one
    assert throttle.hit("a", 11.0) is None


def test_table_is_bounded() -> None:
    """Many keys (addresses) share one entry once the table is full: memory and lines stay bounded."""
    throttle = LogThrottle(10.0, max_keys=4)
    lines = [throttle.hit(f"10.0.0.{i}", 1.0) for i in range(1000)]
    assert len(throttle._keys) <= 5
    assert lines.count(None) >= 990
    # Once their interval has passed, keys are forgotten and new ones get their own line.
    assert throttle.hit("10.0.1.1", 12.0) == 1
    assert "10.0.1.1" in throttle._keys and len(throttle._keys) <= 5


def test_refusal_log_writes_one_line_per_key_with_the_count() -> None:
    events: list[dict[str, Any]] = []
    now = [100.0]
    refusals = RefusalLog(Logger(namespace="test", observer=events.append), 10.0, clock=lambda: now[0])
    for _ in range(1000):
        refusals.info(("10.0.0.1", 503), "refused {client}", client="10.0.0.1")
    refusals.warn(("10.0.0.2", 503), "refused {client}", client="10.0.0.2")
    assert [(e["client"], e["count"], e["log_level"]) for e in events] == [
        ("10.0.0.1", 1, LogLevel.info),
        ("10.0.0.2", 1, LogLevel.warn),
    ]
    now[0] += 10.0
    assert refusals.info(("10.0.0.1", 503), "refused {client}", client="10.0.0.1")
    assert events[-1]["count"] == 1000  # 999 held back, and this one
    assert "since the last line" in events[-1]["log_format"]
