"""PyTorch reference engine: the original stage modules, rebuilt from the package's model.safetensors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lic_deploy.errors import BackendUnavailable, LicError
from lic_deploy.runtime.package import Package

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchEngine:
    """FP32 on CPU (the export-side reference); FP32, FP16 and BF16 on CUDA when `device="cuda[:N]"`
    (weights and activations in that type; inputs and outputs float32 on the host)."""

    name = "torch"

    def __init__(self, package: Package, precision: str = "fp32", *, threads: int | None = None,
                 device: str = "cpu") -> None:
        try:
            import torch
        except ImportError:
            raise BackendUnavailable("--backend torch needs PyTorch: pip install 'lic-deploy[export]'") from None
        from lic_deploy.archs.checkpoint import load_model
        from lic_deploy.archs.registry import get_adapter

        if precision not in DTYPES or (precision != "fp32" and device == "cpu"):
            raise LicError(f"the torch engine runs fp32 (and fp16, bf16 on CUDA), not {precision} on {device}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {device} needs an NVIDIA GPU and a CUDA build of PyTorch; "
                                     f"torch {torch.__version__} sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        entry = package.manifest.get("torch_weights")
        if not entry:
            raise LicError(f"{package.root}: package has no torch weights; re-export it")
        loaded = load_model(package.verified_path(entry), package.arch)
        spec = get_adapter(loaded.arch).spec(loaded.model)
        dtype = getattr(torch, DTYPES[precision])
        self.modules = {k: s.module.eval().to(device=device, dtype=dtype) for k, s in spec.stages.items()}
        self.precision, self.device, self.dtype = precision, device, dtype

    def run(self, stage: str, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, self.dtype)
            return self.modules[stage](t).float().cpu().numpy()

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA kernels run asynchronously); nothing to do on the CPU."""
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def stage_timer(self, stage: str, x: np.ndarray) -> Callable[[], None]:
        """A callable that runs `stage` on `x` already on the device, leaving the output there: what a
        device-side latency measures, copies excluded (time it between two `synchronize` calls)."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, self.dtype)
        module = self.modules[stage]

        def call() -> None:
            with torch.inference_mode():
                module(t)

        return call
