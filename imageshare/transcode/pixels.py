"""Decide whether a DICOM instance can be streamed, and decode it frame by frame.

What is streamable (JPIP serves JPEG 2000 Part 1 codestreams, 1 or 3
components, integer samples):

* MONOCHROME1 / MONOCHROME2, 1 sample: streamed as is (MONOCHROME1 stays
  inverted; ``source_photometric`` tells the renderer).
* RGB, 3 samples: streamed with the reversible colour transform, bit-exact.
* YBR_RCT / YBR_ICT (only found in JPEG 2000 sources): OpenJPEG returns RGB.
* YBR_FULL / YBR_FULL_422: converted to RGB with pydicom's
  ``convert_color_space`` (native, RLE) or by the JPEG decoder (JPEG
  Baseline). The YCbCr to RGB conversion rounds, so **it is not bit-lossless**
  with respect to the stored YCbCr values; this is accepted because every
  viewer shows these images as RGB anyway. Everything else here is lossless
  with respect to what pydicom decodes.

Not streamable (:class:`NotStreamable` with a reason): Float/Double Float Pixel
Data, PALETTE COLOR (would need the lookup tables in the stream), YBR_PARTIAL_420
and YBR_PARTIAL_422 (video/retired), retired ARGB/CMYK/HSV, Samples per Pixel
other than 1 or 3, Bits Allocated other than 8 or 16 (1-bit segmentations and
32-bit RT Dose/parametric data), video transfer syntaxes, pixel data held
elsewhere (JPIP referenced), inconsistent or truncated pixel data, and
transfer syntaxes no installed decoder handles.

Values outside Bits Stored: pydicom masks (unsigned) or sign-extends (signed)
the bits above Bits Stored by default, which silently changes such values. We
ask pydicom for the raw container values instead and keep them whenever the
bits above Bits Stored carry data, raising the codestream precision to what the
data needs (up to Bits Allocated); see :func:`required_precision`. Each frame
is decoded once: call :func:`required_precision` on each frame that
:func:`iter_frames` yields.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import numpy as np
from pydicom import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    MPEGTransferSyntaxes,
)

from .errors import NotAnImage, NotStreamable

__all__ = ["ImageInfo", "classify", "iter_frames", "required_precision", "STREAMABLE_PHOTOMETRIC"]

#: Photometric interpretations we stream, with their Samples per Pixel.
STREAMABLE_PHOTOMETRIC: dict[str, int] = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_RCT": 3,
    "YBR_ICT": 3,
}

_REJECTED_PHOTOMETRIC: dict[str, str] = {
    "PALETTE COLOR": (
        "PALETTE COLOR images need their lookup tables applied; streaming the indices "
        "alone would show meaningless grey levels"
    ),
    "YBR_PARTIAL_420": "YBR_PARTIAL_420 is only used by MPEG video transfer syntaxes",
    "YBR_PARTIAL_422": "YBR_PARTIAL_422 is retired and not supported",
    "ARGB": "ARGB is a retired photometric interpretation and not supported",
    "CMYK": "CMYK is a retired photometric interpretation and not supported",
    "HSV": "HSV is a retired photometric interpretation and not supported",
}

# JPIP Referenced (Deflate): the pixels live on a JPIP server, not in the object.
_JPIP_REFERENCED = {
    "1.2.840.10008.1.2.4.94",
    "1.2.840.10008.1.2.4.95",
    "1.2.840.10008.1.2.4.204",
    "1.2.840.10008.1.2.4.205",
}

# Decoders whose codestream records precision and signedness; pydicom corrects
# those from the codestream, so the bits above Bits Stored are never guesswork.
_SELF_DESCRIBING = set(JPEG2000TransferSyntaxes) | set(JPEGLSTransferSyntaxes)


@attrs.frozen(kw_only=True)
class ImageInfo:
    """What an image instance is, as far as transcoding is concerned.

    Attributes
    ----------
    rows, columns : int
        Frame size.
    frames : int
        Number of Frames (1 when absent).
    samples : int
        1 (grey) or 3 (colour, always delivered as RGB by :func:`iter_frames`).
    precision : int
        Bits Stored: the minimum codestream precision. A frame may need more,
        see :func:`required_precision`.
    signed : bool
        Pixel Representation is 1 (two's complement samples).
    colour_transform : bool
        Whether to encode with the multiple component transform (3 samples).
    source_photometric : str
        The instance's Photometric Interpretation (e.g. ``"MONOCHROME1"``,
        ``"YBR_FULL_422"``); frames from :func:`iter_frames` are RGB whenever
        ``samples == 3``.
    bits_allocated : int
        8 or 16: the largest precision a frame can need.
    transfer_syntax : str
        Transfer Syntax UID of the source pixel data.
    """

    rows: int
    columns: int
    frames: int
    samples: int
    precision: int
    signed: bool
    colour_transform: bool
    source_photometric: str
    bits_allocated: int
    transfer_syntax: str

    def precision_of(self, frame: np.ndarray) -> int:
        """Codestream precision for one of this instance's frames.

        Same as :func:`required_precision` (``frame``, ``self``).
        """
        return required_precision(frame, self)


def _int_attr(ds: Dataset, keyword: str, label: str, default: int | None = None) -> int:
    """Read an integer attribute or say precisely why it cannot be used."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is not None:
            return default
        raise NotStreamable(f"{label} is missing")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NotStreamable(f"{label} has an invalid value {value!r}") from None


def _describe(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID")
    if sop is None and getattr(ds, "file_meta", None) is not None:
        sop = ds.file_meta.get("MediaStorageSOPClassUID")
    if not sop:
        return "this object"
    name = UID(str(sop)).name
    return f"{name} ({sop})" if name != str(sop) else f"SOP Class {sop}"


def classify(ds: Dataset) -> ImageInfo:
    """Tell whether and how an instance's pixel data can be streamed.

    Reads only attributes and the pixel data length; nothing is decoded.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance, with ``file_meta.TransferSyntaxUID`` set.

    Returns
    -------
    ImageInfo
        For a streamable image.

    Raises
    ------
    NotAnImage
        The object has no Pixel Data at all (SR, KOS, PR, RT Plan, ...).
    NotStreamable
        There is pixel data but we cannot or do not stream it; ``reason`` says
        exactly why.
    """
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        which = "Float Pixel Data" if "FloatPixelData" in ds else "Double Float Pixel Data"
        raise NotStreamable(f"{which} (floating point samples) cannot be coded as JPEG 2000")
    if "PixelData" not in ds:
        if "PixelDataProviderURL" in ds:
            raise NotStreamable(
                "the pixel data is held elsewhere (Pixel Data Provider URL); nothing to transcode"
            )
        raise NotAnImage(f"{_describe(ds)} has no Pixel Data")

    file_meta = getattr(ds, "file_meta", None)
    ts_value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not ts_value:
        raise NotStreamable("Transfer Syntax UID is missing: the Pixel Data encoding is unknown")
    ts = UID(str(ts_value))
    if ts in _JPIP_REFERENCED:
        raise NotStreamable(f"{ts.name}: the pixel data is held on a JPIP server")
    if ts in MPEGTransferSyntaxes:
        raise NotStreamable(
            f"{ts.name} is a video transfer syntax; video is not streamed as JPEG 2000"
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise NotStreamable(f"no pixel data decoder for transfer syntax {ts.name} ({ts})") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "unknown"
        raise NotStreamable(f"no installed decoder plugin for {ts.name} (missing: {missing})")

    rows = _int_attr(ds, "Rows", "Rows")
    columns = _int_attr(ds, "Columns", "Columns")
    if rows <= 0 or columns <= 0:
        raise NotStreamable(f"the image size is {rows} x {columns} (Rows x Columns)")
    samples = _int_attr(ds, "SamplesPerPixel", "Samples per Pixel")
    bits_allocated = _int_attr(ds, "BitsAllocated", "Bits Allocated")
    bits_stored = _int_attr(ds, "BitsStored", "Bits Stored")
    representation = _int_attr(ds, "PixelRepresentation", "Pixel Representation")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()

    if not photometric:
        raise NotStreamable("Photometric Interpretation is missing")
    if photometric in _REJECTED_PHOTOMETRIC:
        raise NotStreamable(_REJECTED_PHOTOMETRIC[photometric])
    if photometric not in STREAMABLE_PHOTOMETRIC:
        raise NotStreamable(f"Photometric Interpretation {photometric!r} is not supported")
    if samples not in (1, 3):
        raise NotStreamable(f"Samples per Pixel {samples} is not supported (only 1 or 3)")
    if samples != STREAMABLE_PHOTOMETRIC[photometric]:
        raise NotStreamable(
            f"Samples per Pixel {samples} contradicts Photometric Interpretation {photometric}"
        )
    if bits_allocated not in (8, 16):
        # pydicom decodes only 1 or multiples of 8; the JPIP profile and our
        # reversible path stop at 16 bits (32-bit data is RT Dose or parametric).
        raise NotStreamable(f"Bits Allocated {bits_allocated} is not supported (only 8 or 16)")
    if not 1 <= bits_stored <= bits_allocated:
        raise NotStreamable(
            f"Bits Stored {bits_stored} is not in 1..Bits Allocated ({bits_allocated})"
        )
    high_bit = _int_attr(ds, "HighBit", "High Bit", default=bits_stored - 1)
    if high_bit != bits_stored - 1:
        # pydicom assumes the stored bits are the low ones; anything else would
        # be decoded wrongly without any error.
        raise NotStreamable(f"High Bit {high_bit} with Bits Stored {bits_stored} is not supported")
    if representation not in (0, 1):
        raise NotStreamable(f"Pixel Representation {representation} is invalid (0 or 1)")
    frames = _int_attr(ds, "NumberOfFrames", "Number of Frames", default=1)
    if frames < 1:
        raise NotStreamable(f"Number of Frames is {frames}")

    if not ts.is_encapsulated:
        if photometric == "YBR_FULL_422":
            # Two luminance samples share one Cb and one Cr: 2 samples per pixel.
            frame_bytes = rows * columns * 2 * (bits_allocated // 8)
        else:
            frame_bytes = rows * columns * samples * (bits_allocated // 8)
        expected = frame_bytes * frames
        actual = len(ds.PixelData)
        if actual < expected:
            raise NotStreamable(
                f"Pixel Data is {actual} bytes but {frames} frame(s) of {rows} x {columns} x "
                f"{samples} at {bits_allocated} bits need {expected} bytes (truncated?)"
            )

    return ImageInfo(
        rows=rows,
        columns=columns,
        frames=frames,
        samples=samples,
        precision=bits_stored,
        signed=representation == 1,
        colour_transform=samples == 3,
        source_photometric=photometric,
        bits_allocated=bits_allocated,
        transfer_syntax=str(ts),
    )


def _overlays_in_unused_bits(ds: Dataset) -> bool:
    """Whether retired overlays live in the unused high bits of Pixel Data."""
    for group in range(0x6000, 0x6020, 2):
        position = ds.get((group, 0x0102))
        if position is not None and position.value not in (None, "", 0):
            return True
    return False


def _settle_unused_bits(arr: np.ndarray, info: ImageInfo) -> np.ndarray:
    """Decide, for a signed frame decoded raw, what the bits above Bits Stored mean.

    If none of them is set, the writer did not sign-extend, so the standard
    reading applies: sign-extend from Bits Stored (PS3.5 8.1.1), exactly as
    pydicom's default does. If some are set, the writer stored full-width two's
    complement values (sign-extended, or beyond Bits Stored): keep them.
    """
    shift = info.bits_allocated - info.precision
    if not (info.signed and shift):
        return arr
    if np.any(arr >> info.precision):
        return arr
    if not arr.flags.writeable:
        arr = arr.copy()
    np.left_shift(arr, shift, out=arr)
    np.right_shift(arr, shift, out=arr)
    return arr


def iter_frames(ds: Dataset, info: ImageInfo) -> Iterator[np.ndarray]:
    """Decode the frames of a classified instance one at a time.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance given to :func:`classify`.
    info : ImageInfo
        Its classification.

    Yields
    ------
    numpy.ndarray
        ``rows x columns`` (grey) or ``rows x columns x 3`` (RGB) integer
        samples in native byte order, one frame at a time so memory stays
        bounded for large multi-frame objects. Values may exceed Bits Stored;
        pass each frame to :func:`required_precision`.

    Raises
    ------
    NotStreamable
        If a frame cannot be decoded, has an unexpected shape, is not RGB for
        colour, or fewer frames than declared are found.
    """
    ts = UID(info.transfer_syntax)
    decoder = get_decoder(ts)
    options: dict[str, object] = {"as_rgb": True, "allow_excess_frames": False}
    if ts not in _SELF_DESCRIBING:
        # Keep the bits above Bits Stored, unless retired overlays occupy them.
        options["correct_unused_bits"] = _overlays_in_unused_bits(ds)
    settle = ts not in _SELF_DESCRIBING and not options["correct_unused_bits"]
    frames = decoder.iter_array(ds, **options)
    try:
        yield from _checked_frames(frames, info, settle)
    finally:
        frames.close()  # release pydicom's generator even if the caller stops early


def _checked_frames(
    frames: Iterator[tuple[np.ndarray, dict[str, object]]], info: ImageInfo, settle: bool
) -> Iterator[np.ndarray]:
    expected_shape = (info.rows, info.columns) + ((3,) if info.samples == 3 else ())
    index = 0
    while index < info.frames:
        try:
            arr, meta = next(frames)
        except StopIteration:
            raise NotStreamable(
                f"only {index} of {info.frames} declared frames are present"
            ) from None
        except Exception as exc:  # pydicom and its plugins raise many types
            raise NotStreamable(
                f"frame {index + 1} of {info.frames} could not be decoded: {exc}"
            ) from exc
        if arr.shape != expected_shape:
            raise NotStreamable(
                f"frame {index + 1} decoded to shape {arr.shape}, expected {expected_shape}"
            )
        if info.samples == 3:
            photometric = str(meta.get("photometric_interpretation", ""))
            if photometric != "RGB":
                raise NotStreamable(
                    f"frame {index + 1} decoded as {photometric or 'unknown'} instead of RGB"
                )
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if settle:
            arr = _settle_unused_bits(arr, info)
        yield arr
        index += 1


def _bits_needed(lo: int, hi: int, signed: bool) -> int:
    if signed:
        return max(max(hi, 0).bit_length(), (-min(lo, 0) - 1).bit_length() if lo < 0 else 0) + 1
    return max(hi.bit_length(), 1)


def required_precision(frame: np.ndarray, info: ImageInfo) -> int:
    """Codestream precision for a frame: Bits Stored, or more if the data needs it.

    Parameters
    ----------
    frame : numpy.ndarray
        A frame from :func:`iter_frames`.
    info : ImageInfo
        The instance's classification.

    Returns
    -------
    int
        ``max(info.precision, bits the values need)``; values that exceed Bits
        Stored are kept rather than truncated.

    Raises
    ------
    NotStreamable
        If the values do not fit even Bits Allocated (or are negative for
        unsigned data), which only a broken decoder could produce.
    """
    lo, hi = int(frame.min()), int(frame.max())
    if not info.signed and lo < 0:
        raise NotStreamable(f"unsigned pixel data decoded to negative values (minimum {lo})")
    needed = _bits_needed(lo, hi, info.signed)
    if needed > info.bits_allocated:
        raise NotStreamable(
            f"pixel values {lo}..{hi} need {needed} bits, more than Bits Allocated "
            f"({info.bits_allocated})"
        )
    return max(info.precision, needed)
