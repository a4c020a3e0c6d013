"""Independent validation of JPP streams with OpenJPEG's own tools (test helper).

``opj_jpip_transcode`` (Debian's libopenjpip-dec-server) turns a JPP stream into a J2K
codestream, and ``opj_decompress`` decodes it: neither shares code with our server.
Quirks handled here (see the peers notes): the transcoder does not know EOR messages,
wants an explicit class and codestream on every message, expects tile-header bins in
OpenJPEG's own layout (the SOT fields without the marker, the markers, then SOD: the
server's ``openjpeg`` layout, rewritten here from its default ``part9`` one), and
writes its output without truncating it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

from imageshare.protocols.jpip.messages import Message, MessageEncoder, StreamParser

HAVE_TOOLS = all(shutil.which(t) for t in ("opj_jpip_transcode", "opj_decompress"))


def messages(*bodies: bytes) -> list[Message]:
    """The data messages of whole response bodies of one channel, in order (EORs dropped)."""
    out: list[Message] = []
    for body in bodies:
        parser = StreamParser()
        out.extend(m for m in parser.feed(body) if isinstance(m, Message))
        parser.close()
    return out


def for_transcoder(msgs: list[Message], layout: str = "part9") -> bytes:
    """Re-encode messages the way opj_jpip_transcode can read them.

    ``layout`` is the server's tile-header layout: ``part9`` bins are rewritten into
    OpenJPEG's, ``openjpeg`` ones pass as they are (only the headers are made explicit).
    """
    if layout == "openjpeg":
        enc = MessageEncoder()
        out = bytearray()
        for m in msgs:
            enc.reset()
            out += enc.header(m.bin_class, m.csn, m.bin_id, m.offset, len(m.data), m.complete, m.aux) + m.data
        return bytes(out)
    tile_headers: dict[tuple[int, int], bytearray] = {}
    for m in msgs:
        if m.bin_class == 2:
            buf = tile_headers.setdefault((m.csn, m.bin_id), bytearray())
            assert m.offset == len(buf), "tile-header messages out of order"
            buf += m.data
    out = bytearray()
    done: set[tuple[int, int]] = set()
    for m in msgs:
        enc = MessageEncoder()
        enc.reset()
        if m.bin_class == 2:
            key = (m.csn, m.bin_id)
            if key in done:
                continue
            done.add(key)
            # Lsot=10, Isot, Psot=0 (recomputed by the transcoder), TPsot=0, TNsot=1, ..., SOD
            body = struct.pack(">HHIBB", 10, m.bin_id, 0, 0, 1) + bytes(tile_headers[key]) + b"\xff\x93"
            out += enc.header(2, m.csn, m.bin_id, 0, len(body), True) + body
        else:
            out += enc.header(m.bin_class, m.csn, m.bin_id, m.offset, len(m.data), m.complete, m.aux) + m.data
    return bytes(out)


def transcode(folder: Path, *bodies: bytes, layout: str = "part9") -> Path:
    """The J2K codestream opj_jpip_transcode rebuilds from the bodies (tile headers in ``layout``)."""
    jpp = folder / "stream.jpp"
    jpp.write_bytes(for_transcoder(messages(*bodies), layout))
    out = folder / "rebuilt.j2k"
    out.unlink(missing_ok=True)
    r = subprocess.run(["opj_jpip_transcode", str(jpp), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.exists() and out.stat().st_size, r.stdout + r.stderr
    return out


def decode(j2k: Path, folder: Path, shape: tuple[int, ...], *, precision: int, signed: bool,
           reduce: int = 0, layers: int | None = None) -> np.ndarray:
    """Decode with opj_decompress; ``shape`` is what the decode yields (rows, cols[, comps])."""
    src = j2k
    if j2k.suffix != ".j2k":  # the Debian tools refuse .j2c
        src = folder / (j2k.stem + ".j2k")
        shutil.copyfile(j2k, src)
    out = folder / f"{src.stem}-r{reduce}-l{layers}.rawl"
    cmd = ["opj_decompress", "-i", str(src), "-o", str(out), "-r", str(reduce)]
    if layers is not None:
        cmd += ["-l", str(layers)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    dtype = np.dtype(("i" if signed else "u") + ("1" if precision <= 8 else "2")).newbyteorder("<")
    ncomp = shape[2] if len(shape) == 3 else 1
    planes = np.fromfile(out, dtype=dtype).reshape(ncomp, shape[0], shape[1]).astype(dtype.newbyteorder("="))
    if signed:  # written as precision-bit two's complement, not sign-extended
        shift = 8 * dtype.itemsize - precision
        planes = (planes << shift) >> shift
    return planes[0] if ncomp == 1 else np.moveaxis(planes, 0, -1)
