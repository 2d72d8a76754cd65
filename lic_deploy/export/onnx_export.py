"""Stage modules -> ONNX graphs with dynamic height and width, and their verification against PyTorch."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17
INPUT, OUTPUT = "input", "output"
# FP32 ONNX Runtime vs PyTorch, relative L2 error. Both compute in float32; reordered sums differ by ~1e-7
# relative per operation, ~1e-6 after a dozen layers. A wrong graph (missing op, bad padding) is off by > 1e-2.
FP32_TOLERANCE = 1e-4


def _static_gdn(gdn: Any) -> Any:
    """GDN/IGDN with its reparametrised beta and gamma baked in as constants: y = x * (beta + gamma * x^2)^(-+1/2).

    The exported graph is then Mul -> Conv(1x1, bias=beta) -> Sqrt -> Div/Mul, with no reparametrisation
    subgraph; the 1x1 convolution lives under `/norm/` so quantization can recognise and skip it.
    """
    import torch

    beta = gdn.beta_reparam(gdn.beta).detach()
    gamma = gdn.gamma_reparam(gdn.gamma).detach()
    c = beta.numel()

    class StaticGDN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inverse = bool(gdn.inverse)
            self.norm = torch.nn.Conv2d(c, c, 1)
            self.norm.weight.data.copy_(gamma.reshape(c, c, 1, 1))
            self.norm.bias.data.copy_(beta)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = self.norm(x * x)
            return x * torch.sqrt(n) if self.inverse else x / torch.sqrt(n)

    return StaticGDN()


def deployable(module: Any) -> Any:
    """A copy of `module` in eval mode with every CompressAI GDN replaced by its static form."""
    from compressai.layers import GDN

    module = copy.deepcopy(module).eval()

    def swap(parent: Any) -> None:
        for name, child in parent.named_children():
            if isinstance(child, GDN):
                setattr(parent, name, _static_gdn(child))
            else:
                swap(child)

    swap(module)
    return module


def export_onnx(module: Any, example: Any, path: Path) -> None:
    """Export one stage (single tensor in, single tensor out) with dynamic H and W axes."""
    import torch

    dyn = {INPUT: {2: "height", 3: "width"}, OUTPUT: {2: "out_height", 3: "out_width"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=dyn,
                          do_constant_folding=True)


def rel_error(ref: np.ndarray, test: np.ndarray) -> float:
    """||test - ref||_2 / ||ref||_2 (0 when both are zero)."""
    ref64, test64 = ref.astype(np.float64), test.astype(np.float64)
    denom = float(np.linalg.norm(ref64))
    return float(np.linalg.norm(test64 - ref64)) / denom if denom else float(np.linalg.norm(test64))


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (test - ref)^2)."""
    noise = float(np.sum((test.astype(np.float64) - ref.astype(np.float64)) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise) if signal else float("-inf")


def torch_run(module: Any, x: np.ndarray) -> np.ndarray:
    """Run a stage module on a float32 [1, C, H, W] array."""
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
