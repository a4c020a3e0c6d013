"""The one exception raised by :mod:`imageshare.codestream`.

Codestreams come from our own encoder but also from disk, where they can be
truncated or damaged, and the index is rebuilt from them; a single exception
type lets callers reject a bad codestream without catching programming errors.
"""

from __future__ import annotations

__all__ = ["CodestreamError"]


class CodestreamError(ValueError):
    """A codestream (or a stored index) is malformed, truncated, hostile or
    uses a feature we do not support (POC, PPM, PPT, missing PLT, ...).

    The message says what is wrong and, where it helps, at which byte offset.
    """
