"""Metrics of a point from its records, and the simulated-vs-real comparison with its verdicts.

The same functions compute every metric for both sides: real runs produce the same Record rows
as the simulator. Each real point is repeated (5 times by default), and simulated as many times,
each simulated repeat with its own seed: a metric is computed per repeat on each side (a P99 is
each repeat's P99), and the compared values are the means over repeats. The real mean carries its
95% bootstrap confidence interval over repeats (scipy.stats.bootstrap, BCa; percentile where BCa
cannot be computed), and the simulated side a P10-P90 prediction band: the same repeats simulated
again under draws of the spread calibration saw (sim.bands).

Targets (issue 9): a mean within 5% of the real mean, or the real mean's 95% interval overlapping
the simulated P10-P90 band while the band's half-width is at most 10%; P99 within 10%; payload
bytes exact; keep-alive OOM N exact. p50, per-token latency and TTFT are means of a kind and are
judged like the mean. Coverage is the share of real repeat values inside the band. Wire bytes
(payload + framing), peak GPU memory and GPU utilization are reported without a target.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from djinnsim.common.gpu_busy import busy_share, kernel_share
from djinnsim.sim.records import DURATION_FIELDS, Record

MEAN_TOLERANCE = 0.05
BAND_HALF_WIDTH_MAX = 0.10
P99_TOLERANCE = 0.10
BYTES_TOLERANCE_B = 0.5  # "exact": the same byte count (per-run figures are means, so within half a byte)
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
MIN_REPEATS = 5


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
    """Real runs on the CPU: the share of the window (first issue to last reply) in which some
    request's pass was running, from the servers' compute stamps (a pass starts after the request's
    load and copy). common/gpu_busy.py: on the CPU a pass is the device's work from start to end."""
    if not records:
        return None
    start, end = min(r.issued_at for r in records), max(r.finished_at for r in records)
    if end <= start:
        return None
    starts = [(r.started_at + r.load_s + r.copy_s, r.compute_s) for r in records if r.compute_s > 0]
    return busy_share([(a, a + compute_s) for a, compute_s in starts], start, end)


def kernel_fraction(records: list[Record]) -> float | None:
    """Simulated runs: the share of the window (first issue to last reply) the GPU ran kernels, the
    records' `gpu_busy_s` (a launch-bound pass's kernel share) summed: what NVML's utilization
    measures on the real side, and summary.json's `gpu_utilization` (common/gpu_busy.py)."""
    if not records:
        return None
    return kernel_share(sum(r.gpu_busy_s for r in records), min(r.issued_at for r in records),
                        max(r.finished_at for r in records))


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
    real_ci: list[float] | None = None  # 95% bootstrap interval of the real mean over repeats
    band: list[float] | None = None  # simulated P10-P90 over band draws of the repeats
    band_half_width: float | None = None  # (P90 - P10) / (P90 + P10)
    coverage: float | None = None  # share of real repeat values inside the band
    passed_by: str | None = None  # error | band | None

    def to_dict(self) -> dict:
        return asdict(self)


def relative_error(sim: float, real: float) -> float:
    if real == 0:
        return 0.0 if sim == 0 else math.inf
    return (sim - real) / abs(real)


def _values(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def bootstrap_ci(values: list[float], confidence: float = CONFIDENCE) -> list[float] | None:
    """The `confidence` interval of the mean of `values` by scipy.stats.bootstrap (BCa, falling back
    to the percentile method where BCa is undefined), seeded so a report is reproducible; None for
    fewer than 2 values, [v, v] when they are all equal."""
    from scipy import stats

    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return None
    if np.all(data == data[0]):
        return [float(data[0]), float(data[0])]
    for method in ("BCa", "percentile"):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                                     method=method, rng=np.random.default_rng(0))
        lo, hi = result.confidence_interval
        if math.isfinite(lo) and math.isfinite(hi):
            return [float(lo), float(hi)]
    return None


def prediction_band(values: list[float]) -> list[float] | None:
    from djinnsim.sim.bands import band

    return band(values) if len(values) >= 2 else None


def half_width(band: list[float] | None) -> float | None:
    if band is None or band[0] + band[1] <= 0:
        return None
    return (band[1] - band[0]) / (band[1] + band[0])


def coverage(band: list[float] | None, values: list[float]) -> float | None:
    if band is None or not values:
        return None
    return sum(band[0] <= v <= band[1] for v in values) / len(values)


def _overlaps(a: list[float] | None, b: list[float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def judge(metric: Metric, sim: float | None | list[float | None], real_values: list[float | None],
          band_values: list[float | None] | None = None) -> Comparison:
    """`sim`: the value of each simulated repeat (or of the one draw); their mean is what is judged.
    `band_values`: the metric over the band draws (None: no band)."""
    sims = _values(sim if isinstance(sim, (list, tuple)) else [sim])
    sim_mean = float(np.mean(sims)) if sims else None
    sim_side = {"sim": sim_mean, "sim_min": min(sims) if sims else None, "sim_max": max(sims) if sims else None,
                "sim_values": sims}
    values = _values(real_values)
    band = prediction_band(_values(band_values or [])) if metric.rule in ("mean", "p99") else None
    band_side = {"band": band, "band_half_width": half_width(band), "coverage": coverage(band, values)}
    if not values:
        return Comparison(metric.name, **sim_side, real_mean=None, real_min=None, real_max=None, real_std=None,
                          real_values=[], rel_err=None, verdict="N/A", rule=metric.rule, **band_side)
    mean, lo, hi = float(np.mean(values)), min(values), max(values)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    ci = bootstrap_ci(values) if metric.rule != "bytes" else None
    real_side = {"real_mean": mean, "real_min": lo, "real_max": hi, "real_std": std, "real_values": values,
                 "real_ci": ci}
    if sim_mean is None:
        return Comparison(metric.name, **sim_side, **real_side, rel_err=None, verdict="N/A", rule=metric.rule,
                          **band_side)
    err = relative_error(sim_mean, mean)
    passed_by = None
    if metric.rule == "mean":
        width = band_side["band_half_width"]
        if abs(err) <= MEAN_TOLERANCE:
            passed_by = "error"
        elif _overlaps(ci, band) and width is not None and width <= BAND_HALF_WIDTH_MAX:
            passed_by = "band"
    elif metric.rule == "p99":
        passed_by = "error" if abs(err) <= P99_TOLERANCE else None
    elif metric.rule == "bytes":
        passed_by = "error" if abs(sim_mean - mean) <= BYTES_TOLERANCE_B else None
    else:
        return Comparison(metric.name, **sim_side, **real_side, rel_err=err, verdict="info", rule=metric.rule,
                          **band_side)
    return Comparison(metric.name, **sim_side, **real_side, rel_err=err, verdict="PASS" if passed_by else "FAIL",
                      rule=metric.rule, **band_side, passed_by=passed_by)


def judge_oom(sim_n: int | None, real_n: int | None, probe_max: int | None) -> str:
    """Keep-alive OOM N must match exactly; 'none up to the probe's max' matches a larger sim N."""
    if probe_max is None:
        return "N/A"
    if real_n is None:
        return "PASS" if sim_n is None or sim_n > probe_max else "FAIL"
    return "PASS" if sim_n == real_n else "FAIL"


HELD_OUT, IN_SAMPLE = "held-out", "in-sample"
SAMPLES = (HELD_OUT, IN_SAMPLE)
COUNTED = ("PASS", "FAIL", "info", "N/A")


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
    sample: str = HELD_OUT  # held-out | in-sample (validate.heldout says why)
    sample_reasons: list[str] = field(default_factory=list)

    @property
    def verdicts(self) -> list[str]:
        return [c.verdict for c in self.metrics]

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "metrics"},
                "metrics": {c.metric: c.to_dict() for c in self.metrics}}


def sim_repeat_metrics(records: list[Record], peak_mem_bytes: float | None, agents: bool) -> dict[str, float | None]:
    """The metrics of one simulated repeat: its records' metrics with the simulated memory peak and
    the simulated GPU utilization (kernel time, as NVML measures the real one)."""
    metrics = record_metrics(records, agents)
    metrics["gpu_util"] = kernel_fraction(measured(records))
    if peak_mem_bytes is not None:
        metrics["peak_gpu_mem_bytes"] = float(peak_mem_bytes)
    return metrics


def compare_point(index: int, label: str, backend: str, n_agents: int | None, link_gbps: float,
                  sim_repeats: list[dict[str, float | None]], sim_stage_means: dict[str, float],
                  real_repeats: list[dict[str, float | None]], real_stage_means: dict[str, float],
                  band_repeats: list[dict[str, float | None]] | None = None) -> PointComparison:
    """Per repeat, each side's metrics (`sim_repeat_metrics`; the real records' metrics with NVML and
    TTFT figures filled in); the means over repeats are compared. `band_repeats`: the metrics of
    every band draw of every repeat (None: no band)."""
    result = PointComparison(index, label, backend, n_agents, link_gbps, stages_sim=sim_stage_means,
                             stages_real=real_stage_means)
    for metric in METRICS:
        band = None if band_repeats is None else [r.get(metric.name) for r in band_repeats]
        result.metrics.append(judge(metric, [r.get(metric.name) for r in sim_repeats],
                                    [r.get(metric.name) for r in real_repeats], band))
    return result


def summarize(points: list[PointComparison]) -> dict:
    """Verdict counts over all points, and apart for held-out and in-sample points, with the band
    coverage of real repeat values (judged latency metrics: mean and P99 rules)."""

    def empty() -> dict:
        return {**{v: 0 for v in COUNTED}, "covered": 0, "banded": 0, "coverage": None}

    counts = {**empty(), **{sample: empty() for sample in SAMPLES}}
    for p in points:
        for c in p.metrics:
            for bucket in (counts, counts[p.sample]):
                bucket[c.verdict] = bucket.get(c.verdict, 0) + 1
                if c.band is not None and c.rule in ("mean", "p99"):
                    bucket["banded"] += len(c.real_values)
                    bucket["covered"] += sum(c.band[0] <= v <= c.band[1] for v in c.real_values)
    for bucket in (counts, *(counts[s] for s in SAMPLES)):
        bucket["coverage"] = bucket["covered"] / bucket["banded"] if bucket["banded"] else None
    return counts


def add_oom(summary: dict, verdict: str, sample: str) -> None:
    """Count a keep-alive OOM N verdict into `summary`, overall and under its sample."""
    for bucket in (summary, summary[sample]):
        bucket[verdict] = bucket.get(verdict, 0) + 1
