"""Integer programs: the entropy networks of transformer-era codecs (TCM) as a list of integer instructions.

A `Program` runs instructions over named int64 registers, each [C, H, W] (one image). Every instruction is
integer arithmetic from `intops` or an `IntLayer` (exact float64 GEMMs under their 2**53 bound), so a program
gives the same integers on every machine. Real value = integer * scale; the scales live only in the builder
(`lic_deploy.export.intprog_build`), which folds them into the integer multipliers stored here. Each
instruction's overflow bound was checked when it was built (docs/entropy.md, "Integer programs").

Instructions (`op`, inputs -> output, parameters):
- conv: x -> IntLayer(x) (conv or transposed conv, fused ReLU/LeakyReLU, requantization, clip);
- rescale: x -> clip(round_shift(x * mult[c], shift[c]), lo, hi);
- add: a, b -> clip(round_shift(a * ma + b * mb, shift), lo, hi);
- mul: a, b -> clip(round_shift(a * b * m, shift), lo, hi);
- lut: x -> Lut(x);  layernorm: x -> IntLayerNorm over channels, per pixel;
- concat: x1, x2, ... -> channels concatenated;  slice: x -> x[start:stop];  pixel_shuffle: x -> depth to space;
- wmsa: qkv [3C, H, W] -> window attention (per head q k^T, relative-position bias, shift mask, IntSoftmax,
  P v), before the output projection;
- igdn: x -> x * sqrt(beta + gamma x^2) with an integer square root.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lic_deploy.entropy import intops
from lic_deploy.entropy.intnet import IntLayer, IntNet
from lic_deploy.entropy.intops import IntLayerNorm, IntSoftmax, Lut, requantize, round_shift
from lic_deploy.errors import PackageError

FORMAT, VERSION = "lic-intprog", 1
OPS = ("conv", "rescale", "add", "mul", "lut", "layernorm", "concat", "slice", "pixel_shuffle", "wmsa", "igdn")


@dataclass
class Instr:
    """One instruction: `op` reads registers `ins`, writes register `out`; `p` holds its integer parameters
    (ints, int64/int8 arrays, an IntLayer, a Lut, an IntLayerNorm or an IntSoftmax)."""

    op: str
    ins: list[str]
    out: str
    p: dict[str, Any] = field(default_factory=dict)


def window_region_mask(h: int, w: int, win: int) -> np.ndarray:
    """[nW, T, T] bool: True where a shifted window pairs tokens from opposite sides of the roll's wrap."""
    shift = win // 2

    def region(n: int) -> np.ndarray:
        i = np.arange(n)
        return (i >= n - win).astype(np.int64) + (i >= n - shift)

    reg = region(h)[:, None] * 3 + region(w)[None, :]
    reg = reg.reshape(h // win, win, w // win, win).transpose(0, 2, 1, 3).reshape(-1, win * win)
    return reg[:, :, None] != reg[:, None, :]


def _wmsa(qkv: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    c3, h, w = qkv.shape
    c, heads, win, shifted = c3 // 3, p["heads"], p["window"], bool(p["shifted"])
    hd, t = c // heads, win * win
    if h % win or w % win:
        raise ValueError(f"attention of window {win} needs H and W multiples of it, got {h}x{w}")
    x = np.roll(qkv, (-(win // 2), -(win // 2)), axis=(1, 2)) if shifted else qkv
    x = x.reshape(3, heads, hd, h // win, win, w // win, win).transpose(0, 1, 3, 5, 4, 6, 2)
    x = x.reshape(3, heads, -1, t, hd)  # [qkv, heads, windows, tokens, head_dim]
    q, k, v = x[0], x[1], x[2]
    logits = round_shift(intops.matmul(q, k.transpose(0, 1, 3, 2)) * p["logit_mult"], p["logit_shift"])
    logits = logits + p["bias"][:, None]  # [heads, 1, T, T]
    mask = window_region_mask(h, w, win)[None] if shifted else None
    probs = p["softmax"](logits, mask)
    out = requantize(intops.matmul(probs, v), p["pv_mult"], p["pv_shift"], p["lo"], p["hi"])  # [heads, nW, T, hd]
    out = out.reshape(heads, h // win, w // win, win, win, hd).transpose(0, 5, 1, 3, 2, 4).reshape(c, h, w)
    return np.roll(out, (win // 2, win // 2), axis=(1, 2)) if shifted else out


def _igdn(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    sq = round_shift(x * x, p["sq_shift"])
    nu = np.clip(p["norm"](sq), 1, None)  # beta + gamma x^2 > 0 at the norm's scale
    r = intops.isqrt(nu << (2 * p["k"]))
    t = round_shift(x * r, p["pre_shift"])
    return requantize(t, p["mult"], p["shift"], p["lo"], p["hi"])


def _run(ins: Instr, regs: Mapping[str, np.ndarray]) -> np.ndarray:
    p, a = ins.p, [regs[name] for name in ins.ins]
    op = ins.op
    if op == "conv":
        return p["layer"](a[0])
    if op == "rescale":
        return requantize(a[0], p["mult"][:, None, None], p["shift"][:, None, None], p["lo"], p["hi"])
    if op == "add":
        return np.clip(round_shift(a[0] * p["ma"] + a[1] * p["mb"], p["shift"]), p["lo"], p["hi"])
    if op == "mul":
        return requantize(a[0] * a[1], p["m"], p["shift"], p["lo"], p["hi"])
    if op == "lut":
        return p["lut"](a[0])
    if op == "layernorm":
        c, h, w = a[0].shape
        return p["ln"](a[0].reshape(c, h * w)).reshape(c, h, w)
    if op == "concat":
        return np.concatenate(a, axis=0)
    if op == "slice":
        return a[0][p["start"]:p["stop"]]
    if op == "pixel_shuffle":
        r = p["r"]
        c, h, w = a[0].shape
        return a[0].reshape(c // (r * r), r, r, h, w).transpose(0, 3, 1, 4, 2).reshape(c // (r * r), h * r, w * r)
    if op == "wmsa":
        return _wmsa(a[0], p)
    if op == "igdn":
        return _igdn(a[0], p)
    raise ValueError(f"unknown instruction {op!r}")


@dataclass
class Program:
    """Instructions over named registers. `inputs` name the registers a caller fills (int64 [C, H, W], each
    |x| <= its bound in `in_max`); `run` returns the requested registers."""

    inputs: list[str]
    in_max: dict[str, int]
    instrs: list[Instr]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        regs: dict[str, np.ndarray] = {}
        for name in self.inputs:
            x = inputs[name]
            if not isinstance(x, np.ndarray) or x.dtype != np.int64 or x.ndim != 3:
                raise ValueError(f"program input {name!r} must be an int64 array [C, H, W]")
            if x.size and np.abs(x).max() > self.in_max[name]:
                raise ValueError(f"program input {name!r} exceeds its bound {self.in_max[name]}")
            regs[name] = x
        for ins in self.instrs:
            regs[ins.out] = _run(ins, regs)
        return [regs[name] for name in outputs]

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays for an `.npz` (no pickles): `{prefix}meta` (JSON as uint8) and one array per parameter."""
        arrays: dict[str, np.ndarray] = {}
        meta_instrs = []
        for i, ins in enumerate(self.instrs):
            key = f"{prefix}{i}."
            params: dict[str, Any] = {}
            for name, value in ins.p.items():
                params[name] = _store(value, f"{key}{name}", arrays)
            meta_instrs.append({"op": ins.op, "ins": ins.ins, "out": ins.out, "p": params})
        meta = {"format": FORMAT, "version": VERSION, "inputs": self.inputs, "in_max": self.in_max,
                "instrs": meta_instrs}
        arrays[f"{prefix}meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> Program:
        """Inverse of `to_arrays`; PackageError when the stored program is missing or inconsistent."""
        try:
            meta = json.loads(np.asarray(arrays[f"{prefix}meta"], dtype=np.uint8).tobytes().decode())
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} program")
            instrs = []
            for spec in meta["instrs"]:
                if spec["op"] not in OPS:
                    raise ValueError(f"unknown instruction {spec['op']!r}")
                p = {name: _load(v, arrays) for name, v in spec["p"].items()}
                instrs.append(Instr(spec["op"], list(spec["ins"]), spec["out"], p))
            return cls(list(meta["inputs"]), {k: int(v) for k, v in meta["in_max"].items()}, instrs)
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise PackageError(f"integer program {prefix!r}: {e}") from e


def _store(value: Any, key: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON for one parameter; arrays (and the arrays of structured parameters) go to `arrays`."""
    if isinstance(value, bool | int | np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        arrays[key] = value
        return {"array": key}
    if isinstance(value, IntLayer):
        arrays.update(IntNet([value], value.in_max).to_arrays(key + "."))
        return {"intlayer": key + "."}
    if isinstance(value, Lut):
        arrays[key] = np.array(value.table)
        return {"lut": key, "index_min": value.index_min, "in_shift": value.in_shift}
    if isinstance(value, IntLayerNorm):
        return {"layernorm": [value.channels, value.eps_int, value.out_frac, value.in_max]}
    if isinstance(value, IntSoftmax):
        arrays[key] = np.array(value.exp_lut.table)
        return {"softmax": key, "index_min": value.exp_lut.index_min, "in_shift": value.exp_lut.in_shift,
                "exp_frac": value.exp_frac, "out_frac": value.out_frac}
    raise TypeError(f"cannot store a parameter of type {type(value).__name__}")


def _load(spec: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(spec, int):
        return spec
    if "array" in spec:
        return np.asarray(arrays[spec["array"]])
    if "intlayer" in spec:
        return IntNet.from_arrays(arrays, spec["intlayer"]).layers[0]
    if "lut" in spec:
        return Lut(np.asarray(arrays[spec["lut"]]), int(spec["index_min"]), int(spec["in_shift"]))
    if "layernorm" in spec:
        return IntLayerNorm(*[int(v) for v in spec["layernorm"]])
    if "softmax" in spec:
        lut = Lut(np.asarray(arrays[spec["softmax"]]), int(spec["index_min"]), int(spec["in_shift"]))
        return IntSoftmax(lut, int(spec["exp_frac"]), int(spec["out_frac"]))
    raise ValueError(f"unknown parameter {spec!r}")
