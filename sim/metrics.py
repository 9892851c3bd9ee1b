"""Per-point summaries computed from the table of records (`records_frame`), never from the engine.

Conventions, shared by every output:
- Warm-up is a filter on records (`warmup == False`), applied first.
- OOM records (`status == "oom"`) are counted, never averaged into a latency: a decode run or an
  agent phase that contains one is left out of the latency statistics and reported as OOM. Rejected
  records (`status == "rejected"`, over the server's admission limit) are counted and left out alike.
- Percentiles are `numpy.percentile(..., method="linear")`: linear interpolation between the two
  nearest order statistics (Hyndman & Fan type 7, numpy's and pandas' default). With one sample
  every percentile is that sample; with none it is None (null in JSON).
- Durations are reported in ms; payload sizes in MB of 1e6 bytes.
- A decode run's total is the last reply minus the first request of the run; in a closed-loop
  client that is also the sum of its steps' latencies.
- An agent phase is every record of one (agent, iteration, phase): one record when the backend
  sends a whole generate call, one per token otherwise; its latency runs from its first request
  to its last reply, queueing included.
- Breakdown groups: queue = waiting for the GPU or for memory; transfer = connect + uplink +
  downlink + host<->device copy; load = weight loading; compute = GPU execution.
- GPU utilization (`gpu_utilization`, and each run's `gpu_util_pct`) is the share of wall time
  the GPU runs kernels, as common/gpu_busy.py defines it for the simulator and real runs alike:
  the records' `gpu_busy_s` summed over the span from the first measured request to the last
  measured reply (a run's: its first request to its last reply).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from djinnsim.common.gpu_busy import kernel_share

if TYPE_CHECKING:
    import pandas as pd

MS_PER_S = 1e3
BYTES_PER_MB = 1e6
AGENT_PHASES = ("reason", "reflect")
BREAKDOWN_GROUPS = {
    "queue": ("queue_s",),
    "transfer": ("connect_s", "uplink_s", "downlink_s", "copy_s"),
    "load": ("load_s",),
    "compute": ("compute_s",),
}
_SUMMED = (
    "connect_s", "uplink_s", "queue_s", "load_s", "copy_s", "compute_s", "downlink_s",
    "new_tokens", "bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down", "h2d_bytes", "d2h_bytes",
    "gpu_busy_s",
)
# The record columns the summaries below read (a point's frame needs no other: records.frame(columns)).
SUMMARY_COLUMNS = ("agent", "run", "phase", "status", "warmup", "issued_at", "finished_at", "latency_s",
                   "gpu_mem_peak_bytes", *_SUMMED)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if isinstance(values, np.ndarray) and values.dtype == np.float64:
        array = values  # as the list of its numbers would give, without a Python float per value
    else:
        array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        return None
    return float(np.percentile(array, q, method="linear"))


def describe_ms(values_ms: Iterable[float], quantiles: tuple[int, ...] = (50, 95, 99)) -> dict[str, Any]:
    """n, mean and the given percentiles of a sample already in ms (None when empty)."""
    array = np.asarray(values_ms, dtype=float)
    out: dict[str, Any] = {"n": int(array.size), "mean_ms": float(array.mean()) if array.size else None}
    for q in quantiles:
        out[f"p{q}_ms"] = percentile(array, q)
    return out


def rows_where(frame: "pd.DataFrame", mask: "pd.Series") -> "pd.DataFrame":
    """The rows of `frame` where `mask` holds; `frame` itself when it holds on every row (no copy of
    a large table to keep all of it)."""
    return frame if mask.all() else frame[mask]


def measured(frame: "pd.DataFrame") -> "pd.DataFrame":
    """Records outside warm-up."""
    return rows_where(frame, ~frame["warmup"].astype(bool))


def oom_records(frame: "pd.DataFrame") -> int:
    return int((frame["status"] == "oom").sum())


def rejected_records(frame: "pd.DataFrame") -> int:
    return int((frame["status"] == "rejected").sum())


def _group_spans(frame: "pd.DataFrame", keys: list[str]) -> "pd.DataFrame":
    """One row per group: first request, last reply, sums of durations/tokens/bytes, OOM flag."""
    import pandas as pd

    if frame.empty:
        columns = [*keys, "issued_at", "finished_at", "records", "oom", "rejected", *_SUMMED, "wall_s"]
        return pd.DataFrame({c: pd.Series(dtype=float) for c in columns})
    work = frame.assign(is_oom=frame["status"] == "oom", is_rejected=frame["status"] == "rejected")
    grouped = work.groupby(keys, sort=True)
    # plain reductions per column: far faster than one named .agg over many columns
    spans = grouped[list(_SUMMED)].sum()
    spans.insert(0, "rejected", grouped["is_rejected"].any())
    spans.insert(0, "oom", grouped["is_oom"].any())
    spans.insert(0, "records", grouped.size())
    spans.insert(0, "finished_at", grouped["finished_at"].max())
    spans.insert(0, "issued_at", grouped["issued_at"].min())
    spans = spans.reset_index()
    spans["wall_s"] = spans["finished_at"] - spans["issued_at"]
    return spans


def _add_breakdown_ms(spans: "pd.DataFrame") -> "pd.DataFrame":
    for group, fields in BREAKDOWN_GROUPS.items():
        total = spans[fields[0]]
        for name in fields[1:]:
            total = total + spans[name]
        spans[f"{group}_ms"] = total * MS_PER_S
    return spans


def _weight_read_floor_gbps(forwards: "pd.Series", weight_bytes: int | None, wall_s: "pd.Series") -> "pd.Series":
    """A lower bound on the HBM bandwidth used: every forward reads all the weights once.

    The records do not carry HBM traffic; this is the part any implementation must move (KV
    and activation traffic come on top), averaged over the wall time, with one forward per
    generated token. It is an estimate from the model spec, not a simulated measurement; a
    value above the GPU's HBM bandwidth shows a cost model faster than the hardware allows.
    NaN (null in JSON) without a model.
    """
    if weight_bytes is None:
        return wall_s * np.nan
    return forwards * weight_bytes / wall_s.where(wall_s > 0) / 1e9


# --- decode workloads (Exp 2.1) ------------------------------------------------------------------


def decode_runs(frame: "pd.DataFrame", weight_bytes: int | None = None) -> "pd.DataFrame":
    """One row per measured decode run.

    Columns: run, total_ms, tokens_generated, per_token_ms, gpu_util_pct (kernel time / run
    wall time, common/gpu_busy.py), memory_bw_gbps (weight-read floor, when weight_bytes is given; a forward per
    generated token), host_to_device_mb / device_to_host_mb (client<->server payload), oom,
    plus the raw sums and the breakdown in ms.
    """
    runs = _add_breakdown_ms(_group_spans(measured(rows_where(frame, frame["phase"] == "decode")), ["run"]))
    runs["total_ms"] = runs["wall_s"] * MS_PER_S
    tokens = runs["new_tokens"].astype(float)
    runs["tokens_generated"] = runs["new_tokens"].astype(int)
    runs["per_token_ms"] = runs["total_ms"].where(tokens > 0) / tokens.where(tokens > 0)
    wall = runs["wall_s"].where(runs["wall_s"] > 0)
    runs["gpu_util_pct"] = runs["gpu_busy_s"] / wall * 100.0
    runs["memory_bw_gbps"] = _weight_read_floor_gbps(tokens, weight_bytes, runs["wall_s"])
    runs["host_to_device_mb"] = runs["bytes_up"] / BYTES_PER_MB
    runs["device_to_host_mb"] = runs["bytes_down"] / BYTES_PER_MB
    runs["run"] = runs["run"].astype(int)
    return runs


def decode_summary(frame: "pd.DataFrame", weight_bytes: int | None = None) -> dict[str, Any]:
    """Aggregates over the measured, OOM-free runs of one decode point."""
    runs = decode_runs(frame, weight_bytes)
    ok = runs[~(runs["oom"].astype(bool) | runs["rejected"].astype(bool))]
    steps = measured(rows_where(frame, (frame["phase"] == "decode") & (frame["status"] == "ok")))
    total = describe_ms(ok["total_ms"])
    per_token = describe_ms(ok["per_token_ms"])
    step = describe_ms(steps["latency_s"] * MS_PER_S)
    return {
        "runs": int(len(runs)),
        "oom_runs": int(runs["oom"].astype(bool).sum()),
        "oom_records": oom_records(frame),
        "rejected_records": rejected_records(frame),
        "mean_total_ms": total["mean_ms"],
        "p50_total_ms": total["p50_ms"],
        "p95_total_ms": total["p95_ms"],
        "p99_total_ms": total["p99_ms"],
        "mean_per_token_ms": per_token["mean_ms"],
        "p50_per_token_ms": per_token["p50_ms"],
        "p95_per_token_ms": per_token["p95_ms"],
        "p99_per_token_ms": per_token["p99_ms"],
        "step_p50_ms": step["p50_ms"],
        "step_p99_ms": step["p99_ms"],
        "tokens_per_run": _mean(ok["tokens_generated"]),
        "mean_bytes_up": _mean(ok["bytes_up"]),
        "mean_bytes_down": _mean(ok["bytes_down"]),
        "mean_wire_bytes_up": _mean(ok["wire_bytes_up"]),
        "mean_wire_bytes_down": _mean(ok["wire_bytes_down"]),
        "mean_gpu_util_pct": _mean(ok["gpu_util_pct"]),
        "breakdown_mean_ms": {g: _mean(ok[f"{g}_ms"]) for g in BREAKDOWN_GROUPS},
    }


# --- agent workloads (Exp 2.2) -------------------------------------------------------------------


def agent_phases(frame: "pd.DataFrame") -> "pd.DataFrame":
    """One row per measured (agent, run, phase) of REASON/REFLECT: latency_ms, breakdown, bytes, oom."""
    phases = rows_where(frame, frame["phase"].isin(AGENT_PHASES))
    spans = _add_breakdown_ms(_group_spans(measured(phases), ["agent", "run", "phase"]))
    spans["latency_ms"] = spans["wall_s"] * MS_PER_S
    return spans


def agent_iterations(frame: "pd.DataFrame", weight_bytes: int | None = None,
                     phases: "pd.DataFrame | None" = None) -> "pd.DataFrame":
    """One row per (agent, iteration): the seed's per-run figures for an agent workload.

    total_ms sums the iteration's phase latencies (ACT, the tool's sleep, is not GPU work);
    gpu_util_pct is kernel time (`gpu_busy_s`) over that total; bytes are the iteration's payload.
    `phases` may pass agent_phases(frame) when the caller has it already.
    """
    phases = agent_phases(frame) if phases is None else phases
    if phases.empty:
        iterations = phases.reindex(columns=["agent", "run", "latency_ms", "oom", "rejected", *_SUMMED])
    else:
        grouped = phases.groupby(["agent", "run"], sort=True)
        iterations = grouped[["latency_ms", *_SUMMED]].sum()
        iterations.insert(0, "rejected", grouped["rejected"].any())
        iterations.insert(0, "oom", grouped["oom"].any())
        iterations = iterations.reset_index()
    iterations["total_ms"] = iterations["latency_ms"]
    tokens = iterations["new_tokens"].astype(float)
    iterations["tokens_generated"] = iterations["new_tokens"].astype(int)
    iterations["per_token_ms"] = iterations["total_ms"].where(tokens > 0) / tokens.where(tokens > 0)
    total_s = (iterations["total_ms"] / MS_PER_S).where(iterations["total_ms"] > 0)
    iterations["gpu_util_pct"] = iterations["gpu_busy_s"] / total_s * 100.0
    iterations["memory_bw_gbps"] = _weight_read_floor_gbps(tokens, weight_bytes, iterations["total_ms"] / MS_PER_S)
    iterations["host_to_device_mb"] = iterations["bytes_up"] / BYTES_PER_MB
    iterations["device_to_host_mb"] = iterations["bytes_down"] / BYTES_PER_MB
    return iterations


# The columns of agent_phases that agent_summary reads (a table of phases kept for it needs no other)
AGENT_SUMMARY_PHASE_COLUMNS = ("agent", "phase", "oom", "rejected", "latency_ms",
                               *(f"{g}_ms" for g in BREAKDOWN_GROUPS), "bytes_up", "bytes_down")


def agent_summary(frame: "pd.DataFrame", phases: "pd.DataFrame | None" = None) -> dict[str, Any]:
    """Per-phase and pooled (REASON + REFLECT of all agents) latency statistics of one N (of
    `phases`, only AGENT_SUMMARY_PHASE_COLUMNS are read)."""
    phases = agent_phases(frame) if phases is None else phases
    ok = rows_where(phases, ~(phases["oom"].astype(bool) | phases["rejected"].astype(bool)))
    # a phase's rows of the columns read (not a copy of every column per phase)
    phase_of, read = ok["phase"].to_numpy(), ok[["latency_ms", *(f"{g}_ms" for g in BREAKDOWN_GROUPS)]]
    per_phase = {}
    for name in AGENT_PHASES:
        rows = read[phase_of == name]
        stats = describe_ms(rows["latency_ms"])
        stats["breakdown_mean_ms"] = {g: _mean(rows[f"{g}_ms"]) for g in BREAKDOWN_GROUPS}
        per_phase[name] = stats
    pooled = describe_ms(ok["latency_ms"])
    oom_phases = phases[phases["oom"].astype(bool)]
    oom = oom_records(frame)
    return {
        "phases": per_phase,
        "pooled": pooled,
        "agents": int(frame["agent"].nunique()) if not frame.empty else 0,
        "oom": bool(oom > 0),
        "oom_records": oom,
        "oom_phases": int(len(oom_phases)),
        "oom_agents": int(oom_phases["agent"].nunique()),
        "rejected_records": rejected_records(frame),
        "breakdown_mean_ms": {g: _mean(ok[f"{g}_ms"]) for g in BREAKDOWN_GROUPS},
        "mean_bytes_up": _mean(ok["bytes_up"]),
        "mean_bytes_down": _mean(ok["bytes_down"]),
    }


def gpu_utilization(frame: "pd.DataFrame", gpus: int = 1) -> float | None:
    """Share of the measured wall time (first request to last reply) the GPU ran kernels, in [0, 1]
    (a pool of `gpus`: their mean; common/gpu_busy.kernel_share); None without measured records or
    with no time elapsed."""
    rows = measured(frame)
    if rows.empty:
        return None
    return kernel_share(float(rows["gpu_busy_s"].sum()), float(rows["issued_at"].min()),
                        float(rows["finished_at"].max()), gpus)


def peak_gpu_mem_bytes(frame: "pd.DataFrame") -> int:
    return int(frame["gpu_mem_peak_bytes"].max()) if not frame.empty else 0


def _mean(series: "pd.Series") -> float | None:
    values = series.dropna()
    return float(values.mean()) if len(values) else None
