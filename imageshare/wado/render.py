"""
Rendered WADO-URI images: decoded pixels to an 8-bit JPEG or PNG. No I/O, no Twisted.

Grey images follow the PS3.4 grayscale pipeline (N.2.1): the Modality LUT (Rescale
Slope/Intercept or the Modality LUT Sequence) turns stored values into modality units, the
VOI transform (the request's window, else the object's first Window Center/Width with its
VOI LUT Function, else its first VOI LUT, else the frame's min..max) turns those into grey
levels, and MONOCHROME1 is inverted last. Colour is shown as RGB (YCbCr is converted by
the decoders before it gets here), scaled to 8 bits; windows do not apply to colour.

Geometry: ``region`` selects part of the frame, ``rows``/``columns`` the output size
(:func:`output_size`). A small rendering of a streamable instance decodes a reduced
resolution of its JPEG 2000 codestream (:func:`choose_reduce`): the largest discard level
whose image is still at least the output size, so the final resampling shrinks by less
than 2 (when the codestream has enough levels) or enlarges.
"""

from __future__ import annotations

import io
import math
from typing import Any

import attrs
import numpy as np
from PIL import Image
from pydicom.multival import MultiValue

from imageshare.codestream.markers import parse_main_header
from imageshare.wado.query import JPEG, PNG, Region, WadoError, Window

__all__ = [
    "MAX_OUTPUT_PIXELS",
    "Lut",
    "Photometry",
    "photometry_of",
    "crop_box",
    "output_size",
    "choose_reduce",
    "decomposition_levels",
    "linear_window",
    "voi_levels",
    "render",
    "encode_image",
]

#: Largest rendered image (pixels); beyond it the request is refused (400) rather than
#: letting one request hold hundreds of megabytes.
MAX_OUTPUT_PIXELS = 32 * 1024 * 1024

_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@attrs.frozen(eq=False)
class Lut:
    """A Modality or VOI LUT (PS3.3 C.11.1/C.11.2): ``data[v - first]``, clamped at both ends."""

    first: int
    bits: int
    data: np.ndarray

    def __call__(self, values: np.ndarray) -> np.ndarray:
        index = np.clip(np.rint(values) - self.first, 0, len(self.data) - 1).astype(np.intp)
        return self.data[index]


@attrs.frozen
class Photometry:
    """What an object says about turning its stored values into what is shown.

    ``photometric`` is ``MONOCHROME1``, ``MONOCHROME2`` or ``RGB`` (colour of any encoding
    arrives decoded as RGB; PALETTE COLOR once its lookup tables are applied).
    """

    photometric: str
    bits_stored: int
    slope: float = 1.0
    intercept: float = 0.0
    modality_lut: Lut | None = None
    windows: tuple[Window, ...] = ()
    voi_function: str = "LINEAR"
    voi_lut: Lut | None = None

    @property
    def grey(self) -> bool:
        return self.photometric in _GREY


# --- what the object says ---------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """First value of a (possibly multi-valued) DS, or None if absent or not a finite number."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _lut(item: Any, signed: bool) -> Lut | None:
    """A LUT from an item with LUT Descriptor and LUT Data; None if unusable."""
    try:
        count, first, bits = (int(v) for v in item.LUTDescriptor)
        raw = item.LUTData
    except (AttributeError, TypeError, ValueError):
        return None
    if isinstance(raw, (bytes, bytearray)):
        data = np.frombuffer(raw[: len(raw) // 2 * 2], "<u2")  # OW: one entry per 16-bit word
    else:
        data = np.atleast_1d(np.asarray(raw))
    count = count or 65536  # PS3.3 C.11.1.1: 0 means 2^16 entries
    if signed and first >= 32768:  # the first mapped value is SS for signed pixels
        first -= 65536
    if not 1 <= bits <= 16 or len(data) < count:
        return None
    return Lut(first, bits, data[:count].astype(np.float64))


def photometry_of(ds: Any) -> Photometry:
    """Read the display attributes of a data set (pixels not needed).

    Raises
    ------
    WadoError
        406 for a photometric interpretation that cannot be rendered.
    """
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    signed = _number(ds.get("PixelRepresentation")) == 1
    bits = int(_number(ds.get("BitsStored")) or _number(ds.get("BitsAllocated")) or 8)
    if photometric == "PALETTE COLOR":
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else 8
        return Photometry("RGB", 8 if bits <= 8 else 16)
    if photometric in _COLOUR:
        return Photometry("RGB", bits)
    if photometric not in _GREY:
        raise WadoError(406, "the object's Photometric Interpretation cannot be rendered")
    modality_lut = None
    if ds.get("ModalityLUTSequence"):
        modality_lut = _lut(ds.ModalityLUTSequence[0], signed)
    windows: tuple[Window, ...] = ()
    center, width = _number(ds.get("WindowCenter")), _number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        windows = (Window(center, width),)
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    voi_lut = None
    if ds.get("VOILUTSequence"):
        voi_lut = _lut(ds.VOILUTSequence[0], signed)
    return Photometry(
        photometric,
        bits,
        slope=_number(ds.get("RescaleSlope")) or 1.0,
        intercept=_number(ds.get("RescaleIntercept")) or 0.0,
        modality_lut=modality_lut,
        windows=windows,
        voi_function=function if function in _VOI_FUNCTIONS else "LINEAR",
        voi_lut=voi_lut,
    )


# --- geometry ------------------------------------------------------------------------------


def crop_box(width: int, height: int, region: Region | None) -> tuple[int, int, int, int]:
    """The pixels ``region`` covers, ``(x0, y0, x1, y1)`` on the full frame, at least 1x1."""
    if region is None:
        return (0, 0, width, height)
    x0 = min(math.floor(region.xmin * width), width - 1)
    y0 = min(math.floor(region.ymin * height), height - 1)
    x1 = max(math.ceil(region.xmax * width), x0 + 1)
    y1 = max(math.ceil(region.ymax * height), y0 + 1)
    return (x0, y0, min(x1, width), min(y1, height))


def output_size(width: int, height: int, rows: int | None, columns: int | None) -> tuple[int, int]:
    """``(columns, rows)`` of the rendered image for a source of ``width`` x ``height``.

    Both given: the largest size within them that keeps the aspect ratio; one given: the
    other follows the aspect ratio; none: the source size.

    Raises
    ------
    WadoError
        400 if the result would exceed :data:`MAX_OUTPUT_PIXELS`.
    """
    if rows is None and columns is None:
        size = (width, height)
    else:
        scales = [s for s in (columns and columns / width, rows and rows / height) if s]
        scale = min(scales)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size[0] * size[1] > MAX_OUTPUT_PIXELS:
        raise WadoError(400, f"the rendered image would have more than {MAX_OUTPUT_PIXELS} pixels")
    return size


def choose_reduce(
    full: tuple[int, int], box: tuple[int, int, int, int], size: tuple[int, int], levels: int
) -> int:
    """The JPEG 2000 discard level to decode at: the largest whose box is still >= ``size``.

    Parameters
    ----------
    full : (int, int)
        Full frame ``(width, height)``.
    box : (int, int, int, int)
        The part shown, on the full frame (:func:`crop_box`).
    size : (int, int)
        Output ``(width, height)``.
    levels : int
        Decomposition levels of the codestream: the largest possible discard level.
    """
    width, height = full
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    reduce = 0
    while reduce < levels:
        nxt = reduce + 1
        # A resolution level of a codestream at the origin is ceil(size / 2^r) wide (B-15);
        # the box shrinks in proportion (compared in integers: no rounding at the limit).
        level_w, level_h = -(-width // (1 << nxt)), -(-height // (1 << nxt))
        if box_w * level_w < size[0] * width or box_h * level_h < size[1] * height:
            break
        reduce = nxt
    return reduce


def decomposition_levels(codestream: bytes | memoryview) -> int:
    """The fewest decomposition levels of any component: how far a decode can reduce."""
    header = parse_main_header(codestream)
    return min([header.cod.style.levels] + [c.style.levels for c in header.coc])


# --- values -------------------------------------------------------------------------------


def linear_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A VOI window (PS3.3 C.11.2.1.2 and C.11.2.1.3) onto grey levels 0.0..255.0."""
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
    elif width <= 1:
        y = np.where(x <= center - 0.5, 0.0, 255.0)  # the limit of LINEAR as width -> 1
    else:
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(y, 0.0, 255.0)


def _modality(pixels: np.ndarray, photometry: Photometry) -> np.ndarray:
    if photometry.modality_lut is not None:
        return photometry.modality_lut(pixels)
    values = pixels.astype(np.float64)
    if photometry.slope != 1.0 or photometry.intercept != 0.0:
        values = values * photometry.slope + photometry.intercept
    return values


@attrs.frozen
class _Voi:
    """The VOI transform chosen for a frame: a window or a LUT."""

    window: Window | None = None
    function: str = "LINEAR"
    lut: Lut | None = None

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.lut is not None:
            top = float((1 << self.lut.bits) - 1)
            return np.clip(self.lut(values) * (255.0 / top), 0.0, 255.0)
        assert self.window is not None
        return linear_window(values, self.window.center, self.window.width, self.function)


def _choose_voi(values: np.ndarray, photometry: Photometry, window: Window | None) -> _Voi:
    if window is not None:
        return _Voi(window)
    if photometry.windows:
        return _Voi(photometry.windows[0], photometry.voi_function)
    if photometry.voi_lut is not None:
        return _Voi(lut=photometry.voi_lut)
    low, high = float(np.min(values)), float(np.max(values))
    # Maps low to 0 and high to 255 with the LINEAR formula (dcmtk's min-max window too).
    return _Voi(Window((low + high + 1) / 2, high - low + 1))


def _display(values: np.ndarray, voi: _Voi, photometry: Photometry) -> np.ndarray:
    """Modality values to 8-bit grey levels: VOI, then MONOCHROME1 inverted."""
    levels = voi(values)
    if photometry.photometric == "MONOCHROME1":
        levels = 255.0 - levels
    return np.rint(levels).astype(np.uint8)


def voi_levels(pixels: np.ndarray, photometry: Photometry, window: Window | None = None) -> np.ndarray:
    """Stored grey values to 8-bit display levels, the whole frame at its own size."""
    values = _modality(pixels, photometry)
    return _display(values, _choose_voi(values, photometry, window), photometry)


def _rgb8(pixels: np.ndarray, bits: int) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise WadoError(406, "the colour pixels cannot be rendered (not three samples)")
    if pixels.dtype == np.uint8 and bits <= 8:
        return pixels
    top = float((1 << max(1, min(bits, 32))) - 1)
    return np.rint(np.clip(pixels.astype(np.float64) * (255.0 / top), 0.0, 255.0)).astype(np.uint8)


# --- putting it together ----------------------------------------------------------------------


def _resample(pixels: np.ndarray, mode: str, box: tuple[int, int, int, int], reduce: int,
              size: tuple[int, int]) -> np.ndarray:
    """Crop ``box`` (full-frame pixels) out of a frame decoded at discard level ``reduce``
    and scale it to ``size``."""
    if reduce == 0:
        image = Image.fromarray(pixels, mode)
        if (box[2] - box[0], box[3] - box[1]) == size:
            return np.asarray(image.crop(box))  # nothing to interpolate
        # By a whole factor: BOX, the exact mean of each k x k block (as dcmtk does).
        # Otherwise BILINEAR, a triangle filter widened by the factor when shrinking: Pillow's
        # BOX would count pixels wholly in or out where blocks do not line up, an uneven
        # sampling. Neither overshoots, so neither draws halos at sharp edges (metal, bone,
        # contrast) as LANCZOS or BICUBIC do.
        whole = ((box[2] - box[0]) / size[0]).is_integer() and ((box[3] - box[1]) / size[1]).is_integer()
        return np.asarray(image.resize(size, Image.Resampling.BOX if whole else Image.Resampling.BILINEAR, box=box))
    # Sample k of discard level r sits on full-frame sample 2^r k (the wavelet keeps the
    # even samples), so its centre is at 2^r k + 0.5, not at the middle of the 2^r pixels
    # it stands for: map x to (x - 0.5) / 2^r + 0.5. The mapped box overhangs the last
    # sample by up to half a pixel, hence one pixel of edge padding. BILINEAR, as BOX
    # would round that sub-pixel offset away when the remaining shrink is near 1.
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (pixels.ndim - 2)
    image = Image.fromarray(np.pad(pixels, pad, mode="edge"), mode)
    scale = 1.0 / (1 << reduce)
    mapped = tuple((v - 0.5) * scale + 0.5 + 1 for v in box)
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=mapped))


def render(
    pixels: np.ndarray,
    photometry: Photometry,
    *,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    reduce: int = 0,
    window: Window | None = None,
    content_type: str = JPEG,
    quality: int = 90,
) -> bytes:
    """Render one decoded frame.

    Parameters
    ----------
    pixels : numpy.ndarray
        The frame as decoded: ``rows x columns`` (grey) or ``rows x columns x 3`` (RGB).
    photometry : Photometry
        From :func:`photometry_of`.
    box : (int, int, int, int)
        The part to show, in full-frame pixels (:func:`crop_box`).
    size : (int, int)
        Output ``(width, height)`` (:func:`output_size`).
    reduce : int
        The JPEG 2000 discard level ``pixels`` were decoded at (0: full resolution).
    window : Window or None
        The request's window; ``None`` uses the object's VOI or the frame's range.
    content_type : str
        ``image/jpeg`` or ``image/png``.
    quality : int
        JPEG quality, 1..100.

    Returns
    -------
    bytes
        The encoded image.
    """
    if photometry.grey:
        if pixels.ndim != 2:
            raise WadoError(406, "the grey pixels cannot be rendered (more than one sample)")
        fast = _shown_as_stored(pixels, photometry, box, size, reduce, window)
        if fast is not None:
            return encode_image(Image.fromarray(fast, "L"), content_type, quality)
        values = _modality(pixels, photometry)
        # VOI from the whole frame (a region shows the same grey levels as the full view),
        # applied after resampling: interpolation happens in modality units, as the window
        # is not linear (it clips).
        voi = _choose_voi(values, photometry, window)
        resampled = _resample(values.astype(np.float32), "F", box, reduce, size)
        image = Image.fromarray(_display(resampled, voi, photometry), "L")
    else:
        image = Image.fromarray(_resample(_rgb8(pixels, photometry.bits_stored), "RGB", box, reduce, size), "RGB")
    return encode_image(image, content_type, quality)


def _shown_as_stored(
    pixels: np.ndarray, photometry: Photometry, box: tuple[int, int, int, int], size: tuple[int, int],
    reduce: int, window: Window | None,
) -> np.ndarray | None:
    """Grey levels through a lookup table, when nothing is interpolated; else ``None``.

    Without resampling, every output pixel is a function of its stored value alone, so
    the grey pipeline runs once per possible value rather than once per pixel (a CR has
    millions of pixels but tens of thousands of values). The result is identical.
    """
    if reduce or (box[2] - box[0], box[3] - box[1]) != size or photometry.modality_lut is not None:
        return None
    if pixels.dtype.kind not in "iu" or pixels.size == 0:
        return None
    low, high = int(pixels.min()), int(pixels.max())
    if high - low >= 1 << 20:
        return None
    domain = np.arange(low, high + 1, dtype=np.int64)
    # Rescale is monotonic, so the frame's extreme values are the domain's: a min-max VOI
    # chosen on the domain is the one chosen on the frame.
    values = _modality(domain, photometry)
    lut = _display(values, _choose_voi(values, photometry, window), photometry)
    crop = pixels[box[1] : box[3], box[0] : box[2]]
    return np.ascontiguousarray(lut[crop.astype(np.int64) - low])


def encode_image(image: Image.Image, content_type: str, quality: int = 90) -> bytes:
    """JPEG (baseline, no chroma subsampling) or PNG bytes."""
    out = io.BytesIO()
    if content_type == JPEG:
        # 4:4:4: thin coloured lines (Doppler, graphics) would smear with subsampled chroma.
        image.save(out, "JPEG", quality=quality, subsampling=0)
    elif content_type == PNG:
        image.save(out, "PNG")
    else:
        raise ValueError(f"not a rendered type: {content_type}")
    return out.getvalue()

