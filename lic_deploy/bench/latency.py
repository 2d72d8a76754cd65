"""Timing helpers: medians after warm-up, the only statistic lic-deploy reports for speed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1,
                   sync: Callable[[], object] | None = None) -> float:
    """Median wall-clock seconds of `fn()` over `repeat` runs after `warmup` untimed runs. With `sync` (for
    example `torch.cuda.synchronize`), every run is timed from a synchronised start to a synchronised end, so
    work a GPU queued asynchronously is counted in the run that queued it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table; floats printed with 4 significant digits."""
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
