"""The shipped model set: mbt2018-mean at four lambdas, Adam and SOAP with equal step budgets and seed, plus a
"SOAP, equal quality" model at lambda 0.013: SOAP stopped as soon as it reaches the Adam model's final validation
loss, so that outliers can be compared at equal FP32 quality as well as at equal steps.

Runs round-robin in chunks so that every model advances together, and resumes from the run folder after an
interruption (the run folder holds full training checkpoints with optimizer state; `models/` receives only the
final weights, as FP16 safetensors, and a model card each).

    python -m lic_deploy.train.model_set --data ../shared/data/train --val ../shared/data/kodak

On a GPU, `--preset gpu` (`make models-gpu`) trains the set at N=128/M=192 with `--device cuda --concurrent`: the
eight equal-budget runs at once, one process each sharing the GPU, every run stopped by its step count or its
`--max-seconds` wall-clock budget, whichever comes first; the equal-quality SOAP run follows, alone.

    python -m lic_deploy.train.model_set --preset gpu --data ../shared/data/train --val ../shared/data/kodak \\
        --runs ../lic-runs/gpu --models models-gpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lic_deploy.cli import folder_arg
from lic_deploy.train.loop import TrainConfig, log_path, train

LAMBDAS = (0.0035, 0.0067, 0.013, 0.025)
OPTIMIZERS = ("adam", "soap")
EQUAL_QUALITY_LAMBDA = 0.013


def run_name(optimizer: str, lmbda: float, suffix: str = "", prefix: str = "mbt") -> str:
    return f"{prefix}-{optimizer}{suffix}-{lmbda}"


def last_row(log: Path, key: str) -> dict | None:
    """The last JSONL row of `log` that has `key`."""
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if key in r]
    return rows[-1] if rows else None


def _config(args: argparse.Namespace, runs: Path, name: str, optimizer: str, lmbda: float, steps: int) -> TrainConfig:
    ckpt = runs / f"{name}.pt"
    return TrainConfig(data=args.data, val=args.val, output=str(ckpt), optimizer=optimizer, lmbda=lmbda,
                       N=args.N, M=args.M, steps=steps, batch=args.batch, patch=args.patch, seed=args.seed,
                       resume=str(ckpt) if ckpt.is_file() else None, threads=args.threads,
                       val_count=args.val_count, val_every=args.chunk // 2, ckpt_every=args.chunk // 2,
                       device=args.device, downscale=args.downscale or None, max_seconds=args.max_seconds)


def _concurrently(configs: list[TrainConfig]) -> None:
    """Train every config in its own process at once (spawned: CUDA cannot fork); RuntimeError if one fails."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=train, args=(cfg,), kwargs={"progress": False}) for cfg in configs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [cfg.output for cfg, p in zip(configs, procs, strict=True) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"training failed for {', '.join(failed)}")


# `--preset gpu` (`make models-gpu`): the set at N=128/M=192 on one GPU, the eight equal-budget runs at once
PRESETS: dict[str, dict[str, object]] = {
    "cpu": {},
    "gpu": {"device": "cuda", "concurrent": True, "prefix": "mbt128", "N": 128, "M": 192, "batch": 16, "patch": 256,
            "downscale": 320, "steps": 10000, "max_seconds": 420.0, "chunk": 500, "eq_val_every": 250, "threads": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The driver's arguments: a preset's defaults, then any option given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="defaults for the set: cpu (N=64/M=96, 2 cores) or gpu (N=128/M=192, batch 16, 256 px "
                             "crops of photos downscaled to 320 px, the eight runs at once on cuda, each stopped at "
                             "10000 steps or 420 s)")
    parser.add_argument("--data", required=True, type=folder_arg, help="training images (or data:train)")
    parser.add_argument("--val", required=True, type=folder_arg, help="validation images (or data:kodak)")
    parser.add_argument("--runs", default=os.environ.get("LIC_DEPLOY_RUNS", "../lic-runs"),
                        help="training checkpoints and logs, resumed from ($LIC_DEPLOY_RUNS or ../lic-runs)")
    parser.add_argument("--models", default="models", help="where the published weights and cards go (models)")
    parser.add_argument("--N", type=int, default=64, help="transform channels (64)")
    parser.add_argument("--M", type=int, default=96, help="latent channels (96)")
    parser.add_argument("--steps", type=int, default=1000, help="steps per equal-budget run (1000)")
    parser.add_argument("--chunk", type=int, default=500,
                        help="steps per round-robin turn; validation and checkpoints every chunk/2 (500)")
    parser.add_argument("--batch", type=int, default=8, help="crops per step (8)")
    parser.add_argument("--patch", type=int, default=128, help="crop size, pixels (128)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every run (0)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run (2)")
    parser.add_argument("--val-count", type=int, default=6, help="validation images, the first of --val (6)")
    parser.add_argument("--eq-val-every", type=int, default=25, help="validation interval of the equal-quality run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu; the gpu preset: cuda)")
    parser.add_argument("--downscale", type=int, default=256, help="shorter side of training images first (0 = off)")
    parser.add_argument("--concurrent", action="store_true",
                        help="train the equal-budget runs at once, one process each (a GPU shared by all)")
    parser.add_argument("--max-seconds", type=float, help="wall-clock training budget of each run, seconds")
    parser.add_argument("--prefix", default="mbt", help="model name prefix (mbt; the GPU set: mbt128)")
    parser.set_defaults(**PRESETS[parser.parse_known_args(argv)[0].preset])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)

    if args.concurrent:
        _concurrently([_config(args, runs, run_name(o, lm, prefix=args.prefix), o, lm, args.steps)
                       for o in OPTIMIZERS for lm in LAMBDAS])
    else:
        for target in range(args.chunk, args.steps + args.chunk, args.chunk):
            for optimizer in OPTIMIZERS:
                for lmbda in LAMBDAS:
                    train(_config(args, runs, run_name(optimizer, lmbda, prefix=args.prefix), optimizer, lmbda,
                                  min(target, args.steps)))

    # Equal FP32 quality: SOAP again from the same seed, stopped at the first validation (every `eq_val_every`
    # steps) whose loss reaches the equal-steps Adam model's final one. (Adam trained on to SOAP's loss does not
    # fit the CPU budget at this scale: see the README.)
    goal = last_row(log_path(runs / f"{run_name('adam', EQUAL_QUALITY_LAMBDA, prefix=args.prefix)}.pt"), "val_loss")
    name = run_name("soap", EQUAL_QUALITY_LAMBDA, "-eq", prefix=args.prefix)
    eq_ckpt = runs / f"{name}.pt"

    def eq_reached() -> bool:
        done = last_row(log_path(eq_ckpt), "val_loss")
        return bool(done and done["val_loss"] <= goal["val_loss"])  # type: ignore[index]

    checkpoints = [runs / f"{run_name(o, lm, prefix=args.prefix)}.pt" for o in OPTIMIZERS for lm in LAMBDAS]
    if goal is None:
        print(f"warning: {run_name('adam', EQUAL_QUALITY_LAMBDA, prefix=args.prefix)} logged no validation loss (its "
              f"budget ended before its first validation), so the set has no equal-quality model", file=sys.stderr)
    else:
        if not eq_reached():
            cfg = _config(args, runs, name, "soap", EQUAL_QUALITY_LAMBDA, args.steps)
            cfg.val_every, cfg.ckpt_every, cfg.until_val_loss = args.eq_val_every, args.eq_val_every, goal["val_loss"]
            train(cfg)
            if not eq_reached():
                print(f"warning: {name} did not reach Adam's validation loss {goal['val_loss']:.4f} within "
                      f"{args.steps} steps; it is published at equal steps instead")
        checkpoints.append(eq_ckpt)

    from lic_deploy.train.cards import publish

    for checkpoint in checkpoints:
        publish(checkpoint, Path(args.models), kodak=args.val)

if __name__ == "__main__":
    main()
