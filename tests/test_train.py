"""Training: SOAP's equations, the preconditioned alignment metrics, bit-exact resume, a short real run, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lic_deploy.cli import main
from lic_deploy.train.alignment import alignment, flatten
from lic_deploy.train.optim import build_optimizer, precondition


def _reference_soap(w0: torch.Tensor, grads: list[torch.Tensor], lr: float, b1: float, b2: float, eps: float,
                    freq: int) -> torch.Tensor:
    """SOAP written from its equations (Vyas et al. 2024, with pytorch-optimizer 4.1's parameter-space momentum):
    one Kronecker factor per dimension, eigenbasis by eigh at step 1 and by one power iteration + QR every `freq`
    steps, Adam's second moment in the eigenbasis, bias-corrected step size."""
    w = w0.clone().double()
    dims = range(w.dim())
    gg = [torch.zeros(n, n, dtype=torch.float64) for n in w.shape]
    q: list[torch.Tensor] = []
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)

    def rotate(t: torch.Tensor, back: bool = False) -> torch.Tensor:
        for mat in q:  # contracting dim 0 each time cycles the dimensions back into place
            t = torch.tensordot(t, mat, dims=[[0], [1 if back else 0]])
        return t

    def accumulate(g: torch.Tensor) -> None:
        for i in dims:
            other = [d for d in dims if d != i]
            gg[i].lerp_(torch.tensordot(g, g, dims=[other, other]), 1 - b2)

    for step, g in enumerate(grads, start=1):
        g = g.double()
        if step == 1:
            accumulate(g)
            q = [torch.flip(torch.linalg.eigh(a + 1e-30 * torch.eye(a.shape[0], dtype=a.dtype))[1], [1])
                 for a in gg]
            continue
        t = step - 1
        m.lerp_(g, 1 - b1)
        v.lerp_(rotate(g) ** 2, 1 - b2)
        size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w -= size * rotate(rotate(m) / (v.sqrt() + eps), back=True)
        accumulate(g)
        if t % freq == 0:
            for i in dims:
                prod = gg[i] @ q[i]
                order = torch.argsort((q[i] * prod).sum(0), descending=True)
                v = v.index_select(i, order)
                q[i] = torch.linalg.qr(prod.index_select(1, order).float())[0].double()
    return w


def test_soap_matches_its_equations_on_fixed_gradients() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3))
    grads = [torch.randn(6, 4, 3, 3) for _ in range(25)]
    opt, hp = build_optimizer("soap", [w], lr=1e-2)
    assert hp["merge_dims"] is False and hp["precondition_frequency"] == 10
    w0 = w.detach().clone()
    for g in grads:
        w.grad = g.clone()
        opt.step()
    ref = _reference_soap(w0, grads, 1e-2, *hp["betas"], hp["eps"], hp["precondition_frequency"])
    assert torch.allclose(w.detach().double(), ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(w.detach(), w0)


@pytest.mark.parametrize("name", ["soap", "adam"])
def test_optimizers_decrease_a_loss(name: str) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3,
                                                                                                   padding=1))
    x = torch.randn(4, 3, 8, 8)
    target = torch.roll(x, 1, dims=2)
    opt, _ = build_optimizer(name, list(net.parameters()), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = torch.mean((net(x) - target) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_preconditioners() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    for name in ("adam", "soap"):
        opt, hp = build_optimizer(name, [w], lr=1e-3)
        assert precondition(opt, [w], [torch.ones(5, 4)]) is None  # no state yet
        for _ in range(3):
            w.grad = torch.randn(5, 4)
            opt.step()
        g = torch.randn(5, 4)
        (u,) = precondition(opt, [w], [g])
        state = opt.state[w]
        if name == "adam":
            v_hat = state["exp_avg_sq"] / (1 - hp["betas"][1] ** float(state["step"]))
            assert torch.allclose(u, g / (v_hat.sqrt() + hp["eps"]))
        else:
            q0, q1 = state["Q"]
            expect = q0 @ ((q0.T @ g @ q1) / (state["exp_avg_sq"].sqrt() + hp["eps"])) @ q1.T
            assert torch.allclose(u, expect, atol=1e-5)
            assert not torch.allclose(u / u.norm(), g / g.norm(), atol=1e-2)  # really a different direction


def test_alignment_formula() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert alignment([a, b]) == pytest.approx(1 / math.sqrt(2))
    assert alignment([a, 3 * a]) == pytest.approx(1.0)
    assert alignment([a, -a]) == pytest.approx(-1.0)
    c = torch.tensor([0.0, 1.0])
    assert alignment([a, c, -a]) == pytest.approx(2 * (1 / 9) - 1)
    assert math.isnan(alignment([a, torch.zeros(2)]))
    assert flatten([torch.ones(2, 2), torch.zeros(3)]).shape == (7,)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "-o", str(out), "--N", "8", "--M", "16", "--batch", "1", "--patch",
            "64", "--downscale", "0", "--log-every", "5", "--align-every", "5", "--ckpt-every", "5",
            "--val-every", "10", "--warmup", "2", "--threads", "2", *extra]


def test_short_run_and_bit_exact_resume(tiny_data: Path, tmp_path: Path) -> None:
    from lic_deploy.archs.checkpoint import load_model, read_checkpoint

    for opt in ("soap", "adam"):
        a, b = tmp_path / f"a-{opt}.pt", tmp_path / f"b-{opt}.pt"
        assert main(_args(tiny_data, a, "--optimizer", opt, "--steps", "10", "--val", str(tiny_data))) == 0
        assert main(_args(tiny_data, b, "--optimizer", opt, "--steps", "6", "--val", str(tiny_data))) == 0
        assert main(_args(tiny_data, b, "--optimizer", opt, "--steps", "10", "--val", str(tiny_data),
                          "--resume", str(b))) == 0
        sa, meta = read_checkpoint(a)
        sb, _ = read_checkpoint(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), opt
        assert meta["steps"] == 10 and meta["optimizer"] == opt and meta["lmbda"] == 0.013
        assert meta["hyperparameters"]["lr"] == (3e-3 if opt == "soap" else 1e-4) and len(meta["data_hash"]) == 64
        loaded = load_model(a)
        assert loaded.arch == "mbt2018-mean" and loaded.config == {"N": 8, "M": 16}
        rows = [json.loads(x) for x in Path(f"{a}.jsonl").read_text().splitlines()]
        assert {"intra_alignment", "inter_alignment", "raw_intra_alignment"} <= set(rows[-1])
        assert all(-1 <= rows[-1][k] <= 1 for k in ("intra_alignment", "inter_alignment"))
        assert {"train_loss", "train_bpp", "val_loss", "val_bpp", "val_psnr", "seconds"} <= set(rows[-1])
        assert rows[-1]["step"] == 10


def test_init_starts_a_new_rate_point_from_trained_weights(tiny_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from lic_deploy.archs.checkpoint import read_checkpoint

    base, low = tmp_path / "base.pt", tmp_path / "low.pt"
    assert main(_args(tiny_data, base, "--optimizer", "adam", "--steps", "5")) == 0
    assert main(_args(tiny_data, low, "--optimizer", "soap", "--steps", "1", "--lmbda", "0.002",
                      "--init", str(base), "--lr", "1e-12", "--clip", "0")) == 0
    start, _ = read_checkpoint(base)
    got, meta = read_checkpoint(low)
    # one step at a vanishing rate: the new run starts from base's weights, not from the seed's
    assert all(torch.allclose(start[k], got[k], atol=1e-6) for k in start if not k.endswith("quantiles"))
    assert meta["steps"] == 1 and meta["lmbda"] == 0.002 and meta["optimizer"] == "soap"
    assert meta["init"] == {"path": str(base), "steps": 5, "optimizer": "adam", "lmbda": 0.013}
    # the record survives a resume
    assert main(_args(tiny_data, low, "--optimizer", "soap", "--steps", "2", "--lmbda", "0.002", "--lr", "1e-12",
                      "--clip", "0", "--resume", str(low))) == 0
    assert read_checkpoint(low)[1]["init"]["path"] == str(base)
    for extra, needle in ((["--N", "16"], "do not fit"), (["--resume", str(low)], "give one of them")):
        assert main(_args(tiny_data, tmp_path / "x.pt", "--init", str(base), *extra)) == 2
        assert needle in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x.pt").exists()


def test_until_val_loss_stops_at_the_first_validation_that_reaches_it(tiny_data: Path, tmp_path: Path) -> None:
    from lic_deploy.archs.checkpoint import read_checkpoint

    out = tmp_path / "eq.pt"
    assert main(_args(tiny_data, out, "--optimizer", "adam", "--steps", "40", "--val", str(tiny_data),
                      "--until-val-loss", "1e9", "--log-every", "8", "--val-every", "3")) == 0
    _, meta = read_checkpoint(out)
    rows = [json.loads(x) for x in Path(f"{out}.jsonl").read_text().splitlines()]
    # validation runs on its own schedule, not only on logging steps
    assert meta["steps"] == 3 and rows[-1]["step"] == 3 and rows[-1]["val_loss"] <= 1e9


def test_bad_arguments(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    cases = [
        (_args(tmp_path / "missing", tmp_path / "x.pt"), "does not exist"),
        (_args(tmp_path / "empty", tmp_path / "x.pt"), "no images"),
        (_args(tiny_data, tmp_path / "x.pt", "--patch", "128"), "at least 128x128"),
        (_args(tiny_data, tmp_path / "x.pt", "--patch", "100"), "multiple of 64"),
        (_args(tiny_data, tmp_path / "x.pt", "--optimizer", "sgd"), "invalid choice"),
        (_args(tiny_data, tmp_path / "x.pt", "--until-val-loss", "2"), "needs --val"),
        (_args(tiny_data, tmp_path / "x.pt", "--context-widths", "8,8"), "elic only"),
        (_args(tiny_data, tmp_path / "x.pt", "--context-widths", "8"), "two positive integers"),
        (_args(tiny_data, tmp_path / "x.pt", "--optimizer", "adam", "--soap-bf16"), "option of SOAP"),
        (_args(tiny_data, tmp_path / "x.pt", "--soap-impl", "pytorch-optimizer", "--soap-bf16"), "lic-deploy's SOAP"),
    ]
    for args, needle in cases:
        try:
            code = main(args)
        except SystemExit as exc:
            code = int(exc.code)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and needle in err[-1], (needle, err)
    assert not (tmp_path / "x.pt").exists()


def _log(path: Path, points: list[tuple[int, float, float]]) -> Path:
    path.write_text("".join(json.dumps({"step": s, "seconds": t, "val_loss": v, "train_loss": v}) + "\n"
                            for s, t, v in points))
    return path


def test_convergence_analysis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lic_deploy.bench.convergence import compare

    adam = _log(tmp_path / "adam.jsonl", [(100, 10.0, 8.0), (200, 20.0, 6.0), (400, 40.0, 4.0)])
    soap = _log(tmp_path / "soap.jsonl", [(100, 12.0, 5.0), (200, 24.0, 3.0), (400, 48.0, 2.0)])
    c = compare(adam, soap)
    assert c.target_val_loss == 4.0 and c.adam_steps == 400
    assert c.soap_steps == pytest.approx(150.0) and c.soap_seconds == pytest.approx(18.0)  # halfway 100 -> 200
    assert c.step_saving == pytest.approx(1 - 150 / 400) and c.time_saving == pytest.approx(1 - 18 / 40)
    assert c.step_time_ratio == pytest.approx(1.2)
    slow = _log(tmp_path / "slow.jsonl", [(100, 12.0, 9.0), (400, 48.0, 5.0)])
    assert compare(adam, slow).soap_steps is None
    assert main(["convergence", "--adam", str(adam), "--soap", str(soap), "-o", str(tmp_path / "out")]) == 0
    assert "62.5% fewer steps" in capsys.readouterr().out
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 1000
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    assert main(["convergence", "--adam", str(tmp_path / "bad.jsonl"), "--soap", str(soap), "-o",
                 str(tmp_path / "x")]) == 2


def test_convergence_warns_when_the_runs_differ_in_more_than_the_optimizer(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = {}
    for name, opt, lmbda in (("a", "adam", "0.013"), ("b", "soap", "0.0067"), ("c", "soap", "0.013")):
        runs[name] = tmp_path / f"{name}.pt"
        assert main(_args(tiny_data, runs[name], "--optimizer", opt, "--lmbda", lmbda, "--steps", "10",
                          "--val", str(tiny_data))) == 0
    for other, expected in (("b", ["differ in lmbda: 0.013 against 0.0067"]), ("c", [])):
        capsys.readouterr()
        assert main(["convergence", "--adam", f"{runs['a']}.jsonl", "--soap", f"{runs[other]}.jsonl", "-o",
                     str(tmp_path / other)]) == 0
        assert [line.split("warning: the two runs ")[1] for line in capsys.readouterr().err.splitlines()
                if "warning: the two runs" in line] == expected


def test_elic_trains_with_both_optimizers_and_exports(tiny_data: Path, tmp_path: Path) -> None:
    from lic_deploy.archs.checkpoint import load_model

    for opt in ("soap", "adam"):
        out = tmp_path / f"elic-{opt}.pt"
        args = _args(tiny_data, out, "--optimizer", opt, "--steps", "3", "--arch", "elic", "--M", "160",
                     "--context-widths", "16,16")
        assert main(args) == 0
        loaded = load_model(out)
        assert loaded.arch == "elic" and loaded.config == {"N": 8, "M": 160, "cc1": 16, "cc2": 16}
        assert loaded.metadata["steps"] == 3 and loaded.metadata["optimizer"] == opt
    code = main(_args(tiny_data, tmp_path / "bad.pt", "--arch", "elic", "--M", "96", "--steps", "1"))
    assert code == 2 and not (tmp_path / "bad.pt").exists()


@pytest.mark.parametrize(("dtype", "tol", "graphed"), [(torch.float32, (1e-5, 1e-6), False),
                                                      (torch.float64, (1e-6, 1e-8), False),
                                                      (torch.float32, (1e-5, 1e-6), True),
                                                      (torch.float64, (1e-6, 1e-8), True)])
def test_lic_soap_equals_pytorch_optimizer_update_for_update(dtype: torch.dtype, tol: tuple[float, float],
                                                             graphed: bool) -> None:
    """lic-deploy's SOAP (first moment kept in the eigenbasis) against pytorch-optimizer's on the same gradients:
    conv-shaped (3x3, 1x1, one dim above max_precondition_dim: the 4-D layout and the generic path), 3-D (as the
    entropy bottleneck's, one with a dim above the limit), 2-D and 1-D parameters, weight decay, 25 steps crossing
    two eigenbasis updates; every step's parameters equal to float32 rounding (in float64 the reordered arithmetic
    agrees to 1e-8, the float32 QR both do being the limit), and far from the start. `graphed`: the step a CUDA
    graph replays (gradients copied into buffers, step size and decay read from a tensor), run eagerly here."""
    torch.manual_seed(0)
    shapes = [(8, 6, 3, 3), (6, 6), (6,), (5, 40), (7, 5, 1, 1), (4, 40, 3, 3), (6, 3, 1), (6, 3, 3), (3, 40, 2)]
    start = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(25)]
    paths = {}
    for impl in ("lic-deploy", "pytorch-optimizer"):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt, hp = build_optimizer("soap", params, soap_impl=impl)
        assert hp["implementation"] == impl
        if impl == "lic-deploy":
            opt.cuda_graph = graphed
        for group in opt.param_groups:
            group["weight_decay"], group["max_precondition_dim"] = 0.01, 32
        paths[impl] = []
        for gs in grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, gs, strict=True))  # the step leaves grads
            paths[impl].append([p.detach().clone() for p in params])
    for ours, ref in zip(paths["lic-deploy"], paths["pytorch-optimizer"], strict=True):
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1])
    assert all(float((a - w).abs().max()) > 0.01 for a, w in zip(paths["lic-deploy"][-1], start, strict=True))
    with pytest.raises(ValueError, match="implementation"):
        build_optimizer("soap", [torch.nn.Parameter(torch.zeros(2, 2))], soap_impl="other")


@pytest.mark.parametrize("bf16", [False, True])
def test_soap_moments_in_place_and_over_foreach_lists_are_bit_identical(bf16: bool) -> None:
    """The parameters of one shape are stacked (batched GEMMs); the CPU's moments one shape at a time in place and
    the GPU's foreach lists (forced here on the CPU) give the same parameters bit for bit over 12 steps (an
    eigenbasis update included, after which the new Q and m are copied into the stacks)."""
    from lic_deploy.train.soap import SOAP

    torch.manual_seed(0)
    shapes = [(8, 6, 3, 3), (6, 6), (6,), (7, 5, 1, 1), (8, 6, 3, 3), (6, 6), (6,), (6, 3, 1), (6, 3, 1)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(12)]
    finals = []
    for in_place in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = SOAP(params, lr=1e-2, bf16_matmul=bf16)
        opt.in_place = in_place
        for gs in grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))
    assert all(not torch.equal(a, w) for a, w in zip(finals[0], start, strict=True))


def test_soap_state_stays_at_the_addresses_a_cuda_graph_captured() -> None:
    """A CUDA graph replays reads and writes at the addresses it captured. From its second step on, SOAP's stacks
    (GG, Q, m, v, the rotation matrices, the gradient buffers) keep their storage across eigenbasis updates, which
    write into them, and the per-parameter states stay views of those stacks, so that state_dict() sees the update."""
    from lic_deploy.train.soap import SOAP

    torch.manual_seed(0)
    shapes = [(8, 6, 3, 3), (8, 6, 3, 3), (6, 6), (6,), (7, 5, 1, 1)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = SOAP(params, lr=1e-2)
    opt.cuda_graph = True

    def addresses() -> list[int]:
        out = []
        for stack in opt._stacks.values():
            for key, value in stack.items():
                if isinstance(key, tuple):
                    out.append(value[0].data_ptr())
            out += [t.data_ptr() for t in stack.get("rot", [])] + [stack["grad"].data_ptr()]
        return out

    seen, qs = [], []
    for step in range(1, 24):  # eigenbasis updates after steps 11 and 21
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        if step >= 2:
            seen.append(addresses())
            qs.append(opt.state[params[1]]["Q"][0].clone())
    # two 4-D groups (m, v, 4 GG, 4 Q, 3 rotations, gradients), 2-D (m, v, 2 GG, 2 Q, gradients), 1-D (m, v, gradients)
    assert len(seen[0]) == 2 * 14 + 7 + 3 and all(a == seen[0] for a in seen)
    assert not torch.equal(qs[8], qs[9]) and torch.equal(qs[9], qs[10])  # the update changed Q in place
    stack = opt._stacks[(id(params[0]), id(params[1]))]
    for i, p in enumerate(params[:2]):
        state = opt.state[p]
        assert state["exp_avg"].data_ptr() == stack[("exp_avg", None)][0][i].data_ptr()
        assert all(q.data_ptr() == stack[("Q", d)][0][i].data_ptr() for d, q in enumerate(state["Q"]))


@pytest.mark.parametrize(("graphed", "bf16"), [(False, False), (True, False), (True, True)])
def test_soap_steps_with_missing_gradients_equal_steps_from_fresh_stacks(graphed: bool, bf16: bool) -> None:
    """The stacks are a cache of the per-parameter states. Steps in which some parameters have no gradient (one
    at an eigenbasis update, others between) step a subset of a shape, whose stack shares the whole shape's
    storage; the run equals one that rebuilds every stack before every step (no cached rotation left stale), a
    step in which no parameter has a gradient changes nothing, and the graph-ready step (`graphed`, eagerly here)
    agrees with the eager one to float32 rounding, with bf16 products too (their updates scaled in float32)."""
    from lic_deploy.train.soap import SOAP

    torch.manual_seed(0)
    shapes = [(8, 6, 3, 3), (8, 6, 3, 3), (6, 6), (6, 6), (6,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(24)]
    missing = {5: {1}, 6: {1, 3}, 10: {0}, 13: {0, 1, 2, 3, 4}, 20: {2}}  # updates after steps 11 and 21

    def run(fresh: bool, graph: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = SOAP(params, lr=1e-2, bf16_matmul=bf16)
        opt.cuda_graph = graph
        for i, gs in enumerate(grads):
            for j, (p, g) in enumerate(zip(params, gs, strict=True)):
                p.grad = None if j in missing.get(i, ()) else g.clone()
            before = [p.detach().clone() for p in params]
            if fresh:
                opt._stacks.clear()
            opt.step()
            if i == 13:
                assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
        return [p.detach().clone() for p in params]

    cached = run(False, graphed)
    assert all(torch.equal(a, b) for a, b in zip(cached, run(True, graphed), strict=True))
    for a, b in zip(cached, run(False, not graphed), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a, w) for a, w in zip(cached, start, strict=True))


def test_soap_state_from_before_the_4d_layout_resumes_to_the_same_updates() -> None:
    """A state saved before 4-D weights kept m and v as [k1, k2, a, b] (no `layout` key, m and v in the
    parameter's layout) loads into the current SOAP and continues exactly as an uninterrupted run."""
    torch.manual_seed(0)
    start, grads = torch.randn(6, 5, 3, 3), [torch.randn(6, 5, 3, 3) for _ in range(14)]
    runs = []
    for convert in (False, True):
        w = torch.nn.Parameter(start.clone())
        opt, _ = build_optimizer("soap", [w])
        for i, g in enumerate(grads):
            if convert and i == 7:
                saved = opt.state_dict()
                old = saved["state"][0]
                assert old.pop("layout") == 1
                for key in ("exp_avg", "exp_avg_sq"):  # back to the parameter's layout, as it was saved then
                    old[key] = old[key].permute(2, 3, 0, 1).contiguous()
                assert old["exp_avg"].shape == w.shape
                opt, _ = build_optimizer("soap", [w])
                opt.load_state_dict(saved)
            w.grad = g.clone()
            opt.step()
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_soap_bf16_products_stay_within_bfloat16_rounding_of_float32() -> None:
    """`soap_bf16`: a conv weight's rotations and statistics as bfloat16 GEMMs. Over 25 steps (two eigenbasis
    updates) each step's update stays within a few bfloat16 roundings (2^-8) of the float32 run's, differs from it
    (the bf16 path runs), and leaves the 2-D and 1-D parameters' updates (float32 products) exactly equal. The
    first update is the exception: with one gradient in v, m / sqrt(v) is sign(Q^T g) and rounding flips the sign
    of entries near zero (5-8 % of the update's norm here)."""
    torch.manual_seed(0)
    shapes = [(16, 12, 5, 5), (12, 16, 3, 3), (6, 6), (6,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(25)]
    updates = {}
    for bf16 in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt, hp = build_optimizer("soap", params, soap_bf16=bf16)
        assert hp["bf16_matmul"] is bf16
        updates[bf16] = []
        for gs in grads:
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
            updates[bf16].append([p.detach() - b for p, b in zip(params, before, strict=True)])
    worst = [0.0, 0.0]
    for ref, low in zip(updates[False][2:], updates[True][2:], strict=True):  # step 1 only builds the factors
        for i, (u, v) in enumerate(zip(ref, low, strict=True)):
            if u.dim() == 4:
                rel = float((u - v).norm() / u.norm())
                worst[i] = max(worst[i], rel)
            else:
                assert torch.equal(u, v)
    assert all(1e-3 < w < 1.5e-2 for w in worst), worst
    with pytest.raises(ValueError, match="lic-deploy's SOAP"):
        build_optimizer("soap", [torch.nn.Parameter(torch.zeros(2, 2))], soap_impl="pytorch-optimizer", soap_bf16=True)


def test_soap_bf16_run_resumes_bit_exactly_and_keeps_its_precision(tiny_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lic_deploy.archs.checkpoint import read_checkpoint
    from lic_deploy.train import loop

    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)  # a CPU without native bfloat16 gets told
    with pytest.warns(UserWarning, match="no AVX512-BF16"):
        assert main(_args(tiny_data, a, "--steps", "8", "--soap-bf16")) == 0
    monkeypatch.undo()
    assert main(_args(tiny_data, b, "--steps", "5", "--soap-bf16")) == 0
    assert main(_args(tiny_data, b, "--steps", "8", "--resume", str(b))) == 0  # no flag: the run's own precision
    assert main(_args(tiny_data, c, "--steps", "8")) == 0
    (sa, meta), (sb, _), (sc, _) = read_checkpoint(a), read_checkpoint(b), read_checkpoint(c)
    assert meta["hyperparameters"]["bf16_matmul"] is True
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_soap_precision_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lic_deploy.bench import soap_precision

    def log(name: str, losses: list[float]) -> None:
        (tmp_path / f"{name}.pt.jsonl").write_text("".join(
            json.dumps({"step": 100 * (i + 1), "seconds": 1.0, "train_loss": v + 1, "val_loss": v, "val_psnr": 30.0,
                        "val_bpp": 0.5}) + "\n" for i, v in enumerate(losses)))

    log("fp32-s0", [4.0, 3.0])
    log("bf16-s0", [4.1, 2.9])
    log("fp32-s1", [3.8, 3.3])
    (tmp_path / "bf16-s1.pt.jsonl").write_text('{"step": 25, "train_loss": 9.0}\n')  # not validated yet: left out
    runs = soap_precision.find_runs(tmp_path)
    assert sorted(runs) == [("bf16", 0), ("fp32", 0), ("fp32", 1)]
    _, rows, diffs = soap_precision.table(runs)
    assert [r[0] for r in rows] == [100, 200]
    assert diffs["bf16 - fp32, seed 0"] == pytest.approx([0.1, -0.1])
    assert diffs["fp32 seed 1 - seed 0"] == pytest.approx([-0.2, 0.3])
    assert soap_precision.main([str(tmp_path), "-o", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "mean |d| 0.1000" in out and (tmp_path / "p.png").stat().st_size > 1000
    # training loss over steps 101-200: the second logged value of each run (val + 1)
    assert soap_precision.late_train_loss(runs, 200) == pytest.approx({("fp32", 0): 4.0, ("bf16", 0): 3.9,
                                                                       ("fp32", 1): 4.3})
    assert "bf16 seed 0: 3.9000 (-2.50 % against fp32)" in out
    (tmp_path / "bf16-s0.pt.jsonl").unlink()
    assert soap_precision.main([str(tmp_path), "-o", str(tmp_path / "q.png")]) == 2
    assert "needs fp32" in capsys.readouterr().err


@pytest.mark.parametrize(("bf16", "in_place", "graphed"), [(False, True, False), (True, True, False),
                                                           (False, False, False), (False, False, True)])
def test_soap_resumes_exactly_from_a_saved_state_after_an_eigenbasis_update(tmp_path: Path, bf16: bool,
                                                                            in_place: bool, graphed: bool) -> None:
    """The eigenbases after an update are slices of one batched QR; with the parameters of one shape stacked, the
    states hold views of the stacks. The state saved after that (torch.save, loaded with weights_only=True)
    continues exactly as the uninterrupted run, across the next update too (3-D parameters included; `graphed`:
    the CUDA graph's step, eagerly)."""
    torch.manual_seed(0)
    shapes = [(8, 6, 3, 3), (6, 8, 3, 3), (8, 8), (8,), (6, 3, 1), (8, 6, 3, 3), (8, 8)]
    start, grads = [torch.randn(s) for s in shapes], [[torch.randn(s) for s in shapes] for _ in range(24)]
    finals = []
    for cut in (None, 14):  # the update comes at step 11, the next at 21
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt, _ = build_optimizer("soap", params, soap_bf16=bf16)
        opt.in_place, opt.cuda_graph = in_place, graphed
        for i, gs in enumerate(grads):
            if i == cut:
                torch.save(opt.state_dict(), tmp_path / "opt.pt")
                opt, _ = build_optimizer("soap", params, soap_bf16=bf16)
                opt.in_place, opt.cuda_graph = in_place, graphed
                opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))
    assert not any(torch.equal(a, w) for a, w in zip(finals[0], start, strict=True))
