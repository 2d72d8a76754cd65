"""The package's entropy model, computed once at export so that no platform ever recomputes it.

Fixed-point conventions (stored in the arrays as `meta`):
- z_hat = z_sym + z_median_fp / 2**Z_FRAC_BITS, exactly; z_median_fp = round(median * 2**Z_FRAC_BITS).
  The integer h_s takes x_int = z_sym * 2**Z_FRAC_BITS + z_median_fp (|x_int| <= 2**15 - 1, clipped).
- h_s (integer network) outputs scales (and then means) as integers with PARAM_FRAC_BITS fractional bits.
- Gaussian table index = #{i < L-1 : scale_table[i] < scale} (CompressAI's `build_indexes`), computed as
  #{i : y_thresholds[i] < scale_int} with y_thresholds[i] = floor(scale_table[i] * 2**PARAM_FRAC_BITS).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lic_deploy.entropy.intnet import IntNet

Z_FRAC_BITS = 6
PARAM_FRAC_BITS = 8
IN_MAX = 2**15 - 1


def hs_input(z_hat: np.ndarray, median_fp: np.ndarray) -> np.ndarray:
    """Float z_hat [1, C, H, W] (on the z_sym + median grid) -> the integer network input [C, H, W]."""
    sym = np.round(z_hat[0].astype(np.float64) - median_fp[:, None, None] / 2**Z_FRAC_BITS)
    x = sym.astype(np.int64) * 2**Z_FRAC_BITS + median_fp[:, None, None]
    return np.clip(x, -IN_MAX, IN_MAX)


def build_entropy(spec: Any, calib_z_hat: Sequence[np.ndarray], *, act_bits: int = 16
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays for entropy.npz and a summary for the manifest. `calib_z_hat`: float [1, N, h, w] per crop."""
    import torch

    from lic_deploy.export.intnet_build import build_intnet

    t = spec.tables
    median_fp = np.round(t["z_median"] * 2**Z_FRAC_BITS).astype(np.int64)
    # Calibrate on exactly what the integer network will see (z_hat on the fixed-point median grid).
    calib = [torch.from_numpy((hs_input(z, median_fp)[None] / 2**Z_FRAC_BITS).astype(np.float32))
             for z in calib_z_hat]
    out_ch = spec.y_channels * (2 if spec.has_means else 1)
    net: IntNet = build_intnet(spec.hs_net, calib, in_frac_bits=Z_FRAC_BITS, in_max=IN_MAX, act_bits=act_bits,
                               out_frac_bits=np.full(out_ch, PARAM_FRAC_BITS, dtype=np.int64))
    thresholds = np.floor(t["y_scale_table"][:-1] * 2**PARAM_FRAC_BITS).astype(np.int64)
    meta = {"z_frac_bits": Z_FRAC_BITS, "param_frac_bits": PARAM_FRAC_BITS, "act_bits": act_bits,
            "has_means": bool(spec.has_means), "y_channels": spec.y_channels, "z_channels": spec.z_channels}
    arrays = {
        "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        "z_cdf": t["z_cdf"], "z_cdf_length": t["z_cdf_length"], "z_offset": t["z_offset"],
        "z_median_fp": median_fp,
        "y_cdf": t["y_cdf"], "y_cdf_length": t["y_cdf_length"], "y_offset": t["y_offset"],
        "y_scale_table": t["y_scale_table"], "y_thresholds": thresholds,
        **net.to_arrays("hs."),
    }
    return arrays, meta
