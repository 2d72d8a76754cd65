"""Paired bootstrap confidence intervals over images.

Every figure of the robustness study (a PTQ loss, or SOAP's PTQ loss minus Adam's) is a function of per-image
values measured on one image set. Its uncertainty is estimated by resampling the images with replacement and
recomputing the figure; the 95 % interval is the 2.5th and 97.5th percentiles of the recomputed figures
(percentile bootstrap). The resampling is paired: one matrix of resampled image indices is drawn once and every
array of every model and variant is indexed with it, so that FP32 and INT8 of one model, and two models compared
with each other, always see the same images (their per-image differences, not their spreads, set the width).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

REPS = 2000  # resamples; percentile endpoints at 95 % move by about 0.1 standard errors between seeds
LEVEL = 0.95
MIN_VALID = 0.9  # a statistic undefined on more than 10 % of the resamples gets no interval


class PairedBootstrap:
    """A fixed set of `reps` resamples of `n` images (seeded), shared by every statistic computed with it."""

    def __init__(self, n: int, reps: int = REPS, seed: int = 0, level: float = LEVEL) -> None:
        if n < 2:
            raise ValueError("a bootstrap over images needs at least two images")
        self.n, self.reps, self.level = n, reps, level
        self.index = np.random.default_rng(seed).integers(0, n, size=(reps, n))  # [reps, n]

    def interval(self, stat: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float] | None:
        """(low, high) of `stat`, a function of an index matrix [reps, n] returning one value per resample
        (vectorised; NaN where undefined); None when fewer than `MIN_VALID` of the resamples are defined."""
        values = np.asarray(stat(self.index), dtype=np.float64)
        return self._percentiles(values)

    def interval_each(self, stat: Callable[[np.ndarray], float]) -> tuple[float, float] | None:
        """As `interval`, for a statistic of one index vector [n] (called once per resample)."""
        values = np.array([stat(row) for row in self.index], dtype=np.float64)
        return self._percentiles(values)

    def _percentiles(self, values: np.ndarray) -> tuple[float, float] | None:
        ok = values[np.isfinite(values)]
        if ok.size < MIN_VALID * self.reps:
            return None
        tail = 100 * (1 - self.level) / 2
        low, high = np.percentile(ok, [tail, 100 - tail])
        return float(low), float(high)


def mean_difference(test: np.ndarray, anchor: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Statistic: mean over images of test - anchor (for PSNR changes in dB)."""
    diff = np.asarray(test, np.float64) - np.asarray(anchor, np.float64)
    return lambda idx: diff[idx].mean(axis=-1)


def ratio_change_pct(test: np.ndarray, anchor: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Statistic: 100 (mean test / mean anchor - 1), the change of mean bpp in percent."""
    t, a = np.asarray(test, np.float64), np.asarray(anchor, np.float64)
    return lambda idx: 100.0 * (t[idx].mean(axis=-1) / a[idx].mean(axis=-1) - 1.0)


def rate_equivalent_pct(test: dict[str, np.ndarray], anchor: dict[str, np.ndarray], lmbda: float
                        ) -> Callable[[np.ndarray], np.ndarray]:
    """Statistic: the rate-equivalent loss of `test` against `anchor` at the models' training lambda, percent:
    100 ((R_t + lmbda D_t) - (R_a + lmbda D_a)) / R_a with R the mean bpp and D the mean MSE on 8-bit RGB (0..255).
    Training minimised R + lmbda D, so lmbda D_change is the rate a quality change is worth at that point: one
    number that weighs a PSNR change and a bpp change against each other (export's fallback targets the same)."""
    (rt, dt), (ra, da) = ((np.asarray(x["bpp"], np.float64), np.asarray(x["mse"], np.float64)) for x in (test, anchor))

    def stat(idx: np.ndarray) -> np.ndarray:
        r0 = ra[idx].mean(axis=-1)
        return 100.0 * ((rt[idx].mean(axis=-1) + lmbda * dt[idx].mean(axis=-1)) - (r0 + lmbda * da[idx].mean(axis=-1))
                        ) / r0

    return stat


def excludes_zero(ci: tuple[float, float] | None) -> bool:
    """True when the interval lies wholly on one side of zero (the difference is outside the noise)."""
    return ci is not None and (ci[0] > 0 or ci[1] < 0)
