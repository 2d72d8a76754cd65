"""An experiment for issue 15's GPU goal (a whole SOAP step <= 1.3x Adam's at batch 16, 256 px): which of the
candidate changes would get lic-deploy's SOAP there, measured before one is built into `train/soap.py`.

Variants, their steps interleaved (one of each per round) on one fixed random batch, mbt2018-mean N=128/M=192:
- `adam`: torch.optim.Adam as `lic-deploy train` builds it (the baseline);
- `soap`: lic-deploy's SOAP as it is (eager; parameters of one shape stacked, moments over foreach lists; the
  eigenbasis update every 10 steps, its QRs on the device);
- `soap in-place`: the same with the CPU's moments, one shape at a time in place (more launches, less traffic);
- `soap host-qr`: the same with the batched QRs of the eigenbasis update on the host (on CUDA PyTorch loops over
  the batch, one cuSOLVER call per matrix: pytorch/pytorch#143281);
- `soap graph` (CUDA only): the optimizer step captured once in a CUDA graph and replayed (no host dispatch; the
  gradients accumulate in place so their addresses stay). Its eigenbasis update is switched off, so its mean is a
  plain step's: the script adds the host-QR variant's update cost (its mean minus its median, as the bench
  measures it) to give the estimate, labelled as such.

    PYTHONPATH=. python scripts/gpu_step_variants.py [--device cuda --batch 16 --patch 256 --rounds 30]

Prints per variant the whole step and the optimizer part (mean over whole precondition periods, and median) and the
ratio of the whole step to Adam's. On the CPU (a mechanics check) the graph variant is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lic_deploy.archs.registry import get_adapter
from lic_deploy.bench.latency import format_table
from lic_deploy.bench.train_bench import _sync
from lic_deploy.train.loop import rd_loss
from lic_deploy.train.optim import build_optimizer, split_parameters


@contextlib.contextmanager
def host_qr() -> Iterator[None]:
    """torch.linalg.qr of device tensors computed on the host, for the duration."""
    qr = torch.linalg.qr

    def on_host(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if a.device.type == "cpu":
            return qr(a, *args, **kwargs)
        q, r = qr(a.cpu(), *args, **kwargs)
        return q.to(a.device, non_blocking=True), r.to(a.device, non_blocking=True)

    torch.linalg.qr = on_host
    try:
        yield
    finally:
        torch.linalg.qr = qr


class Variant:
    """One model and optimizer; `step()` is the optimizer part (eager, or a CUDA graph's replay)."""

    def __init__(self, name: str, args: argparse.Namespace, optimizer: str = "soap", graph: bool = False,
                 on_host: bool = False, in_place: bool | None = None) -> None:
        torch.manual_seed(0)
        self.name, self.graph, self.on_host = name, graph, on_host
        self.model = get_adapter("mbt2018-mean").build({"N": args.N, "M": args.M}).to(args.device).train()
        self.opt, hp = build_optimizer(optimizer, split_parameters(self.model)[0])
        self.period = hp.get("precondition_frequency", 1)
        if in_place is not None:
            self.opt.in_place = in_place
        if graph:
            self.opt.param_groups[0]["precondition_frequency"] = 10**9  # plain steps only (see the docstring)
        self.replay: Callable[[], None] | None = None
        self.steps: list[float] = []
        self.opt_part: list[float] = []

    def backward(self, x: torch.Tensor) -> None:
        loss, _, _ = rd_loss(self.model(x), x, 0.013)
        self.opt.zero_grad(set_to_none=not self.graph)  # a graph reads the gradients where they were captured
        loss.backward()

    def step(self) -> None:
        if self.replay is not None:
            self.replay()
            return
        with host_qr() if self.on_host else contextlib.nullcontext():
            self.opt.step()

    def capture(self) -> None:
        """Record one optimizer step in a CUDA graph (after eager warm-up steps on a side stream)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.opt.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.opt.step()
        self.replay = graph.replay


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--N", type=int, default=128)
    parser.add_argument("--M", type=int, default=192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per variant (whole periods of 10)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    variants = [Variant("adam", args, "adam"), Variant("soap", args), Variant("soap in-place", args, in_place=True),
                Variant("soap host-qr", args, on_host=True)]
    if cuda:
        variants.append(Variant("soap graph", args, graph=True))
    x = torch.rand(args.batch, 3, args.patch, args.patch, device=args.device)
    for i in range(args.warmup + args.rounds):
        for v in variants:
            if v.graph and v.replay is None and i == args.warmup - 1:
                v.backward(x)
                v.capture()
                continue
            _sync(args.device)
            t0 = time.perf_counter()
            v.backward(x)
            _sync(args.device)
            t1 = time.perf_counter()
            v.step()
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
    if cuda:
        by_name = {v.name: v for v in variants}
        parts = by_name["soap host-qr"].opt_part
        update = statistics.fmean(parts) - statistics.median(parts)
        estimate = statistics.fmean(by_name["soap graph"].steps) + update
        print(f"estimate, graph-replayed plain steps + the host-QR eigenbasis update averaged in ({update:.2f} ms a "
              f"step): {estimate:.2f} ms, {estimate / adam:.3f}x Adam")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
