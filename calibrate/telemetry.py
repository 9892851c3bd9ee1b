"""NVML (nvidia-ml-py) readings: device facts, and a background sampler during decode runs."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, or no permission: telemetry is optional
        return None


def nvml_handle(device_index: int, uuid: str | None = None):
    """(pynvml module, handle) for a CUDA device, or (None, None) without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None, None
    try:
        if uuid:
            return nvml, nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        pass
    try:
        return nvml, nvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception:
        return None, None


def driver_version() -> str | None:
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        return None


def memory_free_bytes(nvml, handle) -> tuple[int, int] | None:
    """(free, total) device memory as the driver sees it, for all processes."""
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.free), int(info.total)
    except Exception:
        return None


METRICS = ("sm_util_pct", "mem_util_pct", "power_w", "sm_clock_mhz", "mem_clock_mhz")


@dataclass
class NvmlSampler:
    """Samples utilization, power and clocks every `period_s` while `phase` is set."""

    nvml: object
    handle: object
    period_s: float = 0.1
    phase: str | None = None
    rows: list[tuple[str, float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _read(self) -> dict[str, float]:
        n = self.nvml
        util = n.nvmlDeviceGetUtilizationRates(self.handle)
        return {
            "sm_util_pct": float(util.gpu),
            "mem_util_pct": float(util.memory),
            "power_w": n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
            "sm_clock_mhz": float(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)),
            "mem_clock_mhz": float(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_MEM)),
        }

    def _loop(self) -> None:
        started_at = time.perf_counter()
        while not self._stop.wait(self.period_s):
            phase = self.phase
            if phase is None:
                continue
            try:
                self.rows.append((phase, time.perf_counter() - started_at, self._read()))
            except Exception:
                return

    def __enter__(self) -> NvmlSampler:
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def summary(self) -> dict[str, float]:
        """Median and p90 of each metric per phase, keyed `nvml.<phase>.<metric>.<p50|p90>`."""
        out: dict[str, float] = {}
        for phase in sorted({p for p, _, _ in self.rows}):
            values = [v for p, _, v in self.rows if p == phase]
            for metric in METRICS:
                series = np.array([v[metric] for v in values])
                out[f"nvml.{phase}.{metric}.p50"] = float(np.median(series))
                out[f"nvml.{phase}.{metric}.p90"] = float(np.percentile(series, 90))
            out[f"nvml.{phase}.n_samples"] = float(len(values))
        return out
