"""DICOM UID checks (PS3.5 9.1): what may be used as a key and as part of a file name."""

from __future__ import annotations

import re

# PS3.5 forbids leading zeros in a component, but real modalities send them; refusing
# such an instance would lose a study, so only the shape that matters for safety is kept:
# digits in non-empty dot-separated components, at most 64 characters.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(text: object) -> bool:
    """Whether ``text`` is a usable UID (and therefore safe inside a file name)."""
    return isinstance(text, str) and 0 < len(text) <= 64 and _UID.match(text) is not None
