"""Write a simulation's outputs: baseline JSONs (the seed's schema), records.csv, Figure 6 or the
Exp 2.1 figure (sim.figures), Table 2 (Markdown and CSV), the claims report, a Chrome trace and
summary.json; and print the terminal summary.

Every figure is computed from the records (sim.metrics) and PointResult's reported fields, never
from engine internals. Files are byte-identical for identical records: fixed key order, floats
rounded to fixed decimals, no timestamps or software versions inside files.
pandas and matplotlib are imported inside the functions that use them (CLI start-up time).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from djinnsim.errors import DjinnsimError

from . import claims as claims_mod
from . import figures
from . import metrics
from .records import RECORD_COLUMNS, records_frame
from .safeyaml import strict_json
from .trace import write_trace

if TYPE_CHECKING:
    import pandas as pd

    from .run import SimulationResult
    from .simulate import PointResult

CSV_FLOAT_FORMAT = "%.9f"  # seconds to the nanosecond
_MS, _MB, _PCT, _GBPS, _FRACTION = 4, 6, 3, 3, 6  # decimals kept in JSON per unit

MEMORY_BW_NOTE = (
    "memory_bw_gbps is not simulated: it is a floor, every generated token's forward reading all weights "
    "once (model weight bytes x tokens / run time); KV and activation traffic come on top"
)
NOTES = {
    "memory_bw_gbps": MEMORY_BW_NOTE,
    "gpu_util_pct": "GPU compute time / run wall time x 100",
    "host_to_device_mb": "client -> server payload (framing aside), MB = 1e6 bytes",
    "device_to_host_mb": "server -> client payload (framing aside), MB = 1e6 bytes",
    "percentiles": "numpy.percentile method=linear over the measured (non-warm-up), OOM-free runs",
}
AGENT_NOTES = {
    "runs": "one run per (agent, iteration), in that order; total_ms sums its REASON and REFLECT latencies "
            "(ACT, the tool's sleep, is not GPU work)",
    "agent_phases": "latency at the client, queueing included; pooled pools REASON and REFLECT of all agents",
}


# --- per-point summaries -------------------------------------------------------------------------


def _clean(value: Any, decimals: int) -> Any:
    """A JSON-safe rounded float (None for missing / NaN)."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return None
    return round(value, decimals)


def _clean_ms(mapping: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out[key] = _clean_ms(value)
        elif isinstance(value, (bool, int)):
            out[key] = value
        elif key.endswith("_pct"):
            out[key] = _clean(value, _PCT)
        elif key.startswith(("mean_bytes", "mean_wire_bytes")) or key == "tokens_per_run":
            out[key] = _clean(value, 1)
        else:
            out[key] = _clean(value, _MS)
    return out


def _weight_bytes(point_result: "PointResult") -> int | None:
    model = getattr(point_result.point, "model", None)
    return getattr(model, "weight_bytes", None)


def point_summary(point_result: "PointResult", workload: str, frame: "pd.DataFrame | None" = None,
                  phases: "pd.DataFrame | None" = None) -> dict[str, Any]:
    """Compact, JSON-ready figures of one point; also the input of Table 2 and the claims.
    `phases` may pass metrics.agent_phases(frame) when the caller has it already."""
    frame = frame if frame is not None else _frame(point_result)
    point = point_result.point
    peak = max(int(point_result.peak_mem_bytes or 0), metrics.peak_gpu_mem_bytes(frame))
    summary: dict[str, Any] = {
        "index": point.index,
        "label": point.label,
        "backend": point.backend.name,
        "model": point.model.key,
        "gpu": point.gpu.key,
        "link_gbps": float(point.link.gbps),
        "n_agents": point.n_agents,
        "cost_model": point_result.cost_model,
        "events": int(point_result.events),
        "records": int(len(frame)),
        "oom": metrics.oom_records(frame) > 0,
        "oom_records": metrics.oom_records(frame),
        "peak_gpu_mem_bytes": peak,
        "capacity_bytes": int(point_result.capacity_bytes),
        "memory_bound_agents": point_result.memory_bound_agents,
        "gpu_utilization": _clean(metrics.gpu_utilization(frame, point.cluster.gpus), _FRACTION),
    }
    cluster = point.cluster
    if cluster != type(cluster)():  # a pool: its size (peak and capacity are per GPU; the bound and utilization pool-wide)
        summary["cluster"] = {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "gpus": cluster.gpus,
                              "router": cluster.router}
    if workload == "agents":
        summary["agents"] = _clean_ms(metrics.agent_summary(frame, phases))
    else:
        summary["decode"] = _clean_ms(metrics.decode_summary(frame, _weight_bytes(point_result)))
    return summary


def point_summaries(result: "SimulationResult", frames: list["pd.DataFrame"] | None = None,
                    phases: list["pd.DataFrame | None"] | None = None) -> list[dict[str, Any]]:
    workload = result.scenario.workload.kind
    frames = frames if frames is not None else [_frame(p) for p in result.points]
    phases = phases if phases is not None else [None] * len(frames)
    return [point_summary(p, workload, f, ph) for p, f, ph in zip(result.points, frames, phases)]


def _frame(point_result: "PointResult") -> "pd.DataFrame":
    """The point's table of records (records_frame: column-wise, no object per record)."""
    return records_frame(point_result.records)


# --- baseline JSON in the seed's schema ----------------------------------------------------------


def _run_entries(runs: "pd.DataFrame", run_ids: list[int]) -> list[dict[str, Any]]:
    entries = []
    for run_id, row in zip(run_ids, runs.itertuples(index=False)):
        entries.append({
            "run_id": int(run_id),
            "total_ms": _clean(row.total_ms, _MS),
            "per_token_ms": _clean(row.per_token_ms, _MS),
            "tokens_generated": int(row.tokens_generated),
            "gpu_util_pct": _clean(row.gpu_util_pct, _PCT),
            "memory_bw_gbps": _clean(row.memory_bw_gbps, _GBPS),
            "host_to_device_mb": _clean(row.host_to_device_mb, _MB),
            "device_to_host_mb": _clean(row.device_to_host_mb, _MB),
        })
    return entries


def _failed(runs: "pd.DataFrame") -> "pd.Series":
    """Runs with an OOM or a rejected record: left out of runs and aggregates."""
    return runs["oom"].astype(bool) | runs["rejected"].astype(bool)


def _aggregates(runs: "pd.DataFrame") -> dict[str, Any]:
    ok = runs[~_failed(runs)]
    total = metrics.describe_ms(ok["total_ms"], (50, 95, 99))
    per_token = metrics.describe_ms(ok["per_token_ms"], (50, 95, 99))
    return {
        "mean_total_ms": _clean(total["mean_ms"], _MS),
        "p95_total_ms": _clean(total["p95_ms"], _MS),
        "mean_per_token_ms": _clean(per_token["mean_ms"], _MS),
        "p50_total_ms": _clean(total["p50_ms"], _MS),
        "p99_total_ms": _clean(total["p99_ms"], _MS),
        "p50_per_token_ms": _clean(per_token["p50_ms"], _MS),
        "p95_per_token_ms": _clean(per_token["p95_ms"], _MS),
        "p99_per_token_ms": _clean(per_token["p99_ms"], _MS),
    }


def baseline_document(point_result: "PointResult", scenario: Any, frame: "pd.DataFrame",
                      summary: dict[str, Any], phases: "pd.DataFrame | None" = None) -> dict[str, Any]:
    """The seed's raw-run JSON for one point, extended with p50/p99, agent phases and a `simulation` block.

    Runs with an OOM or a rejected record are left out of `runs` and `aggregates` (counted in `simulation`).
    Decode: one run per measured run, run_id = the engine's 0-based run number + 1 (warm-up runs
    1..warmup_runs are discarded, as in the seed). Agents: one run per (agent, iteration).
    """
    workload = scenario.workload
    point = point_result.point
    weight_bytes = _weight_bytes(point_result)
    if workload.kind == "agents":
        runs = metrics.agent_iterations(frame, weight_bytes, phases)
        prompt_tokens, new_tokens, batch = (workload.reason.input_tokens,
                                            workload.reason.new_tokens + workload.reflect.new_tokens, 1)
    else:
        runs = metrics.decode_runs(frame, weight_bytes)
        prompt_tokens, new_tokens, batch = workload.prompt_tokens, workload.new_tokens, workload.batch
    run_ids = list(range(1, len(runs) + 1)) if workload.kind == "agents" else [int(r) + 1 for r in runs["run"]]
    ok_mask = ~_failed(runs)
    ok_runs = runs[ok_mask]
    ok_ids = [rid for rid, ok in zip(run_ids, ok_mask) if ok]
    document: dict[str, Any] = {
        "baseline": point.backend.name,
        "model_id": point.model.model_id,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch_size": batch,
        "runs": _run_entries(ok_runs, ok_ids),
        "aggregates": _aggregates(runs),
    }
    if workload.kind == "agents":
        agents = summary["agents"]
        document["agent_phases"] = {
            "n_agents": point.n_agents,
            "reason": agents["phases"]["reason"],
            "reflect": agents["phases"]["reflect"],
            "pooled": agents["pooled"],
            "p99_pooled_ms": agents["pooled"]["p99_ms"],
            "breakdown_mean_ms": agents["breakdown_mean_ms"],
            "oom": summary["oom"],
            "oom_agents": agents["oom_agents"],
            "peak_gpu_mem_bytes": summary["peak_gpu_mem_bytes"],
            "capacity_bytes": summary["capacity_bytes"],
            "memory_bound_agents": summary["memory_bound_agents"],
        }
    document["simulation"] = {
        "label": point.label,
        "gpu": point.gpu.key,
        "link_gbps": float(point.link.gbps),
        "cost_model": point_result.cost_model,
        "runs_measured": int(len(runs)),
        "runs_oom": int((~ok_mask).sum()),
        "oom_records": summary["oom_records"],
        "peak_gpu_mem_bytes": summary["peak_gpu_mem_bytes"],
        "notes": {**NOTES, **(AGENT_NOTES if workload.kind == "agents" else {})},
    }
    return document


# --- records, figure, tables ---------------------------------------------------------------------


def write_records_csv(frames: list["pd.DataFrame"], path: Path) -> Path:
    import pandas as pd

    columns = [*RECORD_COLUMNS, "latency_s"]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    table[columns].to_csv(path, index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n")
    return path


# --- entry points --------------------------------------------------------------------------------


def _trace_point(result: "SimulationResult") -> "PointResult":
    index = result.scenario.trace_point
    count = len(result.points)
    if not -count <= index < count:
        raise DjinnsimError(f"trace_point {index} is out of range: the scenario has {count} points")
    return result.points[index]


def _write_json(path: Path, document: Any) -> Path:
    path.write_text(strict_json(document, indent=2) + "\n")  # NaN / Infinity are not JSON
    return path


def write_outputs(result: "SimulationResult", out_dir: Path,
                  summaries: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write every output but scenario.yaml into out_dir; return the paths written, in order.

    `summaries` may pass point_summaries(result) computed already (print_summary takes them too).
    """
    out_dir = Path(out_dir)
    scenario = result.scenario
    workload = scenario.workload.kind
    if not result.points:
        raise DjinnsimError(f"scenario {scenario.name!r} expanded to no points")
    frames = [_frame(p) for p in result.points]
    phases = [metrics.agent_phases(f) if workload == "agents" else None for f in frames]
    if summaries is None:
        summaries = point_summaries(result, frames, phases)
    written: list[Path] = []

    baselines = out_dir / "baselines"
    baselines.mkdir(parents=True, exist_ok=True)
    for point_result, frame, summary, point_phases in zip(result.points, frames, summaries, phases):
        document = baseline_document(point_result, scenario, frame, summary, point_phases)
        written.append(_write_json(baselines / f"{point_result.point.label}.json", document))

    written.append(write_records_csv(frames, out_dir / "records.csv"))
    claims = claims_mod.evaluate_claims(summaries, workload, result)
    if workload == "agents":
        written += figures.write_figure6(summaries, list(scenario.backends), out_dir / "figure6.png")
        written.append(_write_text(out_dir / "table2.md", claims_mod.table2_markdown(summaries)))
        written.append(_write_text(out_dir / "table2.csv", claims_mod.table2_csv(summaries)))
    else:
        written += figures.write_exp21_figure(summaries, list(scenario.backends), out_dir / "exp21.png")
    written.append(_write_text(out_dir / "claims.md", claims_mod.claims_markdown(summaries, workload, claims)))

    traced = _trace_point(result)
    written.append(write_trace(traced.records, out_dir / "trace.json", pid=traced.point.index + 1,
                               process_name=traced.point.label,
                               metadata={"scenario": scenario.name, "point": traced.point.label}))
    written.append(_write_json(out_dir / "summary.json", {
        "scenario": scenario.name,
        "workload": workload,
        "seed": scenario.seed,
        "warnings": list(result.warnings),
        "points": summaries,
        "claims": [c.as_dict() for c in claims],
    }))
    return written


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def summary_rows(result: "SimulationResult", summaries: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per point for the terminal: label, backend, model, gpu, link_gbps, n_agents, latency
    (per-token for decode, per phase for agents: mean_ms and p99_ms), payload mb_up / mb_down (per run
    for decode, per agent phase for agents), oom."""
    summaries = summaries if summaries is not None else point_summaries(result)
    rows = []
    for s in summaries:
        if "decode" in s:
            d = s["decode"]
            mean_ms, p99_ms = d["mean_per_token_ms"], d["p99_per_token_ms"]
            up, down, unit = d["mean_bytes_up"], d["mean_bytes_down"], "per_token"
        else:
            a = s["agents"]
            mean_ms, p99_ms = a["pooled"]["mean_ms"], a["pooled"]["p99_ms"]
            up, down, unit = a["mean_bytes_up"], a["mean_bytes_down"], "per_phase"
        rows.append({
            "label": s["label"], "backend": s["backend"], "model": s["model"], "gpu": s["gpu"],
            "link_gbps": s["link_gbps"], "n_agents": s["n_agents"],
            "latency": unit, "mean_ms": mean_ms, "p99_ms": p99_ms,
            "mb_up": None if up is None else up / metrics.BYTES_PER_MB,
            "mb_down": None if down is None else down / metrics.BYTES_PER_MB,
            "oom": s["oom"], "cost_model": s.get("cost_model", ""),
        })
    return rows


def print_summary(result: "SimulationResult", console: Any, summaries: list[dict[str, Any]] | None = None) -> None:
    """A short rich table, one row per point; a column whose value every point shares goes to the title."""
    from rich.table import Table

    rows = summary_rows(result, summaries)
    decode = result.scenario.workload.kind != "agents"
    shared, varying = [], []
    for key, heading in (("model", "model"), ("gpu", "GPU"), ("link_gbps", "Gbps"), ("n_agents", "N"),
                         ("cost_model", "cost model")):
        values = {row[key] for row in rows}
        if len(values) > 1:
            varying.append((key, heading))
        elif key != "n_agents" or not decode:
            value = next(iter(values), None)
            shared.append(f"{value:g} Gbps" if key == "link_gbps" else f"N={value}" if key == "n_agents"
                          else f"{value} cost model" if key == "cost_model" else str(value))
    what = ("per-token latency, payload MB per run" if decode
            else "per-phase latency (REASON+REFLECT), payload MB per phase")
    table = Table(title=f"{result.scenario.name} ({', '.join(shared)}): {what}")
    table.add_column("backend")
    for _, heading in varying:
        table.add_column(heading, justify="right" if heading in ("Gbps", "N") else "left")
    for heading in ("mean ms", "p99 ms", "MB up", "MB down"):
        table.add_column(heading, justify="right")
    table.add_column("OOM", justify="center")
    for row in rows:
        cells = [row["backend"], *(f"{row[k]:g}" if k == "link_gbps" else str(row[k]) for k, _ in varying)]
        cells += [_cell(row["mean_ms"]), _cell(row["p99_ms"]), _cell(row["mb_up"]), _cell(row["mb_down"])]
        table.add_row(*cells, "[red]OOM[/]" if row["oom"] else "")
    console.print(table)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
