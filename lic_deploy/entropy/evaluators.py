"""Where an entropy model's integer networks run. Every evaluator computes the same integers (docs/entropy.md).

- "numpy": float64 GEMMs on the CPU (`intnet.IntNet` itself; the default),
- "ort": ONNX Runtime (CPU), float32 convolutions on split integer parts (`intnet_onnx`),
- "torch:DEVICE": PyTorch float64 GEMMs on DEVICE, e.g. "torch:cuda:0" (`intnet_torch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lic_deploy.entropy.intnet import IntNet
from lic_deploy.errors import LicError

CHOICES = "numpy, ort or torch:DEVICE (torch:cpu, torch:cuda, torch:cuda:N)"


def check(spec: str) -> str:
    """The spec itself, or LicError naming the choices."""
    if spec in ("numpy", "ort") or (spec.startswith("torch:") and spec[6:].split(":")[0] in ("cpu", "cuda")):
        return spec
    raise LicError(f"unknown integer-network evaluator {spec!r}; choose {CHOICES}")


def install(model: Any, spec: str, threads: int | None = None) -> None:
    """Replace every IntNet attribute of an entropy model (h_s; ELIC's context networks, also inside lists) with
    the evaluator `spec` of it. "numpy" leaves the model as it is."""
    check(spec)
    if spec == "numpy":
        return
    wrap: Callable[[IntNet], Any]
    if spec == "ort":
        from lic_deploy.entropy.intnet_onnx import OrtIntNet

        def wrap(net: IntNet) -> Any:
            return OrtIntNet(net, threads)
    else:
        from lic_deploy.entropy.intnet_torch import TorchIntNet

        def wrap(net: IntNet) -> Any:
            return TorchIntNet(net, spec[6:])
    for name, value in list(vars(model).items()):
        if isinstance(value, IntNet):
            setattr(model, name, wrap(value))
        elif isinstance(value, list) and any(isinstance(v, IntNet) for v in value):
            setattr(model, name, [wrap(v) if isinstance(v, IntNet) else v for v in value])
