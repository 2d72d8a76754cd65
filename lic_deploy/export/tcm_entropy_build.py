"""TCM's entropy networks as integer programs (`entropy.tcm` runs them), calibrated on the float path.

One `Tracer` follows the whole float entropy path on the calibration crops, so that every program's inputs carry
the scales their producers chose: `hs` (z_hat -> latent means, latent scales), then per slice i `slice{i}`
(latent means and scales, ctx(y_hat) of the earlier slices -> mu, scale, the mean support after SWAtten) and
`lrp{i}` (the mean support, ctx(y_hat_i) -> 0.5 tanh(lrp), in y_hat's fixed point).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lic_deploy.entropy.intprog import Program
from lic_deploy.entropy.model import IN_MAX
from lic_deploy.export.intprog_build import Tracer, emit_conv_chain, emit_hyper_synthesis, emit_swatten


def build_tcm_programs(model: Any, calib_inputs: Sequence[Mapping[str, np.ndarray]], z_calib: Sequence[torch.Tensor],
                       z_frac: int, param_frac: int, ctx_frac: int) -> tuple[dict[str, Program], dict[str, list[str]]]:
    """(programs by name, output register names by program). `calib_inputs` hold the float y_hat of every
    slice before and after its LRP (`tcm_before{i}`, `tcm_after{i}`); `z_calib` the z_hat the programs see."""
    t = Tracer()
    slices, m = model.slices, model.M
    s = m // slices

    def ctx_vals(key: str) -> list[torch.Tensor]:  # what ctx(y_fp) means in real units, per crop
        return [torch.from_numpy(np.clip(np.floor(c[key] * 2**ctx_frac), -IN_MAX, IN_MAX) / 2**ctx_frac)
                for c in calib_inputs]

    z = t.input("z", list(z_calib), 2.0**-z_frac, IN_MAX)
    lm, ls = emit_hyper_synthesis(t, model.h_mean_s, z), emit_hyper_synthesis(t, model.h_scale_s, z)
    programs = {"hs": t.program(["z"])}
    outputs = {"hs": [lm, ls]}
    params_scale = np.full(s, 2.0**-param_frac)
    ys: list[str] = []
    for i in range(slices):
        mark = len(t.instrs)
        support = emit_swatten(t, model.atten_mean[i][0], t.concat([lm, *ys]))
        mu = emit_conv_chain(t, model.cc_mean_transforms[i], support, params_scale)
        scale_support = emit_swatten(t, model.atten_scale[i][0], t.concat([ls, *ys]))
        scale = emit_conv_chain(t, model.cc_scale_transforms[i], scale_support, params_scale)
        programs[f"slice{i}"] = t.program([lm, ls, *ys], since=mark)
        outputs[f"slice{i}"] = [mu, scale, support]
        mark = len(t.instrs)
        y_i = t.input(f"y_before{i}", ctx_vals(f"tcm_before{i}"), 2.0**-ctx_frac, IN_MAX)
        lrp = emit_conv_chain(t, model.lrp_transforms[i], t.concat([support, y_i]), None)
        delta = t.lut(lrp, lambda v: 0.5 * np.tanh(v), lambda v: 0.5 * torch.tanh(v), out_scale=2.0**-param_frac)
        programs[f"lrp{i}"] = t.program([support, y_i], since=mark)
        outputs[f"lrp{i}"] = [delta]
        ys.append(t.input(f"y{i}", ctx_vals(f"tcm_after{i}"), 2.0**-ctx_frac, IN_MAX))
    return programs, outputs

