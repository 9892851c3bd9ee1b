"""GPU utilization as the share of wall time the GPU runs kernels: the one helper both sides use."""

from __future__ import annotations

import time

import pytest
from djinnsim.common.gpu_busy import PassClock, busy_share, sampled_busy_share


def test_union_of_intervals_over_the_window():
    assert busy_share([(0, 1), (0.5, 2), (3, 4)], 0, 4) == pytest.approx(0.75)  # overlap counted once
    assert busy_share([(-1, 1), (3, 9)], 0, 4) == pytest.approx(0.5)  # clipped to the window
    assert busy_share([(1, 2), (1.2, 1.5)], 0, 4) == pytest.approx(0.25)  # nested
    assert busy_share([], 0, 4) == 0.0
    with pytest.raises(ValueError):
        busy_share([(0, 1)], 2, 2)


def test_nvml_samples_in_the_window_averaged():
    samples = [(0.0, 100.0), (1.0, 20.0), (2.0, 40.0), (9.0, 0.0)]
    assert sampled_busy_share(samples, 0.5, 2.5) == pytest.approx(0.3)
    assert sampled_busy_share(samples, 3.0, 4.0) is None


def test_pass_clock_on_the_cpu_counts_the_passes_against_the_wall():
    clock = PassClock("cpu")
    for _ in range(3):
        with clock.gpu_pass():
            time.sleep(0.02)
        time.sleep(0.02)
    intervals = clock.intervals()
    assert len(intervals) == 3 and all(b - a >= 0.02 for a, b in intervals)
    assert 0.2 < clock.busy_share() < 0.8
