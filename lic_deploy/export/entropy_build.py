"""The package's entropy model, computed once at export so that no platform ever recomputes it.

Fixed-point conventions (stored in the arrays as `meta`):
- z_median_fp = round(median * 2**Z_FRAC_BITS); h_s becomes an integer network whose outputs carry
  PARAM_FRAC_BITS fractional bits (see `lic_deploy.entropy.model` for how the runtime uses them).
- ELIC (`lic_deploy.entropy.elic`): h_s returns int16 codes, and the context networks read y_hat with
  CTX_FRAC_BITS fractional bits.
- y_thresholds[i] = floor(scale_table[i] * 2**PARAM_FRAC_BITS), so that for an integer scale s,
  s > y_thresholds[i]  <=>  s / 2**PARAM_FRAC_BITS > scale_table[i]: CompressAI's `build_indexes`, exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lic_deploy.entropy.intnet import IntNet
from lic_deploy.entropy.model import IN_MAX, hs_input

Z_FRAC_BITS = 6
PARAM_FRAC_BITS = 8
CTX_FRAC_BITS = 6  # fractional bits of the y_hat that ELIC's context networks read


def build_entropy(spec: Any, calib_inputs: Sequence[Mapping[str, np.ndarray]], *, act_bits: int = 16
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays for entropy.npz and a summary for the manifest. `calib_inputs`: per calibration crop, the float
    stage inputs (`stage_inputs`); h_s is calibrated on their z_hat ("h_s"), ELIC's context networks on the
    float context path (`reference_pass`) of their y ("h_a")."""
    import torch

    from lic_deploy.export.intnet_build import build_intnet

    t = spec.tables
    median_fp = np.round(t["z_median"] * 2**Z_FRAC_BITS).astype(np.int64)
    # Calibrate on exactly what the integer network will see (z_hat on the fixed-point median grid).
    med = median_fp[:, None, None] / 2**Z_FRAC_BITS
    z_calib = [torch.from_numpy((hs_input(np.floor(c["h_s"][0] - med + 0.5).astype(np.int64), median_fp,
                                          Z_FRAC_BITS)[None] / 2**Z_FRAC_BITS).astype(np.float32))
               for c in calib_inputs]
    meta = {"z_frac_bits": Z_FRAC_BITS, "param_frac_bits": PARAM_FRAC_BITS, "act_bits": act_bits,
            "has_means": bool(spec.has_means), "y_channels": spec.y_channels, "z_channels": spec.z_channels}
    programs: dict[str, Any] = {}
    if spec.arch == "tcm":
        from lic_deploy.export.tcm_entropy_build import build_tcm_programs

        programs, outputs = build_tcm_programs(spec.context, calib_inputs, z_calib, Z_FRAC_BITS, PARAM_FRAC_BITS,
                                               CTX_FRAC_BITS)
        nets = {}
        meta |= {"kind": "tcm", "slices": spec.context.slices, "ctx_frac_bits": CTX_FRAC_BITS, "outputs": outputs}
    elif spec.context is None:
        out_ch = spec.y_channels * (2 if spec.has_means else 1)
        nets = {"hs": build_intnet(spec.hs_net, z_calib, in_frac_bits=Z_FRAC_BITS, in_max=IN_MAX, act_bits=act_bits,
                                   out_frac_bits=np.full(out_ch, PARAM_FRAC_BITS, dtype=np.int64))}
    else:
        nets = _elic_nets(spec, calib_inputs, z_calib, act_bits)
        meta |= {"kind": "elic", "groups": spec.context.groups, "ctx_frac_bits": CTX_FRAC_BITS,
                 "side_channels": spec.context.side_channels}
    thresholds = np.floor(t["y_scale_table"][:-1] * 2**PARAM_FRAC_BITS).astype(np.int64)
    arrays = {
        "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        "z_cdf": t["z_cdf"], "z_cdf_length": t["z_cdf_length"], "z_offset": t["z_offset"],
        "z_median_fp": median_fp,
        "y_cdf": t["y_cdf"], "y_cdf_length": t["y_cdf_length"], "y_offset": t["y_offset"],
        "y_scale_table": t["y_scale_table"], "y_thresholds": thresholds,
    }
    for name, net in (nets | programs).items():
        arrays |= net.to_arrays(f"{name}.")
    return arrays, meta


def _elic_nets(spec: Any, calib_inputs: Sequence[Mapping[str, np.ndarray]], z_calib: Sequence[Any],
               act_bits: int) -> dict[str, IntNet]:
    """ELIC's integer h_s (int codes out), per-group context networks and aggregation networks (see
    `lic_deploy.entropy.elic`), calibrated on the float context path of the calibration crops."""
    import torch

    from lic_deploy.archs.elic import reference_pass
    from lic_deploy.export.intnet_build import build_scaled_intnet as build

    ctx, n = spec.context, spec.z_channels
    qmax = 2 ** (act_bits - 1) - 1
    hs, s_side = build(spec.hs_net, z_calib, in_scale=np.full(n, 2.0**-Z_FRAC_BITS), in_max=IN_MAX,
                       act_bits=act_bits, out_scale=None)
    seen: dict[str, list[Any]] = {}
    with torch.no_grad():
        for c, z in zip(calib_inputs, z_calib, strict=True):
            _, inputs = reference_pass(ctx, torch.from_numpy(c["h_a"]), spec.hs_net(z))
            for name, tensors in inputs.items():
                seen.setdefault(name, []).extend(tensors)
    nets: dict[str, IntNet] = {"hs": hs}
    ctx_scale = 2.0**-CTX_FRAC_BITS
    for k, g in enumerate(ctx.groups):
        scales = []
        nets[f"sp{k}"], s_sp = build(ctx.spatial[k], seen[f"sp{k}"], in_scale=np.full(g, ctx_scale), in_max=IN_MAX,
                                     act_bits=act_bits, out_scale=None)
        scales.append(np.full(2 * g, s_sp))
        if k:
            nets[f"cc{k}"], s_cc = build(ctx.channel[k], seen[f"cc{k}"], in_scale=np.full(sum(ctx.groups[:k]),
                                                                                            ctx_scale),
                                         in_max=IN_MAX, act_bits=act_bits, out_scale=None)
            scales.append(np.full(2 * g, s_cc))
        scales.append(np.full(ctx.side_channels, s_side))
        nets[f"agg{k}"], _ = build(ctx.aggregate[k], seen[f"agg{k}"], in_scale=np.concatenate(scales), in_max=qmax,
                                   act_bits=act_bits, out_scale=np.full(2 * g, 2.0**-PARAM_FRAC_BITS))
    return nets
