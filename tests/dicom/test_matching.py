"""C-FIND matching rules as SQL, checked by running the fragments on an in-memory SQLite table."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageshare.dicom.matching import (
    MatchingError,
    condition,
    glob_pattern,
    is_universal,
    like_pattern,
    response_charset,
)


def matching(vr: str, key: str, stored: list[str | int | None]) -> list[str | int | None]:
    """The stored values the key selects, in their order."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, v)")
    conn.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in stored])
    cond = condition("t.v", vr, key)
    where = f" WHERE {cond.sql}" if cond else ""
    rows = conn.execute(f"SELECT v FROM t{where} ORDER BY n", cond.params if cond else ()).fetchall()
    return [v for (v,) in rows]


NAMES = ["Doe^Jane", "DOE^JOHN", "Smith^Ann", "", "Do_e^X", "D%e^Y", "Müller^Jörg", "O'Brien^Pat"]


@pytest.mark.parametrize("key", ["", "*", "**", " "])
def test_universal(key: str) -> None:
    """An empty key, or one of only '*', matches everything, empty stored values included."""
    assert is_universal(key)
    assert condition("t.v", "PN", key) is None
    assert matching("LO", key, ["a", ""]) == ["a", ""]


def test_single_value_is_case_sensitive_except_names() -> None:
    """LO/CS/SH match exactly; PN ignores ASCII case (PS3.4 allows it) and trailing '^'."""
    assert matching("LO", "abc", ["abc", "ABC", "abcd"]) == ["abc"]
    assert matching("CS", "CT", ["CT", "ct", "MR"]) == ["CT"]
    assert matching("PN", "doe^jane", NAMES) == ["Doe^Jane"]
    assert matching("PN", "Doe^Jane^^", NAMES) == ["Doe^Jane"]


def test_wildcards_on_names() -> None:
    """'*' and '?' on PN, case-insensitive; SQL LIKE's own '%', '_' and '\\' are literal."""
    assert matching("PN", "doe*", NAMES) == ["Doe^Jane", "DOE^JOHN"]
    assert matching("PN", "D?e^*", NAMES) == ["Doe^Jane", "DOE^JOHN", "D%e^Y"]
    assert matching("PN", "Do_e*", NAMES) == ["Do_e^X"]
    assert matching("PN", "D%e*", NAMES) == ["D%e^Y"]
    assert matching("PN", "*^J*", NAMES) == ["Doe^Jane", "DOE^JOHN", "Müller^Jörg"]
    assert matching("PN", "O'*", NAMES) == ["O'Brien^Pat"]
    assert matching("PN", "Müller*", NAMES) == ["Müller^Jörg"]


def test_wildcards_elsewhere_are_case_sensitive_and_glob_safe() -> None:
    """GLOB does the other VRs: case-sensitive, and '[' from the key is a plain character."""
    stored = ["ABC123", "abc123", "AB[C]1", "ABx", "AB*"]
    assert matching("LO", "AB*", stored) == ["ABC123", "AB[C]1", "ABx", "AB*"]
    assert matching("LO", "AB[C]?", stored) == ["AB[C]1"]
    assert matching("SH", "?BC*", stored) == ["ABC123"]
    assert matching("LO", "%", ["%", "x"]) == ["%"]


def test_lists() -> None:
    """UIDs separated by backslashes match any of them; so do several text values."""
    uids = ["1.2.3", "1.2.4", "1.2.30"]
    assert matching("UI", "1.2.3", uids) == ["1.2.3"]
    assert matching("UI", "1.2.3\\1.2.30\\9.9", uids) == ["1.2.3", "1.2.30"]
    assert matching("UI", "1.2.*", uids) == []  # no wildcards on UIDs
    assert matching("CS", "CT\\MR", ["CT", "MR", "US"]) == ["CT", "MR"]
    assert matching("CS", "C*\\US", ["CT", "CR", "MR", "US"]) == ["CT", "CR", "US"]
    assert matching("IS", "2\\3", [1, 2, 3, None]) == [2, 3]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("20200101", ["20200101"]),
        ("20200101-", ["20200101", "20201231", "20210101"]),
        ("-20201231", ["20191231", "20200101", "20201231"]),
        ("20200101-20201231", ["20200101", "20201231"]),
        ("2020.01.01", ["20200101"]),  # ACR-NEMA form
    ],
)
def test_date_ranges(key: str, expected: list[str]) -> None:
    """Single dates and open or closed ranges, bounds included; empty dates never in a range."""
    assert matching("DA", key, ["20191231", "20200101", "20201231", "20210101", ""]) == expected


def test_time_ranges_follow_precision() -> None:
    """An upper bound covers every time it is a prefix of; a single time names a span."""
    stored = ["115959", "1200", "120000.5", "125959.999", "130000", ""]
    assert matching("TM", "-1200", stored) == ["115959", "1200", "120000.5"]
    assert matching("TM", "1200-1259", stored) == ["1200", "120000.5", "125959.999"]
    assert matching("TM", "12", stored) == ["1200", "120000.5", "125959.999"]
    assert matching("TM", "12:00-", stored) == ["1200", "120000.5", "125959.999", "130000"]


def test_datetime_range_with_negative_offset() -> None:
    """A DT range splits on the right '-' even when a bound carries a negative UTC offset."""
    stored = ["20200101120000", "20200102", "20200103"]
    assert matching("DT", "20200101-0500-20200102", stored) == ["20200101120000", "20200102"]
    assert matching("DT", "-20200101", stored) == ["20200101120000"]


@pytest.mark.parametrize(
    ("vr", "key"), [("DA", "2020-01-01"), ("DA", "yesterday"), ("DA", "-"), ("TM", "25x"), ("IS", "one"),
                    ("DA", "2020*"), ("SQ", "x")]
)
def test_bad_values(vr: str, key: str) -> None:
    """Values that no rule can use raise MatchingError (the SCP answers a failure)."""
    with pytest.raises(MatchingError):
        condition("t.v", vr, key)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\\*?\x00"), min_size=1))
def test_literal_text_matches_itself_only(text: str) -> None:
    """Without wildcards, any text (SQL specials included) selects exactly the equal value."""
    text = text.strip(" ")
    if not text:
        return
    assert matching("LO", text, [text, text + "x", "x" + text]) == [text]
    conn = sqlite3.connect(":memory:")
    assert conn.execute("SELECT ? LIKE ? ESCAPE '\\'", (text, like_pattern(text))).fetchone() == (1,)
    assert conn.execute("SELECT ? GLOB ?", (text, glob_pattern(text))).fetchone() == (1,)


def test_response_charset() -> None:
    """The study's character set when it can carry the values, UTF-8 when it cannot."""
    assert response_charset("", ["Doe^Jane"]) is None
    assert response_charset("ISO_IR 100", ["Doe^Jane"]) == "ISO_IR 100"
    assert response_charset("ISO_IR 100", ["Müller^Jörg"]) == "ISO_IR 100"
    assert response_charset("", ["Müller^Jörg"]) == "ISO_IR 192"
    assert response_charset("ISO_IR 100", ["Люкceмбypг"]) == "ISO_IR 192"
    assert response_charset("ISO 2022 IR 6\\ISO 2022 IR 87", ["やまだ"]) == "ISO_IR 192"
