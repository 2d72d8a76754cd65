"""BD-rate by the `bjontegaard` package (VCEG method). pchip interpolation unless stated otherwise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bd_rate(rate_anchor: Sequence[float], psnr_anchor: Sequence[float], rate_test: Sequence[float],
            psnr_test: Sequence[float], method: str = "pchip") -> float:
    """Average bit-rate difference of test against anchor at equal PSNR, in percent (negative = test saves).

    Points are sorted by rate; both curves need at least 4 points (the VCEG method's cubic fit).
    """
    import bjontegaard

    if min(len(rate_anchor), len(rate_test)) < 4:
        raise ValueError("BD-rate needs at least four rate-distortion points per curve")
    ra, pa = _sorted(rate_anchor, psnr_anchor)
    rt, pt = _sorted(rate_test, psnr_test)
    return float(bjontegaard.bd_rate(ra, pa, rt, pt, method=method, require_matching_points=False))


def try_bd_rate(rate_anchor: Sequence[float], psnr_anchor: Sequence[float], rate_test: Sequence[float],
                psnr_test: Sequence[float]) -> tuple[float | None, str]:
    """(BD-rate in percent, its text), or (None, why it is undefined): too few points, PSNR not increasing
    with rate on either curve (an RD curve of under-trained models), or ranges that do not meet."""
    for rate, psnr in ((rate_anchor, psnr_anchor), (rate_test, psnr_test)):
        r, p = _sorted(rate, psnr)
        if len(r) >= 2 and (np.any(np.diff(r) <= 0) or np.any(np.diff(p) <= 0)):
            return None, "n/a (PSNR does not increase with rate on every curve)"
    try:
        value = bd_rate(rate_anchor, psnr_anchor, rate_test, psnr_test)
    except (ValueError, AssertionError) as exc:
        return None, f"n/a ({exc})"
    return (value, f"{value:+.3f} %") if np.isfinite(value) else (None, "n/a (the PSNR ranges do not meet)")


def _sorted(rate: Sequence[float], psnr: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(np.asarray(rate, dtype=np.float64))
    return np.asarray(rate, dtype=np.float64)[order], np.asarray(psnr, dtype=np.float64)[order]
