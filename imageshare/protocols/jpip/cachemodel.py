"""The server's model of a JPIP client's cache (ISO/IEC 15444-9 B.3, C.9).

A JPIP server remembers, per session, how many leading bytes of each data-bin
the client holds and whether it holds the whole bin, so that it never sends a
byte twice and resumes a bin where it stopped (``docs/jpip.md`` section 5).
:class:`CacheModel` is that record; :func:`apply_spec` folds a client's
``model=`` statements (parsed by :mod:`~imageshare.protocols.jpip.cachespec`)
into it.

A data-bin is named by a key ``(bin_class, csn, bin_id)``: the JPP/JPT class
number (:data:`PRECINCT`, :data:`TILE_HEADER`, :data:`TILE`,
:data:`MAIN_HEADER`, :data:`METADATA`), the codestream number and the in-class
identifier.

Sans-IO: plain values, no clocks, no I/O.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from imageshare.codestream.index import CodestreamIndex

__all__ = [
    "PRECINCT",
    "TILE_HEADER",
    "TILE",
    "MAIN_HEADER",
    "METADATA",
    "BinKey",
    "BinLengths",
    "CacheModel",
    "CacheSpecTooLarge",
    "MAX_SPEC_BINS",
    "apply_spec",
]

#: Data-bin class numbers on the wire (Table A.2); the extended classes 1 and 5
#: are not used by this server.
PRECINCT = 0
TILE_HEADER = 2
TILE = 4
MAIN_HEADER = 6
METADATA = 8

#: ``(bin_class, csn, bin_id)``.
BinKey = tuple[int, int, int]
#: ``(bin_class, bin_id) -> full length in bytes``, or ``None`` if there is no such bin.
BinLengths = Callable[[int, int], "int | None"]

#: Default bound on the data-bins (plus tile-component-resolutions visited)
#: one :func:`apply_spec` call may touch.
MAX_SPEC_BINS = 1_000_000

# Rough CPython cost of one entry: dict slot and index (~50 bytes at the usual
# load factor), the key tuple (64), its ints beyond the small-int cache (~2 x 28)
# and the value int (28).
_BYTES_PER_ENTRY = 200


class CacheSpecTooLarge(ValueError):
    """A ``model`` statement would touch more data-bins than the bound allows."""


class CacheModel:
    """How much of each data-bin a client holds.

    Every bin is held as a prefix: ``held(key)`` leading bytes, plus a flag for
    "the client has the whole bin" (it received the completeness bit, or said
    so). :meth:`add` only ever grows what is held; :meth:`truncate` and
    :meth:`remove` serve subtractive ``model`` statements (the client's cache
    evicted data). Keys are not checked against any codestream: feed the model
    through :func:`apply_spec` and :func:`~imageshare.protocols.jpip.plan.commit`,
    which only name bins that exist.
    """

    __slots__ = ("_bins", "_complete")

    def __init__(self) -> None:
        # key -> held << 1 | complete: one int per entry keeps the model small.
        self._bins: dict[BinKey, int] = {}
        # (bin_class, csn) -> number of complete bins, for a cheap "image done" test.
        self._complete: dict[tuple[int, int], int] = {}

    def held(self, key: BinKey) -> int:
        """Number of leading bytes of the bin the client holds (0 if none)."""
        return self._bins.get(key, 0) >> 1

    def is_complete(self, key: BinKey) -> bool:
        """Whether the client holds the whole bin."""
        return bool(self._bins.get(key, 0) & 1)

    def add(self, key: BinKey, upto: int, complete: bool = False) -> None:
        """Record that the client holds the first ``upto`` bytes of a bin (and maybe all of it).

        Monotonic: what is held never shrinks and a complete bin stays complete.

        Raises
        ------
        ValueError
            For a negative ``upto`` or a malformed key.
        """
        _check_key(key)
        if upto < 0:
            raise ValueError(f"negative byte count {upto}")
        old = self._bins.get(key, 0)
        was_complete = old & 1
        value = max(old >> 1, upto) << 1 | (was_complete or int(complete))
        if value != old:
            self._bins[key] = value
            if (value & 1) and not was_complete:
                self._count(key, 1)

    def truncate(self, key: BinKey, upto: int) -> None:
        """Record that the client holds at most the first ``upto`` bytes of a bin.

        This is a subtractive statement with a qualifier (``-P12:100``,
        ``-P12:L2``). A bin cut below what was held is no longer complete.
        """
        if upto < 0:
            raise ValueError(f"negative byte count {upto}")
        old = self._bins.get(key)
        if old is None or old >> 1 <= upto:
            return
        if upto == 0:
            self.remove(key)
            return
        if old & 1:
            self._count(key, -1)
        self._bins[key] = upto << 1

    def remove(self, key: BinKey) -> None:
        """Forget a bin: the client holds none of it."""
        old = self._bins.pop(key, None)
        if old is not None and old & 1:
            self._count(key, -1)

    def _count(self, key: BinKey, delta: int) -> None:
        group = (key[0], key[1])
        self._complete[group] = self._complete.get(group, 0) + delta

    def complete_count(self, bin_class: int, csn: int) -> int:
        """Number of complete bins of a class in a codestream."""
        return self._complete.get((bin_class, csn), 0)

    @property
    def entries(self) -> int:
        """Number of bins the model records."""
        return len(self._bins)

    def __len__(self) -> int:
        return len(self._bins)

    def __contains__(self, key: object) -> bool:
        return key in self._bins

    def __iter__(self) -> Iterator[BinKey]:
        return iter(self._bins)

    def approx_bytes(self) -> int:
        """Estimated memory the model occupies, for per-session limits."""
        return sys.getsizeof(self._bins) + _BYTES_PER_ENTRY * len(self._bins)

    def copy(self) -> CacheModel:
        """An independent copy (e.g. a throw-away model for a stateless request)."""
        other = CacheModel()
        other._bins = dict(self._bins)
        other._complete = dict(self._complete)
        return other

    def __repr__(self) -> str:
        return f"<CacheModel {len(self._bins)} bins>"


def _check_key(key: BinKey) -> None:
    if len(key) != 3 or min(key) < 0:
        raise ValueError(f"bad data-bin key {key!r}")


# --- model= statements -----------------------------------------------------------


class ImplicitLike(Protocol):
    """What :func:`apply_spec` reads of an implicit descriptor (``t0-2c0r1p3-5``)."""

    @property
    def tiles(self) -> range | None: ...
    @property
    def components(self) -> range | None: ...
    @property
    def resolutions(self) -> range | None: ...
    @property
    def precincts(self) -> range | None: ...


class CacheItemLike(Protocol):
    """What :func:`apply_spec` reads of a cache-spec item (``cachespec.CacheItem``)."""

    @property
    def subtractive(self) -> bool: ...
    @property
    def codestreams(self) -> tuple[range, ...] | str | None: ...
    @property
    def kind(self) -> str: ...
    @property
    def index(self) -> int | None: ...
    @property
    def implicit(self) -> ImplicitLike | None: ...
    @property
    def bytes_held(self) -> int | None: ...
    @property
    def layers_held(self) -> int | None: ...


def _applies(item: CacheItemLike, csn: int) -> bool:
    streams = item.codestreams
    if streams is None or streams == "all":
        # No qualifier: the request's own codestream, the one we are applying for.
        return True
    return any(csn in r for r in streams)  # type: ignore[union-attr]


def _clip(wanted: range | None, count: int) -> range:
    """``wanted`` (all when None) within ``range(count)``."""
    if wanted is None:
        return range(count)
    return range(max(wanted.start, 0), min(wanted.stop, count))


def _implicit_triples(index: CodestreamIndex, spec: ImplicitLike) -> Iterator[tuple[int, int, int, range]]:
    """``(t, c, r, precincts)`` for every tile-component-resolution an implicit descriptor names."""
    for t in _clip(spec.tiles, index.num_tiles):
        tile = index.tiles[t]
        for c in _clip(spec.components, index.num_components):
            for r in _clip(spec.resolutions, tile.coding.components[c].resolutions):
                yield t, c, r, _clip(spec.precincts, tile.precinct_count(c, r))


def _cost(item: CacheItemLike, index: CodestreamIndex, budget: int) -> int:
    """Bins (and tile-component-resolutions visited) an item touches; stops past ``budget``."""
    kind = item.kind
    if kind in ("H", "T"):
        return index.num_tiles if item.index is None else 1
    if kind == "P" and item.index is None:
        return sum(tile.num_packets // tile.layers for tile in index.tiles)
    if kind == "implicit" and item.implicit is not None:
        total = 0
        for *_, ps in _implicit_triples(index, item.implicit):
            total += 1 + len(ps)
            if total > budget:
                break
        return total
    return 1


def _targets(
    item: CacheItemLike, index: CodestreamIndex
) -> Iterator[tuple[int, int, tuple[int, int, int, int] | None]]:
    """``(bin_class, bin_id, precinct or None)`` of every bin an item names (existing or not)."""
    kind, number = item.kind, item.index
    if kind == "Hm":
        yield MAIN_HEADER, 0, None
    elif kind == "M":
        yield METADATA, 0 if number is None else number, None
    elif kind in ("H", "T"):
        bin_class = TILE_HEADER if kind == "H" else TILE
        for t in range(index.num_tiles) if number is None else (number,):
            yield bin_class, t, None
    elif kind == "P" and number is not None:
        try:
            yield PRECINCT, number, index.precinct_from_bin_id(number)
        except KeyError:
            return  # a precinct the codestream does not have: nothing to record
    elif kind == "P" or (kind == "implicit" and item.implicit is not None):
        spec = item.implicit if kind == "implicit" else None
        triples = (
            _implicit_triples(index, spec)
            if spec is not None
            else ((tile.index, c, r, range(tile.precinct_count(c, r)))
                  for tile in index.tiles
                  for c in range(index.num_components)
                  for r in range(tile.coding.components[c].resolutions))
        )  # fmt: skip
        for t, c, r, ps in triples:
            for p in ps:
                yield PRECINCT, index.precinct_bin_id(t, c, r, p), (t, c, r, p)


def apply_spec(
    model: CacheModel,
    items: Iterable[CacheItemLike],
    index: CodestreamIndex,
    csn: int,
    *,
    bin_lengths: BinLengths,
    max_bins: int = MAX_SPEC_BINS,
) -> int:
    """Fold a client's ``model=`` statements for one codestream into a cache model.

    Explicit descriptors name one bin (``Hm``, ``H3``, ``P12``, ``M0``,
    ``T0``); wildcards (``H*``, ``P*``, ``T*``, ``M*``) every bin of their
    class; implicit descriptors (``t0c0-2r1-3p4``) every precinct they name.
    ``:n`` means the client holds the first n bytes, ``:Ln`` the first n
    quality layers (turned into bytes with the precinct's layer offsets), no
    qualifier the whole bin. A subtractive item (``-P12``) removes the bin; with
    a qualifier (``-P12:100``) it cuts what is held down to that much.

    Items for other codestreams, for bins the codestream does not have, and
    ``:L`` on anything but precincts are skipped. Items without a codestream
    qualifier are taken to be about ``csn``.

    Parameters
    ----------
    model : CacheModel
        Updated in place.
    items : iterable of CacheItem
        Parsed descriptors, in order (``cachespec.CacheSpec`` iterates as such).
    index : CodestreamIndex
        The codestream's index (tiles, precincts, layer offsets).
    csn : int
        The codestream the items are applied to.
    bin_lengths : callable
        ``(bin_class, bin_id) -> length or None``, e.g. ``TargetBins.length``.
    max_bins : int
        Bound on the bins (plus tile-component-resolutions visited) all items
        together may touch.

    Returns
    -------
    int
        Number of data-bins looked at.

    Raises
    ------
    CacheSpecTooLarge
        When the items would touch more than ``max_bins`` bins; the model is
        left untouched (the bound is checked before anything is applied).
    """
    relevant = [item for item in items if _applies(item, csn)]
    total = 0
    for item in relevant:
        total += _cost(item, index, max_bins - total)
        if total > max_bins:
            raise CacheSpecTooLarge(f"cache model statements touch more than {max_bins} data-bins")
    touched = 0
    for item in relevant:
        for bin_class, bin_id, precinct in _targets(item, index):
            length = bin_lengths(bin_class, bin_id)
            if length is None:
                continue
            touched += 1
            key = (bin_class, csn, bin_id)
            if item.layers_held is not None:
                if precinct is None:
                    continue  # layers only make sense for precinct data-bins
                offsets = index.layer_offsets(*precinct)
                layers = len(offsets) - 1
                upto, whole = offsets[min(item.layers_held, layers)], item.layers_held >= layers
            elif item.bytes_held is not None:
                upto, whole = min(item.bytes_held, length), item.bytes_held >= length
            else:
                upto, whole = length, True
            if not item.subtractive:
                model.add(key, upto, whole)
            elif item.layers_held is None and item.bytes_held is None:
                model.remove(key)
            elif not whole:
                model.truncate(key, upto)
    return touched
