"""Engines run a package's float stages. One contract for all: `engine.run(stage, x) -> y`.

x and y are float32 numpy arrays [1, C, H, W]; H and W of x are the stage's input size (image padded to the
package's multiple, divided by the stage's stride). Engines never touch the entropy model: that is integer and
lives in `lic_deploy.entropy`, identical whatever engine runs the transforms.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from lic_deploy.errors import BackendUnavailable, LicError
from lic_deploy.runtime.package import Package

BACKENDS = ("ort", "torch", "tensorrt")


class Engine(Protocol):
    name: str  # "ort", "torch", "tensorrt"
    precision: str

    def run(self, stage: str, x: np.ndarray) -> np.ndarray:
        """Run `stage` on float32 [1, C, H, W]; returns float32 [1, C', H', W']."""


def create_engine(package: Package, backend: str = "ort", precision: str = "fp32", *,
                  threads: int | None = None) -> Engine:
    """An engine of kind `backend` over `package`. BackendUnavailable when its libraries or device are missing."""
    if backend == "ort":
        from lic_deploy.runtime.engines.ort import OrtEngine

        return OrtEngine(package, precision, threads=threads)
    if backend == "torch":
        from lic_deploy.runtime.engines.torch_ref import TorchEngine

        return TorchEngine(package, precision, threads=threads)
    if backend == "tensorrt":
        raise BackendUnavailable("the TensorRT engine is not available in this build")
    raise LicError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
