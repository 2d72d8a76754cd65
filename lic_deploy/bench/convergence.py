"""Convergence of SOAP against Adam from two training logs (JSONL written by `lic-deploy train`).

The question the SOAP study answers with "about 70% fewer steps, 58-61% less wall-clock": how many steps and
seconds does SOAP need to reach the validation loss Adam ends with? Both runs must share architecture, data,
seed and lambda (checked from the checkpoints' logs where recorded). The crossing is the first validation
point at or below Adam's final loss, linearly interpolated between that point and the one before.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lic_deploy.atomic import atomic_path
from lic_deploy.bench.textfile import read_text
from lic_deploy.errors import DataError


@dataclass
class Convergence:
    target_val_loss: float  # Adam's final validation loss
    adam_steps: int
    adam_seconds: float
    soap_steps: float | None  # steps SOAP needed to reach the target (None: never within its log)
    soap_seconds: float | None
    step_time_ratio: float  # SOAP seconds per step / Adam seconds per step
    upper_bound: bool = False  # SOAP was already below the target at its first validation point

    @property
    def step_saving(self) -> float | None:
        """Fraction of Adam's steps SOAP saved (0.7 = 70% fewer)."""
        return None if self.soap_steps is None else 1 - self.soap_steps / self.adam_steps

    @property
    def time_saving(self) -> float | None:
        return None if self.soap_seconds is None else 1 - self.soap_seconds / self.adam_seconds


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Every row of a training log (JSONL written by `lic-deploy train`), in file order; DataError unless each
    is an object with an integer step and numbers for its losses, seconds and lr."""
    text = read_text(path, "a lic-deploy training log")
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise DataError(f"{path}: not a lic-deploy training log ({exc})") from None
    for i, row in enumerate(rows, 1):
        if not (isinstance(row, dict) and type(row.get("step")) is int and all(
                isinstance(v, int | float) for k, v in row.items() if k.endswith(("loss", "seconds", "lr")))):
            raise DataError(f"{path}: row {i} is not a training log row (an object with an integer step and numeric "
                            f"losses): {json.dumps(row)[:80]}")
    return rows


def read_log(path: str | os.PathLike) -> list[dict]:
    """Validation rows (step, seconds, val_loss, ...) of a training log, in step order; of a step logged twice (a
    run resumed from a checkpoint older than its last log rows repeats them) the later row."""
    rows = read_rows(path)
    val = sorted({r["step"]: r for r in rows if "val_loss" in r}.values(), key=lambda r: r["step"])
    if not val:
        raise DataError(f"{path}: has no validation rows (train with --val)")
    return val


def _crossing(rows: list[dict], target: float) -> tuple[float, float] | None:
    prev = {"step": 0, "seconds": 0.0, "val_loss": float("inf")}
    for row in rows:
        if row["val_loss"] <= target:
            if prev["val_loss"] == float("inf"):
                return float(row["step"]), float(row["seconds"])
            f = (prev["val_loss"] - target) / (prev["val_loss"] - row["val_loss"])
            return (prev["step"] + f * (row["step"] - prev["step"]),
                    prev["seconds"] + f * (row["seconds"] - prev["seconds"]))
        prev = row
    return None


def compare(adam_log: str | os.PathLike, soap_log: str | os.PathLike) -> Convergence:
    adam, soap = read_log(adam_log), read_log(soap_log)
    final = adam[-1]
    cross = _crossing(soap, final["val_loss"])
    adam_rate = final["seconds"] / final["step"]
    soap_rate = soap[-1]["seconds"] / soap[-1]["step"]
    return Convergence(final["val_loss"], int(final["step"]), float(final["seconds"]),
                       None if cross is None else cross[0], None if cross is None else cross[1],
                       soap_rate / adam_rate, cross is not None and cross[0] == soap[0]["step"])


COMPARED = ("lmbda", "arch", "N", "M", "arch_options", "context_widths", "batch", "patch", "downscale",
            "data_hash")  # what two compared runs should share: the checkpoint's metadata or its training config


def run_differences(adam_log: str | os.PathLike, soap_log: str | os.PathLike) -> list[str]:
    """What the two runs differ in besides the optimizer ("lmbda: 0.013 against 0.0067", ...), read from the
    checkpoints beside their logs (X.pt for X.pt.jsonl); nothing for a log without a readable checkpoint."""
    from lic_deploy.archs.checkpoint import read_checkpoint
    from lic_deploy.errors import LicError

    metas = []
    for log in (Path(adam_log), Path(soap_log)):
        try:
            metas.append(read_checkpoint(log.with_suffix(""))[1] if log.suffix == ".jsonl" else None)
        except LicError:
            metas.append(None)
    if None in metas:
        return []
    a, s = ({**(m.get("config") or {}), **m} for m in metas)
    return [f"{k}: {a.get(k)} against {s.get(k)}" for k in COMPARED if a.get(k) != s.get(k)]


def plot(adam_log: str | os.PathLike, soap_log: str | os.PathLike, path: Path) -> None:
    """Validation loss against steps and against seconds, both optimizers, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, log, colour in (("Adam", adam_log, "tab:blue"), ("SOAP", soap_log, "tab:red")):
        rows = read_log(log)
        for ax, key in zip(axes, ("step", "seconds"), strict=True):
            ax.plot([r[key] for r in rows], [r["val_loss"] for r in rows], "o-", color=colour, label=name, ms=3)
    for ax, label in zip(axes, ("training steps", "wall-clock seconds (2 CPU cores)"), strict=True):
        ax.set(xlabel=label, ylabel="validation loss (λ·255²·MSE + bpp)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def summary(c: Convergence) -> str:
    lines = [f"Adam's final validation loss: {c.target_val_loss:.4f} at step {c.adam_steps} "
             f"({c.adam_seconds:.0f} s)"]
    if c.soap_steps is None:
        lines.append("SOAP did not reach it within its log")
    else:
        when = "at or before" if c.upper_bound else "at"
        lines.append(f"SOAP reached it {when} step {c.soap_steps:.0f} ({c.soap_seconds:.0f} s): "
                     f"{100 * c.step_saving:.1f}% fewer steps, {100 * c.time_saving:.1f}% less wall-clock"
                     + (" (at least: validate more often to narrow it)" if c.upper_bound else ""))
    lines.append(f"per-step time, SOAP / Adam: {c.step_time_ratio:.3f}")
    return "\n".join(lines)


def to_json(c: Convergence) -> dict:
    return {**asdict(c), "step_saving": c.step_saving, "time_saving": c.time_saving}
