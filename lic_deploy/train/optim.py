"""Optimizers: SOAP (lic-deploy's, `soap.py`, or pytorch-optimizer 4.1.0's: the same updates, merge_dims=False)
or Adam, plus CompressAI's auxiliary Adam.

Also the optimizers' current preconditioners applied to an arbitrary gradient, for the alignment metrics:
Adam maps g to g / (sqrt(v / (1 - beta2^t)) + eps); SOAP rotates g into the eigenbasis of its Kronecker
factors, divides by sqrt(v) + eps there, and rotates back.
"""

from __future__ import annotations

from typing import Any

import torch

OPTIMIZERS = ("soap", "adam")
DEFAULTS: dict[str, dict[str, Any]] = {
    # CompressAI's example training script.
    "adam": {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8},
    # The SOAP reference defaults (Vyas et al. 2024), weight decay off as for the Adam baseline.
    "soap": {"lr": 3e-3, "betas": (0.95, 0.95), "eps": 1e-8, "precondition_frequency": 10,
             "weight_decay": 0.0, "merge_dims": False, "max_precondition_dim": 10000},
}
AUX_LR = 1e-3


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(main parameters, entropy-bottleneck quantiles): the quantiles get their own Adam, as in CompressAI."""
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return main, aux


SOAP_IMPLS = ("lic-deploy", "pytorch-optimizer")  # the first is the default (train/soap.py: the same updates,
# two rotations per step instead of three); checkpoints record theirs, and a resume uses the one the run started with


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float | None = None,
                    soap_impl: str = SOAP_IMPLS[0], soap_bf16: bool = False
                    ) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """The main optimizer and its hyperparameters (for checkpoint metadata; SOAP's include `implementation`).
    `soap_bf16`: lic-deploy's SOAP with its convolution weights' rotations and statistics as bfloat16 GEMMs."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    hp = {**DEFAULTS[name], **({"lr": lr} if lr else {})}
    if name == "adam":
        if soap_bf16:
            raise ValueError("bfloat16 products are an option of SOAP, not of adam")
        return torch.optim.Adam(params, **hp), hp
    if soap_impl == "lic-deploy":
        from lic_deploy.train.soap import SOAP as LicSOAP

        hp["bf16_matmul"] = soap_bf16
        return LicSOAP(params, **hp), {**hp, "implementation": soap_impl}
    if soap_impl != "pytorch-optimizer":
        raise ValueError(f"unknown SOAP implementation {soap_impl!r}; choose from {', '.join(SOAP_IMPLS)}")
    if soap_bf16:
        raise ValueError("bfloat16 SOAP products need lic-deploy's SOAP implementation")
    from pytorch_optimizer import SOAP

    return SOAP(params, **hp), {**hp, "implementation": soap_impl}


@torch.no_grad()
def precondition(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[torch.Tensor]
                 ) -> list[torch.Tensor] | None:
    """The update direction the optimizer's current preconditioner gives `grads`; None before its state exists."""
    out = []
    for p, g in zip(params, grads, strict=True):
        state = opt.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
        if isinstance(opt, torch.optim.Adam):
            step = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
            out.append(g / (v_hat.sqrt() + group["eps"]))
        else:
            if state.get("Q") is None:
                return None
            kw = {"merge_dims": group["merge_dims"], "max_precondition_dim": group["max_precondition_dim"]}
            rotated = opt.project(g, state, **kw)
            out.append(opt.project(rotated / (state["exp_avg_sq"].sqrt() + group["eps"]), state,
                                   project_type="backward", **kw))
    return out
