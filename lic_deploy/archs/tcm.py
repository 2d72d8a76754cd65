"""TCM, the mixed Transformer-CNN codec (Liu, Sun, Katto, CVPR 2023), with the official checkpoints' key layout.

g_a: image -> y (M channels at H/16) through residual blocks with stride, ConvTransBlocks (window 8) and a
strided 3x3 conv; h_a: y -> z (Z channels at H/64) with ConvTransBlocks of window 4. Two hyper-synthesis
branches, `h_mean_s` and `h_scale_s`, give M-channel latent means and scales at H/16. y is coded in `slices`
channel slices in order; slice i's mean and scale come from `SWAtten` + a conv chain on [latent mean|scale,
y_hat of the earlier slices], and latent residual prediction adds 0.5 tanh(lrp(...)) to its y_hat, which
feeds the later slices. Images are padded to multiples of 128 pixels, at least 256 a side.

Official configurations: TCM-S/M/L = N 64/96/128 with M 320, 5 slices, 2 blocks per stage, SWAtten width 128,
conv chains 224 -> 128, Z 192 (`config_for("S")`). Narrow variants (smaller N, M, attn, cc1, cc2, Z) train on
a CPU for tests and benches; a checkpoint's config is read back from its weight shapes. This module stays
light (the registry imports it); the torch model is `lic_deploy.archs.tcm_model.TCM`.
"""

from __future__ import annotations

from typing import Any

OFFICIAL = {"S": 64, "M": 96, "L": 128}
DEFAULTS = {"M": 320, "slices": 5, "depth": 2, "attn": 128, "cc1": 224, "cc2": 128, "Z": 192}
HEAD_DIMS = (8, 16, 32, 32, 16, 8)  # g_a's three and g_s's three stages (official)
HYPER_HEAD_DIM, HYPER_WINDOW, WINDOW = 32, 4, 8
PAD_MULTIPLE, MIN_SIZE = 128, 256


def config_for(size: str) -> dict[str, int]:
    """The official TCM-S/M/L configuration."""
    return {"N": OFFICIAL[size], **DEFAULTS}


class TcmAdapter:
    """Recognises TCM checkpoints (official key layout, any of the configuration knobs) and builds the model."""

    name = "tcm"
    pad_multiple, min_size = PAD_MULTIPLE, MIN_SIZE

    def config_from_state_dict(self, state_dict: dict[str, Any]) -> dict[str, int] | None:
        try:
            n = int(state_dict["g_a.0.conv1.weight"].shape[0]) // 2
            m = int(state_dict["h_a.0.conv1.weight"].shape[1])
            slices = sum(1 for k in state_dict if k.startswith("lrp_transforms.") and k.endswith(".0.weight"))
            depth = sum(1 for k in state_dict if k.startswith("h_a.") and k.endswith(".conv1_1.weight"))
            config = {"N": n, "M": m, "slices": slices, "depth": depth,
                      "attn": int(state_dict["atten_mean.0.0.in_conv.weight"].shape[0]),
                      "cc1": int(state_dict["cc_mean_transforms.0.0.weight"].shape[0]),
                      "cc2": int(state_dict["cc_mean_transforms.0.2.weight"].shape[0]),
                      "Z": int(state_dict["entropy_bottleneck.quantiles"].shape[0])}
        except (KeyError, IndexError, AttributeError):
            return None
        return config if slices and depth else None

    def build(self, config: dict[str, int]) -> Any:
        from lic_deploy.archs.tcm_model import TCM

        return TCM(**{k: int(v) for k, v in config.items()})

    def spec(self, model: Any) -> Any:
        """Stages g_a, h_a, g_s (exported in every precision); the entropy networks stay in `context` (the
        model), converted to integer programs at export."""
        from lic_deploy.archs.base import CodecSpec, StageSpec
        from lic_deploy.archs.hyperprior import entropy_tables

        model.eval()
        model.update(force=True)
        m, z = model.M, model.Z
        stages = {"g_a": StageSpec("g_a", model.g_a, 3, m, 1), "h_a": StageSpec("h_a", model.h_a, m, z, 16),
                  "g_s": StageSpec("g_s", model.g_s, m, 3, 16)}
        return CodecSpec(arch=self.name, config=self.config_from_state_dict(model.state_dict()) or {},
                         stages=stages, pad_multiple=PAD_MULTIPLE, min_size=MIN_SIZE, y_channels=m, y_stride=16,
                         z_channels=z, z_stride=64, has_means=True, hs_net=None,
                         tables=entropy_tables(model.entropy_bottleneck, model.gaussian_conditional), context=model)


ADAPTERS = [TcmAdapter()]
