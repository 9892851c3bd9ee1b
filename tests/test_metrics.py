"""Per-point summaries from hand-built records: per-token math, warm-up and OOM filtering, percentiles."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from djinnsim.sim import metrics
from djinnsim.sim.records import Record, records_frame

_BASE = dict(
    point=0, backend="full_djinn", model="llama-2-7b", gpu="a100-80gb", link_gbps=25.0, n_agents=1, agent=0,
    run=0, phase="decode", step=0, status="ok", warmup=False, issued_at=0.0, started_at=0.0, finished_at=0.0,
    connect_s=0.0, uplink_s=0.0, queue_s=0.0, load_s=0.0, copy_s=0.0, compute_s=0.0, downlink_s=0.0,
    context_tokens=0, input_tokens=1, new_tokens=1, bytes_up=8, bytes_down=64_000, wire_bytes_up=145,
    wire_bytes_down=64_137, h2d_bytes=0, d2h_bytes=0, gpu_mem_bytes=0, gpu_mem_peak_bytes=0,
)


def timed(issued_at: float, **durations: float) -> dict:
    """Timestamps consistent with the durations (they add up to the latency)."""
    d = {k: durations.get(k, 0.0) for k in ("connect_s", "uplink_s", "queue_s", "load_s", "copy_s", "compute_s",
                                            "downlink_s")}
    started = issued_at + d["connect_s"] + d["uplink_s"] + d["queue_s"]
    return dict(d, issued_at=issued_at, started_at=started, finished_at=issued_at + sum(d.values()))


def closed_loop_decode(step_durations: list[list[dict]], warmup_runs: int = 0, **fields) -> list[Record]:
    """One client: run r's steps back to back, runs back to back."""
    records, clock = [], 0.0
    for run, steps in enumerate(step_durations):
        for step, durations in enumerate(steps):
            rec = Record(**{**_BASE, **fields, "run": run, "step": step, "warmup": run < warmup_runs,
                            **timed(clock, **durations)})
            records.append(rec)
            clock = rec.finished_at
    return records


def test_percentile_is_numpy_linear():
    assert metrics.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert metrics.percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(1 + 3 * 0.99)
    assert metrics.percentile([7.0], 99) == 7.0
    assert metrics.percentile([], 50) is None
    sample = [5.0, 1.0, 9.0, 3.0, 3.5, 12.0]
    assert metrics.percentile(sample, 95) == pytest.approx(float(np.percentile(sample, 95)))


def test_percentile_of_an_array_is_that_of_its_numbers_listed():
    rng = np.random.default_rng(5)
    array = rng.lognormal(0, 2, 10_001)
    before = array.copy()
    for values in (array, array[::3], array[:0], np.array([np.nan, 1.0, 2.0]), array.astype(np.float32)):
        for q in (0, 50, 95, 99, 100):
            got, listed = metrics.percentile(values, q), metrics.percentile(values.tolist(), q)
            assert got == listed or (got is not None and math.isnan(got) and math.isnan(listed))
    assert (array == before).all()  # the array itself is left as it was (not sorted in place)


def test_decode_runs_per_token_math_and_warmup_filter():
    # run 0 (warm-up) is slow; runs 1 and 2 have 4 steps of 10 ms and 20 ms (half compute each),
    # each pass launch-bound: kernels run 40% of its compute time (gpu_busy_s).
    runs = [[dict(compute_s=0.5, uplink_s=0.5)] * 4]
    runs += [[dict(compute_s=0.005, uplink_s=0.005)] * 4, [dict(compute_s=0.010, uplink_s=0.010)] * 4]
    records = [dataclasses.replace(r, gpu_busy_s=0.4 * r.compute_s) for r in closed_loop_decode(runs, warmup_runs=1)]
    frame = records_frame(records)
    table = metrics.decode_runs(frame, weight_bytes=10**9)
    assert list(table["run"]) == [1, 2]
    assert list(table["total_ms"]) == pytest.approx([40.0, 80.0])
    assert list(table["per_token_ms"]) == pytest.approx([10.0, 20.0])
    assert list(table["tokens_generated"]) == [4, 4]
    assert list(table["gpu_util_pct"]) == pytest.approx([20.0, 20.0])  # kernel time, not compute time
    assert list(table["host_to_device_mb"]) == pytest.approx([32e-6, 32e-6])
    assert list(table["device_to_host_mb"]) == pytest.approx([0.256, 0.256])
    # weight-read floor: 4 forwards x 1 GB in 40 ms = 100 GB/s
    assert list(table["memory_bw_gbps"]) == pytest.approx([100.0, 50.0])

    summary = metrics.decode_summary(frame)
    assert summary["runs"] == 2
    assert summary["mean_total_ms"] == pytest.approx(60.0)
    assert summary["p50_total_ms"] == pytest.approx(60.0)
    assert summary["p95_total_ms"] == pytest.approx(40 + 40 * 0.95)
    assert summary["mean_per_token_ms"] == pytest.approx(15.0)
    assert summary["p99_per_token_ms"] == pytest.approx(10 + 10 * 0.99)
    assert summary["breakdown_mean_ms"]["compute"] == pytest.approx(30.0)
    assert summary["breakdown_mean_ms"]["transfer"] == pytest.approx(30.0)
    assert metrics.decode_runs(frame)["memory_bw_gbps"].isna().all()


def test_decode_oom_run_is_left_out_of_latency():
    records = closed_loop_decode([[dict(compute_s=0.01)] * 2, [dict(compute_s=0.03)] * 2])
    records[-1] = Record(**{**_BASE, "run": 1, "step": 1, "status": "oom", **timed(records[-2].finished_at)})
    summary = metrics.decode_summary(records_frame(records))
    assert summary["runs"] == 2 and summary["oom_runs"] == 1 and summary["oom_records"] == 1
    assert summary["mean_total_ms"] == pytest.approx(20.0)


def _phase(agent, phase, issued_at, latency_s, status="ok", **fields):
    return Record(**{**_BASE, "backend": "djinn", "n_agents": 3, "agent": agent, "phase": phase, "step": -1,
                     "new_tokens": 50, "status": status, **fields,
                     **timed(issued_at, queue_s=latency_s / 2, compute_s=latency_s / 2)})


def test_agent_phases_pool_reason_and_reflect():
    records = [
        _phase(0, "reason", 0.0, 0.100), _phase(1, "reason", 0.0, 0.200), _phase(2, "reason", 0.0, 0.300),
        _phase(0, "reflect", 10.1, 0.010), _phase(1, "reflect", 10.2, 0.020), _phase(2, "reflect", 10.3, 0.030),
    ]
    summary = metrics.agent_summary(records_frame(records))
    assert summary["phases"]["reason"]["mean_ms"] == pytest.approx(200.0)
    assert summary["phases"]["reason"]["p50_ms"] == pytest.approx(200.0)
    assert summary["phases"]["reflect"]["p99_ms"] == pytest.approx(20 + 10 * 0.98)
    pooled = [100, 200, 300, 10, 20, 30]
    assert summary["pooled"]["p99_ms"] == pytest.approx(float(np.percentile(pooled, 99)))
    assert summary["pooled"]["n"] == 6
    assert summary["breakdown_mean_ms"]["queue"] == pytest.approx(np.mean(pooled) / 2)
    assert summary["agents"] == 3 and not summary["oom"]


def test_agent_phase_of_per_token_records_spans_first_request_to_last_reply():
    steps = [Record(**{**_BASE, "phase": "reason", "step": t, **timed(0.01 * t, compute_s=0.01)}) for t in range(5)]
    phases = metrics.agent_phases(records_frame(steps))
    assert len(phases) == 1
    assert phases["latency_ms"].iloc[0] == pytest.approx(50.0)
    assert phases["new_tokens"].iloc[0] == 5


def test_agent_oom_counted_not_averaged():
    records = [_phase(0, "reason", 0.0, 0.1), _phase(0, "reflect", 10.1, 0.1),
               _phase(1, "reason", 0.0, 5.0, status="oom")]
    summary = metrics.agent_summary(records_frame(records))
    assert summary["oom"] and summary["oom_records"] == 1 and summary["oom_agents"] == 1
    assert summary["pooled"]["n"] == 2
    assert summary["pooled"]["p99_ms"] == pytest.approx(100.0)
    iterations = metrics.agent_iterations(records_frame(records))
    assert list(iterations["oom"]) == [False, True]
    assert iterations["total_ms"].iloc[0] == pytest.approx(200.0)
    assert iterations["per_token_ms"].iloc[0] == pytest.approx(2.0)


def test_empty_frame_gives_empty_statistics():
    summary = metrics.agent_summary(records_frame([]))
    assert summary["pooled"] == {"n": 0, "mean_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    assert metrics.decode_summary(records_frame([]))["mean_per_token_ms"] is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.floats(1e-5, 0.5), st.floats(0, 0.5), st.floats(0, 0.1)),
                         min_size=1, max_size=6), min_size=1, max_size=5))
def test_closed_loop_total_is_the_sum_of_step_latencies(runs):
    steps = [[dict(compute_s=c, queue_s=q, uplink_s=u) for c, q, u in run] for run in runs]
    records = closed_loop_decode(steps)
    table = metrics.decode_runs(records_frame(records))
    for run, row in zip(range(len(runs)), table.itertuples()):
        expected_ms = sum(r.latency_s for r in records if r.run == run) * 1e3
        assert row.total_ms == pytest.approx(expected_ms, rel=1e-9, abs=1e-9)
        assert row.per_token_ms == pytest.approx(expected_ms / len(runs[run]), rel=1e-9, abs=1e-9)
        assert 0 <= row.gpu_util_pct <= 100 * (1 + 1e-6)  # timestamps carry float rounding
