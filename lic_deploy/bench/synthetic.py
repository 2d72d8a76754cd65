"""Stand-in models for benchmarks and tests when no trained checkpoint is at hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def random_checkpoint(path: Path, arch: str = "mbt2018-mean", n: int = 128, m: int = 192, seed: int = 0) -> Path:
    """Save a random-weight model whose latents look like a trained one's: y of a few units, Gaussian scales
    spread over the scale table (a freshly initialised model predicts every scale below the table's first entry,
    so its streams would be nearly all zeros). Same cost per pixel as a trained model of that size."""
    import torch

    from lic_deploy.archs.registry import get_adapter

    torch.manual_seed(seed)
    model = get_adapter(arch).build({"N": n, "M": m})
    with torch.no_grad():
        model.g_a[-1].weight.mul_(20.0)
        last = [mod for mod in model.h_s if hasattr(mod, "weight")][-1]
        last.weight.mul_(0.5)
        last.bias[:m] = torch.exp(torch.empty(m).uniform_(np.log(0.3), np.log(30.0)))
    torch.save(model.state_dict(), path)
    return path
