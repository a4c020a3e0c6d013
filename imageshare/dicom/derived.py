"""The DICOM objects the server hands out besides the archived original (pure).

* :func:`jpip_referenced`: the header-only object of the JPIP Referenced transfer syntaxes
  (PS3.5 A.6/A.7): every attribute but Pixel Data, plus the Pixel Data Provider URL of our
  JPIP server, with an Image Pixel description that matches the codestreams served there.
* :func:`native`: Explicit VR Little Endian with the pixels decoded.
* :func:`jpeg2000_lossless`: JPEG 2000 Lossless (.90) made of our own codestreams.
* :func:`deidentify`: the PS3.15 basic confidentiality profile (see :mod:`.deidentify`).
* :func:`encode` / :func:`encode_dataset`: Part 10 bytes, or the bare data set as a
  C-STORE sub-operation sends it, in any of these transfer syntaxes. pydicom writes
  neither .94 (it thinks it is encapsulated) nor .95 (it does not know it is deflated),
  so both are written here as Explicit VR Little Endian, the latter deflated.

Values in, values out: nothing here reads files or touches the network.
"""

from __future__ import annotations

import copy
import io
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_decoder, pack_bits
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from imageshare.codestream.errors import CodestreamError
from imageshare.codestream.markers import parse_main_header
from imageshare.dicom.deidentify import deidentify
from imageshare.dicom.filemeta import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    encode_file_meta,
)
from imageshare.dicom.wellformed import MalformedDataset, check_dataset, inflate
from imageshare.store.records import FrameRecord

__all__ = [
    "JPIP_REFERENCED",
    "JPIP_REFERENCED_DEFLATE",
    "JPEG2000_LOSSLESS",
    "DerivationError",
    "jpip_url",
    "read_part10",
    "jpip_referenced",
    "native",
    "jpeg2000_lossless",
    "deidentify",
    "encode",
    "encode_dataset",
]

JPIP_REFERENCED = UID("1.2.840.10008.1.2.4.94")
JPIP_REFERENCED_DEFLATE = UID("1.2.840.10008.1.2.4.95")
JPEG2000_LOSSLESS = UID("1.2.840.10008.1.2.4.90")

_JPIP = frozenset({JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE})
# Both are the Explicit VR Little Endian data set, raw-deflated (PS3.5 A.5).
_DEFLATED = frozenset({JPIP_REFERENCED_DEFLATE, DeflatedExplicitVRLittleEndian})

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = 0x7FE00008
_DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
_ALL_PIXEL_DATA = frozenset({_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_FLOAT_PIXEL_DATA})
# Offset tables of encapsulated Pixel Data: meaningless once the fragments change.
_EXTENDED_OFFSET_TABLE = frozenset({0x7FE00001, 0x7FE00002})
_TRAILING_PADDING = 0xFFFCFFFC
_HEADER_ONLY_DROPS = _ALL_PIXEL_DATA | _EXTENDED_OFFSET_TABLE | {_TRAILING_PADDING}

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_LONG_META_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


class DerivationError(ValueError):
    """The object cannot be produced in that form (the caller answers 406 or falls back)."""


@attrs.frozen
class _Geometry:
    """What every frame's codestream says about its samples."""

    width: int
    height: int
    components: int
    precision: int
    signed: bool


def jpip_url(public_url: str, sop_instance_uid: str, grant: str | None = None) -> str:
    """The Pixel Data Provider URL of an instance: a JPIP target the client can extend.

    PS3.5 8.4.1: the client appends its own JPIP fields, so the target is in the query.
    ``grant``: a URL grant (:mod:`imageshare.auth.grants`, URL-safe as it is) for a viewer
    that can only open the URL.
    """
    url = f"{public_url.rstrip('/')}/jpip?target={sop_instance_uid}"
    return url if grant is None else f"{url}&grant={grant}"


# --- reading ------------------------------------------------------------------------


def _dataset_offset(data: bytes) -> int:
    """Offset of the data set in a Part 10 file: after the preamble, DICM and group 2."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InvalidDicomError("not a DICOM Part 10 file: no 'DICM' after the 128-byte preamble")
    pos = 132
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_META_VRS:
            if pos + 12 > len(data):
                raise InvalidDicomError("the File Meta Information is truncated")
            pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    if pos > len(data) or pos == 132:
        raise InvalidDicomError("the File Meta Information is missing or truncated")
    return pos


def _convert_all(ds: Dataset) -> None:
    """Parse every element now, so that damage shows here rather than when serving."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _convert_all(item)


def read_part10(data: bytes) -> Dataset:
    """Parse an archived Part 10 file completely.

    Parameters
    ----------
    data : bytes
        Preamble, ``DICM``, File Meta Information and data set.

    Returns
    -------
    pydicom.dataset.FileDataset
        With ``file_meta``; every element already parsed.

    Raises
    ------
    pydicom.errors.InvalidDicomError
        Not a Part 10 file (no ``DICM``, no or broken meta information).
    ValueError
        The data set is truncated or malformed (``MalformedDataset``), or pydicom cannot
        parse one of its values.
    """
    data = bytes(data)
    start = _dataset_offset(data)
    try:
        meta = dcmread(io.BytesIO(data[:start]), force=False).file_meta
    except InvalidDicomError:
        raise
    except Exception as exc:  # pydicom raises many types for a broken meta group
        raise InvalidDicomError(f"unreadable File Meta Information: {exc}") from exc
    ts = UID(str(meta.get("TransferSyntaxUID", "")))
    if not ts.is_transfer_syntax:
        raise InvalidDicomError(f"unknown or missing Transfer Syntax UID {str(ts)!r}")
    body = data[start:]
    if ts in _DEFLATED:
        body = inflate(body)
        if ts != DeflatedExplicitVRLittleEndian:  # pydicom inflates only .1.99 itself
            data = data[:start] + body
    check_dataset(body, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)
    try:
        ds = dcmread(io.BytesIO(data), force=False)
        _convert_all(ds)
    except (InvalidDicomError, MalformedDataset):
        raise
    except Exception as exc:
        raise ValueError(f"cannot parse the data set: {type(exc).__name__}: {exc}") from exc
    return ds


# --- building -----------------------------------------------------------------------


def _is_big_endian(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(ts) and not UID(str(ts)).is_little_endian


def _swap_to_little_endian(ds: Dataset) -> None:
    """pydicom keeps OW/OF/... values as read; from a big endian source they need swapping."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_to_little_endian(item)
        elif elem.VR in _SWAP_WIDTH and isinstance(elem.value, bytes):
            width = _SWAP_WIDTH[elem.VR]
            if len(elem.value) % width == 0:
                elem.value = np.frombuffer(elem.value, f"u{width}").byteswap().tobytes()


def _copy_attributes(original: Dataset, drop: Iterable[int]) -> Dataset:
    """A copy of the data set without ``drop``, its binary values little endian."""
    dropped = frozenset(drop)
    out = Dataset()
    for elem in original:
        if elem.tag not in dropped:
            out.add(copy.deepcopy(elem))
    if _is_big_endian(original):
        _swap_to_little_endian(out)
    return out


def _set_file_meta(ds: Dataset, original: Dataset, transfer_syntax: str) -> None:
    old = getattr(original, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or old.get("MediaStorageSOPInstanceUID")
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta


def _frame_count(original: Dataset) -> int:
    try:
        return int(original.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise DerivationError(f"Number of Frames {original.NumberOfFrames!r} is not a number") from None


def _check_overlays(original: Dataset) -> None:
    # Retired overlays in the unused bits of Pixel Data do not survive our transcoding,
    # and the JPEG 2000 syntaxes cannot carry them (overlays only in (60xx,3000)).
    for group in range(0x6000, 0x6020, 2):
        position = original.get((group, 0x0102))
        if position is not None and position.value not in (None, "", 0):
            raise DerivationError("the object has overlays in the unused bits of its Pixel Data")


def _photometric(original: Dataset, geometry: _Geometry, *, colour_transform: bool,
                 reversible: bool, rgb_allowed: bool) -> str:
    """Photometric Interpretation of the codestream's samples (PS3.5 8.2.4 and A.6)."""
    samples = original.get("SamplesPerPixel")
    if samples not in (None, "") and int(samples) != geometry.components:
        raise DerivationError(
            f"the codestream has {geometry.components} component(s), the object {samples} sample(s)"
        )
    if geometry.components == 1:
        source = str(original.get("PhotometricInterpretation") or "").strip().upper()
        if source not in _MONOCHROME:
            raise DerivationError(f"a one-component codestream cannot stand for {source or 'no'} "
                                  "Photometric Interpretation")
        return source
    if geometry.components != 3:
        raise DerivationError(f"{geometry.components} components: only 1 or 3 are supported")
    if colour_transform:
        return "YBR_RCT" if reversible else "YBR_ICT"
    if rgb_allowed:
        return "RGB"
    raise DerivationError("colour without the RCT/ICT transform: JPIP allows only "
                          "MONOCHROME1, MONOCHROME2, YBR_ICT and YBR_RCT")


def _describe_pixels(ds: Dataset, original: Dataset, geometry: _Geometry, count: int,
                     photometric: str) -> None:
    """Image Pixel attributes that agree with the codestreams."""
    if not 1 <= geometry.precision <= 16:
        raise DerivationError(f"codestream precision {geometry.precision} is not in 1..16")
    ds.Rows, ds.Columns = geometry.height, geometry.width
    ds.SamplesPerPixel = geometry.components
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if geometry.precision <= 8 else 16
    # The transcoder raises the precision above Bits Stored only for values that need
    # it; Bits Stored stays what the original says, as long as the codestream holds it.
    try:
        stored = int(original.get("BitsStored") or geometry.precision)
    except (TypeError, ValueError):
        stored = geometry.precision
    stored = stored if 1 <= stored <= geometry.precision else geometry.precision
    ds.BitsStored, ds.HighBit = stored, stored - 1
    ds.PixelRepresentation = 1 if geometry.signed else 0
    if "NumberOfFrames" in original or count > 1:
        ds.NumberOfFrames = count
    if geometry.components == 3:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration


def _same_geometry(geometries: Iterable[_Geometry]) -> _Geometry:
    found = set(geometries)
    if not found:
        raise DerivationError("there are no frames")
    if len(found) > 1:
        raise DerivationError(f"the frames differ in size or sample format: {sorted(found, key=str)}")
    return found.pop()


def jpip_referenced(original: Dataset, frames: Sequence[FrameRecord], url: str, *,
                    reversible: bool = True) -> Dataset:
    """The JPIP Referenced header of an instance whose frames we stream.

    Parameters
    ----------
    original : pydicom.Dataset
        The archived instance (not modified).
    frames : sequence of FrameRecord
        One per frame, in order, as the transcoder recorded them.
    url : str
        Pixel Data Provider URL, see :func:`jpip_url`.
    reversible : bool
        ``False`` if the codestreams were coded with the irreversible wavelet (and ICT):
        colour is then ``YBR_ICT`` and the object says Lossy Image Compression ``01``.

    Returns
    -------
    pydicom.Dataset
        With ``file_meta`` for Transfer Syntax .94; write it with :func:`encode`.

    Raises
    ------
    DerivationError
        The frames do not match the object (count, components) or their samples cannot
        be described under this transfer syntax.
    """
    expected = _frame_count(original)
    if len(frames) != expected:
        raise DerivationError(f"{len(frames)} codestream(s) for {expected} frame(s)")
    geometry = _same_geometry(
        _Geometry(f.width, f.height, f.components, f.precision, bool(f.signed)) for f in frames
    )
    _check_overlays(original)
    # Our transcoder codes every 3-sample image as RGB with the component transform.
    photometric = _photometric(original, geometry, colour_transform=True, reversible=reversible,
                               rgb_allowed=False)
    ds = _copy_attributes(original, _HEADER_ONLY_DROPS)
    _describe_pixels(ds, original, geometry, len(frames), photometric)
    ds.add_new(0x00287FE0, "UR", url)  # Pixel Data Provider URL
    if not reversible:
        ds.LossyImageCompression = "01"
    _set_file_meta(ds, original, JPIP_REFERENCED)
    return ds


def _codestream_geometry(codestream: bytes, number: int) -> tuple[_Geometry, bool]:
    """(geometry, colour transform) of a codestream; refuse anything not lossless."""
    try:
        header = parse_main_header(codestream)
    except CodestreamError as exc:
        raise DerivationError(f"frame {number}: {exc}") from exc
    siz, cod = header.siz, header.cod
    comps = siz.components
    if {(c.precision, c.signed, c.xrsiz, c.yrsiz) for c in comps} != {(comps[0].precision, comps[0].signed, 1, 1)}:
        raise DerivationError(f"frame {number}: components differ or are subsampled")
    if cod.style.transform != 1 or any(c.style.transform != 1 for c in header.coc):
        raise DerivationError(f"frame {number}: not coded with the reversible 5/3 wavelet")
    geometry = _Geometry(siz.xsiz - siz.xosiz, siz.ysiz - siz.yosiz, len(comps),
                         comps[0].precision, comps[0].signed)
    return geometry, bool(cod.mct)


def jpeg2000_lossless(original: Dataset, codestreams: Sequence[bytes]) -> Dataset:
    """The instance as JPEG 2000 Image Compression (Lossless Only), from our codestreams.

    Parameters
    ----------
    original : pydicom.Dataset
        The archived instance (not modified).
    codestreams : sequence of bytes
        One reversible J2C codestream per frame, in order.

    Returns
    -------
    pydicom.Dataset
        Encapsulated Pixel Data with a Basic Offset Table, ``file_meta`` for .90.
        Lossy Image Compression stays what the original says.

    Raises
    ------
    DerivationError
        Wrong number of codestreams, a codestream that is not reversible, or samples
        that do not match the object.
    """
    expected = _frame_count(original)
    if len(codestreams) != expected:
        raise DerivationError(f"{len(codestreams)} codestream(s) for {expected} frame(s)")
    described = [_codestream_geometry(c, n) for n, c in enumerate(codestreams, start=1)]
    geometry = _same_geometry(g for g, _ in described)
    mct = {m for _, m in described}
    if len(mct) != 1:
        raise DerivationError("some frames use the component transform and some do not")
    _check_overlays(original)
    photometric = _photometric(original, geometry, colour_transform=mct.pop(), reversible=True,
                               rgb_allowed=True)
    ds = _copy_attributes(original, _HEADER_ONLY_DROPS)
    _describe_pixels(ds, original, geometry, len(codestreams), photometric)
    try:
        ds.PixelData = encapsulate([bytes(c) for c in codestreams], has_bot=True)
    except ValueError as exc:  # the Basic Offset Table's 32-bit offsets overflow
        raise DerivationError(str(exc)) from exc
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    _set_file_meta(ds, original, JPEG2000_LOSSLESS)
    return ds


def _decoded_pixels(original: Dataset, ts: UID) -> tuple[bytes, dict[str, Any], int]:
    """(Pixel Data bytes, image pixel description, frame count) as pydicom decodes them."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DerivationError(f"no pixel data decoder for {ts.name}") from None
    if not decoder.is_available:
        raise DerivationError(f"no installed decoder for {ts.name}")
    arrays: list[np.ndarray] = []
    description: dict[str, Any] = {}
    try:
        for arr, description in decoder.iter_array(original, as_rgb=True):
            arrays.append(arr)
    except Exception as exc:  # pydicom and its plugins raise many types on bad data
        raise DerivationError(f"the pixel data cannot be decoded: {exc}") from exc
    if not arrays:
        raise DerivationError("the pixel data holds no frame")
    if int(original.BitsAllocated) == 1:
        data = pack_bits(np.stack(arrays))  # 1-bit frames are packed end to end
    else:
        data = b"".join(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in arrays)
    return data + b"\x00" * (len(data) % 2), description, len(arrays)


def native(original: Dataset) -> Dataset:
    """The instance in Explicit VR Little Endian, its Pixel Data decoded.

    Compressed (or big endian) pixel data is decoded with pydicom, colour as RGB for the
    YCbCr encodings (what pydicom gives), and the Image Pixel description follows what
    was decoded. Objects without Pixel Data, or already little endian native, are only
    re-encoded.

    Raises
    ------
    DerivationError
        The pixels cannot be decoded, or the object references its pixels elsewhere.
    """
    if "PixelDataProviderURL" in original:
        raise DerivationError("the pixel data is held on a JPIP server")
    meta = getattr(original, "file_meta", None)
    ts = UID(str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian) if meta is not None
                 else ExplicitVRLittleEndian))
    if "PixelData" not in original or (not ts.is_compressed and ts.is_little_endian):
        ds = _copy_attributes(original, ())
        _set_file_meta(ds, original, ExplicitVRLittleEndian)
        return ds
    data, description, count = _decoded_pixels(original, ts)
    ds = _copy_attributes(original, _ALL_PIXEL_DATA | _EXTENDED_OFFSET_TABLE)
    # What pydicom decoded: e.g. RGB for YBR_FULL_422, the precision a J2K stream declares.
    samples = int(description["samples_per_pixel"])
    ds.PhotometricInterpretation = str(description["photometric_interpretation"])
    ds.SamplesPerPixel = samples
    ds.BitsStored = int(description["bits_stored"])
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(description["pixel_representation"])
    if samples > 1:
        ds.PlanarConfiguration = 0  # pydicom returns colour frames interleaved
    if "NumberOfFrames" in original or count > 1:
        ds.NumberOfFrames = count
    ds.add_new(_PIXEL_DATA, "OB" if int(ds.BitsAllocated) <= 8 else "OW", data)
    _set_file_meta(ds, original, ExplicitVRLittleEndian)
    return ds


# --- encoding -----------------------------------------------------------------------


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = compressor.compress(data) + compressor.flush()
    return out + b"\x00" * (len(out) % 2)  # even length, as pydicom writes .1.99


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    """The data set alone (no preamble or meta), as a C-STORE sub-operation sends it.

    Parameters
    ----------
    ds : pydicom.Dataset
        An object from this module (or an archived one in a native syntax).
    transfer_syntax : str
        .94: Explicit VR Little Endian encoding; .95 and .1.2.1.99: the same, raw-deflated;
        Implicit/Explicit VR Little Endian; an encapsulated syntax only if ``ds`` already
        holds Pixel Data encoded in it.

    Raises
    ------
    DerivationError
        The data set is not in a form this transfer syntax can carry (nothing is
        transcoded here), or the syntax is unknown or big endian.
    """
    ts = UID(str(transfer_syntax))
    if not ts.is_transfer_syntax:
        raise DerivationError(f"{str(ts)!r} is not a known transfer syntax")
    if not ts.is_little_endian:
        raise DerivationError(f"{ts.name} output is not produced")
    pixels = ds.get(_PIXEL_DATA)  # by tag: the element, not its value
    encapsulated = pixels is not None and pixels.is_undefined_length
    meta = getattr(ds, "file_meta", None)
    current = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts in _JPIP:
        if any(tag in ds for tag in _ALL_PIXEL_DATA):
            raise DerivationError("a JPIP Referenced data set carries no Pixel Data")
    elif "PixelDataProviderURL" in ds:
        # Under any other syntax the object would silently have no pixels at all.
        raise DerivationError(f"a Pixel Data Provider URL is only valid under JPIP, not {ts.name}")
    elif ts.is_encapsulated:
        if pixels is not None and (not encapsulated or current != ts):
            raise DerivationError(f"the Pixel Data is not encoded as {ts.name}")
    elif encapsulated:
        raise DerivationError("the Pixel Data is encapsulated; decode it first (native())")
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = ts.is_implicit_VR
    write_dataset(fp, ds)
    body = fp.getvalue()
    return _deflate(body) if ts in _DEFLATED else body


def encode(ds: Dataset, transfer_syntax: str | None = None) -> bytes:
    """Part 10 bytes: preamble, ``DICM``, File Meta Information, then the data set.

    Parameters
    ----------
    ds : pydicom.Dataset
        The object to write.
    transfer_syntax : str or None
        Defaults to ``ds.file_meta.TransferSyntaxUID``; see :func:`encode_dataset`.

    Note that PS3.5 does not allow the JPIP syntaxes in PS3.10 media; these bytes are
    for WADO and XDS-I responses, never for our archive.
    """
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ts = str(transfer_syntax or meta.get("TransferSyntaxUID") or "")
    if not ts:
        raise DerivationError("no transfer syntax given and none in file_meta")
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    sop_instance = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
    if not sop_class or not sop_instance:
        raise DerivationError("SOP Class UID and SOP Instance UID are needed for the file meta")
    body = encode_dataset(ds, ts)
    head = encode_file_meta(sop_class_uid=str(sop_class), sop_instance_uid=str(sop_instance),
                            transfer_syntax_uid=ts)
    return head + body
