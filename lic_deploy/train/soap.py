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

The parameters of one shape are stepped together (mbt2018-mean: 49 parameters, 17 shapes): their gradients
stacked, every rotation and statistic one batched GEMM per shape, their GG_i, Q_i, m and v kept in stacks
[k, ...] whose slices the per-parameter states hold as views (saved once by torch.save; after an eigenbasis
update or a load the states' new tensors are copied into the stacks). A shape with one parameter keeps its own
tensors and plain GEMMs. On a GPU, where a step is launch-bound, this cuts the operators a step dispatches from
1171 to 519 (`make bench-train`'s host side); on 2 CPU cores it is a little faster than one parameter at a time
(session 12, interleaved A/B: bf16 optimizer part 109.0 -> 99.6 ms, float32 150.9 -> 146.6).

The moments' update runs one shape at a time, in place, with the rotated gradients as scratch, so their m, v and
rotated gradient stay in cache between the passes (session 11, on the CPU, per parameter: about 10 ms of a 90-100
ms bf16 step less than the same operations over lists of every parameter); an eager step on a GPU runs them as
`torch._foreach_*` passes over every shape instead (fewer launches). The two give bit-identical updates.

On CUDA the plain steps (all but the eigenbasis update) are one CUDA graph, captured after two eager warm-up steps
on a side stream and replayed: a step then costs one launch instead of about 520 operators dispatched from Python.
What the graph reads must stay at its addresses and hold no baked-in value: the gradients are copied into a
buffer per shape first (so `zero_grad(set_to_none=True)` is fine), the step size and the weight-decay factor
(bias correction, learning-rate schedules) come from a tensor, and the stacks are allocated once, the eigenbasis
update (eager, every `precondition_frequency` steps: its QRs loop over matrices in cuSOLVER) writing into them.
The graph is captured again when the live parameters or the constants it holds change, and after a load. Replayed
and eager steps agree to float32 rounding and resume bit-exactly (the `gpu` tests, run on an H200). A whole step
against Adam's on an H200 (session 13, batch 16, 256 px, means; docs/benchmarks.md): 1.18x and 1.28x with the
graph and the moments in place (the default), 1.24-1.35x with the graph over foreach lists, 1.36x eager, 2.65-2.85x
with pytorch-optimizer's SOAP. If a capture fails, the steps stay eager, with a warning.

`bf16_matmul=True` runs those 4-D products (rotations, statistics, and rotating m into a new eigenbasis) as
bfloat16 GEMMs with float32 accumulation, each product's output rounded to bfloat16; the moments, statistics and
eigenbases stay float32, and the other parameters' products too. Updates then agree to about 2^-8 instead of
float32 rounding; `make bench-soap-bf16` compares the loss curves.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from functools import partial
from itertools import chain
from typing import Any

import torch

FAST_PERM = (2, 3, 0, 1)  # a 4-D weight's m and v in the eigenbasis: [k1, k2, a, b] (see the module docstring)
Stack = dict[Any, Any]  # a group's stacked tensors (`SOAP._stacked`)


def _layout(factors: list[torch.Tensor | None]) -> int:
    """1 for a 4-D weight with all four factors (m, v stored as [k1, k2, a, b]), else 0 (the parameter's layout)."""
    return int(len(factors) == 4 and all(f is not None for f in factors))


def _mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[k, m, n] @ [k, n, p]: one bmm, or for k = 1 one mm (on 2 CPU cores a bmm of one bfloat16 product with a
    transposed operand takes 10-20 % longer than the mm)."""
    return (x[0] @ y[0]).unsqueeze(0) if x.shape[0] == 1 else torch.bmm(x, y)


def _gram(x: torch.Tensor) -> torch.Tensor:
    return _mm(x, x.transpose(1, 2))


def _rotations(q: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """4-D weights' rotation matrices, stacked [k, n, n], in the products' dtype: Q_a, Q_b and (Q_k1 (x) Q_k2)^T."""
    k, n1, n2 = q[2].shape[0], q[2].shape[1], q[3].shape[1]
    kron = (q[2][:, :, None, :, None] * q[3][:, None, :, None, :]).reshape(k, n1 * n2, n1 * n2)
    return [q[0].to(dtype), q[1].to(dtype), kron.transpose(1, 2).to(dtype)]


def _to_eigen_4d(g: torch.Tensor, rot: list[torch.Tensor], gg: list[torch.Tensor] | None = None,
                 weight: float = 0.0) -> torch.Tensor:
    """Q^T g for stacked weights g [k, a, b, k1, k2], returned as [k, k1, k2, a, b] in g's dtype, the products in
    the dtype of `rot` (`_rotations`); with `gg` (stacked factors), each lerps towards its dim's g_(i) g_(i)^T by
    `weight` on the way."""
    k, a, b, k1, k2 = g.shape
    c = k1 * k2
    ga = g.reshape(k, a, b * c).to(rot[0].dtype)
    t1 = _mm(ga.transpose(1, 2), rot[0]).view(k, b, c * a)  # [b, k1, k2, a]: a rotated
    t2 = _mm(t1.transpose(1, 2), rot[1]).view(k, c, a * b)  # [k1, k2, a, b]: a and b rotated
    if gg is not None:
        gg[0].lerp_(_gram(ga).to(g.dtype), weight)
        gg[1].lerp_(_gram(t1).to(g.dtype), weight)
        gg[2].lerp_(_gram(t2.view(k, k1, k2 * a * b)).to(g.dtype), weight)
        blocks = t2.view(k * k1, k2, a * b)  # k2's statistic: the k1 blocks' Grams, summed
        gg[3].lerp_(torch.bmm(blocks, blocks.transpose(1, 2)).to(g.dtype).view(k, k1, k2, k2).sum(1), weight)
    return _mm(rot[2], t2).view(k, k1, k2, a, b).to(g.dtype)


def _from_eigen_4d(t: torch.Tensor, rot: list[torch.Tensor]) -> torch.Tensor:
    """Q t for stacked t in the [k, k1, k2, a, b] layout; returns [k, a, b, k1, k2] in the products' dtype."""
    k, k1, k2, a, b = t.shape
    c = k1 * k2
    u = _mm(t.reshape(k, c * a, b).to(rot[1].dtype), rot[1].transpose(1, 2))  # b rotated back
    u = _mm(u.view(k, c, a * b).transpose(1, 2), rot[2])  # [a, b, k1, k2]: kernel dims rotated back
    return _mm(rot[0], u.view(k, a, b * c)).view(k, a, b, k1, k2)


def _rotate(t: torch.Tensor, q: list[torch.Tensor | None], back: bool = False,
            gg: list[torch.Tensor | None] | None = None, weight: float = 0.0) -> torch.Tensor:
    """Contract every dim of stacked t [k, ...] with its stacked Q (Q^T t forward, Q t back), one GEMM per dim:
    the leading dim is contracted and moves to the end, so after the last dim all are back in place; a dim without
    a factor only moves. With `gg`, each factor statistic lerps by `weight` towards g_(i) g_(i)^T, taken from the
    intermediate in which dim i leads, still unrotated (the other dims' rotations leave it unchanged)."""
    k, shape = t.shape[0], t.shape[1:]
    for i, (n, mat) in enumerate(zip(shape, q, strict=True)):
        x = t.reshape(k, n, -1)
        if gg is not None and gg[i] is not None:
            gg[i].lerp_(_gram(x), weight)  # type: ignore[union-attr]
        t = x.transpose(1, 2) if mat is None else _mm(x.transpose(1, 2), mat.transpose(1, 2) if back else mat)
    return t.reshape(k, *shape)


def _to_eigen(g: torch.Tensor, stack: Stack, weight: float | None = None) -> torch.Tensor:
    """Stacked g in the eigenbasis, in the state's layout (a view of g for parameters without factors); with
    `weight`, the factor statistics lerp by it on the way."""
    gg = [stack.get(("GG", i), (None,))[0] for i in range(g.dim() - 1)] if weight is not None else None
    if stack["layout"]:
        return _to_eigen_4d(g, stack["rot"], gg, weight or 0.0)  # type: ignore[arg-type]
    return _rotate(g, [stack.get(("Q", i), (None,))[0] for i in range(g.dim() - 1)], gg=gg, weight=weight or 0.0)


def _from_eigen(t: torch.Tensor, stack: Stack) -> torch.Tensor:
    if stack["layout"]:
        return _from_eigen_4d(t, stack["rot"])
    return _rotate(t, [stack.get(("Q", i), (None,))[0] for i in range(t.dim() - 1)], back=True)


def _versions(stack: Stack) -> tuple[int, ...]:
    """The version counters of a 4-D group's Q stacks (shared by every view of their storage; bumped by writes)."""
    return tuple(stack[("Q", i)][0]._version for i in range(4))


def _rotated_grads(g: torch.Tensor, stack: Stack, weight: float) -> torch.Tensor:
    """A group's stacked gradients g [k, ...] in the eigenbasis, a new tensor (scratch for the moments), the factor
    statistics lerped by `weight` on the way."""
    r = _to_eigen(g, stack, weight)
    return r.clone() if r.data_ptr() == g.data_ptr() else r  # (no factors: a view of g)


class SOAP(torch.optim.Optimizer):
    """See the module docstring. `project` has pytorch-optimizer's signature (the alignment metrics use it)."""

    in_place: bool | None = None  # the moments one shape at a time, in place (None: unless eager on CUDA), or foreach
    cuda_graph: bool | None = None  # plain steps as one replayed CUDA graph (None: on CUDA; the CPU runs them eagerly)

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
        self._stacks: dict[tuple[int, ...], Stack] = {}
        self._graphs: dict[int, tuple[Any, Any, int]] = {}  # per param group: key, CUDA graph, eager warm-up steps
        self._scalars: dict[int, torch.Tensor] = {}  # per param group: [-step size, weight-decay factor]
        self._side: Any = None  # the side stream of the warm-up steps
        self._no_graph = False

    @staticmethod
    def _stack_of(state: dict[str, Any], dtype: torch.dtype) -> Stack:
        """One parameter's state as a group of one (views; its rotation matrices computed afresh)."""
        stack: Stack = {("Q", i): (q.unsqueeze(0),) for i, q in enumerate(state["Q"]) if q is not None}
        stack["layout"] = state["layout"]
        if state["layout"]:
            stack["rot"] = _rotations([stack[("Q", i)][0] for i in range(4)], dtype)
        return stack

    def _stacked(self, params: list[torch.Tensor], states: list[dict[str, Any]], dtype: torch.dtype) -> Stack:
        """A group of same-shaped parameters' GG_i, Q_i, m and v as stacks [k, ...] whose slices are the states'
        tensors (a group of one: views of its tensors; of several: buffers the states then hold views of), and a
        4-D weight's rotation matrices in the products' `dtype`. Allocated once, so that a CUDA graph's addresses
        stay valid: the eigenbasis update writes into them, and a state's tensor that is not its slice (after a
        load, or a step in which other parameters had no gradient) is copied into the slice."""
        stack = self._stacks.setdefault(tuple(id(p) for p in params), {"layout": states[0]["layout"]})
        factors = [i for i, f in enumerate(states[0]["GG"]) if f is not None]
        slots: list[tuple[str, int | None]] = [("exp_avg", None), ("exp_avg_sq", None)]
        slots += [(key, i) for key in ("GG", "Q") for i in factors]
        stack["factors"] = factors
        for key, i in slots:
            current = [st[key] if i is None else st[key][i] for st in states]
            held = stack.get((key, i))
            if held is not None and all(t is v for t, v in zip(current, held[1], strict=True)):
                continue
            if held is None:
                whole = current[0].unsqueeze(0) if len(current) == 1 else torch.stack(current)
                stack[(key, i)] = held = (whole, current if len(current) == 1 else list(whole.unbind(0)))
            else:
                for view, t in zip(held[1], current, strict=True):
                    if view is not t:
                        view.copy_(t)
            for st, view in zip(states, held[1], strict=True):
                if i is None:
                    st[key] = view
                else:
                    st[key][i] = view
        # the rotations follow Q: new stacks, Q copied in above, or written through another stack sharing it
        if stack["layout"] and ("rot" not in stack or stack["rot"][0].dtype != dtype
                                or stack["q_versions"] != _versions(stack)):
            self._refresh_rotations(stack, dtype)
        return stack

    @staticmethod
    def _refresh_rotations(stack: Stack, dtype: torch.dtype) -> None:
        """A 4-D weight group's rotation matrices from its Q stacks, into the buffers it has (if of `dtype`), and
        the Q stacks' versions they follow: a stack of some of a shape's parameters (a step in which the others
        had no gradient) shares their storage, so its eigenbasis update changes this stack's Q too."""
        rot = _rotations([stack[("Q", i)][0] for i in range(4)], dtype)
        if "rot" in stack and stack["rot"][0].dtype == dtype:
            torch._foreach_copy_(stack["rot"], rot)
        else:
            stack["rot"] = rot
        stack["q_versions"] = _versions(stack)

    def project(self, grad: torch.Tensor, state: dict[str, Any], merge_dims: bool = False,
                max_precondition_dim: int = 10000, project_type: str = "forward") -> torch.Tensor:
        stack = self._stack_of(state, grad.dtype)
        if project_type == "forward":
            return _to_eigen(grad.unsqueeze(0), stack)[0]
        return _from_eigen(grad.unsqueeze(0), stack)[0]

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

    @staticmethod
    def _rebase(m: torch.Tensor, r: list[torch.Tensor | None], layout: int, dtype: torch.dtype | None = None
                ) -> torch.Tensor:
        """Stacked m [k, ...] from the old eigenbasis into the new one: Q_new^T Q_old m, one rotation by the
        stacked factors R_i = Q_old_i^T Q_new_i. A 4-D weight's m is rotated in its [k1, k2, a, b] layout, as
        [k1 k2, a, b] whose cycle of GEMMs ends where it starts (products in `dtype`, default m's)."""
        if layout:
            k, k1, k2, a, b = m.shape
            ra, rb, rk = _rotations(r, dtype or m.dtype)  # type: ignore[arg-type]
            rotated = _rotate(m.reshape(k, k1 * k2, a, b).to(ra.dtype), [rk.transpose(1, 2), ra, rb])
            return rotated.view(m.shape).to(m.dtype)
        return _rotate(m, r)

    def _new_eigenbases(self, stacks: list[Stack], dtype: torch.dtype | None) -> None:
        """One power iteration per factor and QR, batched over all factors of one size (a few calls instead of
        several per factor; on a GPU, launches). As pytorch-optimizer, each QR takes the columns of GG Q sorted by
        estimated eigenvalue; pytorch-optimizer then permutes the second moment v to that order, here the new Q's
        columns are put back in v's order instead (n x n numbers instead of all of v; the pairs of eigenvector and
        v entry are the same, and so the next update's sorted columns). Then every stacked m is rotated into its
        new basis. Q, m and the rotation matrices are overwritten in place (`_stacked`)."""
        groups: dict[tuple[Any, ...], list[tuple[Stack, int]]] = {}
        for stack in stacks:
            for i in stack["factors"]:
                gg = stack[("GG", i)][0]
                groups.setdefault((gg.shape[1:], gg.dtype, gg.device), []).append((stack, i))
        turns: dict[int, dict[int, torch.Tensor]] = {}  # per stack and factor: R = Q_old^T Q_new, stacked
        for (_, kind, _), items in groups.items():
            q = torch.cat([stack[("Q", i)][0] for stack, i in items])
            product = torch.bmm(torch.cat([stack[("GG", i)][0] for stack, i in items]), q)
            order = torch.argsort((q * product).sum(1), dim=1, descending=True)[:, None, :].expand_as(q)
            ranked = torch.linalg.qr(product.gather(2, order).to(torch.float32))[0].to(kind)  # as pytorch-optimizer
            q_new = torch.empty_like(ranked).scatter_(2, order, ranked)  # the columns back in v's order
            r = torch.bmm(q.transpose(1, 2), q_new)
            at = 0
            for stack, i in items:
                held = stack[("Q", i)][0]
                held.copy_(q_new[at:at + held.shape[0]])
                turns.setdefault(id(stack), {})[i] = r[at:at + held.shape[0]]
                at += held.shape[0]
        for stack in stacks:
            if id(stack) in turns:
                m = stack[("exp_avg", None)][0]
                r = [turns[id(stack)].get(i) for i in range(m.dim() - 1)]
                m.copy_(self._rebase(m, r, stack["layout"], dtype))
                if stack["layout"]:
                    self._refresh_rotations(stack, stack["rot"][0].dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also resumes states saved before the 4-D layout existed (their m and v are permuted into it) and before
        the rotation matrices moved out of the state (`rot`, dropped: they follow from Q)."""
        super().load_state_dict(state_dict)
        self._stacks.clear()
        self._graphs.clear()
        for state in self.state.values():
            state.pop("rot", None)
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
        for index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            shampoo = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
            live = [p for p in group["params"] if p.grad is not None]
            if not live:  # no parameter of the group takes a step
                continue
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
            dtype = torch.bfloat16 if group.get("bf16_matmul") else None  # (absent from checkpoints before it)
            shapes: dict[Any, list[torch.Tensor]] = {}
            for p in live:
                shapes.setdefault((p.shape, p.dtype), []).append(p)
            stacks = [(ps, self._stacked(ps, [self.state[p] for p in ps], dtype or ps[0].dtype))
                      for ps in shapes.values()]
            graphed = self.cuda_graph if self.cuda_graph is not None else live[0].is_cuda
            in_place = self.in_place if self.in_place is not None else graphed or not live[0].is_cuda
            if not graphed:
                grads = [torch.stack([p.grad for p in ps]) if len(ps) > 1 else ps[0].grad.unsqueeze(0)  # type: ignore
                         for ps, _ in stacks]
                self._plain_step(group, stacks, grads, in_place, size)
            else:
                self._graph_ready_step(index, group, stacks, in_place, size)
            if t % group["precondition_frequency"] == 0:
                self._new_eigenbases([stack for _, stack in stacks], dtype)
        return loss

    @staticmethod
    def _plain_step(group: dict[str, Any], stacks: list[tuple[list[torch.Tensor], Stack]], grads: list[torch.Tensor],
                    in_place: bool, size: float | torch.Tensor) -> None:
        """Everything of a step but the eigenbasis update, from the stacked gradients: the statistics, the moments
        in the eigenbasis, the update rotated back and applied. `size` is the step size, or a tensor [-step size,
        weight-decay factor] (float32, float64 with float64 parameters: the step CUDA graphs replay, no value baked
        in; bf16 products' updates are scaled in the parameters' dtype)."""
        beta1, beta2 = group["betas"]
        shampoo = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
        dtype = torch.bfloat16 if group.get("bf16_matmul") else None
        if in_place:  # one shape at a time, in place: its chain stays in cache (CPU)
            updates = []
            for (_, stack), g in zip(stacks, grads, strict=True):
                r = _rotated_grads(g, stack, 1.0 - shampoo)
                m = stack[("exp_avg", None)][0].lerp_(r, 1.0 - beta1)
                v = stack[("exp_avg_sq", None)][0].lerp_(r.mul_(r), 1.0 - beta2)
                denominator = torch.sqrt(v, out=r).add_(group["eps"])
                # a 4-D weight's bf16 products take m / denominator rounded to bf16 as they are written
                u = torch.empty_like(r, dtype=dtype) if dtype is not None and stack["layout"] else r
                updates.append(_from_eigen(torch.div(m, denominator, out=u), stack))
        else:  # every shape's moments in a few foreach launches (GPU)
            rs = [_rotated_grads(g, stack, 1.0 - shampoo) for (_, stack), g in zip(stacks, grads, strict=True)]
            ms = [stack[("exp_avg", None)][0] for _, stack in stacks]
            vs = [stack[("exp_avg_sq", None)][0] for _, stack in stacks]
            torch._foreach_lerp_(ms, rs, 1.0 - beta1)
            torch._foreach_lerp_(vs, torch._foreach_mul(rs, rs), 1.0 - beta2)
            denominators = torch._foreach_sqrt(vs)
            torch._foreach_add_(denominators, group["eps"])
            updates = [_from_eigen(u, stack)
                       for (_, stack), u in zip(stacks, torch._foreach_div(ms, denominators), strict=True)]
        params = [p for ps, _ in stacks for p in ps]
        if isinstance(size, float):
            torch._foreach_add_(params, [u for us in updates for u in us.unbind(0)], alpha=-size)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            return
        scaled = torch._foreach_mul([u.to(ps[0].dtype) for (ps, _), u in zip(stacks, updates, strict=True)], size[0])
        torch._foreach_add_(params, [u for us in scaled for u in us.unbind(0)])
        if group["weight_decay"]:
            torch._foreach_mul_(params, size[1])

    def _graph_ready_step(self, index: int, group: dict[str, Any], stacks: list[tuple[list[torch.Tensor], Stack]],
                          in_place: bool, size: float) -> None:
        """Param group `index`'s plain step with its inputs at fixed addresses (the gradients copied into a buffer
        per shape, the step size and weight-decay factor into a tensor), replayed as a CUDA graph (`_replay`)."""
        live = [p for ps, _ in stacks for p in ps]
        for ps, stack in stacks:
            if "grad" not in stack:
                stack["grad"] = ps[0].new_empty((len(ps), *ps[0].shape))
        grads = [stack["grad"] for _, stack in stacks]
        torch._foreach_copy_([g for gs in grads for g in gs.unbind(0)], [p.grad for p in live])  # type: ignore[misc]
        kind = torch.float64 if any(p.dtype == torch.float64 for p in live) else torch.float32
        scalars = self._scalars.get(index)
        if scalars is None or (scalars.device, scalars.dtype) != (live[0].device, kind):
            scalars = self._scalars[index] = torch.zeros(2, device=live[0].device, dtype=kind)
        scalars[0].fill_(-size)
        scalars[1].fill_(1.0 - group["lr"] * group["weight_decay"])
        key = (tuple(id(p) for p in live), group.get("bf16_matmul"), group["betas"], group["shampoo_beta"],
               group["eps"], bool(group["weight_decay"]), in_place)
        self._replay(index, key, partial(self._plain_step, group, stacks, grads, in_place, scalars))

    def _replay(self, index: int, key: tuple[Any, ...], step: Any) -> None:
        """Run `step` (param group `index`'s plain step) as a CUDA graph: two eager steps on a side stream first (as
        torch.cuda.graphs asks before a capture), then one capture, replayed from then on while `key` (the live
        parameters and the constants the graph holds) stays. On the CPU, or after a failed capture, `step` runs
        eagerly."""
        held_key, graph, warm = self._graphs.get(index, (None, None, 0))
        if held_key != key:
            graph, warm = None, 0
        if graph is not None:
            graph.replay()
            return
        device = self._scalars[index].device
        if device.type != "cuda" or self._no_graph:
            step()
            return
        if warm < 2:
            side = self._side = self._side or torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(device).wait_stream(side)
            self._graphs[index] = (key, None, warm + 1)
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                step()
        except RuntimeError as err:  # an operator that cannot be captured: stay eager, and say so once
            warnings.warn(f"SOAP's step could not be captured as a CUDA graph, it stays eager: {err}", stacklevel=3)
            self._no_graph = True
            step()
            return
        self._graphs[index] = (key, graph, warm)
        graph.replay()
