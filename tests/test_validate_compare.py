"""The comparison math of `djinnsim validate`, on synthetic records with hand-computed answers."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from djinnsim.sim.metrics import gpu_utilization
from djinnsim.sim.records import Record, records_frame
from djinnsim.validate import compare
from djinnsim.validate.compare import METRIC_BY_NAME, busy_fraction, judge, judge_oom, record_metrics, relative_error

BASE = Record(
    point=0, backend="full_djinn", model="llama-2-7b", gpu="h100-80gb", link_gbps=25.0, n_agents=1, agent=0,
    run=0, phase="decode", step=0, status="ok", warmup=False, issued_at=0.0, started_at=0.0, finished_at=1.0,
    connect_s=0.0, uplink_s=0.0, queue_s=0.0, load_s=0.0, copy_s=0.0, compute_s=0.0, downlink_s=0.0,
    context_tokens=0, input_tokens=1, new_tokens=1, bytes_up=8, bytes_down=64000, wire_bytes_up=150,
    wire_bytes_down=64200, h2d_bytes=0, d2h_bytes=0, gpu_mem_bytes=0, gpu_mem_peak_bytes=100,
)


def rec(**changes) -> Record:
    return replace(BASE, **changes)


def decode_run(run: int, start: float, step_s: list[float], warmup: bool = False, **changes) -> list[Record]:
    out, at = [], start
    for t, d in enumerate(step_s):
        out.append(rec(run=run, step=t, issued_at=at, started_at=at, finished_at=at + d, compute_s=d / 2,
                       warmup=warmup, **changes))
        at += d
    return out


def test_decode_metrics_by_hand():
    records = (decode_run(0, 0.0, [9.0, 9.0], warmup=True)  # dropped: warm-up
               + decode_run(1, 100.0, [0.4, 0.1, 0.1, 0.2])
               + decode_run(2, 200.0, [0.6, 0.1, 0.1, 0.2]))
    m = record_metrics(records, agents=False)
    lat = [0.4, 0.1, 0.1, 0.2, 0.6, 0.1, 0.1, 0.2]
    assert m["latency_mean_s"] == pytest.approx(np.mean(lat))
    assert m["latency_p50_s"] == pytest.approx(0.15)
    assert m["latency_p99_s"] == pytest.approx(np.percentile(lat, 99))
    assert m["per_token_s"] == pytest.approx(np.mean([0.8 / 4, 1.0 / 4]))
    assert m["ttft_s"] == pytest.approx(0.5)
    # bytes are per measured run: 4 steps of 8 B up each
    assert m["bytes_up"] == pytest.approx(32)
    assert m["bytes_down"] == pytest.approx(4 * 64000)
    assert m["wire_bytes_up"] == pytest.approx(4 * 150)
    # half of every step computes; the runs are 100 s apart, so most of the window is idle
    assert m["gpu_util"] == pytest.approx((0.4 + 0.5) / (200.0 + 1.0 - 100.0))


def test_oom_records_are_counted_not_averaged():
    ok = rec(phase="reason", step=-1, agent=0, new_tokens=50, finished_at=2.0)
    oom = rec(phase="reason", step=-1, agent=1, status="oom", new_tokens=50, finished_at=1000.0)
    m = record_metrics([ok, oom], agents=True)
    assert m["latency_mean_s"] == pytest.approx(2.0)
    assert m["per_token_s"] == pytest.approx(2.0 / 50)
    assert m["ttft_s"] is None  # phase records carry no first-token time
    assert m["bytes_up"] == pytest.approx(8)  # per agent that ran


def test_no_measured_records_give_none():
    m = record_metrics([rec(warmup=True)], agents=False)
    assert all(v is None for v in m.values())


def test_busy_fraction_merges_overlaps():
    a = rec(issued_at=0.0, started_at=1.0, compute_s=2.0, finished_at=3.0)
    b = rec(issued_at=0.0, started_at=2.0, compute_s=2.0, finished_at=4.0)  # overlaps a by 1 s
    c = rec(issued_at=0.0, started_at=6.0, compute_s=1.0, finished_at=10.0)
    assert busy_fraction([a, b, c]) == pytest.approx((3.0 + 1.0) / 10.0)
    assert busy_fraction([]) is None
    # a pass starts after its request's weight load and copies: a 3 s load, then 1 s of compute
    loaded = rec(issued_at=0.0, started_at=0.0, load_s=3.0, copy_s=0.5, compute_s=1.0, finished_at=10.0)
    assert busy_fraction([loaded, rec(issued_at=0.0, started_at=3.5, compute_s=1.0, finished_at=10.0)]) == \
        pytest.approx(1.0 / 10.0)  # the same second twice: one busy second


def test_simulated_gpu_utilization_is_kernel_time_as_nvml_measures_the_real_one():
    """The simulated side counts the records' gpu_busy_s (a launch-bound pass's kernel share), the
    quantity NVML reports for the real side and summary.json's gpu_utilization: not compute time,
    which holds the host's launch gaps (it made a keep-alive point read 76% simulated against 20%
    real)."""
    run = [replace(r, gpu_busy_s=0.4 * r.compute_s) for r in decode_run(1, 0.0, [0.2, 0.1, 0.1])]
    sim = compare.sim_repeat_metrics(run, None, agents=False)
    assert sim["gpu_util"] == pytest.approx(0.4 * 0.2 / 0.4)  # kernels 40% of the half spent computing
    assert busy_fraction(run) == pytest.approx(0.5)  # what compute stamps alone would say
    assert compare.sim_repeat_metrics([rec(warmup=True)], None, agents=False)["gpu_util"] is None
    assert gpu_utilization(records_frame(run)) == pytest.approx(sim["gpu_util"])  # one definition


def test_relative_error_and_zero_reference():
    assert relative_error(1.05, 1.0) == pytest.approx(0.05)
    assert relative_error(0.0, 0.0) == 0.0
    assert math.isinf(relative_error(1.0, 0.0))


def test_mean_rule_no_longer_passes_on_the_min_max_of_repeats():
    metric = METRIC_BY_NAME["latency_mean_s"]
    wide = judge(metric, 1.2, [0.8, 1.0, 1.3])  # real mean 1.033, sim +16%, inside min..max: no longer enough
    assert wide.verdict == "FAIL"
    assert wide.real_min == 0.8 and wide.real_max == 1.3
    assert wide.real_std == pytest.approx(np.std([0.8, 1.0, 1.3], ddof=1))
    assert judge(metric, 1.049, [1.0, 1.0]).verdict == "PASS"
    assert judge(metric, 1.049, [1.0, 1.0]).passed_by == "error"


def test_mean_rule_passes_when_the_interval_meets_a_narrow_band():
    metric = METRIC_BY_NAME["latency_mean_s"]
    real = [0.9, 1.0, 1.1, 1.05, 0.95]
    narrow = [1.02 + 0.01 * i for i in range(10)]  # sim +6.5%, band 1.029-1.101: half-width 3.4%
    c = judge(metric, 1.065, real, narrow)
    assert c.real_ci is not None and c.real_ci[0] < 1.0 < c.real_ci[1]
    assert c.band_half_width == pytest.approx((c.band[1] - c.band[0]) / (c.band[1] + c.band[0]))
    assert c.band_half_width < compare.BAND_HALF_WIDTH_MAX
    assert (c.verdict, c.passed_by) == ("PASS", "band")
    assert c.coverage == pytest.approx(2 / 5)  # 1.05 and 1.1 are inside
    wide = [0.6 + 0.1 * i for i in range(10)]  # band overlaps, but half-width > 10%
    assert judge(metric, 1.065, real, wide).verdict == "FAIL"
    far = [1.2 + 0.001 * i for i in range(10)]  # narrow but beyond the interval
    assert judge(metric, 1.065, real, far).verdict == "FAIL"


def test_bootstrap_interval_is_scipys_and_reproducible():
    from scipy import stats

    values = [1.0, 1.2, 0.9, 1.1, 1.05]
    ci = compare.bootstrap_ci(values)
    assert ci == compare.bootstrap_ci(values)
    ref = stats.bootstrap((np.asarray(values),), np.mean, confidence_level=0.95, n_resamples=9999, method="BCa",
                          rng=np.random.default_rng(0)).confidence_interval
    assert ci == pytest.approx([ref.low, ref.high])
    assert ci[0] < np.mean(values) < ci[1]
    assert compare.bootstrap_ci([1.0]) is None
    assert compare.bootstrap_ci([2.0, 2.0, 2.0]) == [2.0, 2.0]
    assert compare.bootstrap_ci([1.0, 2.0]) is not None  # BCa undefined with 2 values: percentile


def test_p99_and_bytes_tolerances():
    p99 = METRIC_BY_NAME["latency_p99_s"]
    assert judge(p99, 1.099, [1.0]).verdict == "PASS"
    assert judge(p99, 1.101, [1.0]).verdict == "FAIL"
    assert judge(p99, 1.101, [0.5, 1.5]).verdict == "FAIL"  # no spread allowance for P99
    assert judge(p99, 1.0, [0.9, 1.0, 1.1]).real_ci is not None  # P99 gets its interval too
    up = METRIC_BY_NAME["bytes_up"]
    assert judge(up, 1000.0, [1000.0]).verdict == "PASS"
    assert judge(up, 1001.0, [1000.0]).verdict == "FAIL"  # bytes are exact
    assert judge(METRIC_BY_NAME["gpu_util"], 0.1, [0.9]).verdict == "info"


def test_missing_sides_are_not_applicable():
    metric = METRIC_BY_NAME["ttft_s"]
    assert judge(metric, None, [0.1, 0.2]).verdict == "N/A"
    assert judge(metric, 0.1, [None, None]).verdict == "N/A"
    assert judge(metric, 0.1, []).real_mean is None


def test_oom_n_must_match_exactly():
    assert judge_oom(6, 6, 12) == "PASS"
    assert judge_oom(5, 6, 12) == "FAIL"
    assert judge_oom(None, 6, 12) == "FAIL"
    assert judge_oom(13, None, 12) == "PASS"  # neither ran out within the probe
    assert judge_oom(7, None, 12) == "FAIL"
    assert judge_oom(6, None, None) == "N/A"  # not probed (CPU)


@given(
    real=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=6),
    factor=st.floats(min_value=0.5, max_value=1.5),
)
def test_mean_verdict_matches_its_definition(real, factor):
    sim = float(np.mean(real)) * factor
    band = [sim * 0.97, sim * 1.03]
    c = judge(METRIC_BY_NAME["latency_mean_s"], sim, real, band)
    within = abs(sim - np.mean(real)) / np.mean(real) <= compare.MEAN_TOLERANCE
    ci = c.real_ci
    meets = ci is not None and ci[0] <= c.band[1] and c.band[0] <= ci[1]
    assert (c.verdict == "PASS") == (within or meets)
    assert c.coverage == pytest.approx(sum(c.band[0] <= v <= c.band[1] for v in real) / len(real))


def test_compare_point_uses_real_repeats_and_sim_peak():
    sim = [compare.sim_repeat_metrics(decode_run(1, 0.0, [0.2, 0.1]), 12345.0, agents=False)]
    repeats = [{"latency_mean_s": 0.15, "bytes_up": 16.0}, {"latency_mean_s": 0.16, "bytes_up": 16.0}]
    pc = compare.compare_point(0, "p", "full_djinn", None, 25.0, sim, {}, repeats, {})
    by = {c.metric: c for c in pc.metrics}
    assert by["latency_mean_s"].verdict == "PASS"  # 0.15 vs mean 0.155: within 5%
    assert by["bytes_up"].verdict == "PASS"
    assert by["peak_gpu_mem_bytes"].sim == 12345.0
    assert by["ttft_s"].verdict == "N/A"  # the real side did not report it
    assert compare.summarize([pc])["PASS"] >= 2


def test_the_mean_of_simulated_repeats_is_judged_with_each_repeats_p99():
    # Three simulated repeats: 0.10, 0.13 and 0.16 s per step. Their mean (0.13) is within 5% of the
    # real 0.125; any one draw alone is not (0.10: -20%, 0.16: +28%, outside the real 0.12..0.13).
    runs = [decode_run(1, 0.0, [d] * 4) for d in (0.10, 0.13, 0.16)]
    sim = [compare.sim_repeat_metrics(r, None, agents=False) for r in runs]
    real = [{"latency_mean_s": 0.12, "latency_p99_s": 0.3}, {"latency_mean_s": 0.13, "latency_p99_s": 0.35}]
    pc = compare.compare_point(0, "p", "full_djinn", None, 25.0, sim, {}, real, {})
    by = {c.metric: c for c in pc.metrics}
    mean = by["latency_mean_s"]
    per_repeat = [np.mean([x.latency_s for x in r]) for r in runs]
    assert mean.sim_values == pytest.approx(per_repeat) and len(mean.sim_values) == 3
    assert mean.sim == pytest.approx(np.mean(per_repeat))
    assert (mean.sim_min, mean.sim_max) == (min(per_repeat), max(per_repeat))
    assert mean.rel_err == pytest.approx((np.mean(per_repeat) - 0.125) / 0.125)
    assert mean.verdict == "PASS"
    for one in per_repeat[:1] + per_repeat[2:]:
        assert judge(METRIC_BY_NAME["latency_mean_s"], one, [0.12, 0.13]).verdict == "FAIL"
    p99 = by["latency_p99_s"]
    each = [np.percentile([x.latency_s for x in r], 99) for r in runs]
    assert p99.sim == pytest.approx(np.mean(each))  # mean of per-repeat P99s (0.13), as on the real side,
    assert p99.sim != pytest.approx(np.percentile([x.latency_s for r in runs for x in r], 99))  # not pooled (0.16)
    assert p99.verdict == "FAIL"  # 0.13 against the real 0.325


def test_simulated_oom_n_from_records_never_the_bound():
    """The OOM N judged against the real one is simulated: an OOM record at a swept N, or the first N
    whose simulation OOMs below it (up to the cap); the memory bound (5 here, as if 5 copies fit
    while the engine runs out at the 4th) is never the answer."""
    from types import SimpleNamespace

    from djinnsim.validate.pipeline import _sim_oom_n

    def point(n, statuses):
        return SimpleNamespace(point=SimpleNamespace(n_agents=n), memory_bound_agents=5,
                               records=[rec(status=s) for s in statuses])

    simulated = []

    def simulate_at(n):  # the engine runs out of memory from N = 4 on
        simulated.append(n)
        return [rec(status="oom" if n >= 4 else "ok")]

    assert _sim_oom_n([point(1, ["ok"]), point(2, ["ok", "ok"])]) is None  # nothing simulated OOMs
    assert _sim_oom_n([point(1, ["ok"]), point(8, ["ok", "oom"])]) == 8  # the swept OOM
    assert _sim_oom_n([point(1, ["ok"]), point(8, ["ok", "oom"])], simulate_at, cap=9) == 4
    assert max(simulated) < 8 and simulated.count(4) == 1
    assert _sim_oom_n([point(1, ["ok"])], simulate_at, cap=3) is None  # no OOM up to the cap
    assert _sim_oom_n([point(1, ["ok"]), point(2, ["oom"])], simulate_at, cap=9) == 2
