"""Tests for :mod:`imageshare.wado.render`: the grayscale pipeline, geometry and encoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.sequence import Sequence

from imageshare.transcode import openjpeg
from imageshare.transcode.params import EncodeParams
from imageshare.wado import render
from imageshare.wado.query import JPEG, PNG, Region, WadoError, Window
from imageshare.wado.render import Lut, Photometry


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def grey_dataset(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.BitsAllocated, ds.PixelRepresentation = 12, 16, 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


# --- windowing math ------------------------------------------------------------------------


def test_linear_window_follows_ps33() -> None:
    """LINEAR (PS3.3 C.11.2.1.2.1): c - 0.5 - (w-1)/2 and below is 0, above c - 0.5 + (w-1)/2
    is 255, linear in between (c=40, w=401: -160.5 -> 0, 240.5 -> 255, 39.5 -> 127.5)."""
    y = render.linear_window(np.array([-1000, -160.5, 39.5, 240.5, 1000]), 40, 401)
    np.testing.assert_allclose(y, [0, 0, 127.5, 255, 255])
    assert render.linear_window(np.array([-160.0]), 40, 401)[0] == pytest.approx(255 / 400 * 0.5)


def test_window_of_width_one_is_a_threshold() -> None:
    """Width 1 (the smallest allowed): at most c - 0.5 is black, anything above is white."""
    np.testing.assert_array_equal(render.linear_window(np.array([9, 9.5, 10, 11]), 10, 1), [0, 0, 255, 255])


def test_linear_exact_and_sigmoid() -> None:
    """LINEAR_EXACT (C.11.2.1.3.2) and SIGMOID (C.11.2.1.3.1) put the centre at mid-grey."""
    exact = render.linear_window(np.array([-160, 40, 240]), 40, 400, "LINEAR_EXACT")
    np.testing.assert_allclose(exact, [0, 127.5, 255])
    sigmoid = render.linear_window(np.array([40, 240, -160]), 40, 400, "SIGMOID")
    np.testing.assert_allclose(sigmoid, [127.5, 255 / (1 + np.exp(-2)), 255 / (1 + np.exp(2))])


def test_window_is_in_modality_units() -> None:
    """Rescale Slope/Intercept come first: a CT stored value 1024 with intercept -1024 is
    0 HU, the centre of a (0, 101) window."""
    ph = render.photometry_of(grey_dataset(RescaleSlope=1, RescaleIntercept=-1024, PixelRepresentation=1))
    levels = render.voi_levels(np.array([[1024 - 50, 1024, 1024 + 50]], np.int16), ph, Window(0.5, 101))
    np.testing.assert_array_equal(levels, [[0, 128, 255]])


def test_request_window_overrides_the_objects() -> None:
    """The object's first window is used unless the request gives one."""
    ds = grey_dataset(WindowCenter=[100.5, 2000], WindowWidth=[201, 1000])
    ph = render.photometry_of(ds)
    assert ph.windows == (Window(100.5, 201),)
    pixels = np.array([[0, 100, 200]], np.uint16)
    np.testing.assert_array_equal(render.voi_levels(pixels, ph), [[0, 128, 255]])
    np.testing.assert_array_equal(render.voi_levels(pixels, ph, Window(2000, 1000)), [[0, 0, 0]])


def test_voi_lut_function_attribute() -> None:
    """VOI LUT Function SIGMOID applies to the object's own window."""
    ph = render.photometry_of(grey_dataset(WindowCenter=100, WindowWidth=100, VOILUTFunction="SIGMOID"))
    assert ph.voi_function == "SIGMOID"
    assert render.voi_levels(np.array([[100]], np.uint16), ph)[0, 0] == 128


def test_min_max_without_voi() -> None:
    """Without any VOI the frame's own range maps onto 0..255 (min black, max white)."""
    ph = render.photometry_of(grey_dataset())
    pixels = np.array([[500, 1000, 1500]], np.uint16)
    np.testing.assert_array_equal(render.voi_levels(pixels, ph), [[0, 128, 255]])
    flat = np.full((2, 2), 7, np.uint16)
    assert render.voi_levels(flat, ph).shape == (2, 2)  # a flat frame does not divide by zero


def test_monochrome1_is_inverted_after_windowing() -> None:
    """MONOCHROME1: the same window, then inverted (low values white)."""
    ds = grey_dataset(PhotometricInterpretation="MONOCHROME1", WindowCenter=100.5, WindowWidth=201)
    levels = render.voi_levels(np.array([[0, 100, 200]], np.uint16), render.photometry_of(ds))
    np.testing.assert_array_equal(levels, [[255, 128, 0]])


def test_voi_lut_sequence() -> None:
    """A VOI LUT Sequence (no window) maps through its table: first mapped value, clamped
    at both ends, entries scaled from the LUT's bit depth to 8 bits."""
    item = Dataset()
    item.LUTDescriptor = [4, 10, 10]
    item.LUTData = [0, 1023, 512, 100]
    ph = render.photometry_of(grey_dataset(VOILUTSequence=Sequence([item])))
    assert ph.voi_lut is not None and not ph.windows
    levels = render.voi_levels(np.array([[0, 10, 11, 12, 13, 99]], np.uint16), ph)
    np.testing.assert_array_equal(levels, [[0, 0, 255, 128, 25, 25]])


def test_voi_lut_data_as_ow_bytes() -> None:
    """LUT Data read as OW bytes is one little-endian 16-bit entry per word."""
    item = Dataset()
    item.LUTDescriptor = [2, 0, 8]
    item.add_new(0x00283006, "OW", np.array([0, 255], "<u2").tobytes())
    lut = render.photometry_of(grey_dataset(VOILUTSequence=Sequence([item]))).voi_lut
    assert lut is not None
    np.testing.assert_array_equal(lut.data, [0, 255])


def test_modality_lut_sequence() -> None:
    """A Modality LUT Sequence replaces Rescale Slope/Intercept; the window then applies to
    its output."""
    item = Dataset()
    item.LUTDescriptor = [3, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [1000, 2000, 3000]
    ph = render.photometry_of(grey_dataset(ModalityLUTSequence=Sequence([item]), RescaleSlope=5))
    levels = render.voi_levels(np.array([[0, 1, 2, 9]], np.uint16), ph, Window(2000.5, 2001))
    np.testing.assert_array_equal(levels, [[0, 128, 255, 255]])


def test_signed_lut_first_value() -> None:
    """For signed pixels a first mapped value read as US above 32767 is negative (SS)."""
    ds = grey_dataset(PixelRepresentation=1, VOILUTSequence=Sequence([_lut_item([2, 65535, 8], [0, 255])]))
    lut = render.photometry_of(ds).voi_lut
    assert lut is not None and lut.first == -1
    np.testing.assert_array_equal(lut(np.array([-5, -1, 0, 7])), [0, 0, 255, 255])


def _lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    return item


def test_photometry_of_colour_and_unsupported() -> None:
    """Any colour encoding is rendered as RGB (decoders convert), PALETTE COLOR once its
    LUTs are applied; other interpretations are a 406."""
    assert render.photometry_of(grey_dataset(PhotometricInterpretation="YBR_FULL_422", BitsStored=8)) == Photometry("RGB", 8)
    palette = grey_dataset(PhotometricInterpretation="PALETTE COLOR", RedPaletteColorLookupTableDescriptor=[256, 0, 16])
    assert render.photometry_of(palette) == Photometry("RGB", 16)
    with pytest.raises(WadoError) as info:
        render.photometry_of(grey_dataset(PhotometricInterpretation="CMYK"))
    assert info.value.status == 406


def test_bad_voi_attributes_are_ignored() -> None:
    """A window that is not a number, or a LUT without data, falls back to the next choice."""
    ds = grey_dataset()
    ds.add_new(0x00281050, "DS", None)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    ph = render.photometry_of(grey_dataset(VOILUTSequence=Sequence([item])))
    assert render.photometry_of(ds).windows == () and ph.voi_lut is None


# --- geometry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, columns, expected",
    [
        (None, None, (400, 200)),
        (None, 100, (100, 50)),
        (50, None, (100, 50)),
        (100, 100, (100, 50)),  # both: the largest size inside 100x100 that keeps 2:1
        (10, 1000, (20, 10)),
        (1000, 800, (800, 400)),  # enlarging is allowed
        (1, None, (2, 1)),
        (None, 1, (1, 1)),  # never 0 pixels
    ],
)
def test_output_size_keeps_the_aspect_ratio(rows: int | None, columns: int | None, expected: tuple[int, int]) -> None:
    """rows and columns are maxima keeping the aspect ratio; one alone derives the other."""
    assert render.output_size(400, 200, rows, columns) == expected


def test_output_size_limit() -> None:
    """A rendering beyond MAX_OUTPUT_PIXELS is refused with 400."""
    with pytest.raises(WadoError) as info:
        render.output_size(100, 100, 8192, 8192)
    assert info.value.status == 400


def test_crop_box() -> None:
    """A region covers whole pixels (rounded outwards), at least one."""
    assert render.crop_box(100, 50, None) == (0, 0, 100, 50)
    assert render.crop_box(100, 50, Region(0.25, 0.5, 0.75, 1.0)) == (25, 25, 75, 50)
    assert render.crop_box(100, 50, Region(0.251, 0.0, 0.259, 0.01)) == (25, 0, 26, 1)
    assert render.crop_box(100, 50, Region(0.999, 0.999, 1.0, 1.0)) == (99, 49, 100, 50)


@pytest.mark.parametrize(
    "full, box, size, levels, expected",
    [
        ((1024, 1024), (0, 0, 1024, 1024), (1024, 1024), 5, 0),
        ((1024, 1024), (0, 0, 1024, 1024), (256, 256), 5, 2),
        ((1024, 1024), (0, 0, 1024, 1024), (257, 100), 5, 1),
        ((1024, 1024), (0, 0, 1024, 1024), (16, 16), 5, 5),  # no further than the codestream goes
        ((1024, 1024), (0, 0, 1024, 1024), (16, 16), 3, 3),
        ((1024, 1024), (0, 0, 512, 512), (128, 128), 5, 2),  # the region counts, not the frame
        ((1955, 1841), (0, 0, 1955, 1841), (256, 241), 5, 2),  # 489x461 >= 256x241 > 245x231
        ((1955, 1841), (0, 0, 1955, 1841), (245, 231), 5, 3),  # ceil(1955/8) = 245
        ((5, 5), (0, 0, 5, 5), (3, 3), 5, 1),  # ceil(5/2) = 3
    ],
)
def test_choose_reduce(
    full: tuple[int, int], box: tuple[int, int, int, int], size: tuple[int, int], levels: int, expected: int
) -> None:
    """The discard level is the largest whose (ceil-halved) box is still at least the output."""
    assert render.choose_reduce(full, box, size, levels) == expected


@pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing")
def test_decomposition_levels(tmp_path: Path) -> None:
    """The levels are read from the codestream's COD (what OpenJPEG can reduce by)."""
    frame = np.arange(300 * 200, dtype=np.uint16).reshape(200, 300) % 4096
    path = tmp_path / "f.j2c"
    openjpeg.encode(frame, path, precision=12, signed=False, colour_transform=False, params=EncodeParams())
    levels = render.decomposition_levels(path.read_bytes())
    assert levels >= 1
    assert openjpeg.decode(path.read_bytes(), reduce=levels).shape == (-(-200 // 2**levels), -(-300 // 2**levels))


# --- rendering --------------------------------------------------------------------------------


def grey_frame() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:96]
    return (x * 40 + y * 3).astype(np.uint16)


def test_render_png_native_is_the_voi_output() -> None:
    """At native size, a PNG holds exactly the VOI levels."""
    pixels, ph = grey_frame(), render.photometry_of(grey_dataset())
    png = render.render(pixels, ph, box=(0, 0, 96, 64), size=(96, 64), content_type=PNG)
    assert png.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode(png), render.voi_levels(pixels, ph))


def test_render_region_crops_before_scaling() -> None:
    """A region at native scale is the crop of the full rendering, with the grey levels of
    the whole frame (the min-max window comes from the whole frame, not the region)."""
    pixels, ph = grey_frame(), render.photometry_of(grey_dataset())
    box = render.crop_box(96, 64, Region(0.5, 0.25, 1.0, 0.75))
    png = render.render(pixels, ph, box=box, size=(48, 32), content_type=PNG)
    np.testing.assert_array_equal(decode(png), render.voi_levels(pixels, ph)[16:48, 48:96])


def test_render_shrinks_by_area_average() -> None:
    """Halving averages each 2x2 block (BOX), in modality units before the window."""
    pixels = np.array([[0, 100, 200, 200], [100, 200, 200, 200]], np.uint16)
    ph = render.photometry_of(grey_dataset())
    png = render.render(pixels, ph, box=(0, 0, 4, 2), size=(2, 1), window=Window(100.5, 201),
                        content_type=PNG)
    np.testing.assert_array_equal(decode(png), [[128, 255]])


def test_render_from_a_reduced_decode() -> None:
    """A frame decoded at a lower resolution renders to the requested size from the full
    frame's box (scaled), close to rendering the full frame."""
    pixels, ph = grey_frame(), render.photometry_of(grey_dataset())
    # The 5/3 wavelet's low-pass band of a linear ramp is the ramp's even samples.
    half = pixels[::2, ::2]
    box = render.crop_box(96, 64, Region(0.0, 0.0, 0.5, 1.0))
    window = Window(2000, 4000)  # the same for both (min..max differs: the odd samples are gone)
    from_half = decode(render.render(half, ph, box=box, size=(24, 32), reduce=1, window=window, content_type=PNG))
    from_full = decode(render.render(pixels, ph, box=box, size=(24, 32), window=window, content_type=PNG))
    assert from_half.shape == (32, 24)
    inner = (slice(1, -1), slice(1, -1))  # the edge pixels see the padding
    assert np.abs(from_half.astype(int) - from_full)[inner].max() <= 1


def test_render_rgb_jpeg() -> None:
    """Colour renders as an RGB JPEG of the requested size; 16-bit samples are scaled to 8."""
    rgb = np.zeros((40, 60, 3), np.uint16)
    rgb[..., 0] = 65535
    rgb[:, 30:, 2] = 32768
    ph = Photometry("RGB", 16)
    jpeg = render.render(rgb, ph, box=(0, 0, 60, 40), size=(30, 20), window=Window(1, 1), quality=95)
    out = decode(jpeg).astype(int)
    assert jpeg.startswith(b"\xff\xd8") and out.shape == (20, 30, 3)
    assert np.abs(out[5, 5] - [255, 0, 0]).max() <= 3 and np.abs(out[5, 25] - [255, 0, 128]).max() <= 3


def test_jpeg_quality_changes_the_size() -> None:
    """imageQuality reaches the JPEG encoder."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, (64, 64)).astype(np.uint16)
    ph = render.photometry_of(grey_dataset())
    sizes = [len(render.render(pixels, ph, box=(0, 0, 64, 64), size=(64, 64), quality=q))
             for q in (10, 95)]
    assert sizes[0] < sizes[1]


def test_render_refuses_mismatched_pixels() -> None:
    """Grey attributes with colour pixels (or the reverse) are a 406, not a crash."""
    with pytest.raises(WadoError):
        render.render(np.zeros((4, 4, 3), np.uint8), render.photometry_of(grey_dataset()), box=(0, 0, 4, 4), size=(4, 4))
    with pytest.raises(WadoError):
        render.render(np.zeros((4, 4), np.uint8), Photometry("RGB", 8), box=(0, 0, 4, 4), size=(4, 4))


def test_encode_image_rejects_other_types() -> None:
    """Only JPEG and PNG are rendered types."""
    with pytest.raises(ValueError):
        render.encode_image(Image.new("L", (1, 1)), "image/gif")
    assert render.encode_image(Image.new("L", (1, 1)), JPEG).startswith(b"\xff\xd8")


def test_lut_call_clamps() -> None:
    """A LUT maps values below its first entry to the first, above its last to the last."""
    lut = Lut(first=5, bits=8, data=np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(lut(np.array([0, 5, 6, 7, 100])), [1, 1, 2, 3, 3])


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
@pytest.mark.parametrize("window", [None, (40.0, 400.0), (-600.0, 1.0)])
@pytest.mark.parametrize("monochrome1", [False, True])
def test_lookup_table_path_equals_per_pixel_path(name: str, window: tuple[float, float] | None,
                                                 monochrome1: bool) -> None:
    """Unscaled grey renderings go through a table over the stored values; the grey levels
    are exactly those of the per-pixel pipeline (rescale, window or min-max, MONOCHROME1)."""
    from pydicom import dcmread

    from tests.helpers import sample_file

    ds = dcmread(sample_file(name))
    if monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    photometry = render.photometry_of(ds)
    pixels = ds.pixel_array
    w = render.Window(*window) if window else None
    box = (3, 5, pixels.shape[1] - 7, pixels.shape[0] - 2)
    fast = render._shown_as_stored(pixels, photometry, box, (box[2] - box[0], box[3] - box[1]), 0, w)
    assert fast is not None
    expected = render.voi_levels(pixels, photometry, w)[box[1] : box[3], box[0] : box[2]]
    np.testing.assert_array_equal(fast, expected)
    # Anything interpolated takes the per-pixel path.
    assert render._shown_as_stored(pixels, photometry, box, (10, 10), 0, w) is None
    assert render._shown_as_stored(pixels, photometry, box, (box[2] - box[0], box[3] - box[1]), 1, w) is None
