"""ELIC (He et al., CVPR 2022) as CompressAI builds it (`Elic2022Official`): a hyperprior whose y is coded in
uneven channel groups [16, 16, 32, 64, M - 128], each with a channel context (all earlier groups), a
checkerboard spatial context (anchors first, then non-anchors) and a 1x1 parameter-aggregation network.

Stages: g_a, h_a, h_s (z_hat -> 2N side parameters), g_s, and per group k the context networks `cc{k}`
(k >= 1: earlier groups' y_hat -> 2 g_k), `sp{k}` (the group's anchors' y_hat -> 2 g_k; the checkerboard mask is
baked into the weight) and `agg{k}` ([spatial, channel, side] parameters -> scales, means). The codec runs the
context networks as integer networks (`lic_deploy.entropy.elic`); their float graphs are exported for
inspection and for other runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lic_deploy.archs.base import CodecSpec, StageSpec
from lic_deploy.archs.hyperprior import entropy_tables
from lic_deploy.entropy.elic import anchor_mask

CC_WIDTHS = (224, 128)  # CompressAI's channel-context hidden widths


def default_groups(m: int) -> list[int]:
    """ELIC's uneven channel groups for M latent channels (M > 128)."""
    return [16, 16, 32, 64, m - 128]


@dataclass
class ContextSpec:
    """ELIC's entropy-parameter networks as plain nn.Sequential of Conv2d / ReLU (index k = group)."""

    groups: list[int]
    channel: list[Any]  # cc_k; None for k = 0
    spatial: list[Any]  # one Conv2d, checkerboard mask applied to its weight
    aggregate: list[Any]  # 1x1 convs; output = [scales (g_k), means (g_k)]
    side_channels: int  # 2N, the h_s output


def _masked_as_conv(masked: Any) -> Any:
    """A plain Conv2d equal to CompressAI's MaskedConv2d (weight * mask), so that export and IntNet see it."""
    import torch

    conv = torch.nn.Conv2d(masked.in_channels, masked.out_channels, masked.kernel_size, masked.stride,
                           masked.padding)
    with torch.no_grad():
        conv.weight.copy_(masked.weight * masked.mask)
        conv.bias.copy_(masked.bias)
    return torch.nn.Sequential(conv)


class ElicAdapter:
    name = "elic"
    pad_multiple, min_size = 64, 64

    def config_from_state_dict(self, state_dict: dict[str, Any]) -> dict[str, int] | None:
        try:
            n = int(state_dict["g_a.0.weight"].shape[0])
            m = int(state_dict["g_a.13.weight"].shape[0])
            cc1 = int(state_dict["latent_codec.y.channel_context.y1.0.weight"].shape[0])
            cc2 = int(state_dict["latent_codec.y.channel_context.y1.2.weight"].shape[0])
        except (KeyError, IndexError, AttributeError):
            return None
        return {"N": n, "M": m, "cc1": cc1, "cc2": cc2}

    def build(self, config: dict[str, int]) -> Any:
        import torch
        from compressai.models import Elic2022Official
        from compressai.models.utils import conv

        n, m = int(config["N"]), int(config["M"])
        if m <= 128:
            raise ValueError(f"ELIC needs M > 128 (channel groups 16, 16, 32, 64, M-128), got M={m}")
        model = Elic2022Official(N=n, M=m)
        widths = (int(config.get("cc1", CC_WIDTHS[0])), int(config.get("cc2", CC_WIDTHS[1])))
        if widths != CC_WIDTHS:  # a narrower channel context (CPU training); CompressAI's layout otherwise
            groups, cc = model.groups, model.latent_codec["y"].channel_context
            for k in range(1, len(groups)):
                cc[f"y{k}"] = torch.nn.Sequential(
                    conv(sum(groups[:k]), widths[0], kernel_size=5, stride=1), torch.nn.ReLU(inplace=True),
                    conv(widths[0], widths[1], kernel_size=5, stride=1), torch.nn.ReLU(inplace=True),
                    conv(widths[1], groups[k] * 2, kernel_size=5, stride=1))
        return model

    def spec(self, model: Any) -> CodecSpec:
        import torch

        model.eval()
        model.update(force=True)
        groups = list(model.groups)
        n, m = int(model.g_a[0].weight.shape[0]), sum(groups)
        hyper, ych = model.latent_codec["hyper"], model.latent_codec["y"]
        codecs = [ych.latent_codec[f"y{k}"] for k in range(len(groups))]
        gcs = [c.latent_codec["y"].gaussian_conditional for c in codecs]
        for gc in gcs[1:]:
            if not torch.equal(gc.scale_table, gcs[0].scale_table):
                raise ValueError("ELIC groups with different scale tables are not supported")
        ctx = ContextSpec(
            groups=groups,
            channel=[None, *[ych.channel_context[f"y{k}"] for k in range(1, len(groups))]],
            spatial=[_masked_as_conv(c.context_prediction) for c in codecs],
            aggregate=[c.entropy_parameters for c in codecs],
            side_channels=2 * n,
        )
        stages = {
            "g_a": StageSpec("g_a", model.g_a, 3, m, 1),
            "h_a": StageSpec("h_a", hyper.h_a, m, n, 16),
            "h_s": StageSpec("h_s", hyper.h_s, n, 2 * n, 64),
            "g_s": StageSpec("g_s", model.g_s, m, 3, 16),
        }
        for k, g in enumerate(groups):
            if k:
                stages[f"cc{k}"] = StageSpec(f"cc{k}", ctx.channel[k], sum(groups[:k]), 2 * g, 16)
            stages[f"sp{k}"] = StageSpec(f"sp{k}", ctx.spatial[k], g, 2 * g, 16)
            agg_in = 2 * g * (2 if k else 1) + 2 * n
            stages[f"agg{k}"] = StageSpec(f"agg{k}", ctx.aggregate[k], agg_in, 2 * g, 16)
        return CodecSpec(
            arch=self.name, config=self.config_from_state_dict(model.state_dict()) or {"N": n, "M": m},
            stages=stages, pad_multiple=64, y_channels=m, y_stride=16, z_channels=n, z_stride=64,
            has_means=True, hs_net=torch.nn.Sequential(*hyper.h_s),
            tables=entropy_tables(hyper.entropy_bottleneck, gcs[0]), context=ctx,
        )


def reference_pass(ctx: ContextSpec, y: Any, side: Any) -> tuple[Any, dict[str, list[Any]]]:
    """The float entropy-parameter path in CompressAI's compress order (groups, then anchors and non-anchors).

    y [1, M, H, W] and side [1, 2N, H, W] are torch tensors. Returns (y_hat, the input each context stage saw,
    per stage name, one tensor per call); y_hat = round(y - mean) + mean with the float means, as CompressAI's
    `compress` reconstructs it. Used for calibration, verification and tests; the codec uses the integer path.
    """
    import torch

    _, _, h, w = y.shape
    anchor = torch.from_numpy(anchor_mask(h, w))
    y_hat = torch.zeros_like(y)
    seen: dict[str, list[Any]] = {}
    c0 = 0
    with torch.no_grad():
        for k, g in enumerate(ctx.groups):
            c1 = c0 + g
            feats = [side]
            if k:
                seen.setdefault(f"cc{k}", []).append(y_hat[:, :c0].clone())
                feats = [ctx.channel[k](y_hat[:, :c0]), side]
            for sel in (anchor, ~anchor):
                if sel is anchor:
                    s = torch.zeros(1, 2 * g, h, w, dtype=y.dtype)
                else:
                    seen.setdefault(f"sp{k}", []).append(y_hat[:, c0:c1].clone())
                    s = ctx.spatial[k](y_hat[:, c0:c1])
                a_in = torch.cat([s, *feats], dim=1)
                seen.setdefault(f"agg{k}", []).append(a_in)
                means = ctx.aggregate[k](a_in)[:, g:]
                q = torch.round(y[:, c0:c1] - means) + means
                y_hat[:, c0:c1] = torch.where(sel, q, y_hat[:, c0:c1])
            c0 = c1
    return y_hat, seen


ADAPTERS = [ElicAdapter()]
