"""Engines run a package's float stages. One contract for all: `engine.run(stage, x) -> y`.

x and y are float32 numpy arrays [1, C, H, W]; H and W of x are the stage's input size (image padded to the
package's multiple, divided by the stage's stride). Engines never touch the entropy model: that is integer and
lives in `lic_deploy.entropy`, identical whatever engine runs the transforms.
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np

from lic_deploy.errors import LicError
from lic_deploy.runtime.package import Package

BACKENDS = ("ort", "torch", "tensorrt")


class Engine(Protocol):
    name: str  # "ort", "torch", "tensorrt"
    precision: str

    def run(self, stage: str, x: np.ndarray) -> np.ndarray:
        """Run `stage` on float32 [1, C, H, W]; returns float32 [1, C', H', W']."""


DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str, hint: str) -> None:
    """LicError (one line, ending with `hint`) unless `device` is cpu, or cuda / cuda:N with such a CUDA device
    visible to PyTorch."""
    if not DEVICE.fullmatch(device):
        raise LicError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available() or _cuda_index(device) >= torch.cuda.device_count():
        raise LicError(f"--device {device}: torch {torch.__version__} sees no such CUDA device "
                       f"({torch.cuda.device_count()} found); {hint}")


def _cuda_index(device: str) -> int:
    """"cuda:N" -> N; "cuda" and "cpu" (the default, meaningless for TensorRT) -> 0."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def create_engine(package: Package, backend: str = "ort", precision: str = "fp32", *,
                  threads: int | None = None, device: str = "cpu") -> Engine:
    """An engine of kind `backend` over `package`. BackendUnavailable when its libraries or device are missing.

    `device` is "cpu", "cuda" or "cuda:N": where --backend torch runs; TensorRT always runs on CUDA device N (0
    unless "cuda:N"); ONNX Runtime runs on the CPU only.
    """
    if not DEVICE.fullmatch(device):
        raise LicError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if backend == "ort":
        if device != "cpu":
            raise LicError(f"--backend ort runs on the CPU, not {device}; use --backend torch or tensorrt")
        from lic_deploy.runtime.engines.ort import OrtEngine

        return OrtEngine(package, precision, threads=threads)
    if backend == "torch":
        from lic_deploy.runtime.engines.torch_ref import TorchEngine

        return TorchEngine(package, precision, threads=threads, device=device)
    if backend == "tensorrt":
        from lic_deploy.runtime.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(package, precision, device=_cuda_index(device))
    raise LicError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
