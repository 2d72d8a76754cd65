"""Convert a float hyper-synthesis network (torch nn.Sequential) into an integer `IntNet`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lic_deploy.entropy.intnet import MAX_SHIFT, IntLayer, IntNet

WEIGHT_QMAX = 127  # symmetric int8 weights
MULT_BITS = 23  # multipliers lie in [2**22, 2**23)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

_Conv = nn.Conv2d | nn.ConvTranspose2d
_Act = nn.ReLU | nn.LeakyReLU


def build_intnet(
    net: nn.Sequential,
    calib_inputs: Sequence[torch.Tensor],
    *,
    in_frac_bits: int,
    in_max: int,
    act_bits: int,
    out_frac_bits: np.ndarray,
) -> IntNet:
    """Quantize `net` (Conv2d / ConvTranspose2d, each optionally followed by ReLU / LeakyReLU).

    Input of the integer net: x_int = round(x * 2**in_frac_bits) with |x_int| <= in_max. Weights: symmetric
    int8 per output channel. Intermediate activations: per-tensor scale max|a| / (2**(act_bits-1) - 1), with
    max|a| measured by running the float net on `calib_inputs` (each [1, C, H, W]), clipped to
    +-(2**(act_bits-1) - 1). Output channel o of the last layer has scale 2**-out_frac_bits[o], clipped to
    int32. ValueError for unsupported modules or when a scale ratio or bound cannot be represented.
    """
    n_in = _parse(net)[0][0].in_channels
    out = np.asarray(out_frac_bits)
    if not np.issubdtype(out.dtype, np.integer):
        raise ValueError("out_frac_bits must be an integer array")
    return build_scaled_intnet(net, calib_inputs, in_scale=np.full(n_in, 2.0**-in_frac_bits), in_max=in_max,
                               act_bits=act_bits, out_scale=np.exp2(-out.astype(np.float64)))[0]


def build_scaled_intnet(
    net: nn.Sequential,
    calib_inputs: Sequence[torch.Tensor],
    *,
    in_scale: np.ndarray,
    in_max: int,
    act_bits: int,
    out_scale: np.ndarray | None,
) -> tuple[IntNet, float]:
    """`build_intnet` with a scale per input channel and, optionally, a calibrated output.

    Input channel c of the integer net means x_int[c] * in_scale[c] (a concatenation of tensors quantized with
    different scales); the scales are folded into the first layer's float weights before they are quantized.
    `out_scale` gives the last layer's scale per output channel (outputs clipped to int32); None makes the
    output an activation like the intermediate ones (per-tensor calibrated scale, clipped to +-(2**(act_bits-1)
    - 1)). Returns (net, the output's per-tensor scale, or 0.0 when `out_scale` was given).
    """
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    stages = _parse(net)
    act_amax = _calibrate(stages, calib_inputs)
    qmax = 2 ** (act_bits - 1) - 1
    n_first, n_last = stages[0][0].in_channels, stages[-1][0].out_channels
    fold = np.asarray(in_scale, dtype=np.float64)
    if fold.shape != (n_first,) or not (np.isfinite(fold) & (fold > 0)).all():
        raise ValueError(f"in_scale must hold {n_first} positive scales")
    if out_scale is not None and np.shape(out_scale) != (n_last,):
        raise ValueError(f"out_scale must have shape ({n_last},)")

    s_in, layer_in_max, feature_scale = 1.0, in_max, 0.0  # the first layer's input scale is folded in
    layers = []
    for i, (conv, act) in enumerate(stages):
        last = i == len(stages) - 1
        if last and out_scale is not None:
            s_out = np.asarray(out_scale, dtype=np.float64)
            out_min, out_max = INT32_MIN, INT32_MAX
        else:
            s_out = np.full(conv.out_channels, (act_amax[i] if act_amax[i] > 0 else 1.0) / qmax)
            out_min, out_max = -qmax, qmax
            feature_scale = float(s_out[0])
        weight, s_w = _quantize_weight(conv, fold if i == 0 else None)
        bias = _quantize_bias(conv, s_in * s_w)
        mult, shift = _multipliers(s_in * s_w / s_out)
        layers.append(
            IntLayer(
                kind="conv" if isinstance(conv, nn.Conv2d) else "deconv",
                weight=weight,
                bias=bias,
                stride=conv.stride[0],
                padding=conv.padding[0],
                output_padding=conv.output_padding[0] if isinstance(conv, nn.ConvTranspose2d) else 0,
                mult=mult,
                mult_neg=_mult_neg(mult, act),
                shift=shift,
                out_min=out_min,
                out_max=out_max,
                in_max=layer_in_max,
            )
        )
        s_in, layer_in_max = float(s_out[0]), qmax
    return IntNet(layers, in_max), (0.0 if out_scale is not None else feature_scale)


def _parse(net: nn.Sequential) -> list[tuple[_Conv, _Act | None]]:
    """Group the modules into (conv, optional activation) stages; ValueError for anything unsupported."""
    stages: list[tuple[_Conv, _Act | None]] = []
    for name, module in net.named_children():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            _check_conv(name, module)
            stages.append((module, None))
        elif isinstance(module, (nn.ReLU, nn.LeakyReLU)):
            if not stages or stages[-1][1] is not None:
                raise ValueError(f"module {name} ({module}): an activation must directly follow a conv")
            stages[-1] = (stages[-1][0], module)
        else:
            raise ValueError(f"module {name} ({module}): unsupported (Conv2d/ConvTranspose2d/ReLU/LeakyReLU)")
    if not stages:
        raise ValueError("the network has no convolution")
    return stages


def _check_conv(name: str, conv: _Conv) -> None:
    square = all(
        isinstance(v, tuple) and len(v) == 2 and v[0] == v[1]
        for v in (conv.stride, conv.padding, conv.dilation, getattr(conv, "output_padding", (0, 0)))
    )
    if not square or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(
            f"module {name} ({conv}): need groups=1, dilation=1, zero padding and square stride/padding"
        )


@torch.no_grad()
def _calibrate(stages: list[tuple[_Conv, _Act | None]], calib_inputs: Sequence[torch.Tensor]) -> list[float]:
    """max|a| of each stage's output over the calibration inputs (float torch net)."""
    if len(calib_inputs) == 0:
        raise ValueError("calib_inputs is empty")
    amax = [0.0] * len(stages)
    for x in calib_inputs:
        if x.ndim != 4:
            raise ValueError(f"calibration inputs must be [1, C, H, W], got shape {tuple(x.shape)}")
        a = x.to(stages[0][0].weight)  # the float net's dtype and device
        for i, (conv, act) in enumerate(stages):
            a = conv(a)
            if act is not None:
                a = act(a)
            amax[i] = max(amax[i], float(a.abs().max()))
    return amax


def _quantize_weight(conv: _Conv, in_scale: np.ndarray | None = None, min_scale: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """int8 weight (torch layout) and per-output-channel scale s_w = max|w_o| / 127 (1 for zero channels, at
    least `min_scale` when given), of the weight times `in_scale` per input channel when given."""
    w = conv.weight.detach().cpu().double().numpy()
    out_axis = 0 if isinstance(conv, nn.Conv2d) else 1
    if in_scale is not None:
        shape = [1, 1, 1, 1]
        shape[1 - out_axis] = -1
        w = w * in_scale.reshape(shape)
    other = tuple(d for d in range(4) if d != out_axis)
    amax = np.abs(w).max(axis=other)
    s_w = np.where(amax > 0, amax / WEIGHT_QMAX, 1.0)
    if min_scale is not None:
        s_w = np.maximum(s_w, min_scale)
    shape = [1, 1, 1, 1]
    shape[out_axis] = -1
    q = np.clip(np.rint(w / s_w.reshape(shape)), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    return q, s_w


def _quantize_bias(conv: _Conv, s_acc: np.ndarray) -> np.ndarray:
    """Bias in accumulator units, round(b / (s_in * s_w[o])), as int64."""
    if conv.bias is None:
        return np.zeros(len(s_acc), dtype=np.int64)
    q = np.rint(conv.bias.detach().cpu().double().numpy() / s_acc)
    if not np.isfinite(q).all() or np.abs(q).max() >= 2.0**53:
        raise ValueError(f"bias of {conv} does not fit the accumulator (input scale too small)")
    return q.astype(np.int64)


def _multipliers(ratio: np.ndarray, bits: int = MULT_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: shift and mult = round(ratio * 2**shift) in [2**(bits-1), 2**bits); ratio 0 -> mult 0."""
    mult = np.zeros(len(ratio), dtype=np.int64)
    shift = np.full(len(ratio), bits, dtype=np.int64)
    for o, r in enumerate(ratio.tolist()):
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"channel {o}: invalid scale ratio {r}")
        if r == 0:
            continue
        frac, exp = math.frexp(r)  # r = frac * 2**exp, frac in [0.5, 1)
        m, s = round(frac * 2**bits), bits - exp
        if m == 2**bits:  # rounding reached the top of the range
            m, s = m // 2, s - 1
        if not 1 <= s <= MAX_SHIFT:
            raise ValueError(f"channel {o}: scale ratio {r:.3g} needs shift {s}, outside [1, {MAX_SHIFT}]")
        mult[o], shift[o] = m, s
    return mult, shift


def _mult_neg(mult: np.ndarray, act: _Act | None) -> np.ndarray:
    """Multiplier for negative accumulators: the activation folded into the requantization."""
    if act is None:
        return mult.copy()
    if isinstance(act, nn.ReLU):
        return np.zeros_like(mult)
    return np.rint(mult * float(act.negative_slope)).astype(np.int64)
