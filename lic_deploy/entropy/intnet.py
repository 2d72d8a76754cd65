"""Integer hyper-synthesis network, evaluated bit-exactly with numpy (no torch).

Encoder and decoder must derive identical entropy parameters on every machine, so h_s is run as an
integer network: int8 weights, int64 accumulators and per-channel fixed-point requantization. The
convolutions use float64 GEMMs (numpy has no integer BLAS; float32 where a layer's bound allows) under a
construction-time bound that makes every partial sum an exactly representable integer, so the result does
not depend on the BLAS, the summation order or the thread count.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lic_deploy.errors import PackageError

EXACT_LIMIT = 2**53  # |integers| below this are exact in float64, and so are sums of them that stay below it
EXACT_LIMIT_F32 = 2**24  # the same for float32: layers whose sums stay below it run their GEMMs in float32
PRODUCT_LIMIT = 2**62  # bound on |acc * multiplier|; adding the rounding term 2**(shift-1) keeps it < 2**63
MAX_SHIFT = 62
CHUNK_BYTES = 16 * 2**20  # float64 working set per row chunk; peak extra memory stays a few times this
KINDS = ("conv", "deconv")
FORMAT = "lic-intnet"
VERSION = 1


def _frozen_copy(a: np.ndarray) -> np.ndarray:
    out = np.array(a, copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class IntLayer:
    """One integer conv or transposed conv with a fused activation and requantization.

    `weight` is int8 in torch layout (conv [O, I, kh, kw], deconv [I, O, kh, kw]); `bias` is int64 [O] in
    accumulator units (input scale * weight scale of channel o). With `acc = conv(a, weight) + bias`
    (exact) and `m = mult[o] if acc >= 0 else mult_neg[o]`, the output is

        out = clip(floor((acc * m + 2**(shift[o] - 1)) / 2**shift[o]), out_min, out_max)

    i.e. rounding half up (toward +inf), computed in int64 with an arithmetic right shift. The activation
    lives in `mult_neg`: ReLU -> 0, none -> mult, LeakyReLU(slope) -> round(mult * slope).

    `in_max` bounds |input|. Construction checks, per output channel o, with
    A_o = in_max * sum|w_o| + |bias_o|:  A_o < 2**53 (exact float64 GEMM) and
    A_o * max(|mult_o|, |mult_neg_o|) < 2**62 (no int64 overflow); ValueError otherwise.
    Arrays are copied and made read-only, so the checked invariants hold for the layer's lifetime.
    """

    kind: str
    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int
    output_padding: int
    mult: np.ndarray
    mult_neg: np.ndarray
    shift: np.ndarray
    out_min: int
    out_max: int
    in_max: int
    _wmat: np.ndarray = field(init=False, repr=False)
    _dtype: type = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        w = self.weight
        if not isinstance(w, np.ndarray) or w.dtype != np.int8 or w.ndim != 4 or 0 in w.shape:
            raise ValueError("weight must be a non-empty 4-D int8 array")
        n_out = self.out_channels
        for name in ("bias", "mult", "mult_neg", "shift"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.shape != (n_out,):
                raise ValueError(f"{name} must be an int64 array of shape ({n_out},)")
            object.__setattr__(self, name, _frozen_copy(a))
        object.__setattr__(self, "weight", _frozen_copy(w))
        for name in ("stride", "padding", "output_padding", "out_min", "out_max", "in_max"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name} must be an int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.stride < 1 or self.padding < 0 or self.in_max < 0:
            raise ValueError("need stride >= 1, padding >= 0 and in_max >= 0")
        op_max = self.stride - 1 if self.kind == "deconv" else 0
        if not 0 <= self.output_padding <= op_max:
            raise ValueError(f"output_padding must be in [0, {op_max}] for a {self.kind} layer")
        if not -(2**63) <= self.out_min <= self.out_max < 2**63:
            raise ValueError("need out_min <= out_max within int64")
        if self.shift.min() < 1 or self.shift.max() > MAX_SHIFT:
            raise ValueError(f"shift must be in [1, {MAX_SHIFT}]")
        if (self.mult < 0).any():
            raise ValueError("mult must be >= 0 (the output scale is positive)")

        # Per-channel bounds, in Python ints so the check itself cannot overflow.
        w_abs = np.abs(w.astype(np.int64))
        w_sum = w_abs.sum(axis=(1, 2, 3)) if self.kind == "conv" else w_abs.sum(axis=(0, 2, 3))
        for o in range(n_out):
            acc_max = self.in_max * int(w_sum[o]) + abs(int(self.bias[o]))
            if acc_max >= EXACT_LIMIT:
                raise ValueError(
                    f"channel {o}: in_max * sum|w| + |bias| = {acc_max} >= 2**53, float64 GEMM not exact"
                )
            m_max = max(int(self.mult[o]), abs(int(self.mult_neg[o])))
            if acc_max * m_max >= PRODUCT_LIMIT:
                raise ValueError(f"channel {o}: |acc| * multiplier may reach {acc_max * m_max} >= 2**62")

        # float32 GEMMs (about twice float64's speed) where every partial sum, bias excluded (it is added in int64),
        # stays below 2**24: in_max * max_o sum|w_o| < 2**24, e.g. int8 activations (`--entropy-bits 8`).
        dtype = np.float32 if self.in_max * int(w_sum.max()) < EXACT_LIMIT_F32 else np.float64
        object.__setattr__(self, "_dtype", dtype)
        kh, kw = self.kernel
        if self.kind == "conv":  # [kh*kw*I, O]: rows in the (ky, kx, channel) order of the im2col columns
            wmat = w.astype(dtype).transpose(2, 3, 1, 0).reshape(kh * kw * self.in_channels, n_out).copy()
        else:  # [I, kh*kw*O]: O innermost, so the overlap-add below works on contiguous rows
            wmat = w.astype(dtype).transpose(0, 2, 3, 1).reshape(self.in_channels, kh * kw * n_out)
        wmat.flags.writeable = False
        object.__setattr__(self, "_wmat", wmat)

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1] if self.kind == "conv" else self.weight.shape[0])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0] if self.kind == "conv" else self.weight.shape[1])

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def bound(self) -> int:
        """Largest |output| value (from the clip range); the next layer's in_max must cover it."""
        return max(abs(self.out_min), abs(self.out_max))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Output spatial size for an h x w input, as torch computes it (may be <= 0 when invalid)."""
        (kh, kw), s, p = self.kernel, self.stride, self.padding
        if self.kind == "conv":
            return (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
        op = self.output_padding
        return (h - 1) * s - 2 * p + kh + op, (w - 1) * s - 2 * p + kw + op

    def accumulate(self, a: np.ndarray) -> np.ndarray:
        """Exact int64 accumulator conv(a, weight) + bias, [O, H', W'] for an int64 input [I, H, W]."""
        acc = self._conv(a) if self.kind == "conv" else self._deconv(a)
        acc += self.bias[:, None, None]
        return acc

    def __call__(self, a: np.ndarray) -> np.ndarray:
        """Output int64 [O, H', W'] in [out_min, out_max] for int64 [I, H, W]; |a| <= in_max is the caller's
        duty (IntNet checks its input, and each clip range is covered by the next layer's in_max)."""
        return self.requantize(self.accumulate(a))

    def requantize(self, acc: np.ndarray) -> np.ndarray:
        """Activation, fixed-point rescale (round half up) and clip of int64 [O, H, W], in place."""
        step = max(1, CHUNK_BYTES // (8 * acc[0].size))  # channels per pass: bounded temporaries
        for o0 in range(0, acc.shape[0], step):
            a, sl = acc[o0 : o0 + step], slice(o0, o0 + step)
            shift = self.shift[sl, None, None]
            t = np.where(a >= 0, self.mult[sl, None, None], self.mult_neg[sl, None, None])
            t *= a
            t += np.int64(1) << (shift - 1)
            t >>= shift
            np.clip(t, self.out_min, self.out_max, out=a)
        return acc

    def _conv(self, a: np.ndarray) -> np.ndarray:
        n_in, h, w = a.shape
        (kh, kw), s, p = self.kernel, self.stride, self.padding
        if (kh, kw, s, p) == (1, 1, 1, 0):  # pointwise: one GEMM over the pixels, no im2col (same exact sums)
            res = self._wmat.T @ a.reshape(n_in, h * w).astype(self._dtype)
            return np.rint(res).astype(np.int64).reshape(-1, h, w)
        ho, wo = self.output_size(h, w)
        fan_in = n_in * kh * kw
        acc = np.empty((self.out_channels, ho, wo), dtype=np.int64)
        rows = max(1, CHUNK_BYTES // (8 * wo * (fan_in + self.out_channels)))
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            top, bottom = r0 * s - p, (r1 - 1) * s - p + kh  # input rows [top, bottom) incl. padding
            slab = np.zeros((bottom - top, w + 2 * p, n_in), dtype=self._dtype)  # HWC: channels contiguous
            src0, src1 = max(top, 0), min(bottom, h)
            if src1 > src0:
                slab[src0 - top : src1 - top, p : p + w] = a[:, src0:src1].transpose(1, 2, 0)
            # im2col by kernel offset: each (ky, kx) copies whole channel vectors; columns in (ky, kx, c) order
            cols = np.empty((r1 - r0, wo, kh * kw, n_in), dtype=self._dtype)
            for ky in range(kh):
                for kx in range(kw):
                    cols[:, :, ky * kw + kx] = slab[ky : ky + (r1 - r0 - 1) * s + 1 : s, kx : kx + (wo - 1) * s + 1 : s]
            # Exact: |partial sums| <= in_max * max_o sum|w_o| < 2**53 (2**24 in float32; __post_init__).
            res = cols.reshape((r1 - r0) * wo, fan_in) @ self._wmat
            acc[:, r0:r1] = np.rint(res).astype(np.int64).T.reshape(-1, r1 - r0, wo)
        return acc

    def _deconv(self, a: np.ndarray) -> np.ndarray:
        n_in, h, w = a.shape
        (kh, kw), s, p = self.kernel, self.stride, self.padding
        n_out = self.out_channels
        ho, wo = self.output_size(h, w)
        extra = max(0, self.output_padding - p)  # output_padding rows/cols beyond the overlap-add extent
        # HWC, float64 (float32 under its bound): every partial overlap-add sum is a sum of some of one output's
        # terms, so its magnitude is within the same in_max * sum|w_o| bound and exact; rounded to int64 at the end.
        full = np.zeros(((h - 1) * s + kh + extra, (w - 1) * s + kw + extra, n_out), dtype=self._dtype)
        rows = max(1, CHUNK_BYTES // (8 * w * (n_in + n_out * kh * kw)))
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            x = a[:, r0:r1].reshape(n_in, -1).T.astype(self._dtype)
            # Exact: |partial sums| <= in_max * max_o sum|w_o| < 2**53 (2**24 in float32; __post_init__).
            res = (x @ self._wmat).reshape(r1 - r0, w, kh, kw, n_out)
            for ky in range(kh):
                ys = slice(r0 * s + ky, (r1 - 1) * s + ky + 1, s)
                for kx in range(kw):
                    full[ys, kx : (w - 1) * s + kx + 1 : s] += res[:, :, ky, kx]
        return np.rint(full[p : p + ho, p : p + wo].transpose(2, 0, 1)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class IntNet:
    """A chain of IntLayers. Input: int64 [C, H, W] with |x| <= in_max; output: int64 [O, H', W'].

    Invariants (ValueError at construction): channel counts chain, layers[0].in_max >= in_max and every
    later layer's in_max covers the previous layer's clip range, so each layer's exactness and overflow
    bounds hold for every admissible input.
    """

    layers: list[IntLayer]
    in_max: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", list(self.layers))
        if not self.layers or not all(isinstance(layer, IntLayer) for layer in self.layers):
            raise ValueError("an IntNet needs at least one IntLayer")
        if not isinstance(self.in_max, (int, np.integer)) or isinstance(self.in_max, bool) or self.in_max < 0:
            raise ValueError(f"in_max must be an int >= 0, got {self.in_max!r}")
        object.__setattr__(self, "in_max", int(self.in_max))
        bound, channels = self.in_max, self.layers[0].in_channels
        for i, layer in enumerate(self.layers):
            if layer.in_channels != channels:
                raise ValueError(f"layer {i} takes {layer.in_channels} channels, gets {channels}")
            if layer.in_max < bound:
                raise ValueError(f"layer {i}: in_max {layer.in_max} < largest possible input {bound}")
            bound, channels = layer.bound, layer.out_channels

    @property
    def in_channels(self) -> int:
        return self.layers[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.layers[-1].out_channels

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        for layer in self.layers:
            h, w = layer.output_size(h, w)
        return h, w

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run the net on int64 [C, H, W]; ValueError for a wrong dtype/shape or |x| > in_max."""
        self.check_input(x)
        a = x
        for layer in self.layers:
            a = layer(a)
        return a

    def check_input(self, x: np.ndarray) -> None:
        """ValueError unless x is int64 [C, H, W] with this net's C, large enough, and |x| <= in_max."""
        if not isinstance(x, np.ndarray) or x.dtype != np.int64 or x.ndim != 3:
            raise ValueError("input must be an int64 array [C, H, W]")
        if x.shape[0] != self.in_channels:
            raise ValueError(f"input has {x.shape[0]} channels, the net takes {self.in_channels}")
        h, w = x.shape[1:]
        if h < 1 or w < 1:
            raise ValueError(f"empty input of spatial size {h}x{w}")
        for layer in self.layers:
            h, w = layer.output_size(h, w)
            if h < 1 or w < 1:
                raise ValueError(f"input of size {x.shape[1:]} is too small for this net")
        if x.min() < -self.in_max or x.max() > self.in_max:
            raise ValueError(f"input values must lie in [-{self.in_max}, {self.in_max}]")

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays for an `.npz` (no pickles): `{prefix}meta` (JSON as uint8) and `{prefix}layer{i}.*`."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "in_max": self.in_max,
            "layers": [
                {k: getattr(layer, k) for k in ("stride", "padding", "output_padding", "out_min", "out_max")}
                | {"kind": layer.kind, "in_max": layer.in_max}
                for layer in self.layers
            ],
        }
        out = {f"{prefix}meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()}
        for i, layer in enumerate(self.layers):
            for name in ("weight", "bias", "mult", "mult_neg", "shift"):
                out[f"{prefix}layer{i}.{name}"] = np.array(getattr(layer, name))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> IntNet:
        """Inverse of `to_arrays`; PackageError when the stored data is missing or inconsistent."""
        meta = _read_meta(arrays, prefix)
        try:
            layers = []
            for i, spec in enumerate(meta["layers"]):
                arr = {
                    name: _read_array(arrays, f"{prefix}layer{i}.{name}", dtype)
                    for name, dtype in (
                        ("weight", np.int8),
                        ("bias", np.int64),
                        ("mult", np.int64),
                        ("mult_neg", np.int64),
                        ("shift", np.int64),
                    )
                }
                ints = {k: _meta_int(spec, k) for k in ("stride", "padding", "output_padding", "out_min")}
                ints |= {k: _meta_int(spec, k) for k in ("out_max", "in_max")}
                layers.append(IntLayer(kind=spec.get("kind"), **arr, **ints))
            return cls(layers, _meta_int(meta, "in_max"))
        except (ValueError, TypeError, AttributeError) as e:
            raise PackageError(f"integer network {prefix!r}: {e}") from e


class IntNetEvaluator:
    """Base of the other evaluators of one `IntNet` (ONNX Runtime, torch): they keep the net (`net`) and its
    shape, and must give its integers exactly."""

    net: IntNet

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def out_channels(self) -> int:
        return self.net.out_channels

    @property
    def layers(self) -> list[IntLayer]:
        return self.net.layers


def _read_meta(arrays: Mapping[str, np.ndarray], prefix: str) -> dict:
    raw = _read_array(arrays, f"{prefix}meta", np.uint8)
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"integer network {prefix!r}: metadata is not valid JSON") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("layers"), list):
        raise PackageError(f"integer network {prefix!r}: metadata is not a {FORMAT} description")
    if meta.get("version") != VERSION:
        raise PackageError(f"integer network {prefix!r}: unsupported version {meta.get('version')!r}")
    if not all(isinstance(spec, dict) for spec in meta["layers"]):
        raise PackageError(f"integer network {prefix!r}: malformed layer list")
    return meta


def _read_array(arrays: Mapping[str, np.ndarray], key: str, dtype: type) -> np.ndarray:
    try:
        a = arrays[key]
    except KeyError:
        raise PackageError(f"integer network: missing array {key!r}") from None
    except ValueError as e:  # e.g. an object array refused by allow_pickle=False
        raise PackageError(f"integer network: unreadable array {key!r}: {e}") from e
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        raise PackageError(f"integer network: array {key!r} must have dtype {np.dtype(dtype).name}")
    if dtype is np.uint8 and a.ndim != 1:
        raise PackageError(f"integer network: array {key!r} must be 1-D")
    return a


def _meta_int(d: dict, key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"metadata field {key!r} must be an int, got {v!r}")
    return v
