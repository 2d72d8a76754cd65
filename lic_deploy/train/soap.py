"""SOAP (Vyas et al. 2024) as pytorch-optimizer 4.1.0 computes it, in fewer operations.

Settings fixed to those lic-deploy trains with: merge_dims=False, precondition_1d=False, correct_bias=True,
normalize_gradient=False, decoupled weight decay. Per parameter tensor with dims d_1..d_k (each at most
`max_precondition_dim` gets a Kronecker factor; other dims and 1-D tensors are left unrotated):

    GG_i <- lerp(GG_i, g_(i) g_(i)^T, 1 - shampoo_beta)         statistics of every factor
    Q_i  = eigenvectors of GG_i (first step), then every `precondition_frequency` steps one power iteration
           and QR (the columns sorted by estimated eigenvalue, the second moment permuted with them)
    m    <- lerp(m, g, 1 - beta1),  v <- lerp(v, (Q^T g)^2, 1 - beta2)
    p    <- p - lr sqrt(1 - beta2^t) / (1 - beta1^t) * Q (Q^T m / (sqrt(v) + eps))

pytorch-optimizer keeps m in parameter space and rotates it into the eigenbasis every step: three rotations per
step (g, m forward; the update back). Rotation is linear and Q fixed between eigenbasis updates, so Q^T m can be
kept instead, updated with the rotated gradient it already has: two rotations per step, plus rotating m into
the new basis (Q_new^T Q_old m) when Q changes, once every `precondition_frequency` steps.

Every rotation is one GEMM per dim on a contiguous intermediate: the leading dim is contracted and moves to the
end, so after the last one the dims are back in place, with no copies; the statistic of each dim is taken from
the intermediate in which that dim leads, still unrotated (a factor's statistic contracts the other dims, which
orthogonal rotations leave unchanged), so the statistics cost no copies either. A 4-D weight [a, b, k1, k2] (a
convolution) with all four factors contracts a, then b, then both kernel dims at once with the 25x25 (or 9x9)
(Q_k1 (x) Q_k2)^T, kept with Q until it changes, so m and v live in the eigenbasis as [k1, k2, a, b];
pytorch-optimizer's per-dim tensordots multiply the 5-wide kernel dims as (n x 5) @ (5 x 5) products at a few
GFLOP/s. Equal to pytorch-optimizer's updates up to float32 rounding (tests/test_train.py compares them step by
step); `make bench-train` measures the optimizer part, and the operators a step dispatches (a GPU's launches).

On the CPU the moments' update runs one parameter at a time, in place, with the rotated gradient as scratch, so a
weight's m, v and rotated gradient stay in cache between the passes (on 2 CPU cores about 10 ms of a 90-100 ms
bf16 step less than the same operations over lists of every parameter); on a GPU, where launches cost more than
memory traffic, as `torch._foreach_*` passes over every parameter, the updates added in one more (on an H200,
N=128/M=192, batch 16: median 10.3 against 12.5 ms float32, 19.5 against 25.3 ms bf16). The two give
bit-identical updates.

`bf16_matmul=True` runs those 4-D products (rotations, statistics, and rotating m into a new eigenbasis) as
bfloat16 GEMMs with float32 accumulation, each product's output rounded to bfloat16; the moments, statistics and
eigenbases stay float32, and the other parameters' products too. Updates then agree to about 2^-8 instead of
float32 rounding; `make bench-soap-bf16` compares the loss curves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

FAST_PERM = (2, 3, 0, 1)  # a 4-D weight's m and v in the eigenbasis: [k1, k2, a, b] (see the module docstring)


def _layout(factors: list[torch.Tensor | None]) -> int:
    """1 for a 4-D weight with all four factors (m, v stored as [k1, k2, a, b]), else 0 (the parameter's layout)."""
    return int(len(factors) == 4 and all(f is not None for f in factors))


def _rotations(q: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """A 4-D weight's rotation matrices in the products' dtype: Q_a, Q_b and (Q_k1 (x) Q_k2)^T."""
    return [q[0].to(dtype), q[1].to(dtype), torch.kron(q[2], q[3]).T.to(dtype)]


def _to_eigen_4d(g: torch.Tensor, rot: list[torch.Tensor], gg: list[torch.Tensor] | None = None,
                 weight: float = 0.0) -> torch.Tensor:
    """Q^T g for g [a, b, k1, k2], returned as [k1, k2, a, b] in g's dtype, the products in the dtype of `rot`
    (`_rotations`); with `gg`, each factor statistic lerps towards its dim's g_(i) g_(i)^T by `weight` on the way."""
    a, b, k1, k2 = g.shape
    c = k1 * k2
    ga = g.reshape(a, b * c).to(rot[0].dtype)
    t1 = (ga.T @ rot[0]).view(b, c * a)  # [b, k1, k2, a]: a rotated
    t2 = (t1.T @ rot[1]).view(c, a * b)  # [k1, k2, a, b]: a and b rotated
    if gg is not None:
        gg[0].lerp_((ga @ ga.T).to(g.dtype), weight)
        gg[1].lerp_((t1 @ t1.T).to(g.dtype), weight)
        rows = t2.view(k1, k2 * a * b)
        gg[2].lerp_((rows @ rows.T).to(g.dtype), weight)
        blocks = t2.view(k1, k2, a * b)  # k2's statistic: the k1 blocks' Grams, summed
        gg[3].lerp_(torch.bmm(blocks, blocks.transpose(1, 2)).to(g.dtype).sum(0), weight)
    return (rot[2] @ t2).view(k1, k2, a, b).to(g.dtype)


def _from_eigen_4d(t: torch.Tensor, rot: list[torch.Tensor]) -> torch.Tensor:
    """Q t for t in the [k1, k2, a, b] layout; returns [a, b, k1, k2] in the dtype of `rot`, the products' dtype."""
    k1, k2, a, b = t.shape
    c = k1 * k2
    u = t.reshape(c * a, b).to(rot[1].dtype) @ rot[1].T  # b rotated back
    u = u.view(c, a * b).T @ rot[2]  # [a, b, k1, k2]: kernel dims rotated back
    return (rot[0] @ u.view(a, b * c)).view(a, b, k1, k2)


class SOAP(torch.optim.Optimizer):
    """See the module docstring. `project` has pytorch-optimizer's signature (the alignment metrics use it)."""

    per_parameter: bool | None = None  # the moments one parameter at a time (None: on the CPU), else foreach lists

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0,
                 precondition_frequency: int = 10, max_precondition_dim: int = 10000, merge_dims: bool = False,
                 bf16_matmul: bool = False) -> None:
        if merge_dims:
            raise ValueError("this SOAP implements merge_dims=False only")
        defaults = {"lr": lr, "betas": betas, "shampoo_beta": shampoo_beta, "eps": eps, "weight_decay": weight_decay,
                    "precondition_frequency": precondition_frequency, "max_precondition_dim": max_precondition_dim,
                    "merge_dims": False, "bf16_matmul": bf16_matmul, "step": 0}
        super().__init__(params, defaults)

    @staticmethod
    def _rotate(t: torch.Tensor, q: list[torch.Tensor | None], back: bool = False,
                gg: list[torch.Tensor | None] | None = None, weight: float = 0.0) -> torch.Tensor:
        """Contract every dim with its Q (Q^T t forward, Q t back), one GEMM per dim: the leading dim is
        contracted and moves to the end, so after the last dim all are back in place; a dim without a factor only
        moves. With `gg`, each factor statistic lerps by `weight` towards g_(i) g_(i)^T, taken from the
        intermediate in which dim i leads, still unrotated (the other dims' rotations leave it unchanged)."""
        shape = t.shape
        for i, (n, mat) in enumerate(zip(shape, q, strict=True)):
            x = t.reshape(n, -1)
            if gg is not None and gg[i] is not None:
                gg[i].lerp_(x @ x.T, weight)  # type: ignore[union-attr]
            t = x.T if mat is None else x.T @ (mat.T if back else mat)
        return t.reshape(shape)

    @staticmethod
    def _rot(state: dict[str, Any], dtype: torch.dtype) -> list[torch.Tensor]:
        """A 4-D weight's `_rotations`, those the step keeps in the state (`rot`) when they have `dtype`."""
        rot = state.get("rot")
        return rot if rot is not None and rot[0].dtype == dtype else _rotations(state["Q"], dtype)

    @classmethod
    def _to_eigen(cls, g: torch.Tensor, state: dict[str, Any], beta: float | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """g in the eigenbasis (in the state's layout): a view of g for a parameter without factors, else a new
        tensor; with `beta`, the factor statistics are updated too. `dtype`: a 4-D weight's products (default g's)."""
        gg = state["GG"] if beta is not None else None
        if state["layout"]:
            return _to_eigen_4d(g, cls._rot(state, dtype or g.dtype), gg, 1.0 - (beta or 0.0))
        return cls._rotate(g, state["Q"], gg=gg, weight=1.0 - (beta or 0.0))

    @classmethod
    def _from_eigen(cls, t: torch.Tensor, state: dict[str, Any], dtype: torch.dtype | None = None) -> torch.Tensor:
        if state["layout"]:
            return _from_eigen_4d(t, cls._rot(state, dtype or t.dtype))
        return cls._rotate(t, state["Q"], back=True)

    def project(self, grad: torch.Tensor, state: dict[str, Any], merge_dims: bool = False,
                max_precondition_dim: int = 10000, project_type: str = "forward") -> torch.Tensor:
        return self._to_eigen(grad, state) if project_type == "forward" else self._from_eigen(grad, state)

    @staticmethod
    def _accumulate(grad: torch.Tensor, factors: list[torch.Tensor | None], beta: float) -> None:
        """GG_i <- lerp(GG_i, g_(i) g_(i)^T, 1 - beta) for every factor (tensors of two or more dims only); the
        first step's statistics (later steps take them on the way into the eigenbasis)."""
        for i, gg in enumerate(factors):
            if gg is not None:
                other = [*chain(range(i), range(i + 1, grad.dim()))]
                gg.lerp_(torch.tensordot(grad, grad, dims=[other, other]), 1.0 - beta)

    @staticmethod
    def _eigenbases(state: dict[str, Any]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for gg in state["GG"]:
            if gg is None:
                out.append(None)
                continue
            eye = torch.eye(gg.shape[0], device=gg.device, dtype=gg.dtype)
            try:
                q = torch.linalg.eigh(gg + 1e-30 * eye)[1]
            except RuntimeError:  # as pytorch-optimizer: retry in float64
                q = torch.linalg.eigh(gg.double() + 1e-30 * eye.double())[1].to(gg.dtype)
            out.append(torch.flip(q, dims=[1]))
        return out

    @classmethod
    def _rebase(cls, m: torch.Tensor, r: list[torch.Tensor | None], state: dict[str, Any],
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """m from the old eigenbasis into the new one: Q_new^T Q_old m, one rotation by the factors
        R_i = Q_old_i^T Q_new_i. A 4-D weight's m is rotated in its [k1, k2, a, b] layout, as [k1 k2, a, b] whose
        cycle of GEMMs ends where it starts (products in `dtype`, default m's)."""
        if state["layout"]:
            k1, k2, a, b = m.shape
            ra, rb, rk = _rotations(r, dtype or m.dtype)  # type: ignore[arg-type]
            return cls._rotate(m.reshape(k1 * k2, a, b).to(ra.dtype), [rk.T, ra, rb]).view(m.shape).to(m.dtype)
        return cls._rotate(m, r)

    @classmethod
    def _new_eigenbases(cls, states: list[dict[str, Any]], dtype: torch.dtype | None) -> None:
        """One power iteration per factor and QR, batched over the factors of one size (a few calls instead of
        several per factor; on a GPU, launches). As pytorch-optimizer, each QR takes the columns of GG Q sorted by
        estimated eigenvalue; pytorch-optimizer then permutes the second moment v to that order, here the new Q's
        columns are put back in v's order instead (n x n numbers instead of all of v; the pairs of eigenvector and
        v entry are the same, and so the next update's sorted columns). Then every m is rotated into its new basis."""
        groups: dict[tuple[Any, ...], list[tuple[dict[str, Any], int]]] = {}
        for st in states:
            for i, gg in enumerate(st["GG"]):
                if gg is not None:
                    groups.setdefault((gg.shape, gg.dtype, gg.device), []).append((st, i))
        new = {id(st): (list(st["Q"]), list(st["Q"])) for st in states}  # new Q, R = Q_old^T Q_new per factor
        for (_, kind, _), items in groups.items():
            q = torch.stack([st["Q"][i] for st, i in items])
            product = torch.bmm(torch.stack([st["GG"][i] for st, i in items]), q)
            order = torch.argsort((q * product).sum(1), dim=1, descending=True)[:, None, :].expand_as(q)
            ranked = torch.linalg.qr(product.gather(2, order).to(torch.float32))[0].to(kind)  # as pytorch-optimizer
            q_new = torch.empty_like(ranked).scatter_(2, order, ranked)  # the columns back in v's order
            r = torch.bmm(q.transpose(1, 2), q_new)
            for (st, i), qi, ri in zip(items, q_new, r, strict=True):
                new[id(st)][0][i], new[id(st)][1][i] = qi, ri
        for st in states:
            st["Q"], r = new[id(st)]
            st.pop("rot", None)
            st["exp_avg"] = cls._rebase(st["exp_avg"], r, st, dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also resumes states saved before the 4-D layout existed: their m and v are permuted into it."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "GG" in state and "layout" not in state:
                state["layout"] = _layout(state["GG"])
                if state["layout"]:
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = state[key].permute(FAST_PERM).contiguous()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            shampoo = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
            live = [p for p in group["params"] if p.grad is not None]
            for p in live:
                state = self.state[p]
                if not state:
                    g = p.grad
                    state["GG"] = [torch.zeros(n, n, device=g.device, dtype=g.dtype)
                                   if g.dim() > 1 and n <= group["max_precondition_dim"] else None for n in g.shape]
                    state["layout"] = _layout(state["GG"])
                    shape = [g.shape[i] for i in FAST_PERM] if state["layout"] else g.shape
                    state["exp_avg"] = g.new_zeros(shape)  # the first moment, in the eigenbasis
                    state["exp_avg_sq"] = g.new_zeros(shape)
                    self._accumulate(g, state["GG"], shampoo)
                    state["Q"] = self._eigenbases(state)
            group["step"] += 1
            if group["step"] == 1:
                continue
            t = group["step"] - 1
            size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
            states = [self.state[p] for p in live]
            dtype = torch.bfloat16 if group.get("bf16_matmul") else None  # (absent from checkpoints before it)
            for p, st in zip(live, states, strict=True):  # a 4-D weight's rotation matrices, until Q changes
                if st["layout"]:
                    st["rot"] = self._rot(st, dtype or p.dtype)
            per_parameter = self.per_parameter if self.per_parameter is not None else not live[0].is_cuda
            if per_parameter:  # one parameter at a time: its chain stays in cache (CPU)
                for p, st in zip(live, states, strict=True):
                    r = self._to_eigen(p.grad, st, shampoo, dtype)
                    if r.data_ptr() == p.grad.data_ptr():  # no factors: a view of the grad, reused below as scratch
                        r = r.clone()
                    m = st["exp_avg"].lerp_(r, 1.0 - beta1)
                    v = st["exp_avg_sq"].lerp_(r.mul_(r), 1.0 - beta2)
                    denominator = torch.sqrt(v, out=r).add_(group["eps"])
                    # a 4-D weight's bf16 products take m / denominator rounded to bf16 as they are written
                    u = torch.empty_like(r, dtype=dtype) if dtype is not None and st["layout"] else r
                    p.add_(self._from_eigen(torch.div(m, denominator, out=u), st, dtype), alpha=-size)
            else:  # every parameter's moments in a few foreach launches (GPU)
                rotated = [self._to_eigen(p.grad, st, shampoo, dtype) for p, st in zip(live, states, strict=True)]
                ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
                torch._foreach_lerp_(ms, rotated, 1.0 - beta1)
                torch._foreach_lerp_(vs, torch._foreach_mul(rotated, rotated), 1.0 - beta2)
                denominators = torch._foreach_sqrt(vs)
                torch._foreach_add_(denominators, group["eps"])
                updates = [self._from_eigen(u, st, dtype)
                           for st, u in zip(states, torch._foreach_div(ms, denominators), strict=True)]
                torch._foreach_add_(live, updates, alpha=-size)
            if group["weight_decay"]:
                torch._foreach_mul_(live, 1.0 - group["lr"] * group["weight_decay"])
            if t % group["precondition_frequency"] == 0:
                self._new_eigenbases(states, dtype)
        return loss
