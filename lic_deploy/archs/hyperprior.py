"""CompressAI's hyperprior family: `bmshj2018-hyperprior` (scale) and `mbt2018-mean` (mean-scale).

Both: g_a (image -> y, stride 16), h_a (y -> z, stride 4 more), h_s (z_hat -> Gaussian parameters), g_s
(y_hat -> image). The scale hyperprior's h_a sees |y|; the stage wraps that so every stage is tensor -> tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lic_deploy.archs.base import CodecSpec, StageSpec


def _abs_then(module: Any) -> Any:
    import torch

    class AbsThen(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(torch.abs(x))

    return AbsThen(module)


def entropy_tables(eb: Any, gc: Any) -> dict[str, np.ndarray]:
    """The integer CDF tables of CompressAI's entropy bottleneck `eb` and Gaussian conditional `gc`, after
    the model's `update(force=True)`.

    `z_*`: the factorized bottleneck, one table per z channel, symbol = round(z - z_median[c]).
    `y_*`: the Gaussian conditional, one table per scale-table entry. CDFs are 16-bit (sum 2**16).
    """
    return {
        "z_cdf": eb._quantized_cdf.numpy().astype(np.int32),
        "z_cdf_length": eb._cdf_length.numpy().astype(np.int32),
        "z_offset": eb._offset.numpy().astype(np.int32),
        "z_median": eb.quantiles[:, 0, 1].detach().numpy().astype(np.float64),
        "y_cdf": gc._quantized_cdf.numpy().astype(np.int32),
        "y_cdf_length": gc._cdf_length.numpy().astype(np.int32),
        "y_offset": gc._offset.numpy().astype(np.int32),
        "y_scale_table": gc.scale_table.numpy().astype(np.float64),
    }


class HyperpriorAdapter:
    """Adapter for one member of the family; `has_means` selects mean-scale (mbt2018-mean)."""

    pad_multiple, min_size = 64, 64

    def __init__(self, name: str, has_means: bool) -> None:
        self.name = name
        self.has_means = has_means

    def config_from_state_dict(self, state_dict: dict[str, Any]) -> dict[str, int] | None:
        try:
            n = int(state_dict["g_a.0.weight"].shape[0])
            m = int(state_dict["g_a.6.weight"].shape[0])
            hs_out = int(state_dict["h_s.4.weight"].shape[0])
        except (KeyError, IndexError, AttributeError):
            return None
        if any(k.startswith("context_prediction.") for k in state_dict):
            return None
        return {"N": n, "M": m} if hs_out == (2 * m if self.has_means else m) else None

    def build(self, config: dict[str, int]) -> Any:
        from compressai.models import MeanScaleHyperprior, ScaleHyperprior

        cls = MeanScaleHyperprior if self.has_means else ScaleHyperprior
        return cls(N=int(config["N"]), M=int(config["M"]))

    def spec(self, model: Any) -> CodecSpec:
        import torch

        model.eval()
        model.update(force=True)
        n, m = model.N, model.M
        h_a = model.h_a if self.has_means else _abs_then(model.h_a)
        hs_out = 2 * m if self.has_means else m
        stages = {
            "g_a": StageSpec("g_a", model.g_a, 3, m, 1),
            "h_a": StageSpec("h_a", h_a, m, n, 16),
            "h_s": StageSpec("h_s", model.h_s, n, hs_out, 64),
            "g_s": StageSpec("g_s", model.g_s, m, 3, 16),
        }
        return CodecSpec(
            arch=self.name,
            config={"N": n, "M": m},
            stages=stages,
            pad_multiple=64,
            y_channels=m,
            y_stride=16,
            z_channels=n,
            z_stride=64,
            has_means=self.has_means,
            hs_net=torch.nn.Sequential(*model.h_s),
            tables=entropy_tables(model.entropy_bottleneck, model.gaussian_conditional),
        )


ADAPTERS = [HyperpriorAdapter("bmshj2018-hyperprior", False), HyperpriorAdapter("mbt2018-mean", True)]
