"""Split audio longer than the encoder's limit at its quietest points (pure: numpy in, sample ranges out).

Each cut falls in the last ``search_s`` seconds before a piece would exceed ``max_piece_samples``, at
the centre of the ``ENERGY_FRAME_S`` frame with the least energy there (earliest on ties), so words are
rarely cut and every piece but the last is at least ``max_piece - search`` long.
"""

from __future__ import annotations

import numpy as np

# Energy is measured over 20 ms frames every 10 ms (the log-mel framing).
ENERGY_FRAME_S = 0.020
ENERGY_HOP_S = 0.010


def quietest_point(samples: np.ndarray, lo: int, hi: int, rate_hz: int) -> int:
    """Sample index in ``[lo, hi]`` at the centre of the lowest-energy frame of ``samples[lo:hi]``.

    Args:
        samples: mono float32 ``[n]``.
        lo, hi: the search range, ``0 <= lo < hi <= n``.
    """
    frame = max(1, round(ENERGY_FRAME_S * rate_hz))
    hop = max(1, round(ENERGY_HOP_S * rate_hz))
    if hi - lo <= frame:
        return (lo + hi) // 2
    sq = np.concatenate([[0.0], np.cumsum(samples[lo:hi].astype(np.float64) ** 2)])
    starts = np.arange(0, hi - lo - frame + 1, hop)
    energy = sq[starts + frame] - sq[starts]
    return lo + int(starts[int(np.argmin(energy))]) + frame // 2


def split_points(
    samples: np.ndarray, rate_hz: int, max_piece_samples: int, search_s: float, *, min_piece_samples: int = 1
) -> list[tuple[int, int]]:
    """Cut ``samples`` into pieces of at most ``max_piece_samples``.

    The search window ends early enough that the next piece keeps at least ``min_piece_samples``
    (so a clip just over the limit does not leave a sliver too short to encode).

    Returns:
        ``[(start, end), ...]`` sample ranges covering ``[0, len(samples))`` in order, each
        ``1 <= end - start <= max_piece_samples``; a single range when the clip already fits.

    Raises:
        ValueError: ``max_piece_samples < 1``, ``search_s`` not in ``(0, max_piece_samples / rate_hz]``,
            or ``min_piece_samples`` not in ``[1, max_piece_samples / 2]``.
    """
    if max_piece_samples < 1:
        raise ValueError(f"max_piece_samples must be >= 1, got {max_piece_samples}")
    search = round(search_s * rate_hz)
    if not 0 < search <= max_piece_samples:
        raise ValueError(f"search_s={search_s} must be in (0, {max_piece_samples / rate_hz}] seconds")
    if not 1 <= min_piece_samples <= max_piece_samples // 2:
        raise ValueError(f"min_piece_samples={min_piece_samples} must be in [1, {max_piece_samples // 2}]")
    num_samples = int(samples.shape[0])
    pieces: list[tuple[int, int]] = []
    start = 0
    while num_samples - start > max_piece_samples:
        hi = min(start + max_piece_samples, num_samples - min_piece_samples)
        lo = max(start + min_piece_samples, hi - search)
        cut = quietest_point(samples, lo, hi, rate_hz) if lo < hi else hi
        cut = min(max(cut, start + 1), hi)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, num_samples))
    return pieces
