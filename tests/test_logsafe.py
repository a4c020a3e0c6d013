"""Log fields are bounded and escaped: a client value can neither flood nor forge the log."""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import LogLevel, formatEvent

from imageshare.logsafe import MAX_VALUE_CHARS, Logger, clip


def _capture() -> tuple[Logger, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    return Logger(namespace="test", observer=events.append), events


def test_numbers_pass_unchanged_so_format_specs_still_apply() -> None:
    """Integers keep their type: ``{status:#06x}`` still formats as hex."""
    log, events = _capture()
    log.warn("status {status:#06x}, {n} items, ok {ok}", status=0xA700, n=3, ok=True)
    assert formatEvent(events[0]) == "status 0xa700, 3 items, ok True"


def test_line_breaks_and_controls_are_escaped() -> None:
    """A newline (what ``&#10;`` in a SOAP header becomes) cannot start a second line."""
    forged = "urn:x\n2026-12-03T00:00:00+0000 [imageshare#critical] forged\r\x1b[31m\u2028\x85"
    log, events = _capture()
    log.info("action {action} not served here", action=forged)
    text = formatEvent(events[0])
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert "\u2028" not in text and "\x85" not in text
    assert "urn:x\\x0a2026-12-03" in text and "\\u2028" in text


def test_long_values_are_cut_and_say_how_long_they_were() -> None:
    """A 300 MB value becomes a bounded string, quickly, with its length noted."""
    huge = "A" * (300 << 20)
    start = time.monotonic()
    out = clip(huge)
    assert time.monotonic() - start < 0.5
    assert len(out) < MAX_VALUE_CHARS + 32
    assert out.endswith(f"…[{300 << 20} chars]")
    del huge


def test_containers_and_bytes_are_cut_too() -> None:
    """Lists of client strings and raw bytes are bounded like strings."""
    log, events = _capture()
    log.info("ignored unknown fields {fields}", fields=["x" * 100_000] * 20)
    log.info("got {data}", data=b"\x00\xff" * 100_000)
    for event in events:
        assert len(formatEvent(event)) < 2 * MAX_VALUE_CHARS
    assert "\\x00\\xff" in formatEvent(events[1])


def test_failures_and_twisted_keys_are_untouched() -> None:
    """``log.failure`` still carries the Failure object; log_* keys are not converted."""
    log, events = _capture()
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure("it failed {where}", where="here")
    event = events[0]
    assert event["log_level"] is LogLevel.critical
    assert event["log_failure"].check(ValueError)
    assert event["where"] == "here"


def test_the_class_attribute_form_keeps_clipping() -> None:
    """``log = Logger()`` on a class (a descriptor) still gives the clipping logger."""
    events: list[dict[str, Any]] = []

    class Thing:
        log = Logger(observer=events.append)

    Thing().log.info("{v}", v="a\nb")
    assert formatEvent(events[0]) == "a\\x0ab"


def test_short_plain_strings_are_unchanged() -> None:
    """Ordinary values (UIDs, AE titles, addresses) are logged as they are."""
    assert clip("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert clip("STORESCU") == "STORESCU"
    assert clip(None) is None


def test_events_below_the_minimum_level_are_not_emitted() -> None:
    """With the minimum at info (the default of ``[log] level``), debug events are dropped."""
    from imageshare import logsafe

    log, events = _capture()
    try:
        logsafe.set_minimum_level("info")
        log.debug("quoted {value}", value="1962O231")
        log.info("kept")
    finally:
        logsafe.set_minimum_level("debug")
    assert [formatEvent(e) for e in events] == ["kept"]
