"""The TCM model (torch): transforms, the two hyper-synthesis branches, the slice networks, training forward and
the float reference codec. Architecture, configurations and sizes: `lic_deploy.archs.tcm`."""

from __future__ import annotations

from typing import Any

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import ResidualBlockUpsample, ResidualBlockWithStride, conv3x3, subpel_conv3x3
from compressai.models.base import CompressionModel
from compressai.models.utils import conv
from compressai.ops import quantize_ste
from torch import Tensor, nn

from lic_deploy.archs.tcm import HEAD_DIMS, HYPER_HEAD_DIM, HYPER_WINDOW, WINDOW
from lic_deploy.archs.tcm_layers import ConvTransBlock, SWAtten


def _blocks(n: int, depth: int, head_dim: int, window: int) -> list[nn.Module]:
    return [ConvTransBlock(n, head_dim, window, shifted=bool(i % 2)) for i in range(depth)]


def _cc(c_in: int, c1: int, c2: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv(c_in, c1, stride=1, kernel_size=3), nn.GELU(),
                         conv(c1, c2, stride=1, kernel_size=3), nn.GELU(),
                         conv(c2, c_out, stride=1, kernel_size=3))


class TCM(CompressionModel):
    """TCM with the official module names. forward() is the training pass (CompressAI's output dict);
    compress()/decompress() are the float reference codec (PyTorch, CompressAI's rANS, one string per slice)."""

    def __init__(self, N: int = 128, M: int = 320, slices: int = 5, depth: int = 2, attn: int = 128,
                 cc1: int = 224, cc2: int = 128, Z: int = 192) -> None:
        super().__init__()
        if M % slices:
            raise ValueError(f"M={M} is not divisible into {slices} slices")
        self.N, self.M, self.slices, self.Z = N, M, slices, Z
        s = M // slices
        n2 = 2 * N
        hd = HEAD_DIMS
        self.g_a = nn.Sequential(
            ResidualBlockWithStride(3, n2, 2), *_blocks(N, depth, hd[0], WINDOW),
            ResidualBlockWithStride(n2, n2, 2), *_blocks(N, depth, hd[1], WINDOW),
            ResidualBlockWithStride(n2, n2, 2), *_blocks(N, depth, hd[2], WINDOW),
            conv3x3(n2, M, stride=2))
        self.g_s = nn.Sequential(
            ResidualBlockUpsample(M, n2, 2), *_blocks(N, depth, hd[3], WINDOW),
            ResidualBlockUpsample(n2, n2, 2), *_blocks(N, depth, hd[4], WINDOW),
            ResidualBlockUpsample(n2, n2, 2), *_blocks(N, depth, hd[5], WINDOW),
            subpel_conv3x3(n2, 3, 2))
        self.h_a = nn.Sequential(ResidualBlockWithStride(M, n2, 2),
                                 *_blocks(N, depth, HYPER_HEAD_DIM, HYPER_WINDOW), conv3x3(n2, Z, stride=2))
        for name in ("h_mean_s", "h_scale_s"):
            setattr(self, name, nn.Sequential(ResidualBlockUpsample(Z, n2, 2),
                                              *_blocks(N, depth, HYPER_HEAD_DIM, HYPER_WINDOW),
                                              subpel_conv3x3(n2, M, 2)))
        support = [M + s * i for i in range(slices)]
        self.atten_mean = nn.ModuleList(nn.Sequential(SWAtten(c, attn)) for c in support)
        self.atten_scale = nn.ModuleList(nn.Sequential(SWAtten(c, attn)) for c in support)
        self.cc_mean_transforms = nn.ModuleList(_cc(c, cc1, cc2, s) for c in support)
        self.cc_scale_transforms = nn.ModuleList(_cc(c, cc1, cc2, s) for c in support)
        self.lrp_transforms = nn.ModuleList(_cc(c + s, cc1, cc2, s) for c in support)
        self.entropy_bottleneck = EntropyBottleneck(Z)
        self.gaussian_conditional = GaussianConditional(None)

    def slice_params(self, i: int, latent_means: Tensor, latent_scales: Tensor,
                     y_hat_slices: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Slice i's (mean, scale, mean support after SWAtten) from the hyper outputs and earlier slices."""
        mean_support = self.atten_mean[i](torch.cat([latent_means, *y_hat_slices], dim=1))
        scale_support = self.atten_scale[i](torch.cat([latent_scales, *y_hat_slices], dim=1))
        return self.cc_mean_transforms[i](mean_support), self.cc_scale_transforms[i](scale_support), mean_support

    def lrp(self, i: int, mean_support: Tensor, y_hat_slice: Tensor) -> Tensor:
        """Latent residual prediction: y_hat_slice + 0.5 tanh(lrp_i([mean_support, y_hat_slice]))."""
        return y_hat_slice + 0.5 * torch.tanh(self.lrp_transforms[i](torch.cat([mean_support, y_hat_slice], 1)))

    def forward(self, x: Tensor) -> dict[str, Any]:
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        z_offset = self.entropy_bottleneck._get_medians()
        z_hat = quantize_ste(z - z_offset) + z_offset
        latent_scales, latent_means = self.h_scale_s(z_hat), self.h_mean_s(z_hat)
        y_hat_slices: list[Tensor] = []
        likelihoods = []
        for i, y_slice in enumerate(y.chunk(self.slices, 1)):
            mu, scale, mean_support = self.slice_params(i, latent_means, latent_scales, y_hat_slices)
            _, lk = self.gaussian_conditional(y_slice, scale, mu)
            likelihoods.append(lk)
            y_hat_slices.append(self.lrp(i, mean_support, quantize_ste(y_slice - mu) + mu))
        x_hat = self.g_s(torch.cat(y_hat_slices, dim=1))
        return {"x_hat": x_hat, "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods}}

    def reference_slices(self, y: Tensor, z_hat: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The float entropy path in coding order for latents y and a quantized z_hat: (y_hat, each slice's
        y_hat before its LRP, each slice's y_hat after it), y_hat = round(y - mu) + mu as `compress` makes it.
        Calibration for the integer programs and the float side of their tests."""
        latent_scales, latent_means = self.h_scale_s(z_hat), self.h_mean_s(z_hat)
        before, after = [], []
        for i, y_slice in enumerate(y.chunk(self.slices, 1)):
            mu, _, mean_support = self.slice_params(i, latent_means, latent_scales, after)
            before.append(torch.round(y_slice - mu) + mu)
            after.append(self.lrp(i, mean_support, before[-1]))
        return torch.cat(after, dim=1), before, after

    def compress(self, x: Tensor) -> dict[str, Any]:
        """Float reference: {"strings": [z string, slice 0..S-1 strings] (each a list over the batch),
        "shape": z's H, W}. Needs `update()` first."""
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        latent_scales, latent_means = self.h_scale_s(z_hat), self.h_mean_s(z_hat)
        strings, y_hat_slices = [z_strings], []
        gc = self.gaussian_conditional
        for i, y_slice in enumerate(y.chunk(self.slices, 1)):
            mu, scale, mean_support = self.slice_params(i, latent_means, latent_scales, y_hat_slices)
            index = gc.build_indexes(scale)
            strings.append(gc.compress(y_slice, index, means=mu))
            y_q = gc.quantize(y_slice, "symbols", mu)
            y_hat_slices.append(self.lrp(i, mean_support, y_q + mu))
        return {"strings": strings, "shape": z.shape[-2:]}

    def decompress(self, strings: list[Any], shape: Any) -> dict[str, Tensor]:
        z_hat = self.entropy_bottleneck.decompress(strings[0], shape)
        latent_scales, latent_means = self.h_scale_s(z_hat), self.h_mean_s(z_hat)
        y_hat_slices: list[Tensor] = []
        gc = self.gaussian_conditional
        for i in range(self.slices):
            mu, scale, mean_support = self.slice_params(i, latent_means, latent_scales, y_hat_slices)
            y_hat = gc.decompress(strings[1 + i], gc.build_indexes(scale), means=mu)
            y_hat_slices.append(self.lrp(i, mean_support, y_hat))
        return {"x_hat": self.g_s(torch.cat(y_hat_slices, dim=1)).clamp(0, 1)}
