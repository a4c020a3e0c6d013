"""Encode frames to raw JPEG 2000 codestreams (J2C) with the system OpenJPEG.

Blocking code meant for a worker thread pool: every call builds its own
OpenJPEG codec, image and stream, and ctypes releases the GIL while OpenJPEG
works, so several frames encode in parallel.

glymur's ``Jp2k(..., data=...)`` writer cannot be used: it always writes a
precision of 8 or 16 and unsigned samples, which would break both the bit depth
a viewer reads (12-bit CT must say 12) and the signedness of CT/MR data. We
reuse glymur's ctypes structure layouts and library discovery but declare the
functions on a private ``CDLL`` handle, because glymur re-assigns
``argtypes``/``restype`` on its shared handle at every call and funnels all
errors through one global queue, neither of which is safe across threads.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import DecodeError, EncodeError, InvalidFrame
from .params import EncodeParams, resolutions_for

__all__ = ["encode", "decode", "is_available", "library_version", "MIN_VERSION"]

log = logging.getLogger(__name__)

#: ``TLM=YES`` in ``opj_encoder_set_extra_options`` appeared in OpenJPEG 2.5.0.
MIN_VERSION = (2, 5, 0)

# Constants from openjpeg.h.
_CODEC_J2K = 0
_CODEC_JP2 = 2
_CLRSPC_SRGB = 1
_CLRSPC_GRAY = 2
_PROG_RPCL = 2
_CSTY_PRECINCTS = 0x01

_J2K_MAGIC = b"\xff\x4f\xff\x51"
_JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"

_MSG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_READ_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p)
_STREAM_END = ctypes.c_size_t(-1).value


def _load() -> tuple[ctypes.CDLL | None, Any, str]:
    """Open a private handle on the libopenjp2 that glymur found."""
    try:
        from glymur.lib import openjp2 as glymur_opj
    except Exception as exc:  # glymur missing or broken: report, do not crash imports
        return None, None, f"glymur unavailable: {exc}"
    shared = getattr(glymur_opj, "OPENJP2", None)
    if shared is None:
        return None, glymur_opj, "glymur found no libopenjp2"
    try:
        lib = ctypes.CDLL(shared._name)
    except OSError as exc:
        return None, glymur_opj, f"cannot load {shared._name}: {exc}"
    return lib, glymur_opj, ""


_lib, _g, _load_problem = _load()


def _declare(lib: ctypes.CDLL, g: Any) -> None:
    """Give every function we call an exact prototype on our private handle."""
    vp, i32 = ctypes.c_void_p, ctypes.c_int32
    image_p = ctypes.POINTER(g.ImageType)
    protos: dict[str, tuple[Any, list[Any]]] = {
        "opj_version": (ctypes.c_char_p, []),
        "opj_has_thread_support": (i32, []),
        "opj_set_default_encoder_parameters": (None, [ctypes.POINTER(g.CompressionParametersType)]),
        "opj_set_default_decoder_parameters": (
            None,
            [ctypes.POINTER(g.DecompressionParametersType)],
        ),
        "opj_image_create": (
            image_p,
            [ctypes.c_uint32, ctypes.POINTER(g.ImageComptParmType), ctypes.c_int],
        ),
        "opj_image_destroy": (None, [image_p]),
        "opj_create_compress": (vp, [ctypes.c_int]),
        "opj_create_decompress": (vp, [ctypes.c_int]),
        "opj_destroy_codec": (None, [vp]),
        "opj_set_error_handler": (i32, [vp, _MSG_CALLBACK, vp]),
        "opj_set_warning_handler": (i32, [vp, _MSG_CALLBACK, vp]),
        "opj_set_info_handler": (i32, [vp, _MSG_CALLBACK, vp]),
        "opj_setup_encoder": (i32, [vp, ctypes.POINTER(g.CompressionParametersType), image_p]),
        "opj_encoder_set_extra_options": (i32, [vp, ctypes.POINTER(ctypes.c_char_p)]),
        "opj_codec_set_threads": (i32, [vp, ctypes.c_int]),
        "opj_stream_create_default_file_stream": (vp, [ctypes.c_char_p, i32]),
        "opj_stream_create": (vp, [ctypes.c_size_t, i32]),
        "opj_stream_set_read_function": (None, [vp, _READ_FN]),
        "opj_stream_set_skip_function": (None, [vp, _SKIP_FN]),
        "opj_stream_set_seek_function": (None, [vp, _SEEK_FN]),
        "opj_stream_set_user_data_length": (None, [vp, ctypes.c_uint64]),
        "opj_stream_destroy": (None, [vp]),
        "opj_start_compress": (i32, [vp, image_p, vp]),
        "opj_encode": (i32, [vp, vp]),
        "opj_end_compress": (i32, [vp, vp]),
        "opj_setup_decoder": (i32, [vp, ctypes.POINTER(g.DecompressionParametersType)]),
        "opj_read_header": (i32, [vp, vp, ctypes.POINTER(image_p)]),
        "opj_decode": (i32, [vp, vp, image_p]),
        "opj_end_decompress": (i32, [vp, vp]),
    }
    for name, (restype, argtypes) in protos.items():
        func = getattr(lib, name)
        func.restype = restype
        func.argtypes = argtypes


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _lib is not None:
    try:
        _declare(_lib, _g)
    except AttributeError as exc:  # a symbol missing: library too old
        _load_problem = f"libopenjp2 lacks a needed function: {exc}"
        _lib = None

_VERSION = _lib.opj_version().decode("ascii", "replace") if _lib is not None else ""
if _lib is not None and _parse_version(_VERSION) < MIN_VERSION:
    _load_problem = f"OpenJPEG {_VERSION} is older than {'.'.join(map(str, MIN_VERSION))}"
_THREADS_SUPPORTED = bool(_lib.opj_has_thread_support()) if _lib is not None else False


def is_available() -> bool:
    """Whether a usable OpenJPEG (>= 2.5.0, for TLM) was found.

    Returns
    -------
    bool
        ``True`` if :func:`encode` and :func:`decode` can run.
    """
    return _lib is not None and not _load_problem


def library_version() -> str:
    """Version of the OpenJPEG library in use.

    Returns
    -------
    str
        For example ``"2.5.0"``; an empty string if no library was found.
    """
    return _VERSION


def _require() -> ctypes.CDLL:
    if _lib is None or _load_problem:
        raise EncodeError(f"OpenJPEG is not usable: {_load_problem}")
    return _lib


def _padded(struct_type: type[ctypes.Structure]) -> ctypes.Structure:
    """Allocate a parameter struct with slack at the end.

    ``opj_set_default_*_parameters`` writes the library's idea of the struct;
    the slack keeps a newer library with extra trailing fields from writing
    past our buffer.
    """
    buf = (ctypes.c_char * (ctypes.sizeof(struct_type) + 4096))()
    struct = struct_type.from_buffer(buf)
    struct._keepalive = buf  # type: ignore[attr-defined]
    return struct


class _Messages:
    """Collects OpenJPEG's error and warning messages for one codec."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        # Keep the ctypes callbacks referenced for as long as the codec lives.
        self.on_error = _MSG_CALLBACK(self._error)
        self.on_warning = _MSG_CALLBACK(self._warning)

    def _error(self, msg: bytes | None, _data: object) -> None:
        self.errors.append((msg or b"").decode("utf-8", "replace").strip())

    def _warning(self, msg: bytes | None, _data: object) -> None:
        self.warnings.append((msg or b"").decode("utf-8", "replace").strip())

    def install(self, lib: ctypes.CDLL, codec: int) -> None:
        lib.opj_set_error_handler(codec, self.on_error, None)
        lib.opj_set_warning_handler(codec, self.on_warning, None)
        # No info handler: OpenJPEG's default for a new codec is a no-op.

    def describe(self, what: str) -> str:
        detail = "; ".join(m for m in self.errors if m) or "no message from OpenJPEG"
        return f"{what} failed: {detail}"


def _check_frame(
    frame: np.ndarray, precision: int, signed: bool, colour_transform: bool
) -> np.ndarray:
    """Validate a frame and return it as rows x columns x components."""
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = arr[:, :, np.newaxis]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise InvalidFrame(
            f"a frame must be rows x columns or rows x columns x 3, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise InvalidFrame(f"the frame is empty (shape {np.shape(frame)})")
    if arr.dtype.kind not in "iu":
        raise InvalidFrame(f"samples must be integers, got dtype {arr.dtype}")
    if isinstance(precision, bool) or not isinstance(precision, (int, np.integer)):
        raise InvalidFrame(f"precision must be an int, got {precision!r}")
    if not 1 <= precision <= 16:
        # DICOM data we stream never exceeds 16 bits; keeping the bound tight keeps
        # the reversible path well inside OpenJPEG's int32 dynamic range.
        raise InvalidFrame(f"precision must be in 1..16, got {precision}")
    if colour_transform and arr.shape[2] != 3:
        raise InvalidFrame("colour_transform needs a 3-component frame")
    if max(arr.shape[:2]) >= 2**31:
        raise InvalidFrame(f"frame too large: {arr.shape}")
    if signed:
        lo, hi = -(1 << (precision - 1)), (1 << (precision - 1)) - 1
    else:
        lo, hi = 0, (1 << precision) - 1
    found_lo, found_hi = int(arr.min()), int(arr.max())
    if found_lo < lo or found_hi > hi:
        kind = "signed" if signed else "unsigned"
        raise InvalidFrame(
            f"sample values {found_lo}..{found_hi} do not fit {precision}-bit {kind} "
            f"samples ({lo}..{hi})"
        )
    return arr


def _encoder_parameters(
    lib: ctypes.CDLL, width: int, height: int, colour_transform: bool, params: EncodeParams
) -> ctypes.Structure:
    cp = _padded(_g.CompressionParametersType)
    lib.opj_set_default_encoder_parameters(ctypes.byref(cp))
    cp.tcp_numlayers = len(params.layer_rates)
    for i, rate in enumerate(params.layer_rates):
        # OpenJPEG treats a ratio <= 1 as lossless; write 0 so the intent is explicit.
        cp.tcp_rates[i] = 0.0 if rate <= 1.0 else rate
    cp.cp_disto_alloc = 1
    cp.cp_fixed_alloc = 0
    cp.cp_fixed_quality = 0
    cp.irreversible = 0 if params.lossless else 1
    numres = resolutions_for(width, height, params)
    cp.numresolution = numres
    cp.prog_order = _PROG_RPCL
    # Explicit precincts at every resolution (Scod bit 0) give JPIP its spatial
    # random access; no SOP/EPH (bits 1, 2).
    cp.csty = _CSTY_PRECINCTS
    cp.res_spec = numres
    for level in range(numres):
        cp.prcw_init[level] = params.precinct
        cp.prch_init[level] = params.precinct
    cp.cblockw_init, cp.cblockh_init = params.codeblock
    cp.mode = 0
    cp.tile_size_on = 0
    cp.tp_on = 0
    cp.tcp_mct = 1 if colour_transform else 0
    cp.roi_compno = -1
    return cp


def encode(
    frame: np.ndarray,
    path: str | os.PathLike[str],
    *,
    precision: int,
    signed: bool,
    colour_transform: bool,
    params: EncodeParams,
) -> int:
    """Write one frame as a raw JPEG 2000 codestream (J2C, no JP2 boxes).

    Parameters
    ----------
    frame : numpy.ndarray
        Integer samples, ``rows x columns`` (one component) or
        ``rows x columns x 3`` (colour, in RGB order).
    path : str or os.PathLike
        Output file; overwritten if it exists, removed again if encoding fails.
    precision : int
        Real bit depth written to SIZ (e.g. 12 for 12-bit CT), 1..16.
    signed : bool
        Whether samples are two's complement (SIZ ``Ssiz`` bit 7).
    colour_transform : bool
        Apply the multiple component transform (RCT when lossless, ICT
        otherwise); only for 3-component frames.
    params : EncodeParams
        Coding parameters (layers, precincts, resolutions, threads, ...).

    Returns
    -------
    int
        Size of the written codestream in bytes.

    Raises
    ------
    InvalidFrame
        (an :class:`EncodeError` and a :class:`ValueError`) if the frame's
        shape or dtype is wrong or its values do not fit ``precision``/``signed``.
    EncodeError
        If OpenJPEG is unusable or reports an error (its message is included).
    """
    lib = _require()
    arr = _check_frame(frame, precision, signed, colour_transform)
    height, width, ncomp = arr.shape
    cparams = _encoder_parameters(lib, width, height, colour_transform, params)

    comps = (_g.ImageComptParmType * ncomp)()
    for comp in comps:
        comp.dx = comp.dy = 1
        comp.w, comp.h = width, height
        comp.x0 = comp.y0 = 0
        comp.prec = comp.bpp = precision
        comp.sgnd = 1 if signed else 0
    colour_space = _CLRSPC_SRGB if ncomp == 3 else _CLRSPC_GRAY
    target = os.fspath(path)
    messages = _Messages()
    opened = done = False
    image = lib.opj_image_create(ncomp, comps, colour_space)
    if not image:
        raise EncodeError("opj_image_create failed (out of memory?)")
    try:
        img = image.contents
        img.x0, img.y0, img.x1, img.y1 = 0, 0, width, height
        for k in range(ncomp):
            # Convert straight into OpenJPEG's int32 plane: one pass, no temporary.
            plane = np.ctypeslib.as_array(img.comps[k].data, shape=(height, width))
            np.copyto(plane, arr[:, :, k], casting="unsafe")
        codec = lib.opj_create_compress(_CODEC_J2K)
        if not codec:
            raise EncodeError("opj_create_compress failed")
        try:
            messages.install(lib, codec)
            if not lib.opj_setup_encoder(codec, ctypes.byref(cparams), image):
                raise EncodeError(messages.describe("opj_setup_encoder"))
            options = (ctypes.c_char_p * 3)(b"PLT=YES", b"TLM=YES", None)
            if not lib.opj_encoder_set_extra_options(codec, options):
                raise EncodeError(messages.describe("opj_encoder_set_extra_options(PLT, TLM)"))
            # A pool of one thread would only add hand-over cost.
            if params.threads > 1 and _THREADS_SUPPORTED:
                if not lib.opj_codec_set_threads(codec, params.threads):
                    raise EncodeError(messages.describe("opj_codec_set_threads"))
            stream = lib.opj_stream_create_default_file_stream(os.fsencode(target), 0)
            if not stream:
                raise EncodeError(f"cannot open {target!r} for writing")
            opened = True
            try:
                for step, call in (
                    ("opj_start_compress", lambda: lib.opj_start_compress(codec, image, stream)),
                    ("opj_encode", lambda: lib.opj_encode(codec, stream)),
                    ("opj_end_compress", lambda: lib.opj_end_compress(codec, stream)),
                ):
                    if not call():
                        raise EncodeError(messages.describe(step))
            finally:
                lib.opj_stream_destroy(stream)  # also closes the file
        finally:
            lib.opj_destroy_codec(codec)
        done = True
    finally:
        lib.opj_image_destroy(image)
        if opened and not done:
            # Never leave a truncated codestream where a reader could find it.
            try:
                os.unlink(target)
            except OSError:
                pass
    for warning in messages.warnings:
        log.warning("OpenJPEG warning while encoding %s: %s", target, warning)
    return os.stat(target).st_size


class _MemoryStream:
    """Callbacks feeding OpenJPEG from an in-memory buffer."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._array = np.frombuffer(data, dtype=np.uint8)
        self._base = self._array.ctypes.data
        self._size = self._array.size
        self._pos = 0
        self.read = _READ_FN(self._read)
        self.skip = _SKIP_FN(self._skip)
        self.seek = _SEEK_FN(self._seek)

    def _read(self, buffer: int, nbytes: int, _data: object) -> int:
        count = min(nbytes, self._size - self._pos)
        if count <= 0:
            return _STREAM_END
        ctypes.memmove(buffer, self._base + self._pos, count)
        self._pos += count
        return count

    def _skip(self, nbytes: int, _data: object) -> int:
        target = min(max(self._pos + nbytes, 0), self._size)
        moved = target - self._pos
        self._pos = target
        return moved if moved or nbytes == 0 else -1

    def _seek(self, offset: int, _data: object) -> int:
        if not 0 <= offset <= self._size:
            return 0
        self._pos = offset
        return 1

    def open(self, lib: ctypes.CDLL) -> int:
        stream = lib.opj_stream_create(max(self._size, 1), 1)
        if not stream:
            raise DecodeError("opj_stream_create failed")
        lib.opj_stream_set_read_function(stream, self.read)
        lib.opj_stream_set_skip_function(stream, self.skip)
        lib.opj_stream_set_seek_function(stream, self.seek)
        lib.opj_stream_set_user_data_length(stream, self._size)
        return stream


def _component_dtype(prec: int, signed: bool) -> np.dtype[Any]:
    if prec <= 8:
        return np.dtype(np.int8 if signed else np.uint8)
    if prec <= 16:
        return np.dtype(np.int16 if signed else np.uint16)
    return np.dtype(np.int32 if signed else np.uint32)


def decode(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    reduce: int = 0,
    layers: int | None = None,
    threads: int = 1,
) -> np.ndarray:
    """Decode a J2C codestream (or a JP2 file) with OpenJPEG.

    Parameters
    ----------
    path_or_bytes : str, os.PathLike, bytes, bytearray or memoryview
        A file name, or the codestream itself.
    reduce : int
        Discard this many of the highest resolution levels (each halves the size).
    layers : int or None
        Decode only the first ``layers`` quality layers; ``None`` decodes all.
    threads : int
        OpenJPEG threads for this decode (code-blocks are decoded in parallel).

    Returns
    -------
    numpy.ndarray
        ``rows x columns`` for one component, ``rows x columns x n`` otherwise;
        dtype (u)int8 up to 8 bits, (u)int16 up to 16, (u)int32 beyond, signed
        as the codestream says.

    Raises
    ------
    DecodeError
        If the data is not JPEG 2000 or OpenJPEG cannot decode it.
    """
    if _lib is None or _load_problem:
        raise DecodeError(f"OpenJPEG is not usable: {_load_problem}")
    lib = _lib
    if reduce < 0:
        raise ValueError(f"reduce must be >= 0, got {reduce}")
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be >= 1 or None, got {layers}")

    open_stream: Callable[[], int]
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        head = bytes(path_or_bytes[:12])
        memory = _MemoryStream(path_or_bytes)  # referenced until decoding ends

        def open_stream() -> int:
            return memory.open(lib)

    else:
        name = os.fspath(path_or_bytes)
        try:
            with open(name, "rb") as fh:
                head = fh.read(12)
        except OSError as exc:
            raise DecodeError(f"cannot read {name!r}: {exc}") from exc

        def open_stream() -> int:  # type: ignore[misc]
            stream = lib.opj_stream_create_default_file_stream(os.fsencode(name), 1)
            if not stream:
                raise DecodeError(f"cannot open {name!r}")
            return stream

    if head.startswith(_J2K_MAGIC):
        codec_format = _CODEC_J2K
    elif head.startswith(_JP2_MAGIC):
        codec_format = _CODEC_JP2
    else:
        raise DecodeError("not a JPEG 2000 codestream or JP2 file")

    dparams = _padded(_g.DecompressionParametersType)
    lib.opj_set_default_decoder_parameters(ctypes.byref(dparams))
    dparams.cp_reduce = reduce
    dparams.cp_layer = layers or 0
    messages = _Messages()
    image = ctypes.POINTER(_g.ImageType)()
    codec = lib.opj_create_decompress(codec_format)
    if not codec:
        raise DecodeError("opj_create_decompress failed")
    try:
        messages.install(lib, codec)
        if not lib.opj_setup_decoder(codec, ctypes.byref(dparams)):
            raise DecodeError(messages.describe("opj_setup_decoder"))
        if threads > 1 and not lib.opj_codec_set_threads(codec, threads):
            raise DecodeError(messages.describe("opj_codec_set_threads"))
        stream = open_stream()
        try:
            if not lib.opj_read_header(stream, codec, ctypes.byref(image)):
                raise DecodeError(messages.describe("opj_read_header"))
            if not lib.opj_decode(codec, stream, image):
                raise DecodeError(messages.describe("opj_decode"))
            if not lib.opj_end_decompress(codec, stream):
                raise DecodeError(messages.describe("opj_end_decompress"))
        finally:
            lib.opj_stream_destroy(stream)
        img = image.contents
        planes = []
        for k in range(img.numcomps):
            comp = img.comps[k]
            if not comp.data:
                raise DecodeError(f"component {k} has no decoded data")
            plane = np.ctypeslib.as_array(comp.data, shape=(comp.h, comp.w))
            planes.append(plane.astype(_component_dtype(comp.prec, bool(comp.sgnd))))
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_destroy_codec(codec)
    if len(planes) == 1:
        return planes[0]
    if len({p.shape for p in planes}) != 1:
        raise DecodeError(f"components have different sizes: {[p.shape for p in planes]}")
    return np.stack(planes, axis=-1)
