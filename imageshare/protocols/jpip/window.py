"""JPIP view-windows: from what a client asks to the precincts it needs.

A client names a view-window (ISO/IEC 15444-9 C.4) by a frame size ``fsiz``
with a rounding rule, a region ``roff``/``rsiz`` of that frame, components and
a number of quality layers. :func:`resolve` turns it into what the server will
actually deliver (a discard level, the frame size there and the region clipped
to it) and tells which of those values differ from the request, so that the
server reports exactly those in ``JPIP-fsiz``, ``JPIP-roff``, ... headers.
:func:`precincts` lists the precincts a client needs to reconstruct that region
exactly, and :func:`tiles_in_window` the tiles whose headers it needs.

Coordinates: a *frame* at discard level d is the image at resolution NL - d;
its width is ``Fx(d) = ceil(Xsiz / 2^d) - ceil(XOsiz / 2^d)`` (jpip.md 6.1).
Region coordinates are relative to the frame's top-left corner; *absolute*
level-d coordinates add ``ceil(XOsiz / 2^d)``.

Sans-IO: plain values in, plain values out; nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from imageshare.codestream.index import CodestreamIndex

__all__ = [
    "ROUND_MODES",
    "Window",
    "ResolvedWindow",
    "frame_size",
    "max_discard",
    "resolve",
    "tiles_in_window",
    "precincts",
    "synthesis_margin",
]

#: The values of the ``round`` request field (C.4.2), "round-down" being the default.
ROUND_MODES = ("round-down", "round-up", "closest")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pair(value: Iterable[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    x, y = value
    return (int(x), int(y))


def _comp_ranges(value: Iterable[Iterable[int | None]] | None) -> tuple[tuple[int, int | None], ...] | None:
    if value is None:
        return None
    out = []
    for lo, hi in value:  # type: ignore[misc]
        out.append((int(lo), None if hi is None else int(hi)))  # type: ignore[arg-type]
    return tuple(out)


@attrs.frozen
class Window:
    """A view-window as the client asked for it (request fields ``fsiz`` ... ``layers``).

    Parameters
    ----------
    fsiz : tuple of int, optional
        Requested frame size ``(fx, fy)``; ``None`` means the request names no
        view-window, so only headers are wanted.
    round : str
        ``"round-down"`` (default), ``"round-up"`` or ``"closest"``.
    roff : tuple of int, optional
        Region offset in the requested frame; ``(0, 0)`` when omitted.
    rsiz : tuple of int, optional
        Region size; when omitted the region runs to the frame's far edges.
    comps : tuple of (int, int or None), optional
        Component ranges ``(lo, hi)``, ``hi`` inclusive or ``None`` for "to the
        last one"; all components when omitted.
    layers : int, optional
        Number of quality layers wanted; all when omitted.
    """

    fsiz: tuple[int, int] | None = attrs.field(default=None, converter=_pair)
    round: str = "round-down"
    roff: tuple[int, int] | None = attrs.field(default=None, converter=_pair)
    rsiz: tuple[int, int] | None = attrs.field(default=None, converter=_pair)
    comps: tuple[tuple[int, int | None], ...] | None = attrs.field(default=None, converter=_comp_ranges)
    layers: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.round not in ROUND_MODES:
            raise ValueError(f"round must be one of {ROUND_MODES}, got {self.round!r}")
        if self.fsiz is not None and min(self.fsiz) < 1:
            raise ValueError(f"fsiz must be positive, got {self.fsiz}")
        for name in ("roff", "rsiz"):
            value = getattr(self, name)
            if value is not None and min(value) < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        for lo, hi in self.comps or ():
            if lo < 0 or (hi is not None and hi < lo):
                raise ValueError(f"bad component range {lo}-{hi}")
        if self.layers is not None and self.layers < 0:
            raise ValueError(f"layers must not be negative, got {self.layers}")


@attrs.frozen
class ResolvedWindow:
    """The view-window the server delivers.

    Parameters
    ----------
    discard : int
        Discard level d: resolution NL - d of every tile-component is the top one.
    fsiz : tuple of int
        Frame size ``(Fx(d), Fy(d))``.
    roff, rsiz : tuple of int
        The region within that frame, clipped to it (it may be empty).
    comps : tuple of int
        The components delivered, ascending.
    layers : int
        Quality layers delivered (at most the codestream's).
    changed : frozenset of str
        The names among ``fsiz``, ``roff``, ``rsiz``, ``comps`` and ``layers``
        whose value differs from the request: the response reports exactly
        these (``JPIP-fsiz`` ...). An omitted ``roff``/``rsiz``/``comps``/``layers``
        stands for its default, which the actual value always matches.
    """

    discard: int
    fsiz: tuple[int, int]
    roff: tuple[int, int]
    rsiz: tuple[int, int]
    comps: tuple[int, ...]
    layers: int
    changed: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        """Whether the window covers no sample (nothing to send beyond headers)."""
        return not (self.rsiz[0] and self.rsiz[1] and self.comps)


def max_discard(index: CodestreamIndex) -> int:
    """Largest usable discard level.

    The smallest NL over every tile-component, lowered further while the frame
    there would be empty: ``Fx(d)`` counts the multiples of ``2^d`` in
    ``[XOsiz, Xsiz)``, so a tiny image far from the origin can vanish at a
    level its decomposition has.
    """
    seen: dict[int, int] = {}
    for tile in index.tiles:
        # Tiles mostly share one TileCoding object: look at each distinct one once.
        if id(tile.coding) not in seen:
            seen[id(tile.coding)] = min(tile.coding.levels)
    top = min(seen.values())
    # Fx(d) never grows with d, and Fx(0) >= 1.
    while top and min(frame_size(index, top)) < 1:
        top -= 1
    return top


def frame_size(index: CodestreamIndex, discard: int) -> tuple[int, int]:
    """Frame size ``(Fx(d), Fy(d))`` at discard level ``d`` (jpip.md 6.1)."""
    siz = index.siz
    scale = 1 << discard
    return (
        _ceil_div(siz.xsiz, scale) - _ceil_div(siz.xosiz, scale),
        _ceil_div(siz.ysiz, scale) - _ceil_div(siz.yosiz, scale),
    )


def _choose_discard(sizes: list[tuple[int, int]], fsiz: tuple[int, int], mode: str) -> int:
    fx, fy = fsiz
    if mode == "round-down":
        # sizes[0] is the largest: the first that fits is the largest that fits.
        for d, (w, h) in enumerate(sizes):
            if w <= fx and h <= fy:
                return d
        return len(sizes) - 1
    if mode == "round-up":
        for d in range(len(sizes) - 1, -1, -1):
            w, h = sizes[d]
            if w >= fx and h >= fy:
                return d
        return 0
    # closest: nearest in area; min() keeps the first, i.e. the larger frame, on ties.
    area = fx * fy
    return min(range(len(sizes)), key=lambda d: abs(sizes[d][0] * sizes[d][1] - area))


def _components(
    index: CodestreamIndex, comps: tuple[tuple[int, int | None], ...] | None
) -> tuple[tuple[int, ...], bool]:
    """The components asked for that exist, and whether any asked for does not."""
    count = index.num_components
    if comps is None:
        return tuple(range(count)), False
    chosen: set[int] = set()
    changed = False
    for lo, hi in comps:
        top = count - 1 if hi is None else min(hi, count - 1)
        chosen.update(range(lo, top + 1))
        # An open range ("2-") asks for "up to the last one": never more than exists.
        changed = changed or lo >= count or (hi is not None and hi >= count)
    return tuple(sorted(chosen)), changed


def resolve(index: CodestreamIndex, window: Window) -> ResolvedWindow:
    """Decide what a view-window request gets.

    The discard level d in ``[0, min NL]`` is chosen from ``fsiz`` by the
    rounding rule: ``round-down`` takes the largest frame with both sides at
    most the requested ones (else the smallest frame), ``round-up`` the
    smallest with both sides at least the requested ones (else the largest),
    ``closest`` the frame nearest in area (ties go to the larger frame).
    When the frame differs from the requested one, ``roff``/``rsiz`` are scaled
    by actual/requested (offsets rounded down, far edges up); the region is
    then clipped to the frame and may end up empty.

    Parameters
    ----------
    index : CodestreamIndex
        The codestream's index.
    window : Window
        The request.

    Returns
    -------
    ResolvedWindow
        With ``changed`` naming the values that differ from the request. A
        request without ``fsiz`` resolves to an empty window at level 0 with
        no components and no layers.
    """
    if window.fsiz is None:
        return ResolvedWindow(0, frame_size(index, 0), (0, 0), (0, 0), (), 0, frozenset())
    sizes = [frame_size(index, d) for d in range(max_discard(index) + 1)]
    discard = _choose_discard(sizes, window.fsiz, window.round)
    frame = sizes[discard]
    offset = window.roff if window.roff is not None else (0, 0)
    roff: list[int] = []
    rsiz: list[int] = []
    for axis in (0, 1):
        asked, actual = window.fsiz[axis], frame[axis]
        # Scale to the actual frame: floor for the near edge, ceil for the far one,
        # so that the scaled region covers at least what was asked.
        near = offset[axis] * actual // asked
        if window.rsiz is None:
            far = actual
        else:
            far = _ceil_div((offset[axis] + window.rsiz[axis]) * actual, asked)
        near, far = min(near, actual), min(far, actual)
        roff.append(near)
        rsiz.append(max(far - near, 0))
    comps, comps_changed = _components(index, window.comps)
    available = max(tile.layers for tile in index.tiles)
    layers = available if window.layers is None else min(window.layers, available)
    changed = set()
    if frame != window.fsiz:
        changed.add("fsiz")
    if tuple(roff) != offset:
        changed.add("roff")
    if window.rsiz is not None and tuple(rsiz) != window.rsiz:
        changed.add("rsiz")
    if comps_changed:
        changed.add("comps")
    if window.layers is not None and layers != window.layers:
        changed.add("layers")
    return ResolvedWindow(
        discard, frame, (roff[0], roff[1]), (rsiz[0], rsiz[1]), comps, layers, frozenset(changed)
    )


def _absolute_region(index: CodestreamIndex, resolved: ResolvedWindow) -> tuple[int, int, int, int]:
    """The region in absolute level-d coordinates ``(x0, y0, x1, y1)``."""
    scale = 1 << resolved.discard
    x0 = _ceil_div(index.siz.xosiz, scale) + resolved.roff[0]
    y0 = _ceil_div(index.siz.yosiz, scale) + resolved.roff[1]
    return x0, y0, x0 + resolved.rsiz[0], y0 + resolved.rsiz[1]


def tiles_in_window(index: CodestreamIndex, resolved: ResolvedWindow) -> list[int]:
    """Indices of the tiles that have samples in the region, ascending.

    A tile ``[tx0, tx1)`` spans ``[ceil(tx0 / 2^d), ceil(tx1 / 2^d))`` at level d;
    only the tile rows and columns near the region are looked at, so this is
    cheap however many tiles there are.
    """
    if not (resolved.rsiz[0] and resolved.rsiz[1]):
        return []
    siz = index.siz
    scale = 1 << resolved.discard
    x0, y0, x1, y1 = _absolute_region(index, resolved)
    # Candidate tile columns/rows from the reference grid, then the exact test.
    cols = range(max((x0 * scale - scale - siz.xtosiz) // siz.xtsiz, 0),
                 min((x1 * scale - siz.xtosiz) // siz.xtsiz + 1, siz.tiles_across))  # fmt: skip
    rows = range(max((y0 * scale - scale - siz.ytosiz) // siz.ytsiz, 0),
                 min((y1 * scale - siz.ytosiz) // siz.ytsiz + 1, siz.tiles_down))  # fmt: skip
    out = []
    for row in rows:
        for col in cols:
            t = row * siz.tiles_across + col
            tx0, ty0, tx1, ty1 = siz.tile_bounds(t)
            if (_ceil_div(tx0, scale) < x1 and _ceil_div(tx1, scale) > x0
                    and _ceil_div(ty0, scale) < y1 and _ceil_div(ty1, scale) > y0):  # fmt: skip
                out.append(t)
    return out


def synthesis_margin(reversible: bool) -> int:
    """Samples to add on each side of a region at a resolution for its high-pass sub-bands.

    Inverse lifting of the 5/3 wavelet makes output sample k depend on the
    low-pass coefficients sitting at distance <= 1 from k (a low coefficient j
    sits at 2j of the resolution grid) and the high-pass ones at distance <= 2
    (j sits at 2j + 1): the 3- and 5-tap synthesis filters. The 9/7 wavelet has
    7- and 9-tap filters: distances 3 and 4. Growing by the high-pass distance
    (2 or 4) covers both bands; symmetric extension at tile edges only reflects
    positions back into that same grown interval.
    """
    return 2 if reversible else 4


def precincts(index: CodestreamIndex, resolved: ResolvedWindow) -> list[tuple[int, int, int, int]]:
    """The precincts a client needs to reconstruct the region exactly.

    For every tile in the window and every delivered component (plus the other
    two of components 0-2 when the tile uses a multiple component transform,
    whose inverse mixes them), the region is mapped to the top resolution
    ``R = NL_c - d`` (its sample k sits at frame position ``k * XRsiz``) and
    clipped to the tile-component: tiles are transformed independently.
    Going down from R to 0, resolution r > 0 keeps the precincts meeting the
    region grown by :func:`synthesis_margin` (they carry its high-pass
    sub-bands); the low-pass input, resolution r - 1, then needs the grown
    region halved (rounded outwards). Resolution 0 keeps the precincts meeting
    its region as is.

    Parameters
    ----------
    index : CodestreamIndex
    resolved : ResolvedWindow

    Returns
    -------
    list of (t, c, r, p)
        Per tile (ascending), per component (ascending), resolutions 0..R in
        order and precincts in raster order; empty for an empty window.
    """
    out: list[tuple[int, int, int, int]] = []
    if resolved.empty:
        return out
    d = resolved.discard
    ax0, ay0, ax1, ay1 = _absolute_region(index, resolved)
    wanted = set(resolved.comps)
    for t in tiles_in_window(index, resolved):
        tile = index.tiles[t]
        comps = set(wanted)
        if tile.coding.mct and index.num_components >= 3 and comps & {0, 1, 2}:
            comps |= {0, 1, 2}
        for c in sorted(comps):
            style = tile.coding.components[c]
            comp = index.siz.components[c]
            top = style.levels - d
            rx0, ry0, rx1, ry1 = index.resolution_bounds(t, c, top)
            # Component sample i sits at level-d position i * XRsiz.
            x0, x1 = max(_ceil_div(ax0, comp.xrsiz), rx0), min(_ceil_div(ax1, comp.xrsiz), rx1)
            y0, y1 = max(_ceil_div(ay0, comp.yrsiz), ry0), min(_ceil_div(ay1, comp.yrsiz), ry1)
            if x0 >= x1 or y0 >= y1:
                continue
            margin = synthesis_margin(style.reversible)
            per_resolution: list[list[tuple[int, int, int, int]]] = []
            for r in range(top, -1, -1):
                if r:
                    x0, y0, x1, y1 = x0 - margin, y0 - margin, x1 + margin, y1 + margin
                cols, rows = index.precinct_ranges(t, c, r, x0, y0, x1, y1)
                per_resolution.append([(t, c, r, p) for p in tile.iter_precincts(c, r, cols, rows)])
                if r:
                    bx0, by0, bx1, by1 = index.resolution_bounds(t, c, r - 1)
                    x0, x1 = max(x0 >> 1, bx0), min(_ceil_div(x1, 2), bx1)
                    y0, y1 = max(y0 >> 1, by0), min(_ceil_div(y1, 2), by1)
            for group in reversed(per_resolution):
                out.extend(group)
    return out
