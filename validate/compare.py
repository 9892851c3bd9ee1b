"""Metrics of a point from its records, and the simulated-vs-real comparison with its verdicts.

The same functions compute every metric for both sides: real runs produce the same Record rows
as the simulator. Each real point is repeated, and simulated as many times, each simulated repeat
with its own seed: a metric is computed per repeat on each side (a P99 is each repeat's P99), the
compared values are the means over repeats, and the real repeats' min/max/stdev are the spread
each error is read against (the simulated min/max are reported beside it).

Targets (issue 4, §5): a mean within 5% or inside the real min..max (whichever is wider), P99 within
10%, payload bytes within 1%, keep-alive OOM N exact. p50, per-token latency and TTFT are means of
a kind and are judged like the mean. Wire bytes (payload + framing), peak GPU memory and GPU
utilization are reported without a target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from djinnsim.sim.records import DURATION_FIELDS, Record

MEAN_TOLERANCE = 0.05
P99_TOLERANCE = 0.10
BYTES_TOLERANCE = 0.01


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    unit: str  # s | B | frac
    rule: str  # mean | p99 | bytes | info


METRICS = (
    Metric("latency_mean_s", "mean latency", "s", "mean"),
    Metric("latency_p50_s", "p50 latency", "s", "mean"),
    Metric("latency_p99_s", "p99 latency", "s", "p99"),
    Metric("per_token_s", "per-token latency", "s", "mean"),
    Metric("ttft_s", "time to first token", "s", "mean"),
    Metric("bytes_up", "payload up per run/agent", "B", "bytes"),
    Metric("bytes_down", "payload down per run/agent", "B", "bytes"),
    Metric("wire_bytes_up", "wire bytes up per run/agent", "B", "info"),
    Metric("wire_bytes_down", "wire bytes down per run/agent", "B", "info"),
    Metric("peak_gpu_mem_bytes", "peak GPU memory", "B", "info"),
    Metric("gpu_util", "GPU utilization", "frac", "info"),
)
METRIC_BY_NAME = {m.name: m for m in METRICS}


def measured(records: list[Record]) -> list[Record]:
    """Records that count: warm-ups dropped (a filter, as everywhere), out-of-memory ones dropped."""
    return [r for r in records if not r.warmup and r.status == "ok"]


def _units(records: list[Record], agents: bool) -> int:
    """Runs (decode) or agents (agents workload): what bytes are reported per."""
    keys = {r.agent for r in records} if agents else {r.run for r in records}
    return max(len(keys), 1)


def busy_fraction(records: list[Record]) -> float | None:
    """Fraction of the window (first issue to last reply) in which some request was computing."""
    if not records:
        return None
    spans = sorted((r.started_at, r.started_at + r.compute_s) for r in records if r.compute_s > 0)
    start, end = min(r.issued_at for r in records), max(r.finished_at for r in records)
    if end <= start:
        return None
    busy, cur_start, cur_end = 0.0, None, None
    for a, b in spans:
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        busy += cur_end - cur_start
    return min(busy / (end - start), 1.0)


def record_metrics(records: list[Record], agents: bool) -> dict[str, float | None]:
    """Every metric the records alone can give (no TTFT for phase records, no NVML figures)."""
    rows = measured(records)
    out: dict[str, float | None] = {m.name: None for m in METRICS}
    if not rows:
        return out
    latency = np.array([r.latency_s for r in rows])
    out["latency_mean_s"] = float(latency.mean())
    out["latency_p50_s"] = float(np.percentile(latency, 50))
    out["latency_p99_s"] = float(np.percentile(latency, 99))
    if agents:
        out["per_token_s"] = float(np.mean([r.latency_s / r.new_tokens for r in rows]))
    else:
        per_run = {}
        for r in rows:
            first, last, tokens = per_run.get(r.run, (math.inf, -math.inf, 0))
            per_run[r.run] = (min(first, r.issued_at), max(last, r.finished_at), tokens + r.new_tokens)
        out["per_token_s"] = float(np.mean([(b - a) / n for a, b, n in per_run.values()]))
        first_steps = [r.latency_s for r in rows if r.step == 0]
        out["ttft_s"] = float(np.mean(first_steps)) if first_steps else None
    units = _units(rows, agents)
    for name in ("bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down"):
        out[name] = sum(getattr(r, name) for r in rows) / units
    out["gpu_util"] = busy_fraction(rows)
    out["peak_gpu_mem_bytes"] = float(max(r.gpu_mem_peak_bytes for r in records))
    return out


def stage_means(records: list[Record]) -> dict[str, float]:
    """Mean seconds per request spent in each stage: where a latency error comes from."""
    rows = measured(records)
    if not rows:
        return {}
    return {name: float(np.mean([getattr(r, name) for r in rows])) for name in DURATION_FIELDS}


@dataclass
class Comparison:
    metric: str
    sim: float | None  # the mean over simulated repeats
    sim_min: float | None
    sim_max: float | None
    sim_values: list[float]
    real_mean: float | None
    real_min: float | None
    real_max: float | None
    real_std: float | None
    real_values: list[float]
    rel_err: float | None
    verdict: str  # PASS | FAIL | info | N/A
    rule: str

    def to_dict(self) -> dict:
        return asdict(self)


def relative_error(sim: float, real: float) -> float:
    if real == 0:
        return 0.0 if sim == 0 else math.inf
    return (sim - real) / abs(real)


def _values(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def judge(metric: Metric, sim: float | None | list[float | None], real_values: list[float | None]) -> Comparison:
    """`sim`: the value of each simulated repeat (or of the one draw); their mean is what is judged."""
    sims = _values(sim if isinstance(sim, (list, tuple)) else [sim])
    sim_mean = float(np.mean(sims)) if sims else None
    sim_side = {"sim": sim_mean, "sim_min": min(sims) if sims else None, "sim_max": max(sims) if sims else None,
                "sim_values": sims}
    values = _values(real_values)
    if not values:
        return Comparison(metric.name, **sim_side, real_mean=None, real_min=None, real_max=None, real_std=None,
                          real_values=[], rel_err=None, verdict="N/A", rule=metric.rule)
    mean, lo, hi = float(np.mean(values)), min(values), max(values)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    real_side = {"real_mean": mean, "real_min": lo, "real_max": hi, "real_std": std, "real_values": values}
    if sim_mean is None:
        return Comparison(metric.name, **sim_side, **real_side, rel_err=None, verdict="N/A", rule=metric.rule)
    err = relative_error(sim_mean, mean)
    if metric.rule == "mean":
        ok = abs(err) <= MEAN_TOLERANCE or lo <= sim_mean <= hi
    elif metric.rule == "p99":
        ok = abs(err) <= P99_TOLERANCE
    elif metric.rule == "bytes":
        ok = abs(err) <= BYTES_TOLERANCE
    else:
        return Comparison(metric.name, **sim_side, **real_side, rel_err=err, verdict="info", rule=metric.rule)
    return Comparison(metric.name, **sim_side, **real_side, rel_err=err, verdict="PASS" if ok else "FAIL",
                      rule=metric.rule)


def judge_oom(sim_n: int | None, real_n: int | None, probe_max: int | None) -> str:
    """Keep-alive OOM N must match exactly; 'none up to the probe's max' matches a larger sim N."""
    if probe_max is None:
        return "N/A"
    if real_n is None:
        return "PASS" if sim_n is None or sim_n > probe_max else "FAIL"
    return "PASS" if sim_n == real_n else "FAIL"


@dataclass
class PointComparison:
    index: int
    label: str
    backend: str
    n_agents: int | None
    link_gbps: float
    metrics: list[Comparison] = field(default_factory=list)
    stages_sim: dict[str, float] = field(default_factory=dict)
    stages_real: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def verdicts(self) -> list[str]:
        return [c.verdict for c in self.metrics]

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "metrics"},
                "metrics": {c.metric: c.to_dict() for c in self.metrics}}


def sim_repeat_metrics(records: list[Record], peak_mem_bytes: float | None, agents: bool) -> dict[str, float | None]:
    """The metrics of one simulated repeat: its records' metrics with the simulated memory peak."""
    metrics = record_metrics(records, agents)
    if peak_mem_bytes is not None:
        metrics["peak_gpu_mem_bytes"] = float(peak_mem_bytes)
    return metrics


def compare_point(index: int, label: str, backend: str, n_agents: int | None, link_gbps: float,
                  sim_repeats: list[dict[str, float | None]], sim_stage_means: dict[str, float],
                  real_repeats: list[dict[str, float | None]], real_stage_means: dict[str, float]) -> PointComparison:
    """Per repeat, each side's metrics (`sim_repeat_metrics`; the real records' metrics with NVML and
    TTFT figures filled in); the means over repeats are compared."""
    result = PointComparison(index, label, backend, n_agents, link_gbps, stages_sim=sim_stage_means,
                             stages_real=real_stage_means)
    for metric in METRICS:
        result.metrics.append(judge(metric, [r.get(metric.name) for r in sim_repeats],
                                    [r.get(metric.name) for r in real_repeats]))
    return result


def summarize(points: list[PointComparison]) -> dict[str, int]:
    counts = {"PASS": 0, "FAIL": 0, "info": 0, "N/A": 0}
    for p in points:
        for v in p.verdicts:
            counts[v] = counts.get(v, 0) + 1
    return counts
