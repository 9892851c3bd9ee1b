"""GPU utilization and memory in use, sampled through NVML on a background thread.

NVML sees the whole device (every process's CUDA context, weights, KV and allocator cache), which
is what decides an out-of-memory, and it never creates a CUDA context in this process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from djinnsim.calibrate.telemetry import driver_version, nvml_handle


@dataclass(frozen=True)
class GpuFacts:
    name: str
    memory_bytes: int
    driver: str


def gpu_facts(index: int) -> GpuFacts | None:
    """Name, memory and driver of GPU `index`, or None when NVML or the GPU is missing."""
    nvml, handle = nvml_handle(index)
    driver = driver_version()
    if handle is None or driver is None:  # no NVML library, no driver, no such GPU: the caller says N/A
        return None
    try:
        name = nvml.nvmlDeviceGetName(handle)
        return GpuFacts(name=name.decode() if isinstance(name, bytes) else name,
                        memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total), driver=driver)
    except Exception:
        return None


class GpuMonitor:
    """Samples (time, utilization %, memory used bytes) every `interval_s` until stopped."""

    def __init__(self, index: int, interval_s: float = 0.02, max_samples: int = 2_000_000) -> None:
        self.index = index
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline_bytes = 0
        self.total_bytes: int | None = None
        self._nvml, self._handle = nvml_handle(index)
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.baseline_bytes, self.total_bytes = int(info.used), int(info.total)
            self.available = True
        except Exception:  # no NVML library, no driver, no such GPU
            self._nvml = None
            self.available = False

    def __enter__(self) -> "GpuMonitor":
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        while not self._stop.is_set() and len(self.samples) < self.max_samples:
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                used = nvml.nvmlDeviceGetMemoryInfo(handle).used
            except Exception:
                return
            self.samples.append((time.perf_counter(), float(util), int(used)))
            self._stop.wait(self.interval_s)

    def window(self, start_at: float, end_at: float) -> tuple[float | None, int | None]:
        """(mean utilization as a fraction, peak memory in use above the idle baseline) in a window."""
        inside = [s for s in self.samples if start_at <= s[0] <= end_at]
        if not inside:
            return None, None
        util = sum(s[1] for s in inside) / len(inside) / 100.0
        peak = max(s[2] for s in inside) - self.baseline_bytes
        return util, max(peak, 0)
