"""The one timer for calibration: synchronize, discard warm-ups, repeat, keep every sample.

Host wall-clock time around a synchronized call is what the simulator needs: a step's cost as the
caller sees it, kernel launches and Python overhead included, not only the GPU kernels' time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (10, 50, 90, 99)


@dataclass
class Timing:
    samples_s: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_s, q)) if self.samples_s else float("nan")

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p10(self) -> float:
        return self.percentile(10)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    def percentiles(self) -> dict[str, float]:
        return {f"p{q}": self.percentile(q) for q in PERCENTILES}

    def describe(self) -> str:
        return f"p50 {fmt_s(self.p50)} (p10 {fmt_s(self.p10)}, p90 {fmt_s(self.p90)}, n={len(self.samples_s)})"


def fmt_s(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def make_sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure(
    fn: Callable[[], object],
    sync: Callable[[], None],
    *,
    warmup: int = 1,
    repeat: int = 5,
    min_repeat: int = 2,
    budget_s: float | None = None,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Time `fn` `repeat` times after `warmup` untimed calls; stop early past `budget_s` (>= min_repeat).

    `setup` runs untimed before every call (for example, to rebuild an input the call consumes).
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync()
    timing = Timing()
    started_at = time.perf_counter()
    for i in range(repeat):
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        timing.samples_s.append(time.perf_counter() - t0)
        if budget_s is not None and i + 1 >= min_repeat and time.perf_counter() - started_at > budget_s:
            break
    return timing
