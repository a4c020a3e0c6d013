"""Tests of :mod:`imageshare.protocols.jpip.plan`: data-bins, delivery order, the cache model."""

from __future__ import annotations

import random
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from imageshare.codestream.index import CodestreamIndex, build_index
from imageshare.codestream.markers import Marker
from imageshare.protocols.jpip.cachemodel import MAIN_HEADER, METADATA, PRECINCT, TILE, TILE_HEADER, CacheModel
from imageshare.protocols.jpip.messages import MessageEncoder
from imageshare.protocols.jpip.plan import (
    EOR_BYTE_LIMIT,
    EOR_IMAGE_DONE,
    EOR_WINDOW_DONE,
    OPENJPEG,
    Piece,
    PlanResult,
    TargetBins,
    commit,
    message_header_length,
    plan,
    vbas_length,
)
from imageshare.protocols.jpip.window import Window, frame_size, max_discard, precincts, resolve
from imageshare.transcode import openjpeg
from imageshare.transcode.params import EncodeParams
from tests.protocols.jpip import opj
from tests.protocols.jpip.test_cachemodel import varied_codestream
from tests.protocols.jpip.test_window import (
    Decoder,
    encoded,
    needs_opj,
    packets_in_file_order,
    smooth_noise,
)


def run(
    data_index: tuple[bytes, CodestreamIndex], win: Window, model: CacheModel, *, jpt: bool = False,
    byte_limit: int | None = None, csn: int = 0, bins: TargetBins | None = None, align: bool = False,
) -> PlanResult:  # fmt: skip
    """Resolve, select and plan one request."""
    _, index = data_index
    resolved = resolve(index, win)
    bins = bins if bins is not None else TargetBins(index)
    return plan(bins, index, resolved, precincts(index, resolved), model, csn, jpt=jpt, byte_limit=byte_limit,
                align=align)


def merged(pieces: list[Piece], data: bytes) -> list[tuple[tuple[int, int, int], int, int, bool, bytes]]:
    """Pieces as (key, offset, length, complete, bytes), consecutive pieces of one bin merged."""
    out: list[tuple[tuple[int, int, int], int, int, bool, bytes]] = []
    for piece in pieces:
        body = piece.body(data)
        assert len(body) == piece.length
        if out and out[-1][0] == piece.key and out[-1][1] + out[-1][2] == piece.bin_offset:
            key, offset, length, _, previous = out[-1]
            out[-1] = (key, offset, length + piece.length, piece.complete, previous + body)
        else:
            out.append((piece.key, piece.bin_offset, piece.length, piece.complete, body))
    return out


def layer_of(index: CodestreamIndex, piece: Piece) -> int:
    """The quality layer the first byte of a precinct piece belongs to."""
    offsets = index.layer_offsets(*index.precinct_from_bin_id(piece.bin_id))
    return max(l for l in range(len(offsets) - 1) if offsets[l] <= piece.bin_offset)  # noqa: E741


# --- data-bins ---------------------------------------------------------------------------


def test_main_header_bin_drops_pointer_segments_and_is_stable() -> None:
    """The main header bin is SOC..SOT without TLM (our encoder writes one), keeps everything
    else, and is the same for the same index, also after a JSON round trip of the index."""
    data, index = encoded("gray12")
    assert any(s.marker == Marker.TLM for s in index.main_segments)
    bins = TargetBins(index)
    header = bins.content(MAIN_HEADER, 0, data)
    want = b"".join(data[s.offset : s.offset + s.length] for s in index.main_segments if s.marker != Marker.TLM)
    assert header == want and header.startswith(b"\xff\x4f\xff\x51") and b"\xff\x55" not in header
    again = TargetBins(CodestreamIndex.from_json(index.to_json()))
    assert again.content(MAIN_HEADER, 0, data) == header
    assert bins.length(MAIN_HEADER, 0) == len(header) == bins.main_header_length


def test_tile_header_and_precinct_bins() -> None:
    """Tile-header bins hold the tile-part header segments except PLT; precinct bins the packets in
    layer order; lengths agree; bins that do not exist have no length."""
    data, index = varied_codestream(3, tile=(64, 48))
    bins = TargetBins(index)
    for t in range(index.num_tiles):
        assert bins.content(TILE_HEADER, t, data) == b"\xff\x64\x00\x0a\x00\x01tile %d" % t
        assert bins.content(TILE, t, data) == b"".join(
            data[part.offset : part.end] for part in index.tiles[t].parts
        )
    for t, c, r, p in [(0, 0, 0, 0), (1, 1, 2, 3), (3, 0, 1, 0)]:
        bin_id = index.precinct_bin_id(t, c, r, p)
        content = bins.content(PRECINCT, bin_id, data)
        assert content == b"".join(data[o : o + n] for o, n in index.packets(t, c, r, p))
        assert bins.length(PRECINCT, bin_id) == index.layer_offsets(t, c, r, p)[-1] == len(content)
    assert bins.length(METADATA, 0) == 0
    for bin_class, bin_id in [(PRECINCT, 10**9), (TILE_HEADER, 99), (METADATA, 1), (MAIN_HEADER, 1), (3, 0)]:
        assert bins.length(bin_class, bin_id) is None
    keys = list(bins.keys(0))
    assert len(keys) == len(set(keys)) == bins.num_bins()
    assert len(list(bins.keys(0, jpt=True))) == bins.num_bins(jpt=True) == 2 + index.num_tiles


def test_message_header_length() -> None:
    """VBAS and Bin-ID sizes follow Annex A (docs/jpip.md 3.1, 3.2 examples)."""
    assert [vbas_length(v) for v in (0, 127, 128, 300, 16383, 16384)] == [1, 1, 2, 2, 2, 3]
    # Bin-ID: 4 bits in the first byte, then 7 per byte.
    assert message_header_length(0, 0, 15, 0, 0) == 5
    assert message_header_length(0, 0, 16, 0, 0) == 6  # id 20 is "A0 14" in the digest
    assert message_header_length(6, 0, 0, 0, 181) == 6  # "50 06 00 81 35" + the CSn we always count
    assert message_header_length(0, 0, 2**11, 0, 0) == 7
    assert message_header_length(1, 0, 0, 0, 0, aux=200) == 7


# --- order ---------------------------------------------------------------------------------


def test_first_response_order() -> None:
    """metadata-bin 0, main header, tile headers of the window, then packets layer-major with
    resolutions ascending; only the last layer's piece of a bin is complete."""
    data, index = varied_codestream(4, 200, 160, tile=(128, 96), components=2, levels=3, layers=4)
    result = run((data, index), Window(fsiz=(200, 160), roff=(100, 50), rsiz=(60, 60)), CacheModel())
    pieces = list(result.pieces)
    assert pieces[0] == Piece(METADATA, 0, 0, 0, 0, True, b"")
    assert pieces[1].key == (MAIN_HEADER, 0, 0) and pieces[1].complete
    headers = [p for p in pieces if p.bin_class == TILE_HEADER]
    assert [p.bin_id for p in headers] == [0, 1, 2, 3] and pieces[2:6] == headers
    packets = pieces[6:]
    assert all(p.bin_class == PRECINCT for p in packets)
    order = []
    for piece in packets:
        t, c, r, p = index.precinct_from_bin_id(piece.bin_id)
        order.append((layer_of(index, piece), r, c, t, p))
        offsets = index.layer_offsets(t, c, r, p)
        assert piece.complete == (piece.end == offsets[-1])
    assert order == sorted(order)
    assert {o[0] for o in order} == {0, 1, 2, 3}
    assert result.eor_reason == EOR_WINDOW_DONE


def test_requested_layers_only() -> None:
    """layers=2 sends packets of layers 0 and 1 only, none complete (the bins have 4 layers)."""
    data, index = varied_codestream(5, levels=2, layers=4)
    result = run((data, index), Window(fsiz=(100, 80), layers=2), CacheModel())
    packets = [p for p in result.pieces if p.bin_class == PRECINCT]
    assert packets and {layer_of(index, p) for p in packets} == {0, 1}
    assert not any(p.complete for p in packets)
    for p in packets:
        offsets = index.layer_offsets(*index.precinct_from_bin_id(p.bin_id))
        assert p.end in (offsets[1], offsets[2])


def test_single_precinct_pieces_are_coalesced() -> None:
    """Consecutive packets of one bin become one piece: a window of one precinct at resolution 0
    is a single complete piece holding the whole bin."""
    data, index = varied_codestream(6, 64, 64, components=1, levels=0, precinct=6)
    result = run((data, index), Window(fsiz=(64, 64), roff=(3, 3), rsiz=(2, 2)), CacheModel())
    packets = [p for p in result.pieces if p.bin_class == PRECINCT]
    assert len(packets) == 1 and packets[0].complete and packets[0].bin_offset == 0
    assert packets[0].body(data) == TargetBins(index).content(PRECINCT, packets[0].bin_id, data)


# --- the cache model ----------------------------------------------------------------------


def random_window(rng: random.Random, index: CodestreamIndex) -> Window:
    """An arbitrary view-window, sometimes in a frame size that must be rounded."""
    d = rng.randint(0, max_discard(index))
    fx, fy = frame_size(index, d)
    if rng.random() < 0.3:
        fx, fy = fx + rng.randint(-5, 5) or 1, fy + rng.randint(-5, 5) or 1
    ox, oy = rng.randint(0, fx - 1), rng.randint(0, fy - 1)
    comps = rng.choice([None, ((0, 0),), ((1, None),)])
    return Window(fsiz=(max(fx, 1), max(fy, 1)), roff=(ox, oy), rsiz=(rng.randint(1, fx), rng.randint(1, fy)),
                  comps=comps, layers=rng.choice([None, 1, 2, 3]))  # fmt: skip


@pytest.mark.parametrize("jpt", [False, True], ids=["jpp", "jpt"])
def test_never_twice_and_everything_in_the_end(jpt: bool) -> None:
    """A sequence of random windows on one model never sends a byte of a bin twice, every piece
    continues its bin where the model stops, and a final full-resolution window completes every
    bin with exactly its content (EOR 1)."""
    data, index = varied_codestream(7, 150, 120, tile=(64, 64), components=2, levels=3, layers=3)
    bins = TargetBins(index)
    model = CacheModel()
    received: dict[tuple[int, int, int], bytearray] = {}
    complete: set[tuple[int, int, int]] = set()
    rng = random.Random(8)
    windows = [random_window(rng, index) for _ in range(25)] + [Window(fsiz=(150, 120))]
    for win in windows:
        result = run((data, index), win, model, jpt=jpt, bins=bins)
        for piece in result.pieces:
            got = received.setdefault(piece.key, bytearray())
            assert piece.bin_offset == len(got), "a piece must continue its bin exactly"
            assert piece.key not in complete
            got += piece.body(data)
            if piece.complete:
                complete.add(piece.key)
            commit(model, [piece])
    assert result.eor_reason == EOR_IMAGE_DONE
    expected = list(bins.keys(0, jpt=jpt))
    assert complete == set(expected) == set(received)
    for key in expected:
        assert bytes(received[key]) == bins.content(key[0], key[2], data), key
        assert model.is_complete(key) and model.held(key) == len(received[key])
    assert run((data, index), Window(fsiz=(150, 120)), model, jpt=jpt, bins=bins) == PlanResult((), EOR_IMAGE_DONE, 0)


def test_repeat_of_a_window_sends_nothing() -> None:
    """The same window again, with the model updated, gives no pieces and EOR 2 (or 1 once the
    client holds the whole image)."""
    data, index = varied_codestream(9, tile=(64, 48))
    model = CacheModel()
    for win, reason in [(Window(fsiz=(50, 40), roff=(10, 10), rsiz=(20, 20)), EOR_WINDOW_DONE),
                        (Window(fsiz=(100, 80), layers=2), EOR_WINDOW_DONE),
                        (Window(fsiz=(100, 80)), EOR_IMAGE_DONE)]:  # fmt: skip
        first = run((data, index), win, model)
        assert first.pieces and first.eor_reason == reason
        commit(model, first.pieces)
        assert run((data, index), win, model) == PlanResult((), reason, 0)


def test_resumes_inside_a_packet_and_completes_held_bins() -> None:
    """A bin held up to the middle of a packet is resumed at that byte; a bin whose bytes are all
    held but not known complete gets an empty complete piece; a complete one gets nothing."""
    data, index = varied_codestream(10, components=1, levels=1, layers=3)
    bins = TargetBins(index)
    ids = [index.precinct_bin_id(0, 0, 1, p) for p in range(3)]
    offsets = [index.layer_offsets(*index.precinct_from_bin_id(i)) for i in ids]
    model = CacheModel()
    middle = offsets[0][1] + 1  # one byte into the packet of layer 1
    assert offsets[0][2] - offsets[0][1] > 1
    model.add((PRECINCT, 0, ids[0]), middle)
    model.add((PRECINCT, 0, ids[1]), offsets[1][-1])
    model.add((PRECINCT, 0, ids[2]), offsets[2][-1], complete=True)
    result = run((data, index), Window(fsiz=(100, 80)), model, bins=bins)
    first = [p for p in result.pieces if p.bin_id == ids[0] and p.bin_class == PRECINCT]
    assert first[0].bin_offset == middle > offsets[0][1]
    assert b"".join(p.body(data) for p in first) == bins.content(PRECINCT, ids[0], data)[middle:]
    second = [p for p in result.pieces if p.bin_id == ids[1] and p.bin_class == PRECINCT]
    assert second == [Piece(PRECINCT, 0, ids[1], offsets[1][-1], 0, True, ())]
    assert not [p for p in result.pieces if p.bin_id == ids[2] and p.bin_class == PRECINCT]


def test_byte_limit_resumption() -> None:
    """Successive plans limited to a few hundred bytes, each committed, end with EOR 4 until the
    last; each stays within its limit, and together they send exactly what one unlimited plan
    sends (same bins, offsets and bytes, in the same order)."""
    data, index = varied_codestream(11, 150, 120, tile=(64, 64), components=2, levels=3, layers=3)
    bins = TargetBins(index)
    win = Window(fsiz=(150, 120), roff=(20, 30), rsiz=(90, 70))
    whole = run((data, index), win, CacheModel(), bins=bins)
    model = CacheModel()
    rng = random.Random(12)
    pieces: list[Piece] = []
    for rounds in range(10_000):
        limit = rng.randint(1, 400)
        result = run((data, index), win, model, bins=bins, byte_limit=limit)
        assert result.size <= limit
        assert result.size == sum(p.header_length + p.length for p in result.pieces)
        commit(model, result.pieces)
        pieces.extend(result.pieces)
        if result.eor_reason != EOR_BYTE_LIMIT:
            break
    assert rounds > 10 and result.eor_reason == whole.eor_reason
    assert merged(pieces, data) == merged(list(whole.pieces), data)


def test_byte_limit_cuts_inside_a_packet() -> None:
    """A limit lands inside a piece: that piece is cut to fit exactly (header included), marked
    incomplete, and the next plan resumes at the next byte."""
    data, index = varied_codestream(13, components=1, levels=0, layers=2, precinct=7)
    model = CacheModel()
    model.add((METADATA, 0, 0), 0, complete=True)
    whole = run((data, index), Window(fsiz=(100, 80)), model)
    assert [p.bin_class for p in whole.pieces] == [MAIN_HEADER, TILE_HEADER, PRECINCT]
    target = whole.pieces[2]
    assert target.length > 20
    limit = sum(p.header_length + p.length for p in whole.pieces[:2]) + target.head(10).header_length + 10
    cut = run((data, index), Window(fsiz=(100, 80)), model, byte_limit=limit)
    assert cut.eor_reason == EOR_BYTE_LIMIT and cut.size == limit
    assert cut.pieces[2] == target.head(10) and not cut.pieces[2].complete
    commit(model, cut.pieces)
    rest = run((data, index), Window(fsiz=(100, 80)), model)
    assert rest.pieces[0].bin_offset == 10 and rest.pieces[0].key == target.key
    assert rest.eor_reason == EOR_IMAGE_DONE
    tiny = run((data, index), Window(fsiz=(100, 80)), CacheModel(), byte_limit=4)
    assert tiny.pieces == () and tiny.eor_reason == EOR_BYTE_LIMIT


def test_aligned_byte_limits_end_messages_at_packet_boundaries() -> None:
    """With align=yes, every precinct message cut by a byte limit ends at a packet boundary
    unless it lies inside one packet; successive aligned plans still deliver everything."""
    data, index = varied_codestream(11, 150, 120, tile=(64, 64), components=2, levels=3, layers=3)
    bins = TargetBins(index)
    win = Window(fsiz=(150, 120))
    whole = run((data, index), win, CacheModel(), bins=bins)
    model = CacheModel()
    rng = random.Random(5)
    pieces: list[Piece] = []
    for _ in range(10_000):
        result = run((data, index), win, model, bins=bins, byte_limit=rng.randint(50, 600), align=True)
        for p in result.pieces:
            if p.bin_class == PRECINCT:
                ends = index.layer_offsets(*index.precinct_from_bin_id(p.bin_id))
                crossing = [e for e in ends if p.bin_offset < e < p.end]
                assert p.end in ends or not crossing, (p.bin_offset, p.end, ends)
        commit(model, result.pieces)
        pieces.extend(result.pieces)
        if result.eor_reason != EOR_BYTE_LIMIT:
            break
    assert merged(pieces, data) == merged(list(whole.pieces), data)


def test_commit_records_only_leading_bytes() -> None:
    """commit() grows the model by what was sent; a piece starting past the held bytes is ignored."""
    model = CacheModel()
    piece = Piece(PRECINCT, 0, 3, 0, 50, False, ((100, 50),))
    commit(model, [piece.head(20)])
    assert model.held((PRECINCT, 0, 3)) == 20
    commit(model, [Piece(PRECINCT, 0, 3, 30, 10, True, ((130, 10),))])
    assert model.held((PRECINCT, 0, 3)) == 20 and not model.is_complete((PRECINCT, 0, 3))
    commit(model, [Piece(PRECINCT, 0, 3, 20, 30, True, ((120, 30),))])
    assert model.held((PRECINCT, 0, 3)) == 50 and model.is_complete((PRECINCT, 0, 3))
    assert piece.head(20).source == ((100, 20),) and piece.head(0).source == ()


def test_jpt_sends_whole_tile_parts() -> None:
    """JPT: metadata-bin 0, main header, then tile bins (class 4) of the tiles in the window,
    each its tile-parts as in the file; no tile-header or precinct bins."""
    data, index = varied_codestream(14, 150, 120, tile=(64, 64))
    result = run((data, index), Window(fsiz=(150, 120), roff=(70, 0), rsiz=(10, 10)), CacheModel(), jpt=True)
    assert [p.bin_class for p in result.pieces] == [METADATA, MAIN_HEADER, TILE]
    tile = result.pieces[2]
    assert tile.bin_id == 1 and tile.complete
    assert tile.body(data) == data[index.tiles[1].parts[0].offset : index.tiles[1].parts[0].end]
    assert result.eor_reason == EOR_WINDOW_DONE


def test_headers_only_request() -> None:
    """No view-window: just metadata-bin 0 and the main header."""
    data, index = varied_codestream(15)
    result = run((data, index), Window(), CacheModel())
    assert [p.bin_class for p in result.pieces] == [METADATA, MAIN_HEADER]
    assert result.eor_reason == EOR_WINDOW_DONE


def test_plan_is_cheap_for_a_large_tiled_image() -> None:
    """4096x4096, 64 tiles, 3 components, 5 layers: bins are built and a thumbnail planned quickly,
    touching only the window's precincts."""
    data, index = varied_codestream(16, 4096, 4096, tile=(512, 512), components=3, levels=5, layers=5, precinct=7)
    start = time.perf_counter()
    bins = TargetBins(index)
    result = run((data, index), Window(fsiz=(256, 256)), CacheModel(), bins=bins)
    detail = run((data, index), Window(fsiz=(4096, 4096), roff=(1000, 1000), rsiz=(300, 300)), CacheModel(),
                 bins=bins)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert result.eor_reason == detail.eor_reason == EOR_WINDOW_DONE
    assert 64 < len(result.pieces) < 64 * 3 * 2 * 5 + 70
    assert sum(p.length for p in detail.pieces) < 0.05 * len(data)


# --- real codestreams ---------------------------------------------------------------------


def test_first_view_of_a_large_16_bit_image_is_small(tmp_path: Path) -> None:
    """fsiz=256,256 on a 1955x1841 16-bit image encoded with our encoder costs at most 3% of the
    codestream, message headers included."""
    assert openjpeg.is_available(), "OpenJPEG >= 2.5 is needed (Debian package libopenjp2-7)"
    frame = smooth_noise(1841, 1955, 16, 5)
    path = tmp_path / "big.j2k"
    openjpeg.encode(frame, path, precision=16, signed=False, colour_transform=False, params=EncodeParams())
    data = path.read_bytes()
    index = build_index(data)
    result = run((data, index), Window(fsiz=(256, 256)), CacheModel())
    assert resolve(index, Window(fsiz=(256, 256))).fsiz == (245, 231)
    assert result.eor_reason == EOR_WINDOW_DONE
    assert result.size <= 0.03 * len(data)


def client_codestream(index: CodestreamIndex, received: dict[tuple[int, int, int], bytes]) -> bytes:
    """What a client rebuilds from its data-bins: main header bin, then per tile SOT, tile-header
    bin, SOD and every packet in codestream order, taken from the precinct bin when the bin holds
    that whole layer and empty (0x00) otherwise."""
    out = bytearray(received[(MAIN_HEADER, 0, 0)])
    for t in range(index.num_tiles):
        body = bytearray()
        for c, r, p, layer, _offset, _length in packets_in_file_order(index, t):
            offsets = index.layer_offsets(t, c, r, p)
            held = received.get((PRECINCT, 0, index.precinct_bin_id(t, c, r, p)), b"")
            body += held[offsets[layer] : offsets[layer + 1]] if len(held) >= offsets[layer + 1] else b"\x00"
        header = received.get((TILE_HEADER, 0, t), b"")
        out += struct.pack(">HHHIBB", 0xFF90, 10, t, 12 + len(header) + 2 + len(body), 0, 1)
        out += header + b"\xff\x93" + body
    return bytes(out + b"\xff\xd9")


@needs_opj
def test_client_reconstruction_from_the_pieces_decodes_the_window() -> None:
    """End to end: the bins a client assembles from two successive plans (the second limited in
    bytes and then resumed) rebuild a codestream that decodes the window exactly."""
    data, index = encoded("gray12")
    model = CacheModel()
    received: dict[tuple[int, int, int], bytes] = {}
    win = Window(fsiz=(259, 195), roff=(100, 70), rsiz=(40, 30))
    for byte_limit in (3000, None):
        result = run((data, index), win, model, byte_limit=byte_limit)
        for piece in result.pieces:
            assert len(received.get(piece.key, b"")) == piece.bin_offset
            received[piece.key] = received.get(piece.key, b"") + piece.body(data)
        commit(model, result.pieces)
    resolved = resolve(index, win)
    with tempfile.TemporaryDirectory() as tmp:
        decoder = Decoder(Path(tmp))
        partial = decoder.decode(client_codestream(index, received), index, resolved.discard)
        full = decoder.decode(data, index, resolved.discard)
    (ox, oy), (sx, sy) = resolved.roff, resolved.rsiz
    assert np.array_equal(partial[:, oy : oy + sy, ox : ox + sx], full[:, oy : oy + sy, ox : ox + sx])
    assert not np.array_equal(partial, full)


def test_max_message_splits_long_pieces_for_http_tcp() -> None:
    """With max_message, no message exceeds it, and the split pieces carry the same bytes."""
    data, index = varied_codestream(11, 150, 120, tile=(64, 64), components=2, levels=3, layers=3)
    bins = TargetBins(index)
    win = Window(fsiz=(150, 120))
    whole = run((data, index), win, CacheModel(), bins=bins)
    resolved = resolve(index, win)
    split = plan(bins, index, resolved, precincts(index, resolved), CacheModel(), 0, max_message=40)
    assert all(p.header_length + p.length <= 40 for p in split.pieces)
    assert len(split.pieces) > len(whole.pieces)
    assert merged(list(split.pieces), data) == merged(list(whole.pieces), data)
    assert split.eor_reason == whole.eor_reason


# --- the openjpeg tile-header layout -------------------------------------------------------


def test_openjpeg_tile_header_bin_bytes() -> None:
    """In the openjpeg layout a tile-header bin is the SOT segment without FF90 (Lsot 10, Isot,
    Psot 0, TPsot 0, TNsot 1), the part9 bin (the tile-part markers, PLT left out), then SOD;
    its length is known without reading the codestream; every other bin is the same."""
    data, index = varied_codestream(3, tile=(64, 48))
    part9, opj_bins = TargetBins(index), TargetBins(index, OPENJPEG, data)
    assert part9.tile_header_layout == "part9" and opj_bins.tile_header_layout == "openjpeg"
    # Tile 2: SOT body | COM "tile 2" (the PLT after it is dropped) | SOD.
    assert opj_bins.content(TILE_HEADER, 2, data) == bytes.fromhex(
        "000a 0002 00000000 00 01" "ff64 000a 0001 74696c652032" "ff93"
    )
    for t in range(index.num_tiles):
        sot = struct.pack(">HHIBB", 10, t, 0, 0, 1)
        assert opj_bins.content(TILE_HEADER, t, data) == sot + part9.content(TILE_HEADER, t, data) + b"\xff\x93"
        assert opj_bins.length(TILE_HEADER, t) == part9.length(TILE_HEADER, t) + 12 == 24
    assert TargetBins(index, OPENJPEG, b"").length(TILE_HEADER, 3) == 24  # no byte read
    assert opj_bins.length(TILE_HEADER, index.num_tiles) is None
    for key in part9.keys(0):
        if key[0] != TILE_HEADER:
            assert opj_bins.content(key[0], key[2], data) == part9.content(key[0], key[2], data), key
    with pytest.raises(ValueError, match="needs the codestream"):
        TargetBins(index, OPENJPEG)
    with pytest.raises(ValueError, match="unknown tile-header layout"):
        TargetBins(index, "kakadu", data)


def test_openjpeg_tile_headers_are_planned_whole_and_counted_in_the_model() -> None:
    """Planned in the openjpeg layout, tile-header pieces carry the whole bin, complete; a byte
    limit falling inside one ends the plan before it (part9 cuts it), and the next plan sends
    it whole; the model counts the openjpeg bytes, so a repeat sends no header again."""
    data, index = varied_codestream(3, tile=(64, 48))
    win = Window(fsiz=(100, 80))
    for bins in (TargetBins(index), TargetBins(index, OPENJPEG, data)):
        whole = run((data, index), win, CacheModel(), bins=bins)
        headers = [p for p in whole.pieces if p.bin_class == TILE_HEADER]
        assert [p.body(data) for p in headers] == [bins.content(TILE_HEADER, t, data) for t in range(4)]
        assert all(p.complete and p.bin_offset == 0 for p in headers)
        assert [p.bin_class for p in whole.pieces[:3]] == [METADATA, MAIN_HEADER, TILE_HEADER]
        limit = sum(p.header_length + p.length for p in whole.pieces[:3]) + 10  # inside tile header 1
        model = CacheModel()
        cut = run((data, index), win, model, byte_limit=limit, bins=bins)
        assert cut.eor_reason == EOR_BYTE_LIMIT
        if bins.tile_header_layout == OPENJPEG:
            assert cut.pieces == whole.pieces[:3]
        else:
            assert cut.pieces[:3] == whole.pieces[:3] and cut.pieces[3].key == (TILE_HEADER, 0, 1)
            assert not cut.pieces[3].complete and 0 < cut.pieces[3].length < 12
        commit(model, cut.pieces)
        rest = run((data, index), win, model, bins=bins)
        first = rest.pieces[0]
        assert first.key == (TILE_HEADER, 0, 1) and first.complete
        assert first.body(data) == bins.content(TILE_HEADER, 1, data)[first.bin_offset :]
        commit(model, rest.pieces)
        assert model.held((TILE_HEADER, 0, 1)) == bins.length(TILE_HEADER, 1)
        assert run((data, index), win, model, bins=bins).pieces == ()


@needs_opj
@pytest.mark.skipif(not opj.HAVE_TOOLS, reason="opj_jpip_transcode not installed")
def test_openjpeg_layout_is_what_opj_jpip_transcode_reads(tmp_path: Path) -> None:
    """OpenJPEG's own transcoder rebuilds our openjpeg-layout stream as it is (no tile-header
    rewriting, only EORs dropped and headers made explicit): a first view and then the rest
    of the image, in one model, decode exactly as the codestream does."""
    data, index = encoded("gray12")
    bins = TargetBins(index, OPENJPEG, data)
    model = CacheModel()
    bodies = []
    for win in (Window(fsiz=(130, 98)), Window(fsiz=(517, 389))):
        result = run((data, index), win, model, bins=bins)
        encoder = MessageEncoder()
        encoder.reset()
        bodies.append(b"".join(
            encoder.header(p.bin_class, p.csn, p.bin_id, p.bin_offset, p.length, p.complete, p.aux) + p.body(data)
            for p in result.pieces
        ) + encoder.eor(result.eor_reason))  # fmt: skip
        commit(model, result.pieces)
    source = tmp_path / "source.j2k"
    source.write_bytes(data)
    reference = opj.decode(source, tmp_path, (389, 517), precision=12, signed=False)
    rebuilt = opj.transcode(tmp_path, *bodies, layout=OPENJPEG)
    np.testing.assert_array_equal(opj.decode(rebuilt, tmp_path, (389, 517), precision=12, signed=False), reference)
