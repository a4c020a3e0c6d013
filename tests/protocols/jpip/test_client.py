"""The client cache rebuilds decodable codestreams from what the planner sends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imageshare.codestream.index import build_index
from imageshare.protocols.jpip.cachemodel import CacheModel
from imageshare.protocols.jpip.client import ClientCache, RebuildError
from imageshare.protocols.jpip.messages import Message, MessageEncoder, StreamParser
from imageshare.protocols.jpip.plan import TargetBins, commit, plan
from imageshare.protocols.jpip.window import Window, precincts, resolve
from imageshare.transcode import openjpeg
from imageshare.transcode.params import EncodeParams


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, bytes]:
    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:301, 0:407]
    img = np.clip(2000 + 1500 * np.sin(x / 17.0) * np.cos(y / 23.0) + rng.normal(0, 30, (301, 407)), 0, 4095)
    img = img.astype(np.uint16)
    path = tmp_path_factory.mktemp("client") / "img.j2k"
    openjpeg.encode(img, path, precision=12, signed=False, colour_transform=False,
                    params=EncodeParams(precinct=32, layer_rates=(40.0, 20.0, 5.0, 1.0)))
    return img, path.read_bytes()


def serve(data: bytes, cache: ClientCache, model: CacheModel, window: Window, byte_limit: int | None = None) -> int:
    """One request's messages, through the real encoder and parser, into the client cache."""
    index = build_index(data)
    bins = TargetBins(index)
    resolved = resolve(index, window)
    result = plan(bins, index, resolved, precincts(index, resolved), model, 0, byte_limit=byte_limit)
    commit(model, result.pieces)
    encoder = MessageEncoder()
    encoder.reset()
    stream = b"".join(
        encoder.header(p.bin_class, p.csn, p.bin_id, p.bin_offset, p.length, p.complete) + p.body(data)
        for p in result.pieces
    ) + encoder.eor(result.eor_reason)
    parser = StreamParser()
    for m in parser.feed(stream):
        if isinstance(m, Message):
            cache.add(m)
    return result.eor_reason


def test_full_session_is_lossless(image: tuple[np.ndarray, bytes]) -> None:
    """A view, a zoom and a len-limited full-resolution sequence rebuild the exact pixels."""
    img, data = image
    cache, model = ClientCache(), CacheModel()
    with pytest.raises(RebuildError):
        cache.rebuild()
    serve(data, cache, model, Window(fsiz=(102, 76)))
    for _ in range(200):
        if serve(data, cache, model, Window(fsiz=(407, 301)), byte_limit=9000) != 4:
            break
    np.testing.assert_array_equal(openjpeg.decode(cache.rebuild()), img)


def test_first_view_matches_reduced_decode(image: tuple[np.ndarray, bytes]) -> None:
    """A 1/4 first view rebuilds to the same pixels as the full codestream decoded at reduce=2."""
    _, data = image
    cache = ClientCache()
    serve(data, cache, CacheModel(), Window(fsiz=(102, 76)))
    np.testing.assert_array_equal(openjpeg.decode(cache.rebuild(), reduce=2), openjpeg.decode(data, reduce=2))


def test_partial_layers_and_cut_packets(image: tuple[np.ndarray, bytes]) -> None:
    """layers=2 rebuilds like decoding 2 layers; a packet cut by len is left out, not garbled."""
    _, data = image
    cache = ClientCache()
    serve(data, cache, CacheModel(), Window(fsiz=(407, 301), layers=2))
    np.testing.assert_array_equal(openjpeg.decode(cache.rebuild(), layers=2), openjpeg.decode(data, layers=2))
    cut = ClientCache()
    serve(data, cut, CacheModel(), Window(fsiz=(407, 301)), byte_limit=len(data) // 3)
    decoded = openjpeg.decode(cut.rebuild())  # decodes: whole packets only
    assert decoded.shape == (301, 407)


def test_region_is_exact(image: tuple[np.ndarray, bytes], tmp_path: Path) -> None:
    """A region at full resolution rebuilds to the exact pixels inside it."""
    img, data = image
    cache = ClientCache()
    serve(data, cache, CacheModel(), Window(fsiz=(407, 301), roff=(150, 100), rsiz=(90, 60)))
    decoded = openjpeg.decode(cache.rebuild())
    np.testing.assert_array_equal(decoded[100:160, 150:240], img[100:160, 150:240])
