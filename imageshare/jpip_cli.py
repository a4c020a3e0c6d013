"""
``imageshare-jpip``: fetch a view of an image over JPIP and save it.

    imageshare-jpip URL [--fsiz W,H] [--roff X,Y] [--rsiz W,H] [--layers N] [--len BYTES]
                        [--stream K] [--session] -o out.png|out.npy|out.j2c

URL names the target: ``http://host:8080/jpip?target=<SOP Instance UID>`` or
``http://host:8080/jpip/<SOP Instance UID>``. With ``--session`` the client opens a JPIP
session (``cnew=http``) and later requests of the same process reuse it; ``--len`` fetches
in byte-limited pieces until the view is complete. The output is the decoded view
(``.npy``: samples as decoded; ``.png``: scaled to 8 bits per sample), or the rebuilt
codestream itself (``.j2c``).

Blocking code for a command line, not for the server.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from imageshare.codestream.index import packet_layout
from imageshare.protocols.jpip.client import MAIN_HEADER, ClientCache
from imageshare.protocols.jpip.messages import Eor, Message, StreamParser


class JpipClient:
    """A blocking JPIP-over-HTTP client with a client-side cache."""

    def __init__(self, url: str, *, session: bool = False, timeout: float = 60) -> None:
        parts = urllib.parse.urlsplit(url)
        fields = dict(urllib.parse.parse_qsl(parts.query))
        path = parts.path
        if "target" not in fields and "/jpip/" in path:
            path, target = path.split("/jpip/", 1)
            path += "/jpip"
            fields["target"] = urllib.parse.unquote(target)
        if "target" not in fields:
            raise ValueError("the URL names no target (…/jpip?target=UID or …/jpip/UID)")
        self._endpoint = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self._fields = fields
        self._session = session
        self._timeout = timeout
        self.cid: str | None = None
        self.transport: str | None = None
        self.cache = ClientCache()
        self.last_headers: dict[str, str] = {}

    def request(self, **window: Any) -> int:
        """One request; the messages go to the cache. Returns the EOR reason."""
        fields = {k: v for k, v in window.items() if v is not None}
        if self.cid is not None:
            fields["cid"] = self.cid
        else:
            fields.update(self._fields)
            if self._session:
                fields["cnew"] = "http"
        url = self._endpoint + "?" + "&".join(f"{k}={urllib.parse.quote(str(v), safe=',')}" for k, v in fields.items())
        with urllib.request.urlopen(url, timeout=self._timeout) as response:
            self.last_headers = {k.lower(): v for k, v in response.headers.items()}
            body = response.read()
        cnew = self.last_headers.get("jpip-cnew")
        if cnew:
            granted = dict(item.split("=", 1) for item in cnew.split(",") if "=" in item)
            self.cid, self.transport = granted.get("cid"), granted.get("transport")
        parser = StreamParser()
        reason = 0
        for m in parser.feed(body):
            if isinstance(m, Message):
                self.cache.add(m)
            elif isinstance(m, Eor):
                reason = m.reason
        parser.close()
        return reason

    def fetch(self, *, limit_rounds: int = 10_000, **window: Any) -> int:
        """Request until the view is complete (repeating while the byte limit cuts it)."""
        reason = self.request(**window)
        rounds = 1
        while reason == 4 and rounds < limit_rounds:
            if self.cid is None:
                raise RuntimeError("a byte-limited view needs a session (--session)")
            reason = self.request(**window)
            rounds += 1
        return reason

    def view(self, stream: int = 0, fsiz: str | None = None) -> tuple[np.ndarray, bytes]:
        """The decoded view at the frame size the server granted (``JPIP-fsiz``, else the
        ``fsiz`` asked for: the server only says when it changed it), and the codestream."""
        from imageshare.transcode import openjpeg  # OpenJPEG only where decoding happens

        codestream = self.cache.rebuild(stream)
        siz, _ = packet_layout(self.cache.bin(MAIN_HEADER, stream, 0))
        fsiz = self.last_headers.get("jpip-fsiz") or fsiz
        reduce = 0
        if fsiz:
            fx = int(fsiz.split(",")[0])
            while reduce < 32 and -(-siz.xsiz // (1 << reduce)) - -(-siz.xosiz // (1 << reduce)) > fx:
                reduce += 1
        return openjpeg.decode(codestream, reduce=reduce), codestream


def _pair(text: str) -> str:
    a, b = (int(v) for v in text.split(","))
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError("expected two non-negative integers")
    return f"{a},{b}"


def _to_png(view: np.ndarray, path: Path) -> None:
    from PIL import Image

    lo, hi = float(view.min()), float(view.max())
    scaled = np.zeros(view.shape, dtype=np.uint8) if hi <= lo else np.rint((view - lo) * 255.0 / (hi - lo))
    Image.fromarray(scaled.astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imageshare-jpip", description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--fsiz", type=_pair, help="frame size wanted, W,H (rounded down to a resolution level)")
    p.add_argument("--roff", type=_pair, help="region offset X,Y in that frame")
    p.add_argument("--rsiz", type=_pair, help="region size W,H in that frame")
    p.add_argument("--layers", type=int, help="quality layers wanted")
    p.add_argument("--len", type=int, help="bytes per request (fetches until complete; needs --session)")
    p.add_argument("--stream", type=int, default=None, help="codestream: frame number - 1")
    p.add_argument("--session", action="store_true", help="open a JPIP session (cnew=http)")
    p.add_argument("-o", "--output", type=Path, required=True, help="out.png, out.npy or out.j2c")
    a = p.parse_args(argv)
    if a.output.suffix not in (".png", ".npy", ".j2c", ".j2k"):
        p.error("the output must end in .png, .npy or .j2c")
    client = JpipClient(a.url, session=a.session)
    client.fetch(fsiz=a.fsiz, roff=a.roff, rsiz=a.rsiz, layers=a.layers, len=a.len, stream=a.stream)
    view, codestream = client.view(a.stream or 0, a.fsiz)
    if a.roff or a.rsiz:
        x, y = (int(v) for v in client.last_headers.get("jpip-roff", a.roff or "0,0").split(","))
        size = client.last_headers.get("jpip-rsiz", a.rsiz)
        if size:
            w, h = (int(v) for v in size.split(","))
            view = view[y : y + h, x : x + w]
    if a.output.suffix in (".j2c", ".j2k"):
        a.output.write_bytes(codestream)
    elif a.output.suffix == ".npy":
        np.save(a.output, view)
    else:
        _to_png(view, a.output)
    print(f"{a.output}: {view.shape[1]}x{view.shape[0]} from {client.cache.size} bytes"
          f" over {client.transport or 'http (stateless)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
