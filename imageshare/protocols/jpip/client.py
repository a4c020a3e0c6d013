"""
The client side of JPIP: a data-bin cache and the codestream it rebuilds (pure).

:class:`ClientCache` takes the messages of JPP-stream responses; :meth:`rebuild` lays
out what it holds as a decodable J2K codestream: the main header, then per tile an SOT,
the tile-header bin and SOD, then every packet in the codestream's progression order —
the packets the cache holds completely, and an empty packet (one zero byte) for each
one it does not. Packet boundaries inside precinct bins come from the packet headers
(:mod:`imageshare.codestream.packets`), so partial bins (``len``, ``layers``) decode too.
"""

from __future__ import annotations

import struct

from imageshare.codestream.index import packet_layout
from imageshare.codestream.packets import NeedMoreData, PrecinctPackets, precinct_blocks
from imageshare.protocols.jpip.messages import Message

PRECINCT, TILE_HEADER, MAIN_HEADER, METADATA = 0, 2, 6, 8


class RebuildError(ValueError):
    """The cache cannot make a codestream (no main header yet, or an unsupported one)."""


class ClientCache:
    """Leading bytes of every data-bin received, and which bins are complete."""

    def __init__(self) -> None:
        self._bins: dict[tuple[int, int, int], bytearray] = {}
        self._complete: set[tuple[int, int, int]] = set()

    def add(self, message: Message) -> None:
        """Store a message's bytes; data past a gap is dropped (servers send in order)."""
        key = (message.bin_class, message.csn, message.bin_id)
        buf = self._bins.setdefault(key, bytearray())
        if message.offset <= len(buf):
            end = message.offset + len(message.data)
            if end > len(buf):
                buf[message.offset :] = message.data
        if message.complete and message.offset + len(message.data) <= len(buf):
            self._complete.add(key)

    def bin(self, bin_class: int, csn: int, bin_id: int) -> bytes:
        return bytes(self._bins.get((bin_class, csn, bin_id), b""))

    def is_complete(self, bin_class: int, csn: int, bin_id: int) -> bool:
        return (bin_class, csn, bin_id) in self._complete

    @property
    def size(self) -> int:
        """Bytes held."""
        return sum(len(b) for b in self._bins.values())

    def rebuild(self, csn: int = 0) -> bytes:
        """A J2K codestream of codestream ``csn`` from what the cache holds."""
        if not self.is_complete(MAIN_HEADER, csn, 0):
            raise RebuildError("the main header has not been received yet")
        main = self.bin(MAIN_HEADER, csn, 0)
        try:
            siz, tiles = packet_layout(main)
        except ValueError as e:
            raise RebuildError(f"cannot lay out this codestream: {e}") from None
        num_tiles, num_comps = siz.num_tiles, len(siz.components)
        out = bytearray(main)
        for t, layout in enumerate(tiles):
            splits: dict[tuple[int, int, int], list[bytes]] = {}
            body = bytearray()
            for c, r, p, layer in layout.order:
                packets = splits.get((c, r, p))
                if packets is None:
                    packets = splits[(c, r, p)] = self._packets(siz, layout, t, c, r, p, csn, num_tiles, num_comps)
                body += packets[layer] if layer < len(packets) else b"\x00"
            header = self.bin(TILE_HEADER, csn, t)
            # SOT: Lsot 10, Isot, Psot (whole tile-part), TPsot 0, TNsot 1.
            psot = 12 + len(header) + 2 + len(body)
            out += struct.pack(">HHHIBB", 0xFF90, 10, t, psot, 0, 1) + header + b"\xff\x93" + body
        out += b"\xff\xd9"
        return bytes(out)

    def _packets(self, siz, layout, t, c, r, p, csn, num_tiles, num_comps) -> list[bytes]:  # type: ignore[no-untyped-def]
        """The complete packets of one precinct bin, in layer order."""
        grid = layout.grid[c]
        s = sum(cols * rows for cols, rows in grid[:r]) + p
        data = self.bin(PRECINCT, csn, t + (c + s * num_comps) * num_tiles)
        if not data:
            return []
        style = layout.coding.components[c]
        comp = siz.components[c]
        tx0, ty0, tx1, ty1 = siz.tile_bounds(t)
        tc = (-(-tx0 // comp.xrsiz), -(-ty0 // comp.yrsiz), -(-tx1 // comp.xrsiz), -(-ty1 // comp.yrsiz))
        scale = 1 << (style.levels - r)
        res = (-(-tc[0] // scale), -(-tc[1] // scale), -(-tc[2] // scale), -(-tc[3] // scale))
        cols = grid[r][0]
        walker = PrecinctPackets(
            precinct_blocks(res, tc, style.levels, r, (p % cols, p // cols), style.precincts[r], (style.xcb, style.ycb)),
            style.cblk_style,
        )
        packets, pos = [], 0
        while pos < len(data) and len(packets) < layout.coding.layers:
            try:
                n = walker.next_packet(data, pos)
            except NeedMoreData:
                break  # the rest of this packet has not arrived
            packets.append(data[pos : pos + n])
            pos += n
        return packets
