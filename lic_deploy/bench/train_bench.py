"""`make bench-train`: what a training step costs, SOAP against Adam, and how fast the data pipeline feeds it.

Prints, in one run on this machine (after warm-up):
- per optimizer (their steps interleaved, one of each per round): the whole step (forward, backward, optimizer)
  in ms and steps per second, and the optimizer part (everything after backward: `opt.step()`, SOAP's
  statistics, projections and, every `precondition_frequency` steps, its eigenbasis update) in ms, each as the
  mean over whole multiples of that frequency (what training's wall-clock sees: the periodic update averaged in)
  and the median (a step without the update); SOAP / Adam ratios of both;
- the host side of each optimizer's eager step as a GPU would run it (SOAP's moments over foreach lists, no CUDA
  graph): the operators it dispatches (on a GPU each non-view operator is a kernel launch) and its time on the
  CPU at N=M=4, the same parameters with next to no arithmetic. On a GPU SOAP replays its plain steps as one
  CUDA graph, so these launches cost little there except in the eigenbasis update, which stays eager;
- the float32 and bfloat16 matmul rates (what `--soap-bf16` gains on this machine);
- images per second of the streaming data pipeline (decode, crop, flip, batch) with 0, 2 and 4 workers.

    python -m lic_deploy.bench.train_bench --data ../shared/data/train [--N 128 --M 192 --batch 4 --patch 256]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

from lic_deploy.bench.latency import format_table


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_steps(variants: list[tuple[str, str, bool]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median whole-step and optimizer-part milliseconds of each (optimizer, SOAP implementation, bfloat16
    products) on one fixed random batch, the variants' steps interleaved (one of each per round) so that load on
    the machine hits all alike."""
    import torch

    from lic_deploy.archs.registry import get_adapter
    from lic_deploy.train.loop import rd_loss
    from lic_deploy.train.optim import build_optimizer, split_parameters

    runs = []
    for optimizer, impl, bf16 in variants:
        torch.manual_seed(0)
        model = get_adapter("mbt2018-mean").build({"N": args.N, "M": args.M}).to(args.device).train()
        opt, hp = build_optimizer(optimizer, split_parameters(model)[0], soap_impl=impl, soap_bf16=bf16)
        runs.append((model, opt, hp.get("precondition_frequency", 1), [], []))
    x = torch.rand(args.batch, 3, args.patch, args.patch, device=args.device)
    period = max(r[2] for r in runs)
    for i in range(args.warmup + args.steps * period):
        for model, opt, _, steps, opt_part in runs:
            _sync(args.device)
            t0 = time.perf_counter()
            loss, _, _ = rd_loss(model(x), x, 0.013)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _sync(args.device)
            t1 = time.perf_counter()
            opt.step()
            _sync(args.device)
            t2 = time.perf_counter()
            if i >= args.warmup:
                steps.append(t2 - t0)
                opt_part.append(t2 - t1)
    # means over whole frequency periods (the periodic eigenbasis update included), medians without it
    return [{"optimizer": optimizer if optimizer == "adam" else f"soap ({impl}{', bf16' if bf16 else ''})",
             "step_ms": 1000 * statistics.fmean(steps), "step_median_ms": 1000 * statistics.median(steps),
             "steps_per_s": 1 / statistics.fmean(steps),
             "optimizer_ms": 1000 * statistics.fmean(opt_part),
             "optimizer_median_ms": 1000 * statistics.median(opt_part), "period": freq, "timed_steps": len(steps)}
            for (optimizer, impl, bf16), (_, _, freq, steps, opt_part) in zip(variants, runs, strict=True)]


def host_side(optimizer: str, steps: int = 40) -> tuple[int, int, float]:
    """An optimizer's step on mbt2018-mean as a GPU runs it eagerly (foreach lists; SOAP's CUDA graph off, whose
    replay dispatches none of these one by one): (operators dispatched by a step
    without SOAP's eigenbasis update, by one with it, median CPU ms per step at N=M=4). The counts depend only on
    the parameters' ranks; at N=M=4 the time is the host's dispatching, next to no arithmetic."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from lic_deploy.archs.registry import get_adapter
    from lic_deploy.train.optim import build_optimizer, split_parameters

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    params = split_parameters(get_adapter("mbt2018-mean").build({"N": 4, "M": 4}))[0]
    opt, hp = build_optimizer(optimizer, params)
    if isinstance(opt, torch.optim.Adam):
        opt.param_groups[0]["foreach"] = True
    else:
        opt.in_place, opt.cuda_graph = False, False
    freq = hp.get("precondition_frequency", 1)
    counts, times = [], []
    for step in range(1, steps + 1):
        for p in params:
            p.grad = torch.full_like(p, 1e-3 * step)
        Count.calls = 0
        t0 = time.perf_counter()
        with Count() if step <= freq + 2 else contextlib.nullcontext():  # counted steps are not timed below
            opt.step()
        times.append(time.perf_counter() - t0)
        counts.append(Count.calls)
    # SOAP's first step only gathers statistics; the step after step `freq` updates its eigenbases
    return counts[freq - 1 if freq > 1 else 1], counts[freq], 1000 * statistics.median(times[freq + 2:])


def gemm_rates(device: str, n: int = 2048, repeat: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n x n `torch.matmul` in float32 and bfloat16 (median of `repeat` after one warm-up): whether
    this machine gains from SOAP's bfloat16 products (`--soap-bf16`)."""
    import torch

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        times = []
        for _ in range(repeat + 1):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = 2 * n**3 / statistics.median(times[1:]) / 1e9
    return out


def time_pipeline(args: argparse.Namespace, workers: int) -> float:
    """Images per second of the streaming dataset with `workers` processes (first batch excluded)."""
    from lic_deploy.train.data import StreamDataset, loader

    ds = StreamDataset(args.data, args.patch, args.downscale or None, seed=0, small="upscale")
    it = loader(ds, 0, args.pipeline_steps + 1, list(range(args.pipeline_batch)), workers)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(b) for b in it)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="image folder for the data pipeline (skipped without it)")
    parser.add_argument("--N", type=int, default=128)
    parser.add_argument("--M", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--downscale", type=int, default=0, help="shorter side first (0 = off)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--steps", type=int, default=2, help="timed SOAP precondition periods (2 x 10 steps)")
    parser.add_argument("--pipeline-batch", type=int, default=16)
    parser.add_argument("--pipeline-steps", type=int, default=8)
    parser.add_argument("--workers", default="0,2,4", help="worker counts to time (0,2,4)")
    args = parser.parse_args(argv)
    import torch

    from lic_deploy.runtime.engines import check_device

    check_device(args.device, "run with --device cpu here")
    from lic_deploy.train.loop import flush_denormals

    torch.set_num_threads(args.threads)
    flush_denormals()  # as training does
    rows = time_steps([("adam", "", False), ("soap", "lic-deploy", False), ("soap", "lic-deploy", True),
                       ("soap", "pytorch-optimizer", False)], args)
    adam, soap, soap_bf16, reference = rows
    print(f"training step, mbt2018-mean N={args.N} M={args.M}, batch {args.batch}, {args.patch} px, {args.device}, "
          f"{args.threads} threads (means over whole SOAP precondition periods, and medians):")
    print(format_table(["optimizer", "step ms", "step median ms", "steps/s", "optimizer part ms",
                        "optimizer part median ms"],
                       [[r["optimizer"], r["step_ms"], r["step_median_ms"], r["steps_per_s"], r["optimizer_ms"],
                         r["optimizer_median_ms"]] for r in rows]))
    for r in (soap, soap_bf16, reference):
        print(f"{r['optimizer']} / Adam: whole step {r['step_ms'] / adam['step_ms']:.3f}x (medians "
              f"{r['step_median_ms'] / adam['step_median_ms']:.3f}x), optimizer part "
              f"{r['optimizer_ms'] / adam['optimizer_ms']:.2f}x")
    for r in (soap, soap_bf16):
        ratio = r["optimizer_ms"] / reference["optimizer_ms"]
        print(f"optimizer part, {r['optimizer']} / pytorch-optimizer's: {ratio:.3f}")
    print("\nhost side of an eager step as on a GPU (mbt2018-mean; operators dispatched, and CPU ms at N=M=4):")
    host = [[name, *host_side(name)] for name in ("adam", "soap")]
    print(format_table(["optimizer", "operators", "with eigenbasis update", "host ms"], host))
    gemm = gemm_rates(args.device)
    print(f"matmul 2048^3: float32 {gemm['float32']:.0f} GFLOP/s, bfloat16 {gemm['bfloat16']:.0f} GFLOP/s")
    if args.data:
        counts = [int(w) for w in args.workers.split(",")]
        rates = [time_pipeline(args, w) for w in counts]
        print(f"\ndata pipeline ({args.data}, {args.patch} px crops, batches of {args.pipeline_batch}):")
        print(format_table(["workers", "images/s"], [[w, r] for w, r in zip(counts, rates, strict=True)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
