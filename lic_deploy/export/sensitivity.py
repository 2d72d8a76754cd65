"""Per-layer INT8 sensitivity of the float stages, measured in PyTorch on the deployable stage modules.

A layer's INT8 SQNR is that of its output when only this layer is quantized the way the INT8 graphs quantize
it: the input activation per tensor, symmetric, int8 range [-127, 127] with scale = amax / 127 (amax = max |x|
over a calibration set: min-max calibration), the weights per output channel, symmetric, scale = max |w_c| / 127;
the bias stays float. SQNR = 10 log10(sum y^2 / sum (y_int8 - y)^2) in dB, both sums over all inputs given.

Layer names are `<stage>.<module path>` (for example `g_a.0`, `g_s.6`); `onnx_node` maps a name to the node of
the stage's exported graph (`/0/Conv`), which is how ONNX Runtime's `nodes_to_exclude` refers to it. The 1x1
convolutions inside GDN/IGDN (`norm`) are not layers here: the INT8 graphs keep them in float.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

QMAX = 127


def conv_layers(stages: Mapping[str, Any]) -> dict[str, Any]:
    """Every Conv2d / ConvTranspose2d of the stage modules, `<stage>.<path>` -> module, in definition order."""
    import torch

    out = {}
    for stage, module in stages.items():
        for path, m in module.named_modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) and path.split(".")[-1] != "norm":
                out[f"{stage}.{path}"] = m
    return out


def onnx_node(name: str, module: Any) -> tuple[str, str]:
    """(stage, ONNX node name) of layer `name`, as torch.onnx names the nodes of one exported stage."""
    import torch

    stage, path = name.split(".", 1)
    op = "ConvTranspose" if isinstance(module, torch.nn.ConvTranspose2d) else "Conv"
    return stage, "/" + path.replace(".", "/") + "/" + op


def fake_quant(x: Any, amax: Any, axis: int | None = None) -> Any:
    """Symmetric int8 quantize-dequantize of tensor `x`: per tensor (`axis` None, `amax` a float) or per slice
    along `axis` (`amax` a 1-D tensor). A zero amax leaves its slice unchanged (it is all zeros)."""
    import torch

    amax_t = torch.as_tensor(amax, dtype=x.dtype)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        amax_t = amax_t.reshape(shape)
    scale = torch.where(amax_t > 0, amax_t / QMAX, torch.ones_like(amax_t))
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale


def int8_output(module: Any, x: Any, amax: float) -> Any:
    """The output of conv `module` on `x` with its input and weights quantized (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    if module.padding_mode != "zeros":
        raise ValueError(f"padding mode {module.padding_mode!r} is not supported")
    transposed = isinstance(module, torch.nn.ConvTranspose2d)
    w = module.weight.detach()
    axis = 1 if transposed else 0  # output channels: [in, out/groups, kh, kw] for transposed convolutions
    w_amax = w.abs().amax(dim=[d for d in range(w.dim()) if d != axis])
    wq, xq = fake_quant(w, w_amax, axis), fake_quant(x, amax)
    if transposed:
        return F.conv_transpose2d(xq, wq, module.bias, module.stride, module.padding, module.output_padding,
                                  module.groups, module.dilation)
    return F.conv2d(xq, wq, module.bias, module.stride, module.padding, module.dilation, module.groups)


class ForwardHooks:
    """Context manager: calls `fn(name, module, input, output)` after every forward of every module given."""

    def __init__(self, modules: Mapping[str, Any], fn: Callable[[str, Any, Any, Any], None]) -> None:
        self.modules, self.fn, self.handles = modules, fn, []

    def __enter__(self) -> ForwardHooks:
        for name, m in self.modules.items():
            self.handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: self.fn(name, mod, inp[0].detach(), out.detach())))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def run_stages(stages: Mapping[str, Any], input_sets: Iterable[Mapping[str, np.ndarray]]) -> None:
    """Run every stage module on its input (float32 [1, C, H, W]) of every input set, without gradients."""
    import torch

    with torch.no_grad():
        for inputs in input_sets:
            for stage, module in stages.items():
                module(torch.from_numpy(np.ascontiguousarray(inputs[stage], dtype=np.float32)))


def input_max(stages: Mapping[str, Any], input_sets: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """max |x| of every layer's input over all input sets (min-max calibration of a symmetric quantizer)."""
    layers = conv_layers(stages)
    amax = dict.fromkeys(layers, 0.0)

    def observe(name: str, _m: Any, x: Any, _y: Any) -> None:
        amax[name] = max(amax[name], float(x.abs().max()))

    with ForwardHooks(layers, observe):
        run_stages(stages, input_sets)
    return amax


class SqnrMeter:
    """Accumulates the signal and quantization-noise energy of every layer's INT8 output; `db()` gives SQNR."""

    def __init__(self, amax: Mapping[str, float]) -> None:
        self.amax = amax
        self.signal = dict.fromkeys(amax, 0.0)
        self.noise = dict.fromkeys(amax, 0.0)

    def update(self, name: str, module: Any, x: Any, y: Any) -> None:
        err = int8_output(module, x, self.amax[name]) - y
        self.signal[name] += float((y.double() ** 2).sum())
        self.noise[name] += float((err.double() ** 2).sum())

    def db(self) -> dict[str, float]:
        return {k: float("inf") if self.noise[k] == 0 else 10.0 * float(np.log10(self.signal[k] / self.noise[k]))
                for k in self.signal}


def layer_sqnr(stages: Mapping[str, Any], input_sets: list[Mapping[str, np.ndarray]],
               amax: Mapping[str, float] | None = None) -> dict[str, float]:
    """INT8 SQNR in dB of every layer over `input_sets`; `amax` defaults to the sets' own max |x|."""
    meter = SqnrMeter(amax if amax is not None else input_max(stages, input_sets))
    with ForwardHooks(conv_layers(stages), meter.update):
        run_stages(stages, input_sets)
    return meter.db()
