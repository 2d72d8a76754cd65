"""BD-rate by the `bjontegaard` package (VCEG method). pchip interpolation unless stated otherwise."""

from __future__ import annotations

import math
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
    """(BD-rate in percent, "") or (None, why it is undefined): fewer than four points, PSNR not rising with
    rate along a curve (pchip needs it; under-trained models give such curves), or PSNR ranges that do not
    meet (bjontegaard returns NaN). bjontegaard's warnings pass through to the caller."""
    if min(len(rate_anchor), len(rate_test)) < 4:
        return None, "fewer than four rate-distortion points per curve"
    try:
        value = bd_rate(rate_anchor, psnr_anchor, rate_test, psnr_test)
    except (ValueError, AssertionError):
        return None, "PSNR does not rise with rate along a curve"
    return (value, "") if math.isfinite(value) else (None, "the curves' PSNR ranges do not overlap")


def bd_text(value: float | None, why: str) -> str:
    """try_bd_rate's result for a report line: "+1.234 %" or "n/a (why)"."""
    return f"{value:+.3f} %" if value is not None else f"n/a ({why})"


def _sorted(rate: Sequence[float], psnr: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(np.asarray(rate, dtype=np.float64))
    return np.asarray(rate, dtype=np.float64)[order], np.asarray(psnr, dtype=np.float64)[order]
