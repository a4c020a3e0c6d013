"""
Packet header decoding (ISO/IEC 15444-1 B.9, B.10), enough to find packet boundaries.

A JPIP client holds precinct data-bins (a precinct's packets concatenated) without their
lengths; to rebuild a codestream it must know where each packet ends, which only the
packet headers say. :class:`PrecinctPackets` walks the packets of one precinct in layer
order, keeping the tag-tree and Lblock state that carries from layer to layer. Pure:
bytes in, lengths out.

Supported: the default code-block style (one codeword segment per contribution: no
selective arithmetic bypass, no termination on each pass) and no SOP/EPH markers, which
is what this server's encoder writes; anything else raises :class:`PacketError`.
"""

from __future__ import annotations

import attrs

_UNKNOWN = 1 << 30


class PacketError(ValueError):
    """The packet header is malformed, or of a kind this decoder does not support."""


class NeedMoreData(PacketError):
    """The data ends inside the packet: it is incomplete."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@attrs.frozen
class BandBlocks:
    """Code-blocks of one subband inside one precinct: columns × rows (raster order)."""

    columns: int
    rows: int


def precinct_blocks(
    resolution_bounds: tuple[int, int, int, int],
    component_bounds: tuple[int, int, int, int],
    levels: int,
    r: int,
    precinct: tuple[int, int],
    precinct_exponents: tuple[int, int],
    codeblock_exponents: tuple[int, int],
) -> tuple[BandBlocks, ...]:
    """
    The code-block grid of every subband of precinct (column, row) of resolution ``r``.

    Parameters
    ----------
    resolution_bounds
        (trx0, try0, trx1, try1) of the tile-component at resolution ``r``.
    component_bounds
        (tcx0, tcy0, tcx1, tcy1) of the tile-component.
    levels
        NL, the decomposition levels of the tile-component.
    precinct
        The precinct's column and row in the resolution's precinct grid.
    precinct_exponents
        PPx, PPy of resolution ``r``.
    codeblock_exponents
        xcb, ycb (log2 of the nominal code-block size).
    """
    trx0, try0, _, _ = resolution_bounds
    tcx0, tcy0, tcx1, tcy1 = component_bounds
    ppx, ppy = precinct_exponents
    col, row = precinct
    if r == 0:
        bands = [(0, 0)]
        n = levels
        bpx, bpy = ppx, ppy
    else:
        bands = [(1, 0), (0, 1), (1, 1)]  # HL, LH, HH
        n = levels - r + 1
        bpx, bpy = ppx - 1, ppy - 1
    # Code-blocks never straddle precincts (B.7): their size is capped by the precinct's.
    xcb = min(codeblock_exponents[0], bpx)
    ycb = min(codeblock_exponents[1], bpy)
    # Precinct (col, row) counts from the grid's first column, at floor(trx0 / 2^PPx).
    px0 = ((trx0 >> ppx) + col) << bpx
    py0 = ((try0 >> ppy) + row) << bpy
    out = []
    for xob, yob in bands:
        half = (1 << (n - 1)) if n > 0 else 0
        bx0 = _ceil_div(tcx0 - half * xob, 1 << n)
        bx1 = _ceil_div(tcx1 - half * xob, 1 << n)
        by0 = _ceil_div(tcy0 - half * yob, 1 << n)
        by1 = _ceil_div(tcy1 - half * yob, 1 << n)
        x0, x1 = max(bx0, px0), min(bx1, px0 + (1 << bpx))
        y0, y1 = max(by0, py0), min(by1, py0 + (1 << bpy))
        if x1 <= x0 or y1 <= y0:
            out.append(BandBlocks(0, 0))
            continue
        cols = _ceil_div(x1, 1 << xcb) - (x0 >> xcb)
        rows = _ceil_div(y1, 1 << ycb) - (y0 >> ycb)
        out.append(BandBlocks(cols, rows))
    return tuple(out)


class _Bits:
    """MSB-first bit reader with the packet-header bit stuffing (B.10.1)."""

    def __init__(self, data: bytes | memoryview, pos: int) -> None:
        self._data = data
        self.pos = pos
        self._byte = 0
        self._left = 0

    def bit(self) -> int:
        if self._left == 0:
            if self.pos >= len(self._data):
                raise NeedMoreData("packet header runs past the data")
            stuffed = self._byte == 0xFF
            self._byte = self._data[self.pos]
            self.pos += 1
            self._left = 7 if stuffed else 8
        self._left -= 1
        return (self._byte >> self._left) & 1

    def bits(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | self.bit()
        return value

    def align(self) -> None:
        # After a 0xFF byte the header continues into one more (stuffed) byte.
        if self._byte == 0xFF and self._left < 8:
            if self.pos >= len(self._data):
                raise NeedMoreData("packet header runs past the data")
            self.pos += 1
        self._left = 0
        self._byte = 0


class _TagTree:
    """A tag tree over a columns × rows grid of leaves (B.10.2)."""

    def __init__(self, columns: int, rows: int) -> None:
        self._parents: list[int] = []
        self._leaf_base = 0
        levels = []
        w, h = columns, rows
        while True:
            levels.append((w, h))
            if w * h <= 1:
                break
            w, h = _ceil_div(w, 2), _ceil_div(h, 2)
        # Node numbering: leaves first, then each coarser level.
        starts = []
        total = 0
        for w, h in levels:
            starts.append(total)
            total += w * h
        self._parents = [-1] * total
        for depth in range(len(levels) - 1):
            w, h = levels[depth]
            pw = levels[depth + 1][0]
            for y in range(h):
                for x in range(w):
                    self._parents[starts[depth] + y * w + x] = starts[depth + 1] + (y // 2) * pw + (x // 2)
        self._value = [_UNKNOWN] * total
        self._low = [0] * total

    def decode(self, bits: _Bits, leaf: int, threshold: int) -> bool:
        """Whether the leaf's value is below ``threshold``, reading the bits that takes."""
        path = []
        node = leaf
        while node >= 0:
            path.append(node)
            node = self._parents[node]
        low = 0
        for node in reversed(path):
            if low > self._low[node]:
                self._low[node] = low
            else:
                low = self._low[node]
            while low < threshold and low < self._value[node]:
                if bits.bit():
                    self._value[node] = low
                else:
                    low += 1
            self._low[node] = low
        return self._value[leaf] < threshold

    def value(self, bits: _Bits, leaf: int) -> int:
        threshold = 1
        while not self.decode(bits, leaf, threshold):
            threshold += 1
            if threshold > 64:
                raise PacketError("tag tree value out of range")
        return self._value[leaf]


def _passes(bits: _Bits) -> int:
    if not bits.bit():
        return 1
    if not bits.bit():
        return 2
    n = bits.bits(2)
    if n != 3:
        return 3 + n
    n = bits.bits(5)
    if n != 31:
        return 6 + n
    return 37 + bits.bits(7)


class PrecinctPackets:
    """
    Walks the packets of one precinct, layer after layer.

    Parameters
    ----------
    bands
        The precinct's code-block grid per subband (:func:`precinct_blocks`).
    codeblock_style
        The COD/COC code-block style byte; only 0 and the styles that keep one codeword
        segment per contribution (reset, vertical causal, segmentation symbols) are
        accepted.
    """

    def __init__(self, bands: tuple[BandBlocks, ...], codeblock_style: int = 0) -> None:
        if codeblock_style & 0x05:  # selective bypass, termination on each pass
            raise PacketError(f"code-block style {codeblock_style:#x} has several segments per contribution")
        self._bands = [
            (b, _TagTree(b.columns, b.rows), _TagTree(b.columns, b.rows), [False] * (b.columns * b.rows),
             [3] * (b.columns * b.rows))
            for b in bands
            if b.columns and b.rows
        ]
        self.layer = 0

    def next_packet(self, data: bytes | memoryview, pos: int) -> int:
        """
        The length of the packet starting at ``data[pos]`` (header and body).

        Raises
        ------
        NeedMoreData
            The packet is not complete in ``data`` (state is then undefined: start over).
        """
        bits = _Bits(data, pos)
        body = 0
        if bits.bit():
            for band, inclusion, zero_planes, included, lblock in self._bands:
                for leaf in range(band.columns * band.rows):
                    if included[leaf]:
                        take = bits.bit()
                    else:
                        take = inclusion.decode(bits, leaf, self.layer + 1)
                    if not take:
                        continue
                    if not included[leaf]:
                        zero_planes.value(bits, leaf)
                        included[leaf] = True
                    passes = _passes(bits)
                    while bits.bit():
                        lblock[leaf] += 1
                    body += bits.bits(lblock[leaf] + passes.bit_length() - 1)
        bits.align()
        end = bits.pos + body
        if end > len(data):
            raise NeedMoreData("packet body runs past the data")
        self.layer += 1
        return end - pos
