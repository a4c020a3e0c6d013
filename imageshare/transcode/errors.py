"""Exceptions raised while turning DICOM pixel data into JPEG 2000 codestreams.

Everything derives from :class:`TranscodeError` so that the ingest pipeline can
catch one type and record why an instance was not made streamable.
"""

from __future__ import annotations

__all__ = [
    "TranscodeError",
    "NotAnImage",
    "NotStreamable",
    "EncodeError",
    "InvalidFrame",
    "DecodeError",
]


class TranscodeError(Exception):
    """Base class of every error raised by :mod:`imageshare.transcode`."""


class NotAnImage(TranscodeError):
    """The instance carries no pixel data (SR, KOS, PR, RT Plan, waveform, ...).

    This is not a failure: such objects are stored and served as they are,
    they simply have nothing to stream.
    """


class NotStreamable(TranscodeError):
    """The instance has pixel data that we cannot or do not turn into JPEG 2000.

    Parameters
    ----------
    reason : str
        A specific, human-readable explanation (shown to administrators and
        written to the ingest log), e.g. ``"Bits Allocated 32 is not supported
        (only 8 or 16)"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class EncodeError(TranscodeError):
    """OpenJPEG refused or failed to encode a frame.

    The message carries OpenJPEG's own error text when there is one.
    """


class InvalidFrame(EncodeError, ValueError):
    """The frame given to the encoder is malformed or does not fit the declared
    precision/signedness.

    It is also a :class:`ValueError` because it is the caller's input, not the
    library, that is wrong.
    """


class DecodeError(TranscodeError):
    """OpenJPEG could not decode a codestream."""
