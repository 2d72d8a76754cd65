"""`make bench-soap-bf16`: does SOAP with bfloat16 products (`--soap-bf16`) train like float32 SOAP?

Reads the logs of runs that differ only in SOAP's product precision and seed (same model, data, λ and steps:
`{fp32,bf16}-s{SEED}.pt.jsonl` in one folder) and prints, at every validation step, each run's validation loss
(λ·255²·MSE + bpp), PSNR and bpp, then the two differences that answer the question: bf16 − fp32 at each seed
(what the precision changes) against fp32 seed 1 − fp32 seed 0 (what a different seed changes: the noise floor),
and each run's training loss averaged over the second half of the steps. Also plots training and validation loss
against steps, all runs, one PNG.

    python -m lic_deploy.bench.soap_precision ../lic-runs/soap-bf16 [-o out/soap-bf16.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from lic_deploy.atomic import atomic_path
from lic_deploy.bench.convergence import read_log, read_rows
from lic_deploy.bench.latency import format_table
from lic_deploy.errors import DataError, LicError

PRECISIONS = ("fp32", "bf16")


def find_runs(folder: Path) -> dict[tuple[str, int], Path]:
    """(precision, seed) -> log path for every `{fp32,bf16}-s{SEED}.pt.jsonl` in `folder` that has validated
    (a run still before its first validation is left out)."""
    runs = {}
    for path in sorted(folder.glob("*-s*.pt.jsonl")):
        precision, _, seed = path.name.removesuffix(".pt.jsonl").partition("-s")
        if precision in PRECISIONS and seed.isdigit() and '"val_loss"' in path.read_text():
            runs[precision, int(seed)] = path
    if not any(p == "fp32" for p, _ in runs) or not any(p == "bf16" for p, _ in runs):
        raise DataError(f"{folder}: needs fp32-sN.pt.jsonl and bf16-sN.pt.jsonl training logs")
    return runs


def table(runs: dict[tuple[str, int], Path]) -> tuple[list[str], list[list[object]], dict[str, list[float]]]:
    """(header, rows, differences): validation loss, PSNR, bpp per run at the steps every run validated;
    `differences` maps "bf16 - fp32, seed S" and "fp32 seed S - seed 0" to their validation-loss differences."""
    logs = {key: {r["step"]: r for r in read_log(path)} for key, path in sorted(runs.items())}
    steps = sorted(set.intersection(*(set(rows) for rows in logs.values())))
    if not steps:
        raise DataError("the runs have no validation step in common")
    header = ["step"] + [f"{p} s{s}: loss / dB / bpp" for p, s in logs]
    rows = [[step] + [f"{logs[k][step]['val_loss']:.4f} / {logs[k][step]['val_psnr']:.2f} / "
                      f"{logs[k][step]['val_bpp']:.4f}" for k in logs] for step in steps]
    seeds = sorted({s for _, s in logs})
    diffs: dict[str, list[float]] = {}
    for s in seeds:
        if ("fp32", s) in logs and ("bf16", s) in logs:
            diffs[f"bf16 - fp32, seed {s}"] = [logs["bf16", s][t]["val_loss"] - logs["fp32", s][t]["val_loss"]
                                               for t in steps]
        if s != seeds[0] and ("fp32", s) in logs and ("fp32", seeds[0]) in logs:
            diffs[f"fp32 seed {s} - seed {seeds[0]}"] = [logs["fp32", s][t]["val_loss"]
                                                          - logs["fp32", seeds[0]][t]["val_loss"] for t in steps]
    return header, rows, diffs


def late_train_loss(runs: dict[tuple[str, int], Path], last: int) -> dict[tuple[str, int], float]:
    """Each run's logged training loss averaged over steps (last / 2, last]: the whole training set's view, steadier
    than a few validation images."""
    out = {}
    for key, log in sorted(runs.items()):
        rows = read_rows(log)
        late = [r["train_loss"] for r in rows if "train_loss" in r and last / 2 < r["step"] <= last]
        if late:
            out[key] = statistics.fmean(late)
    return out


def plot(runs: dict[tuple[str, int], Path], steps: list[int], diffs: dict[str, list[float]], path: Path) -> None:
    """Left: training loss (thin) and validation loss (markers) against steps, a colour per seed, float32 solid and
    bfloat16 dashed. Right: the validation-loss differences of `table` at `steps`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, values in diffs.items():
        right.plot(steps, values, "o-" if name.startswith("bf16") else "s:", ms=4, label=name)
    right.axhline(0, color="grey", lw=0.8)
    right.set(xlabel="training steps", ylabel="validation-loss difference", title="what precision and seed change")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    seeds = sorted({seed for _, seed in runs})
    for (precision, seed), log in sorted(runs.items()):
        rows = read_rows(log)
        style, colour = "-" if precision == "fp32" else "--", f"C{seeds.index(seed)}"
        train = [r for r in rows if "train_loss" in r]
        ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], style, lw=1, color=colour,
                label=f"{precision} seed {seed}: train")
        val = [r for r in rows if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o" + style, color=colour, ms=4,
                label=f"{precision} seed {seed}: validation")
    ax.set(xlabel="training steps", ylabel="loss (λ·255²·MSE + bpp)", yscale="log",
           title="SOAP: float32 against bfloat16 products")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="folder with {fp32,bf16}-s{SEED}.pt.jsonl training logs")
    parser.add_argument("-o", "--output", default="out/soap-bf16.png", help="plot path (out/soap-bf16.png)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(Path(args.runs))
        header, rows, diffs = table(runs)
        plot(runs, [r[0] for r in rows], diffs, Path(args.output))
    except LicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("validation (loss / PSNR / bpp):")
    print(format_table(header, rows))
    print("\nvalidation-loss differences, per validation step (and mean |difference|):")
    for name, values in diffs.items():
        print(f"  {name}: {' '.join(f'{v:+.4f}' for v in values)}  (mean |d| {statistics.fmean(map(abs, values)):.4f})")
    last = rows[-1][0]
    late = late_train_loss(runs, last)
    print(f"\ntraining loss, mean over steps {last // 2 + 1}-{last}:")
    for (precision, seed), value in late.items():
        ref = late.get(("fp32", seed))
        vs = f" ({100 * (value / ref - 1):+.2f} % against fp32)" if precision == "bf16" and ref else ""
        print(f"  {precision} seed {seed}: {value:.4f}{vs}")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
