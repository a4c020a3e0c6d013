"""JPEG 2000 coding parameters for streaming-ready codestreams (pure, no I/O).

The codestreams are served over JPIP, so the layout matters as much as the
compression: RPCL progression (a client asking for a thumbnail gets it from the
start of every precinct), precincts at every resolution (spatial random
access), PLT (a server finds packets without parsing them) and TLM (tile-part
lengths in the main header), several quality layers (progressive quality) and,
for diagnostic use, a final lossless layer.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["EncodeParams", "resolutions_for", "OPENJPEG_MAX_RESOLUTIONS"]

#: OpenJPEG rejects more than 32 resolutions although the standard allows 33
#: (its check ``1 << (numres - 1)`` would overflow a 32-bit tile size).
OPENJPEG_MAX_RESOLUTIONS = 32

#: Size of ``opj_cparameters_t.tcp_rates``.
_OPENJPEG_MAX_LAYERS = 100


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _to_rates(value: object) -> tuple[float, ...]:
    return tuple(float(v) for v in value)  # type: ignore[attr-defined]


def _to_codeblock(value: object) -> tuple[int, int]:
    width, height = value  # type: ignore[misc]
    return (int(width), int(height))


@attrs.frozen(kw_only=True)
class EncodeParams:
    """How frames are coded. The defaults are the ones ImageShare streams with.

    Fixed, not configurable: RPCL progression, PLT and TLM marker segments,
    a single tile with a single tile-part, no PPM/PPT packed headers, no
    SOP/EPH markers, no ROI, no code-block mode switches.

    Parameters
    ----------
    lossless : bool
        ``True`` uses the reversible 5/3 wavelet (and RCT for colour) so that the
        last quality layer reproduces the input exactly; ``False`` uses the
        irreversible 9/7 wavelet (and ICT).
    layer_rates : tuple of float
        OpenJPEG compression ratios, one per quality layer, in the order the
        layers are written (increasing quality, hence strictly decreasing
        ratios). A final ratio of 0 or 1 means "all the remaining data", i.e.
        lossless with ``lossless=True``. At least 3 layers; with ``lossless``
        the last one must be 0 or 1.
    precinct : int
        Square precinct size (power of two, 2..32768) used at every resolution.
    codeblock : tuple of int
        Code-block ``(width, height)``: powers of two in 4..1024 with
        ``width * height <= 4096``.
    max_resolutions : int
        Upper bound on the number of resolution levels (1..32).
    smallest : int
        Add resolution levels until the smallest one is at most this many
        pixels across in both directions (bounded by ``max_resolutions``).
    threads : int
        OpenJPEG's own encoder threads per frame (``opj_codec_set_threads``).
    """

    lossless: bool = True
    layer_rates: tuple[float, ...] = attrs.field(
        default=(80.0, 40.0, 20.0, 10.0, 1.0), converter=_to_rates
    )
    precinct: int = 128
    codeblock: tuple[int, int] = attrs.field(default=(64, 64), converter=_to_codeblock)
    max_resolutions: int = 8
    smallest: int = 64
    threads: int = 1

    def __attrs_post_init__(self) -> None:
        self._check_rates()
        if not (_is_power_of_two(self.precinct) and 2 <= self.precinct <= 32768):
            # PPx/PPy are 4-bit exponents and must be >= 1 above resolution 0.
            raise ValueError(f"precinct must be a power of two in 2..32768, got {self.precinct}")
        cbw, cbh = self.codeblock
        if not all(_is_power_of_two(v) and 4 <= v <= 1024 for v in (cbw, cbh)) or cbw * cbh > 4096:
            raise ValueError(
                "codeblock sides must be powers of two in 4..1024 with an area of at most "
                f"4096, got {self.codeblock}"
            )
        if not 1 <= self.max_resolutions <= OPENJPEG_MAX_RESOLUTIONS:
            raise ValueError(
                f"max_resolutions must be in 1..{OPENJPEG_MAX_RESOLUTIONS}, "
                f"got {self.max_resolutions}"
            )
        if self.smallest < 1:
            raise ValueError(f"smallest must be at least 1, got {self.smallest}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

    def _check_rates(self) -> None:
        rates = self.layer_rates
        if len(rates) < 3:
            raise ValueError(f"at least 3 quality layers are needed, got {len(rates)}")
        if len(rates) > _OPENJPEG_MAX_LAYERS:
            raise ValueError(f"at most {_OPENJPEG_MAX_LAYERS} quality layers, got {len(rates)}")
        if any(not math.isfinite(r) for r in rates):
            raise ValueError(f"layer rates must be finite, got {rates}")
        *lossy, last = rates
        # OpenJPEG reads any ratio <= 1 as "lossless", so only the last layer may
        # use it; an earlier one would swallow every following layer.
        if any(r <= 1.0 for r in lossy):
            raise ValueError(f"only the last layer rate may be 0 or 1, got {rates}")
        if any(b >= a for a, b in zip(lossy, lossy[1:])):
            raise ValueError(f"layer rates must be strictly decreasing, got {rates}")
        last_is_lossless = last in (0.0, 1.0)
        if self.lossless and not last_is_lossless:
            raise ValueError(f"with lossless=True the last layer rate must be 0 or 1, got {last}")
        if not last_is_lossless and not 1.0 < last < lossy[-1]:
            raise ValueError(
                f"the last layer rate must be 0, 1 or a ratio below {lossy[-1]}, got {last}"
            )

    @property
    def last_layer_lossless(self) -> bool:
        """Whether the final layer carries every coding pass (rate 0 or 1)."""
        return self.layer_rates[-1] in (0.0, 1.0)


def resolutions_for(width: int, height: int, params: EncodeParams) -> int:
    """Number of resolution levels (decomposition levels + 1) for an image.

    Parameters
    ----------
    width, height : int
        Image size in pixels (both at least 1).
    params : EncodeParams
        Supplies ``smallest`` and ``max_resolutions``.

    Returns
    -------
    int
        The smallest ``n`` such that ``ceil(size / 2**(n - 1)) <= smallest``
        for both sides, capped at ``params.max_resolutions`` and at what
        OpenJPEG accepts for a single tile of this size
        (``2**(n - 1) <= min(width, height)``, ``n <= 32``); at least 1.

    Raises
    ------
    ValueError
        If a side is smaller than 1.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    # OpenJPEG refuses a tile narrower than 2**(numres - 1) in either direction.
    library_cap = min(min(width, height).bit_length(), OPENJPEG_MAX_RESOLUTIONS)
    cap = min(params.max_resolutions, library_cap)
    numres = 1
    largest = max(width, height)
    while numres < cap and -(-largest // (1 << (numres - 1))) > params.smallest:
        numres += 1
    return numres
