"""GPU utilization, one definition on both sides: the share of wall time the GPU runs kernels.

The simulator takes it from the executor's busy intervals; a real run from NVML's utilization
samples, which are that quantity as the driver measures it ("percent of time over the past sample
period during which one or more kernels was executing"), averaged over the run's window. Without
NVML, CUDA events around each GPU pass give the share of wall time the GPU spends inside passes:
an upper bound, since it also counts the gaps between a launch-bound pass's kernels.

Nothing here imports torch at import time: sim/ may use `busy_share` on simulated intervals.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


def busy_share(intervals: Iterable[tuple[float, float]], start_at: float, end_at: float) -> float:
    """Length of the union of `intervals`, clipped to [start_at, end_at], over that window's length
    (overlapping intervals count once: two processes' kernels at once are one busy GPU)."""
    if end_at <= start_at:
        raise ValueError(f"empty window [{start_at}, {end_at}]")
    clipped = sorted((max(a, start_at), min(b, end_at)) for a, b in intervals if b > start_at and a < end_at)
    busy, reach = 0.0, start_at
    for a, b in clipped:
        if b <= reach:
            continue
        busy += b - max(a, reach)
        reach = b
    return busy / (end_at - start_at)


def sampled_busy_share(samples: Iterable[tuple[float, float]], start_at: float, end_at: float) -> float | None:
    """Mean of NVML utilization samples (at, percent) taken in [start_at, end_at], as a share; None if none."""
    inside = [pct for at, pct in samples if start_at <= at <= end_at]
    return sum(inside) / len(inside) / 100.0 if inside else None


class PassClock:
    """Brackets GPU passes: CUDA events on a GPU, the host clock on the CPU (where a pass is the
    device's work from its start to its end). `intervals()` are seconds after the clock was made."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self._events: list[tuple[object, object]] = []
        self._spans: list[tuple[float, float]] = []
        self.started_at = time.perf_counter()
        if self.cuda:
            import torch

            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()

    @contextmanager
    def gpu_pass(self) -> Iterator[None]:
        if not self.cuda:
            t0 = time.perf_counter()
            yield
            self._spans.append((t0 - self.started_at, time.perf_counter() - self.started_at))
            return
        import torch

        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._events.append((begin, end))

    def intervals(self) -> list[tuple[float, float]]:
        """Every bracketed pass as (start, end) on the device's timeline (synchronizes on a GPU)."""
        if not self.cuda:
            return list(self._spans)
        import torch

        torch.cuda.synchronize(self.device)
        return [(self._origin.elapsed_time(b) / 1e3, self._origin.elapsed_time(e) / 1e3) for b, e in self._events]

    def busy_share(self) -> float:
        """Share of the wall time since the clock was made that the device spent inside passes."""
        intervals = self.intervals()
        return busy_share(intervals, 0.0, max(time.perf_counter() - self.started_at, max((e for _, e in intervals), default=0.0)))
