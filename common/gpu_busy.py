"""GPU utilization, one definition on both sides: the share of wall time the GPU runs kernels.

This is the one place it is defined; every figure named GPU utilization follows it:

- Simulator (`kernel_share`): the records' `gpu_busy_s` summed, over the window's wall time. `gpu_busy_s` is
  the kernel time of the request's passes: a launch-bound decode pass counts only its kernel time
  (timeslice_mp's g, the GPU's seconds per step, else a share f of the pass from NVML's SM
  utilization during calibrate's Exp 2.1), a
  batched step is split among its sequences, so the sum is the union of the GPU's busy intervals.
  summary.json's `gpu_utilization` (window: first measured request to last measured reply) and
  the per-run `gpu_util_pct` of the baselines (window: the run) are this.
- Real GPU (`sampled_busy_share`): NVML's utilization samples, which are that quantity as the
  driver measures it ("percent of time over the past sample period during which one or more
  kernels was executing"), averaged over the same window (validate/gpumon.py samples them).
- Real CPU (`busy_share` of the passes' compute stamps, or `PassClock`): a pass is the device's work
  from its start to its end, so the share of wall time inside passes. On a GPU without NVML,
  CUDA events around each pass give the same share, an upper bound there, since it also counts the
  gaps between a launch-bound pass's kernels.

`djinnsim validate` compares the simulated figure with the real one as an info metric (`gpu_util`).
Nothing here imports torch at import time: sim/ uses `kernel_share`.
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


def kernel_share(busy_s: float, start_at: float, end_at: float, gpus: int = 1) -> float | None:
    """`busy_s` kernel seconds (the window's requests' `gpu_busy_s` summed) over the window's wall
    time on `gpus` GPUs (their mean), at most 1; None for a window with no time in it."""
    span_s = end_at - start_at
    if not span_s > 0:
        return None
    return min(float(busy_s) / (span_s * gpus), 1.0)


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
