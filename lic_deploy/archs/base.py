"""What an architecture adapter produces: a `CodecSpec` that export, engines and the codec all read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class StageSpec:
    """One exportable stage: a module taking one float tensor [1, C_in, H, W] and returning one tensor.

    `stride` is the spatial factor between the image and this stage's input (g_a: 1, h_a/g_s: 16, h_s: 64).
    """

    name: str
    module: torch.nn.Module
    in_channels: int
    out_channels: int
    stride: int


@dataclass
class CodecSpec:
    """Everything downstream needs to know about one model.

    Invariants: image height and width are padded to multiples of `pad_multiple` pixels, at least
    `min_size`; y has `y_channels` channels at
    1/`y_stride` resolution, z has `z_channels` at 1/`z_stride`; `hs_net` is the torch h_s as a flat
    Sequential, whose output holds the Gaussian scales (and then the means when `has_means`), or, with a
    `context` (ELIC), the side parameters that the context networks aggregate. TCM has no single h_s
    (`hs_net` None): its `context` is the model itself, whose networks `export.tcm_entropy_build` converts.
    """

    arch: str
    config: dict[str, int]
    stages: dict[str, StageSpec]
    pad_multiple: int
    y_channels: int
    y_stride: int
    z_channels: int
    z_stride: int
    has_means: bool
    hs_net: torch.nn.Sequential | None
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    context: Any = None  # ELIC: the channel/spatial context networks (`lic_deploy.archs.elic.ContextSpec`)
    min_size: int = 0

    def example_input(self, stage: str, height: int = 256, width: int = 256) -> torch.Tensor:
        """A random input for `stage` of an image of height x width pixels (both multiples of pad_multiple)."""
        import torch

        s = self.stages[stage]
        gen = torch.Generator().manual_seed(0)
        return torch.rand(1, s.in_channels, height // s.stride, width // s.stride, generator=gen)


class Adapter(Protocol):
    """An architecture family: builds its torch model, recognises its checkpoints, describes it as a CodecSpec."""

    name: str
    pad_multiple: int  # images are padded to multiples of this many pixels...
    min_size: int  # ...and to at least this many a side (training crops too)

    def config_from_state_dict(self, state_dict: dict[str, Any]) -> dict[str, int] | None:
        """The model config if the keys belong to this architecture, else None."""

    def build(self, config: dict[str, int]) -> torch.nn.Module:
        """A freshly initialised model."""

    def spec(self, model: torch.nn.Module) -> CodecSpec:
        """The stages and entropy tables of a loaded model (calls `model.update()` first)."""
