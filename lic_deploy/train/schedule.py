"""Learning-rate schedules: linear warm-up, then constant, multi-step decay or cosine.

The rate at a step is a pure function of (schedule, step, total steps), so a resumed run follows the schedule
of an uninterrupted one; the schedule is stored in every checkpoint and a resume must name the same one.
Milestones below 1 are fractions of the total steps (0.9, 0.96: the TCM/DCAE/LALIC recipes), others step counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lic_deploy.errors import LicError

KINDS = ("constant", "multistep", "cosine")


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    warmup: int = 100  # steps of linear warm-up from lr / warmup to lr
    milestones: tuple[float, ...] = ()  # multistep: where the rate is multiplied by `gamma`
    gamma: float = 0.1
    min_factor: float = 0.0  # cosine: the final rate as a fraction of the peak

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LicError(f"unknown schedule {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.warmup < 0:
            raise LicError("--warmup must be at least 0")
        if self.kind == "multistep" and not self.milestones:
            raise LicError("--schedule multistep needs --lr-milestones (for example 0.9,0.96)")
        if self.kind != "multistep" and self.milestones:
            raise LicError("--lr-milestones applies to --schedule multistep only")
        if any(m <= 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise LicError("--lr-milestones must be positive and increasing")
        if not 0 < self.gamma <= 1 or not 0 <= self.min_factor <= 1:
            raise LicError("--lr-gamma must be in (0, 1] and the cosine floor in [0, 1]")

    def milestone_steps(self, total: int) -> list[int]:
        """The milestones as step numbers: the first step run at the lowered rate."""
        return [round(m * total) if m < 1 else int(m) for m in self.milestones]

    def factor(self, step: int, total: int) -> float:
        """The multiplier of the peak rate at 0-based `step` of a run of `total` steps."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "multistep":
            return warm * self.gamma ** sum(step >= m for m in self.milestone_steps(total))
        if self.kind == "cosine":
            span = max(1, total - self.warmup)
            t = min(1.0, max(0.0, (step - self.warmup) / span))
            return warm * (self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
        return warm

    def record(self, total: int) -> dict[str, Any]:
        """What a checkpoint stores: the schedule, and the total steps where the schedule depends on it."""
        return {**asdict(self), "milestones": list(self.milestones),
                "total": None if self.kind == "constant" else total}


def parse_milestones(text: str) -> tuple[float, ...]:
    """"0.9,0.96" -> (0.9, 0.96)."""
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise LicError(f"--lr-milestones {text!r}: expected comma-separated numbers like 0.9,0.96") from None
