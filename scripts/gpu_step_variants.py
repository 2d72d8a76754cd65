"""An experiment for issue 15's GPU goal (a whole SOAP step <= 1.3x Adam's at batch 16, 256 px): lic-deploy's SOAP
with and without its CUDA graph, against Adam, and where its eigenbasis update spends its time.

Variants, their steps interleaved (one of each per round) on one fixed random batch, mbt2018-mean N=128/M=192:
- `adam`: torch.optim.Adam as `lic-deploy train` builds it (the baseline);
- `soap`: lic-deploy's SOAP as it trains on CUDA: its plain steps replayed as one CUDA graph, the moments over
  foreach lists; the eigenbasis update every 10 steps eager;
- `soap in-place`: the same with the CPU's moments, one shape at a time in place (fewer passes over memory);
- `soap eager`: no CUDA graph (every operator launched from the host).

    PYTHONPATH=. python scripts/gpu_step_variants.py [--device cuda --batch 16 --patch 256 --rounds 30]

Prints per variant the whole step and the optimizer part (mean over whole precondition periods, and median) and the
ratio of the whole step to Adam's; then (`--profile`) the operators of one eigenbasis update by device and host
time (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lic_deploy.archs.registry import get_adapter
from lic_deploy.bench.latency import format_table
from lic_deploy.bench.train_bench import _sync
from lic_deploy.train.loop import rd_loss
from lic_deploy.train.optim import build_optimizer, split_parameters


class Variant:
    """One model and optimizer, stepped on one batch; the whole steps and optimizer parts in ms."""

    def __init__(self, name: str, args: argparse.Namespace, optimizer: str = "soap", graph: bool | None = None,
                 in_place: bool | None = None) -> None:
        torch.manual_seed(0)
        self.name = name
        self.model = get_adapter("mbt2018-mean").build({"N": args.N, "M": args.M}).to(args.device).train()
        self.opt, _ = build_optimizer(optimizer, split_parameters(self.model)[0])
        if optimizer == "soap":
            self.opt.cuda_graph, self.opt.in_place = graph, in_place
        self.steps: list[float] = []
        self.opt_part: list[float] = []

    def backward(self, x: torch.Tensor) -> None:
        loss, _, _ = rd_loss(self.model(x), x, 0.013)
        self.opt.zero_grad(set_to_none=True)  # as `lic-deploy train`
        loss.backward()


def profile_update(v: Variant, x: torch.Tensor, device: str) -> None:
    """torch.profiler over the optimizer step that ends a precondition period (the eigenbasis update's)."""
    from torch.profiler import ProfilerActivity, profile

    period = v.opt.param_groups[0]["precondition_frequency"]
    while (v.opt.param_groups[0]["step"] - 1) % period != period - 1:
        v.backward(x)
        v.opt.step()
    v.backward(x)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        v.opt.step()
        _sync(device)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"\nprofile of the step with the eigenbasis update ({v.name}), by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=40))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=40))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--N", type=int, default=128)
    parser.add_argument("--M", type=int, default=192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per variant (whole periods of 10)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="profile an eigenbasis update afterwards")
    args = parser.parse_args()
    variants = [Variant("adam", args, "adam"), Variant("soap", args), Variant("soap in-place", args, in_place=True),
                Variant("soap eager", args, graph=False)]
    x = torch.rand(args.batch, 3, args.patch, args.patch, device=args.device)
    for i in range(args.warmup + args.rounds):
        for v in variants:
            _sync(args.device)
            t0 = time.perf_counter()
            v.backward(x)
            _sync(args.device)
            t1 = time.perf_counter()
            v.opt.step()
            _sync(args.device)
            t2 = time.perf_counter()
            if i >= args.warmup:
                v.steps.append(1000 * (t2 - t0))
                v.opt_part.append(1000 * (t2 - t1))
    adam = statistics.fmean(variants[0].steps)
    rows = []
    for v in variants:
        step, part = statistics.fmean(v.steps), statistics.fmean(v.opt_part)
        finite = all(bool(torch.isfinite(p).all()) for p in v.model.parameters())
        rows.append([v.name, step, statistics.median(v.steps), part, statistics.median(v.opt_part), step / adam,
                     "yes" if finite else "NO"])
    print(f"mbt2018-mean N={args.N} M={args.M}, batch {args.batch}, {args.patch} px, {args.device}, "
          f"{args.rounds} timed steps each (interleaved):")
    print(format_table(["variant", "step ms", "median", "optimizer part ms", "median", "step / Adam (means)",
                        "weights finite"], rows))
    graphed = variants[1].opt._graphs.get(0, (None, None))[1] is not None
    print(f"soap's plain steps replayed as a CUDA graph: {graphed}")
    if args.profile:
        profile_update(variants[1], x, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
