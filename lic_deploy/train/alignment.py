"""The SOAP study's update-conflict diagnostics.

Alignment of updates v_1..v_n: A = 2 * ||(1/n) sum_i v_i / ||v_i|| ||^2 - 1, which for n = 2 is their cosine.
Intra-step: between the preconditioned rate and distortion updates of one step. Inter-step: between consecutive
parameter updates. 1 means the updates agree, -1 that they cancel.
"""

from __future__ import annotations

import torch


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def alignment(vectors: list[torch.Tensor]) -> float:
    """A = 2 ||mean of unit vectors||^2 - 1 for flat vectors; nan if any has zero norm."""
    units = []
    for v in vectors:
        n = torch.linalg.vector_norm(v)
        if n == 0:
            return float("nan")
        units.append(v / n)
    mean = torch.stack(units).mean(0)
    return float(2 * torch.dot(mean, mean) - 1)
