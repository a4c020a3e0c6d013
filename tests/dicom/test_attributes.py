"""Catalog attributes read straight from the encoded data set agree with a full pydicom parse."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread

from imageshare.dicom.attributes import _FIELDS, CATALOG_TAGS, _tidy_name, extract_raw
from imageshare.dicom.wellformed import check_dataset, inflate
from tests.helpers import sample_file, wire_dataset

CHARSETS = Path(pydicom.__file__).parent / "data" / "charset_files"


def oracle(path: Path) -> dict[str, object]:
    """What pydicom makes of the same attributes after a full parse."""
    ds = dcmread(path)
    out: dict[str, object] = {}
    for name, keyword, numeric in _FIELDS:
        value = ds.get(keyword)
        if numeric:
            out[name] = int(value) if value not in (None, "") else None
        elif value is None:
            out[name] = ""
        elif type(value).__name__ == "MultiValue":
            out[name] = "\\".join(str(v) for v in value)
        else:
            out[name] = str(value).strip()
        if keyword.endswith("Name"):
            # Trailing separators carry nothing; the catalog keeps names without them.
            out[name] = _tidy_name(str(out[name]))
    return out


FILES = [sample_file(n) for n in ("CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "rtplan.dcm",
                                  "SC_rgb_rle_2frame.dcm", "MR_small_implicit.dcm")]
FILES += sorted(p for p in CHARSETS.glob("chr*.dcm"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_matches_full_parse(path: Path) -> None:
    """Every catalog attribute equals pydicom's value, names in other character sets included."""
    data, ts, _, _ = wire_dataset(path)
    if ts.is_deflated:
        data = inflate(data)
    found = check_dataset(data, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian, wanted=CATALOG_TAGS)
    record = extract_raw(data, found, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
                         transfer_syntax_uid=str(ts))
    expected = oracle(path)
    for name, _, _ in _FIELDS:
        assert getattr(record, name) == expected[name], name
    assert record.transfer_syntax_uid == str(ts)


def test_names_in_japanese_and_russian() -> None:
    """Sanity check that the character-set path really decodes (not just round-trips bytes)."""
    for name, needle in (("chrRuss.dcm", "Люкceмбypг"), ("chrJapMulti.dcm", "やまだ")):
        data, ts, _, _ = wire_dataset(CHARSETS / name)
        found = check_dataset(data, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
                              wanted=CATALOG_TAGS)
        record = extract_raw(data, found, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
                             transfer_syntax_uid=str(ts))
        assert needle in record.patient_name
