"""Stand-in models for benchmarks and tests when no trained checkpoint is at hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def random_checkpoint(path: Path, arch: str = "mbt2018-mean", n: int = 128, m: int = 192, seed: int = 0,
                      **config: int) -> Path:
    """Save a random-weight model whose latents look like a trained one's: y of a few units, Gaussian scales
    spread over the scale table (a freshly initialised model predicts every scale below the table's first entry,
    so its streams would be nearly all zeros). Same cost per pixel as a trained model of that size. `config`
    adds architecture options (ELIC: cc1, cc2)."""
    import torch

    from lic_deploy.archs.registry import get_adapter

    torch.manual_seed(seed)
    model = get_adapter(arch).build({"N": n, "M": m, **config})
    if arch == "elic":
        y_conv = model.g_a[13]
        agg = [model.latent_codec["y"].latent_codec[f"y{k}"].entropy_parameters for k in range(len(model.groups))]
        heads = [(net[-1], net[-1].out_channels // 2) for net in agg]
    else:
        y_conv = model.g_a[-1]
        heads = [([mod for mod in model.h_s if hasattr(mod, "weight")][-1], m)]
    with torch.no_grad():
        y_conv.weight.mul_(20.0)
        for last, scales in heads:
            last.weight.mul_(0.5)
            last.bias[:scales] = torch.exp(torch.empty(scales).uniform_(np.log(0.3), np.log(30.0)))
    torch.save(model.state_dict(), path)
    return path
