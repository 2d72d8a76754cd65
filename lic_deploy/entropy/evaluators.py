"""Where an entropy model's integer networks run. Every evaluator computes the same integers (docs/entropy.md).

- "numpy": float64 GEMMs on the CPU (`intnet.IntNet` itself; the default),
- "ort": ONNX Runtime (CPU), float32 convolutions on split integer parts (`intnet_onnx`),
- "torch:DEVICE": PyTorch float64 GEMMs on DEVICE, e.g. "torch:cuda:0" (`intnet_torch`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from lic_deploy.entropy.intnet import IntNet
from lic_deploy.errors import BackendUnavailable, LicError

CHOICES = "numpy, ort or torch:DEVICE (torch:cpu, torch:cuda, torch:cuda:N)"
SPEC = re.compile(r"numpy|ort|torch:(cpu|cuda(:\d+)?)")


def check(spec: str) -> str:
    """The spec itself, or LicError naming the choices (the spelling only; `require` checks the device too)."""
    if SPEC.fullmatch(spec):
        return spec
    raise LicError(f"unknown integer-network evaluator {spec!r}; choose {CHOICES}")


def require(spec: str) -> str:
    """`check`, then BackendUnavailable unless a "torch:..." evaluator's PyTorch and device are here."""
    if not check(spec).startswith("torch:"):
        return spec
    try:
        import torch
    except ImportError:
        raise BackendUnavailable(f"--intnet {spec} needs PyTorch: pip install 'lic-deploy[export]'") from None
    device = spec[6:]
    if device.startswith("cuda"):
        index = int(device[5:] or 0)
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= found:
            raise BackendUnavailable(f"--intnet {spec}: torch {torch.__version__} sees no such CUDA device "
                                     f"({found} found); use --intnet numpy or ort")
    return spec


def install(model: Any, spec: str, threads: int | None = None) -> None:
    """Replace every IntNet attribute of an entropy model (h_s; ELIC's context networks, also inside lists) with
    the evaluator `spec` of it. "numpy" leaves the model as it is."""
    require(spec)
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
