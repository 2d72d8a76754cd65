"""The package's entropy model, computed once at export so that no platform ever recomputes it.

Fixed-point conventions (stored in the arrays as `meta`):
- z_median_fp = round(median * 2**Z_FRAC_BITS); h_s becomes an integer network whose outputs carry
  PARAM_FRAC_BITS fractional bits (see `lic_deploy.entropy.model` for how the runtime uses them).
- y_thresholds[i] = floor(scale_table[i] * 2**PARAM_FRAC_BITS), so that for an integer scale s,
  s > y_thresholds[i]  <=>  s / 2**PARAM_FRAC_BITS > scale_table[i]: CompressAI's `build_indexes`, exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lic_deploy.entropy.intnet import IntNet
from lic_deploy.entropy.model import IN_MAX, hs_input

Z_FRAC_BITS = 6
PARAM_FRAC_BITS = 8


def build_entropy(spec: Any, calib_z_hat: Sequence[np.ndarray], *, act_bits: int = 16
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays for entropy.npz and a summary for the manifest. `calib_z_hat`: float [1, N, h, w] per crop."""
    import torch

    from lic_deploy.export.intnet_build import build_intnet

    t = spec.tables
    median_fp = np.round(t["z_median"] * 2**Z_FRAC_BITS).astype(np.int64)
    # Calibrate on exactly what the integer network will see (z_hat on the fixed-point median grid).
    med = median_fp[:, None, None] / 2**Z_FRAC_BITS
    calib = [torch.from_numpy((hs_input(np.floor(z[0] - med + 0.5).astype(np.int64), median_fp, Z_FRAC_BITS)[None]
                               / 2**Z_FRAC_BITS).astype(np.float32)) for z in calib_z_hat]
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
