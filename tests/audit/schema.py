"""The DICOM audit message schema (see schema/PROVENANCE.md), loaded once."""

from __future__ import annotations

import functools
from pathlib import Path

from lxml import etree

SCHEMA = Path(__file__).parent / "schema" / "audit-message.rng"


@functools.cache
def _schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def assert_valid(xml: bytes) -> etree._Element:
    """Parse ``xml`` and fail with the schema's error log unless it is a valid audit message."""
    root = etree.fromstring(xml)
    schema = _schema()
    assert schema.validate(root), f"{schema.error_log}\n{xml.decode('utf-8', 'replace')}"
    return root
