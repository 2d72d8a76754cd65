"""PyTorch reference engine: the original stage modules, rebuilt from the package's model.safetensors."""

from __future__ import annotations

import numpy as np

from lic_deploy.errors import BackendUnavailable, LicError
from lic_deploy.runtime.package import Package


class TorchEngine:
    """FP32 on CPU (the export-side reference); FP32/FP16 on CUDA when `device="cuda"`."""

    name = "torch"

    def __init__(self, package: Package, precision: str = "fp32", *, threads: int | None = None,
                 device: str = "cpu") -> None:
        try:
            import torch
        except ImportError:
            raise BackendUnavailable("--backend torch needs PyTorch: pip install 'lic-deploy[export]'") from None
        from lic_deploy.archs.checkpoint import load_model
        from lic_deploy.archs.registry import get_adapter

        if precision not in ("fp32", "fp16") or (precision == "fp16" and device == "cpu"):
            raise LicError(f"the torch engine runs fp32 (and fp16 on CUDA), not {precision} on {device}")
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
        dtype = torch.float16 if precision == "fp16" else torch.float32
        self.modules = {k: s.module.eval().to(device=device, dtype=dtype) for k, s in spec.stages.items()}
        self.precision, self.device, self.dtype = precision, device, dtype

    def run(self, stage: str, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, self.dtype)
            return self.modules[stage](t).float().cpu().numpy()
