"""Integer operators for transformer-era entropy models (TCM now; DCAE and LALIC reuse them).

Every operator maps int64 arrays to int64 arrays with integer arithmetic only (or float64 GEMMs under the
2**53 bound, exact as in `intnet`), so encoder and decoder compute the same values on every machine. Real
values are `integer * scale`; each operator states its scales, its rounding rule and the bound that keeps
int64 from overflowing (checked, ValueError otherwise). The math, rounding and bounds are also in
docs/entropy.md ("Integer operators").

- `round_shift`, `round_div`, `requantize`: rounding half up (toward +inf) by a power of two or an integer.
- `isqrt`: floor(sqrt(n)), exact for 0 <= n < 2**62.
- `IntLayerNorm`: normalisation over channels with an integer mean, variance and square root.
- `Lut`: any scalar function (GELU, sigmoid, tanh, exp) as a table over the integer input, built at export in
  float64 and stored, so no libm ever runs at decode time.
- `softmax`: max-subtracted, table exponent, masked entries exactly 0, integer normalisation.
- `matmul`: activation-by-activation products (Q K^T, P V), exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 2**53  # float64 GEMMs are exact while every |partial sum| stays below this
INT64_SAFE = 2**62  # bound kept on intermediate int64 values (room for a rounding term and a sign)


def _check_int64(name: str, x: np.ndarray) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.int64:
        raise ValueError(f"{name} must be an int64 array")


def round_shift(x: np.ndarray, shift: int | np.ndarray) -> np.ndarray:
    """floor((x + 2**(shift-1)) / 2**shift): x / 2**shift rounded half up; x itself where shift == 0.
    Needs |x| + 2**(shift-1) < 2**63 (callers keep |x| < 2**62) and 0 <= shift <= 62."""
    shift = np.asarray(shift, dtype=np.int64)
    half = np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), 0)
    return (x + half) >> shift


def round_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b rounded half up, for b > 0: floor((2a + b) / (2b)) (numpy's // floors). Needs |2a| + b < 2**63."""
    return (2 * a + b) // (2 * b)


def requantize(acc: np.ndarray, mult: np.ndarray | int, shift: np.ndarray | int, lo: int, hi: int) -> np.ndarray:
    """clip(round_shift(acc * mult, shift), lo, hi): a fixed-point rescale by mult / 2**shift. The caller
    guarantees |acc * mult| < 2**62 (checked by the layer that owns the multiplier)."""
    return np.clip(round_shift(acc * np.asarray(mult, dtype=np.int64), shift), lo, hi)


def isqrt(n: np.ndarray) -> np.ndarray:
    """floor(sqrt(n)) for int64 0 <= n < 2**62, exact: a float64 estimate (IEEE sqrt is correctly rounded, but
    n itself may round on conversion) corrected by integer comparisons until r*r <= n < (r+1)**2."""
    _check_int64("n", n)
    if n.size and (n.min() < 0 or n.max() >= INT64_SAFE):
        raise ValueError("isqrt needs 0 <= n < 2**62")
    r = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int64)
    for _ in range(2):  # the estimate is within one of the answer; two passes each way leave margin
        r = np.where(r * r > n, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


@dataclass(frozen=True)
class IntLayerNorm:
    """LayerNorm over axis 0 of an int64 [C, T] input (T tokens), without its affine part (fold gamma and beta
    into the next linear layer at export: W' = W diag(gamma), b' = b + W beta).

    With s = sum_c x, q = sum_c x**2 (exact) and D = C*q - s**2 = C**2 var (in input units squared), the output
    is y = (C x - s) / sqrt(D + C**2 eps) in fixed point with `out_frac` fractional bits:
        r = isqrt((D + eps_int) * 4**k),  out = round_div((C x - s) * 2**(out_frac + k), r)
    where eps_int = round(C**2 eps / s_x**2) (eps in real units, s_x the input scale) and k >= 0 per token is
    the largest with (D + eps_int) * 4**k < 2**62, so r carries at least 30 significant bits. |out| <=
    sqrt(C) * 2**out_frac + 1 (|C x - s| <= sqrt(C D)). Bounds (checked): C**2 * in_max**2 < 2**61, and the
    numerator |C x - s| * 2**(out_frac + k) <= sqrt(C) * 2**out_frac * r < 2**62.
    """

    channels: int
    eps_int: int
    out_frac: int
    in_max: int

    def __post_init__(self) -> None:
        c, m = self.channels, self.in_max
        if c < 1 or m < 0 or self.eps_int < 0 or not 0 <= self.out_frac <= 24:
            raise ValueError("need channels >= 1, in_max >= 0, eps_int >= 0, 0 <= out_frac <= 24")
        if c * c * m * m >= 2**61:
            raise ValueError(f"C**2 in_max**2 = {c * c * m * m} >= 2**61")
        if (int(np.sqrt(c)) + 1) * 2**self.out_frac * 2**31 >= INT64_SAFE:
            raise ValueError("sqrt(C) * 2**out_frac * 2**31 must stay below 2**62")

    @property
    def bound(self) -> int:
        """Largest |output|."""
        return (int(np.sqrt(self.channels)) + 1) * 2**self.out_frac + 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        _check_int64("x", x)
        if x.ndim != 2 or x.shape[0] != self.channels:
            raise ValueError(f"input must be [{self.channels}, T]")
        if x.size and np.abs(x).max() > self.in_max:
            raise ValueError(f"input values must lie in [-{self.in_max}, {self.in_max}]")
        c = self.channels
        s = x.sum(axis=0)
        d_total = c * (x * x).sum(axis=0) - s * s + self.eps_int  # >= 0 (Cauchy-Schwarz), < 2**61
        k = np.maximum((61 - _bit_length(d_total)) // 2, 0)
        r = np.maximum(isqrt(d_total << (2 * k)), 1)
        return round_div((c * x - s) << (self.out_frac + k), r)


def _bit_length(n: np.ndarray) -> np.ndarray:
    """Bit length of each non-negative int64 (0 for 0), exactly: float64's exponent, corrected by a shift test."""
    b = np.where(n > 0, np.frexp(n.astype(np.float64))[1], 0).astype(np.int64)
    return np.where((b > 0) & ((n >> np.maximum(b - 1, 0)) == 0), b - 1, b)  # conversion may round n up


@dataclass(frozen=True, eq=False)
class Lut:
    """A scalar function as a table: out = table[clip((x >> in_shift) - index_min, 0, len - 1)].

    Built at export by `build_lut` in float64 and stored, so decoding runs no libm: the value at index i is
    round(f((index_min + i) * 2**in_shift * in_scale) / out_scale) (rounded half up), i.e. f sampled at the
    integers whose low `in_shift` bits are zero; inputs beyond the table's ends read its end entries (f is
    flat there for GELU's negative side, sigmoid, tanh and exp of very negative numbers).
    """

    table: np.ndarray
    index_min: int
    in_shift: int = 0

    def __post_init__(self) -> None:
        _check_int64("table", self.table)
        if self.table.ndim != 1 or not self.table.size or not 0 <= self.in_shift <= 30:
            raise ValueError("a LUT needs a non-empty 1-D table and 0 <= in_shift <= 30")
        table = self.table.copy()
        table.flags.writeable = False
        object.__setattr__(self, "table", table)

    @property
    def bound(self) -> int:
        return int(np.abs(self.table).max())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        _check_int64("x", x)
        idx = np.clip((x >> self.in_shift) - self.index_min, 0, self.table.size - 1)
        return self.table[idx]


def build_lut(fn: Callable[[np.ndarray], np.ndarray], in_scale: float, out_scale: float, in_min: int, in_max: int,
              in_shift: int = 0) -> Lut:
    """The `Lut` of fn for integer inputs in [in_min, in_max] of scale in_scale, outputs of scale out_scale."""
    lo, hi = in_min >> in_shift, in_max >> in_shift
    xs = np.arange(lo, hi + 1, dtype=np.float64) * (2**in_shift * in_scale)
    return Lut(np.floor(fn(xs) / out_scale + 0.5).astype(np.int64), lo, in_shift)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU(x) = x Phi(x) in float64 (erf form, as torch.nn.GELU()); for building tables only."""
    import math

    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) in float64; for building tables only."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True, eq=False)
class IntSoftmax:
    """Softmax over the last axis of integer logits z (scale `logit_scale`), probabilities with `out_frac`
    fractional bits.

    t = max(z) - z >= 0 over the unmasked entries; e = exp_table[min(t >> in_shift, len - 1)] with
    exp_table[i] = round(2**exp_frac * exp(-i * 2**in_shift * logit_scale)) (the last entry 0); masked entries
    get e = 0 exactly; p = round_div(e * 2**out_frac, sum e). The row's maximum has e = 2**exp_frac, so the
    sum is positive whenever one entry is unmasked. Bounds: T * 2**exp_frac * 2**out_frac < 2**62 (checked
    per call for T tokens).
    """

    exp_lut: Lut
    exp_frac: int
    out_frac: int

    def __call__(self, z: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        _check_int64("z", z)
        t_len = z.shape[-1]
        if t_len * 2**self.exp_frac * 2**self.out_frac >= INT64_SAFE:
            raise ValueError("softmax row too long for its fixed-point widths")
        keep = np.ones(z.shape, dtype=bool) if mask is None else ~np.broadcast_to(mask, z.shape)
        if not keep.any(axis=-1).all():
            raise ValueError("every softmax row needs an unmasked entry")
        zmax = np.where(keep, z, np.iinfo(np.int64).min).max(axis=-1, keepdims=True)
        e = np.where(keep, self.exp_lut(np.where(keep, zmax - z, 0)), 0)
        return round_div(e << self.out_frac, e.sum(axis=-1, keepdims=True))


def build_softmax(logit_scale: float, exp_frac: int = 16, out_frac: int = 15, max_entries: int = 4096) -> IntSoftmax:
    """An IntSoftmax for logits of scale `logit_scale`: the table covers exponents down to where
    round(2**exp_frac e^-u) is 0, sampled at most `max_entries` times (in_shift chosen so)."""
    u_max = (exp_frac + 1) * np.log(2.0)  # e^-u_max * 2**exp_frac < 1/2: rounds to 0
    span = int(np.ceil(u_max / logit_scale))  # integer logit differences that matter
    in_shift = max(0, int(np.ceil(np.log2(max(span / max_entries, 1.0)))))
    lut = build_lut(lambda u: 2.0**exp_frac * np.exp(-u), logit_scale, 1.0, 0, span + 2**in_shift, in_shift)
    table = lut.table.copy()
    table[-1] = 0
    return IntSoftmax(Lut(table, lut.index_min, in_shift), exp_frac, out_frac)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int64 a @ b (batched over leading axes) through float64 GEMMs: ValueError unless
    max|a| * max|b| * K < 2**53 (every partial sum then exact)."""
    _check_int64("a", a)
    _check_int64("b", b)
    k = a.shape[-1]
    bound = int(np.abs(a).max(initial=0)) * int(np.abs(b).max(initial=0)) * k
    if bound >= EXACT_LIMIT:
        raise ValueError(f"|a| |b| K = {bound} >= 2**53: not exact in float64")
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
