"""Build integer programs (`entropy.intprog`) from float torch modules, calibrating every tensor's scale.

A `Tracer` follows the float network on calibration inputs (float64) and emits, for each step, the integer
instruction that computes it: int8 weights per output channel, int16 activations with a per-tensor scale
max|a| / (2**15 - 1) taken from the float values, multipliers and shifts for every rescale, tables for the
scalar functions. Registers may carry a scale per channel (a concatenation of differently scaled tensors);
convolutions fold such scales into their float weights before quantizing them, element-wise steps first
rescale to one scale. Each emitted step checks the bound that keeps its int64 arithmetic exact.

TCM's modules are emitted by the `emit_*` functions at the end of this file.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lic_deploy.entropy import intops
from lic_deploy.entropy.intnet import IntLayer
from lic_deploy.entropy.intops import INT64_SAFE, IntLayerNorm, build_lut, build_softmax
from lic_deploy.entropy.intprog import Instr, Program
from lic_deploy.export.intnet_build import (
    INT32_MAX,
    INT32_MIN,
    MULT_BITS,
    _mult_neg,
    _multipliers,
    _quantize_bias,
    _quantize_weight,
)

QMAX = 2**15 - 1  # int16 activations
HEADROOM = 4  # calibrated activation scales cover 4x the calibration maximum (values beyond it are clipped)
LN_FRAC = 12  # LayerNorm outputs carry 12 fractional bits
LUT_ENTRIES = 4096  # table functions are sampled at most this many times over their input's range
BETA_BITS = 40  # IGDN's beta is at most 2**40 accumulator units (far finer than any x^2 term it is added to)
NORM_HEADROOM = 2**24  # IGDN's beta + gamma x^2 at its calibrated maximum; clipped at 2**31 - 1


@dataclass
class Reg:
    """A register during building: per-channel scales (real = int * scale), the bound on |int|, and the float
    values it holds on each calibration input ([1, C, H, W] float64)."""

    scale: np.ndarray
    bound: int
    vals: list[torch.Tensor]

    @property
    def uniform(self) -> bool:
        return bool(np.all(self.scale == self.scale[0]))


def _ratio_mult(ratio: float) -> tuple[int, int]:
    """(mult, shift) with mult / 2**shift = ratio, mult in [2**22, 2**23)."""
    mult, shift = _multipliers(np.array([ratio]))
    return int(mult[0]), int(shift[0])


def _amax(vals: list[torch.Tensor]) -> float:
    a = max(float(v.abs().max()) for v in vals)
    return a if a > 0 else 1.0


def _act_scale(vals: list[torch.Tensor]) -> float:
    """The int16 scale of an activation: HEADROOM x its calibration maximum maps to 2**15 - 1. Without headroom,
    on the Adam-trained narrow TCM of `make models-tcm`, up to 1.5 % of a register's values clipped on Kodak
    (calibrated on other photos), and the integer path cost 13 % rate against the float reference."""
    return HEADROOM * _amax(vals) / QMAX


def _pointwise(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A float64 1x1 convolution with weight [O, I] and bias [O] (a linear layer over channels)."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1).double()
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_(bias)
    return conv


class Tracer:
    """Emits instructions while following the float network on calibration inputs."""

    def __init__(self) -> None:
        self.regs: dict[str, Reg] = {}
        self.instrs: list[Instr] = []
        self.inputs: list[str] = []
        self._n = 0

    def _new(self, reg: Reg) -> str:
        name = f"t{self._n}"
        self._n += 1
        self.regs[name] = reg
        return name

    def input(self, name: str, vals: list[torch.Tensor], scale: float | np.ndarray, bound: int) -> str:
        """A program input: int = round(real / scale), |int| <= bound."""
        c = vals[0].shape[1]
        self.regs[name] = Reg(np.broadcast_to(np.asarray(scale, np.float64), (c,)).copy(), bound,
                              [v.double() for v in vals])
        self.inputs.append(name)
        return name

    def program(self, inputs: list[str] | None = None, since: int = 0) -> Program:
        """The instructions emitted from index `since` on, as a program reading `inputs` (default: every input
        declared)."""
        names = inputs or self.inputs
        return Program(list(names), {n: self.regs[n].bound for n in names}, self.instrs[since:])

    # ------------------------------------------------------------------ layers with weights

    def conv(self, x: str, conv: nn.Conv2d | nn.ConvTranspose2d, act: nn.Module | None = None,
             out_scale: np.ndarray | None = None) -> str:
        """conv (+ ReLU / LeakyReLU) with int8 weights; output int16 at a calibrated scale, or int32 at the
        per-channel `out_scale` given (entropy parameters)."""
        r = self.regs[x]
        conv = copy.deepcopy(conv).double()
        with torch.no_grad():
            vals = [act(conv(v)) if act is not None else conv(v) for v in r.vals]
        weight, s_w = _quantize_weight(conv, r.scale)  # the input scales folded into the weights
        bias = _quantize_bias(conv, s_w)
        if out_scale is None:
            s_out, lo, hi = np.full(conv.out_channels, _act_scale(vals)), -QMAX, QMAX
        else:
            s_out, lo, hi = np.asarray(out_scale, np.float64), INT32_MIN, INT32_MAX
        mult, shift = _multipliers(s_w / s_out)
        layer = IntLayer(kind="conv" if isinstance(conv, nn.Conv2d) else "deconv", weight=weight, bias=bias,
                         stride=conv.stride[0], padding=conv.padding[0],
                         output_padding=conv.output_padding[0] if isinstance(conv, nn.ConvTranspose2d) else 0,
                         mult=mult, mult_neg=_mult_neg(mult, act), shift=shift, out_min=lo, out_max=hi,
                         in_max=r.bound)
        out = self._new(Reg(s_out, max(abs(lo), hi), vals))
        self.instrs.append(Instr("conv", [x], out, {"layer": layer}))
        return out

    def linear_after_norm(self, x: str, norm: nn.LayerNorm, linear: nn.Linear) -> str:
        """LayerNorm (integer, no affine) then a linear layer with the norm's gamma and beta folded in:
        W' = W diag(gamma), b' = b + W beta, as a 1x1 convolution over channels."""
        w, b = linear.weight.detach().double(), linear.bias.detach().double()
        gamma, beta = norm.weight.detach().double(), norm.bias.detach().double()
        return self.conv(self.layernorm(x, norm), _pointwise(w * gamma[None], b + w @ beta))

    def linear(self, x: str, linear: nn.Linear, act: nn.Module | None = None) -> str:
        """A linear layer over channels, as a 1x1 convolution."""
        return self.conv(x, _pointwise(linear.weight.detach().double(), linear.bias.detach().double()), act)

    # ------------------------------------------------------------------ element-wise steps

    def uniform(self, x: str) -> str:
        """x itself when its scale is one number, else x rescaled to its largest channel scale."""
        r = self.regs[x]
        if r.uniform:
            return x
        return self.rescale(x, float(r.scale.max()))

    def rescale(self, x: str, scale: float) -> str:
        r = self.regs[x]
        mult, shift = _multipliers(r.scale / scale)
        bound = min(QMAX, math.ceil(r.bound * float((r.scale / scale).max())) + 1)
        self._check(r.bound * int(mult.max()), "rescale")
        out = self._new(Reg(np.full(len(r.scale), scale), bound, r.vals))
        self.instrs.append(Instr("rescale", [x], out, {"mult": mult, "shift": shift, "lo": -bound, "hi": bound}))
        return out

    def add(self, a: str, b: str, relu: bool = False) -> str:
        """a + b (then ReLU), int16 at a calibrated scale."""
        a, b = self.uniform(a), self.uniform(b)
        ra, rb = self.regs[a], self.regs[b]
        with torch.no_grad():
            vals = [(u + v).clamp(min=0) if relu else u + v for u, v in zip(ra.vals, rb.vals, strict=True)]
        s_out = _act_scale(vals)
        ratios = (float(ra.scale[0]) / s_out, float(rb.scale[0]) / s_out)
        shift = MULT_BITS - math.frexp(max(ratios))[1]
        ma, mb = (round(q * 2.0**shift) for q in ratios)
        if not 1 <= shift <= 62:
            raise ValueError(f"add: scale ratio {max(ratios):.3g} not representable")
        self._check(ra.bound * ma + rb.bound * mb, "add")
        out = self._new(Reg(np.full(len(ra.scale), s_out), QMAX, vals))
        self.instrs.append(Instr("add", [a, b], out, {"ma": ma, "mb": mb, "shift": shift,
                                                      "lo": 0 if relu else -QMAX, "hi": QMAX}))
        return out

    def mul(self, a: str, b: str) -> str:
        a, b = self.uniform(a), self.uniform(b)
        ra, rb = self.regs[a], self.regs[b]
        with torch.no_grad():
            vals = [u * v for u, v in zip(ra.vals, rb.vals, strict=True)]
        s_out = _act_scale(vals)
        m, shift = _ratio_mult(float(ra.scale[0] * rb.scale[0]) / s_out)
        self._check(ra.bound * rb.bound * m, "mul")
        out = self._new(Reg(np.full(len(ra.scale), s_out), QMAX, vals))
        self.instrs.append(Instr("mul", [a, b], out, {"m": m, "shift": shift, "lo": -QMAX, "hi": QMAX}))
        return out

    def lut(self, x: str, fn: Any, torch_fn: Any, out_scale: float | None = None) -> str:
        """A scalar function by table; output int16 at a calibrated scale (or `out_scale`)."""
        x = self.uniform(x)
        r = self.regs[x]
        with torch.no_grad():
            vals = [torch_fn(v) for v in r.vals]
        s_in = float(r.scale[0])
        s_out = out_scale or _act_scale(vals)
        in_shift = max(0, (2 * r.bound).bit_length() - LUT_ENTRIES.bit_length() + 1)
        lut = build_lut(fn, s_in, s_out, -r.bound, r.bound, in_shift)
        out = self._new(Reg(np.full(len(r.scale), s_out), lut.bound, vals))
        self.instrs.append(Instr("lut", [x], out, {"lut": lut}))
        return out

    def layernorm(self, x: str, norm: nn.LayerNorm) -> str:
        x = self.uniform(x)
        r = self.regs[x]
        c = len(r.scale)
        eps_int = round(c * c * norm.eps / float(r.scale[0]) ** 2)
        ln = IntLayerNorm(c, eps_int, LN_FRAC, r.bound)
        with torch.no_grad():
            vals = [F.layer_norm(v.permute(0, 2, 3, 1), (c,), eps=norm.eps).permute(0, 3, 1, 2) for v in r.vals]
        out = self._new(Reg(np.full(c, 2.0**-LN_FRAC), ln.bound, vals))
        self.instrs.append(Instr("layernorm", [x], out, {"ln": ln}))
        return out

    # ------------------------------------------------------------------ layout

    def concat(self, xs: list[str]) -> str:
        regs = [self.regs[x] for x in xs]
        vals = [torch.cat(list(vs), dim=1) for vs in zip(*(r.vals for r in regs), strict=True)]
        out = self._new(Reg(np.concatenate([r.scale for r in regs]), max(r.bound for r in regs), vals))
        self.instrs.append(Instr("concat", list(xs), out))
        return out

    def slice(self, x: str, start: int, stop: int) -> str:
        r = self.regs[x]
        out = self._new(Reg(r.scale[start:stop].copy(), r.bound, [v[:, start:stop] for v in r.vals]))
        self.instrs.append(Instr("slice", [x], out, {"start": start, "stop": stop}))
        return out

    def pixel_shuffle(self, x: str, factor: int) -> str:
        x = self.uniform(x)
        r = self.regs[x]
        out = self._new(Reg(np.full(len(r.scale) // factor**2, r.scale[0]), r.bound,
                            [F.pixel_shuffle(v, factor) for v in r.vals]))
        self.instrs.append(Instr("pixel_shuffle", [x], out, {"r": factor}))
        return out

    # ------------------------------------------------------------------ composite steps

    def wmsa(self, qkv: str, att: Any) -> str:
        """Window attention on the projected tokens (before the output projection)."""
        qkv = self.uniform(qkv)
        r = self.regs[qkv]
        s = float(r.scale[0])
        outs, amax_logit = [], 0.0
        att64 = copy.deepcopy(att).double()
        with torch.no_grad():
            for v in r.vals:
                o, sim = att64.attend(v.permute(0, 2, 3, 1))
                outs.append(o.permute(0, 3, 1, 2))
                amax_logit = max(amax_logit, float(sim[torch.isfinite(sim)].abs().max()))
        s_logit = HEADROOM * amax_logit / QMAX
        s_out = _act_scale(outs)
        logit_mult, logit_shift = _ratio_mult(s * s * att.scale / s_logit)
        pv_mult, pv_shift = _ratio_mult(2.0**-15 * s / s_out)
        hd, t = att.head_dim, att.window**2
        self._check(r.bound * r.bound * hd * logit_mult, "attention logits")
        self._check(2**15 * r.bound * t * pv_mult, "attention output")
        bias = np.rint(att.relative_bias().detach().double().numpy() / s_logit).astype(np.int64)
        params = {"heads": att.heads, "window": att.window, "shifted": int(att.shifted), "logit_mult": logit_mult,
                  "logit_shift": logit_shift, "bias": bias, "softmax": build_softmax(s_logit),
                  "pv_mult": pv_mult, "pv_shift": pv_shift, "lo": -QMAX, "hi": QMAX}
        out = self._new(Reg(np.full(len(r.scale) // 3, s_out), QMAX, outs))
        self.instrs.append(Instr("wmsa", [qkv], out, params))
        return out

    def igdn(self, x: str, gdn: Any) -> str:
        """IGDN y = x sqrt(beta + gamma x^2): x^2 shifted to at most 2**23, the norm as an integer 1x1 conv at
        a calibrated scale (up to 2**24, clipped at 2**31 - 1), an integer square root, two rescales."""
        x = self.uniform(x)
        r = self.regs[x]
        c = len(r.scale)
        s_x = float(r.scale[0])
        beta = gdn.beta_reparam(gdn.beta).detach().double()
        gamma = gdn.gamma_reparam(gdn.gamma).detach().double().reshape(c, c, 1, 1)
        sq_shift = max(0, (r.bound * r.bound).bit_length() - 23)
        norm = nn.Conv2d(c, c, 1).double()
        with torch.no_grad():
            norm.weight.copy_(gamma)
            norm.bias.copy_(beta)
            nus = [norm(v * v) for v in r.vals]
            vals = [v * torch.sqrt(n) for v, n in zip(r.vals, nus, strict=True)]
        s_sq = s_x * s_x * 2.0**sq_shift
        # a row of gamma at its reparametrisation floor (a channel that stopped using the others, ~1e-11) would
        # put beta beyond the accumulator at max|gamma_o| / 127: the scale is at least beta_o / 2**BETA_BITS
        min_scale = np.abs(beta.numpy()) / 2.0**BETA_BITS
        weight, s_w = _quantize_weight(norm, np.full(c, s_sq), min_scale)
        s_nu = _amax(nus) / NORM_HEADROOM
        bias = _quantize_bias(norm, s_w)
        sq_max = (r.bound * r.bound >> sq_shift) + 1
        acc_max = sq_max * int(np.abs(weight.astype(np.int64)).sum(axis=(1, 2, 3)).max()) + int(np.abs(bias).max())
        # beta dominates this accumulator: as many multiplier bits as keep |acc| * mult below 2**62
        mult, shift = _multipliers(s_w / s_nu, bits=min(MULT_BITS, 61 - acc_max.bit_length()))
        layer = IntLayer("conv", weight, bias, 1, 0, 0, mult, mult.copy(), shift, 1, INT32_MAX, sq_max)
        k, pre_shift = 15, 16
        s_out = _act_scale(vals)
        m, sh = _ratio_mult(2.0 * s_x * math.sqrt(s_nu) / s_out)
        self._check((r.bound * 2**31 >> pre_shift) * m, "igdn")
        out = self._new(Reg(np.full(c, s_out), QMAX, vals))
        self.instrs.append(Instr("igdn", [x], out, {"sq_shift": sq_shift, "norm": layer, "k": k,
                                                     "pre_shift": pre_shift, "mult": m, "shift": sh,
                                                     "lo": -QMAX, "hi": QMAX}))
        return out

    @staticmethod
    def _check(bound: int, what: str) -> None:
        if bound >= INT64_SAFE:
            raise ValueError(f"{what}: intermediate values may reach {bound} >= 2**62")


# ---------------------------------------------------------------------- TCM's modules


def emit_residual_block(t: Tracer, block: Any, x: str) -> str:
    """CompressAI ResidualBlock: conv3x3, LeakyReLU, conv3x3, LeakyReLU, + identity (or its 1x1 skip)."""
    h = t.conv(x, block.conv1, block.leaky_relu)
    h = t.conv(h, block.conv2, block.leaky_relu)
    return t.add(h, t.conv(x, block.skip) if block.skip is not None else x)


def emit_residual_unit(t: Tracer, unit: Any, x: str) -> str:
    """CompressAI AttentionBlock's unit: 1x1, ReLU, 3x3, ReLU, 1x1, + identity, ReLU."""
    c = unit.conv
    h = t.conv(t.conv(t.conv(x, c[0], c[1]), c[2], c[3]), c[4])
    return t.add(h, x, relu=True)


def emit_swin_layer(t: Tracer, layer: Any, x: str) -> str:
    """x + proj(WMSA(LN(x))), then x + MLP(LN(x)) on a [C, H, W] register."""
    att = layer.msa
    a = t.linear(t.wmsa(t.linear_after_norm(x, layer.ln1, att.embedding_layer), att), att.linear)
    x = t.add(x, a)
    h = t.lut(t.linear_after_norm(x, layer.ln2, layer.mlp[0]), intops.gelu, F.gelu)
    return t.add(x, t.linear(h, layer.mlp[2]))


def emit_conv_trans_block(t: Tracer, block: Any, x: str) -> str:
    n = block.dim
    y = t.conv(x, block.conv1_1)
    conv_x, trans_x = t.slice(y, 0, n), t.slice(y, n, 2 * n)
    conv_x = t.add(emit_residual_block(t, block.conv_block, conv_x), conv_x)
    trans_x = emit_swin_layer(t, block.trans_block, trans_x)
    return t.add(x, t.conv(t.concat([conv_x, trans_x]), block.conv1_2))


def emit_upsample_block(t: Tracer, block: Any, x: str) -> str:
    """CompressAI ResidualBlockUpsample: subpel conv, LeakyReLU, conv3x3, IGDN, + subpel upsample of x.
    (The LeakyReLU commutes with the pixel shuffle, so it is fused into the conv before it.)"""
    h = t.pixel_shuffle(t.conv(x, block.subpel_conv[0], block.leaky_relu), block.subpel_conv[1].upscale_factor)
    h = t.igdn(t.conv(h, block.conv), block.igdn)
    up = t.pixel_shuffle(t.conv(x, block.upsample[0]), block.upsample[1].upscale_factor)
    return t.add(h, up)


def emit_hyper_synthesis(t: Tracer, seq: nn.Sequential, z: str) -> str:
    """TCM's h_mean_s / h_scale_s: upsample block, ConvTransBlocks, subpel conv."""
    x = emit_upsample_block(t, seq[0], z)
    for block in list(seq)[1:-1]:
        x = emit_conv_trans_block(t, block, x)
    last = seq[-1]
    return t.pixel_shuffle(t.conv(x, last[0]), last[1].upscale_factor)


def emit_swatten(t: Tracer, att: Any, x: str) -> str:
    """SWAtten: 1x1 in, a = 3 residual units, b = 3 residual units + 1x1 on the Swin pair's output,
    a * sigmoid(b) + identity, 1x1 out."""
    x = t.conv(x, att.in_conv)
    a = x
    for unit in att.conv_a:
        a = emit_residual_unit(t, unit, a)
    b = emit_swin_layer(t, att.non_local_block.block_2, emit_swin_layer(t, att.non_local_block.block_1, x))
    for unit in list(att.conv_b)[:3]:
        b = emit_residual_unit(t, unit, b)
    b = t.lut(t.conv(b, att.conv_b[3]), intops.sigmoid, torch.sigmoid, out_scale=1.0 / QMAX)
    return t.conv(t.add(t.mul(a, b), x), att.out_conv)


def emit_conv_chain(t: Tracer, seq: nn.Sequential, x: str, out_scale: np.ndarray | None) -> str:
    """conv3x3, GELU, conv3x3, GELU, conv3x3 (TCM's cc and LRP transforms); the last conv's output at the
    per-channel `out_scale` (int32), or int16 at a calibrated scale (None)."""
    h = t.lut(t.conv(x, seq[0]), intops.gelu, F.gelu)
    h = t.lut(t.conv(h, seq[2]), intops.gelu, F.gelu)
    return t.conv(h, seq[4], out_scale=out_scale)

