"""The validation report: validation.json (every figure), validation.md (the tables), one overlay
plot per backend (real points with their spread, the simulated curve), and both record tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .compare import METRIC_BY_NAME, MIN_REPEATS, SAMPLES, Comparison, PointComparison

VERDICT_MARK = {"PASS": "PASS", "FAIL": "**FAIL**", "info": "info", "N/A": "N/A"}


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(document: dict, path: Path) -> Path:
    path.write_text(json.dumps(_finite(document), indent=1, sort_keys=False) + "\n")
    return path


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "N/A"
    if unit == "s":
        return f"{value * 1e3:.4g} ms"
    if unit == "frac":
        return f"{100 * value:.1f}%"
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if abs(value) >= scale:
                return f"{value / scale:.4g} {name}"
        return f"{value:.4g} B"
    return f"{value:.4g}"


def fmt_err(value: float | None) -> str:
    if value is None:
        return "N/A"
    if not math.isfinite(value):
        return "inf"
    return f"{100 * value:+.1f}%"


TARGET_TEXT = {"mean": "5%, or CI meets band of half-width <= 10%", "p99": "10%", "bytes": "exact", "info": "none"}


def _interval(values: list[float] | None, unit: str) -> str:
    return "N/A" if not values else f"{fmt(values[0], unit)} – {fmt(values[1], unit)}"


def _pct(value: float | None) -> str:
    return "N/A" if value is None else f"{100 * value:.0f}%"


def _metric_row(point: PointComparison, c: Comparison) -> str:
    metric = METRIC_BY_NAME[c.metric]
    unit = metric.unit
    n = len(c.real_values)
    ci = _interval(c.real_ci, unit) + (" (n<5)" if c.real_ci and n < MIN_REPEATS else "")
    verdict = VERDICT_MARK[c.verdict] + (" (band)" if c.passed_by == "band" else "")
    half = "N/A" if c.band_half_width is None else f"{100 * c.band_half_width:.1f}%"
    return (f"| {point.label} | {metric.label} | {point.sample} | {fmt(c.real_mean, unit)} | {ci} | {n} | "
            f"{fmt(c.sim, unit)} | {_interval(c.band, unit)} | {half} | {_pct(c.coverage)} | {fmt_err(c.rel_err)} | "
            f"{TARGET_TEXT[c.rule]} | {verdict} |")


def summary_line(counts: dict) -> str:
    cover = "" if counts.get("coverage") is None else (
        f", band coverage {100 * counts['coverage']:.0f}% ({counts['covered']} of {counts['banded']} real repeat values)")
    return (f"{counts.get('PASS', 0)} PASS, {counts.get('FAIL', 0)} FAIL, {counts.get('info', 0)} info, "
            f"{counts.get('N/A', 0)} N/A{cover}")


def _point_level(profile_meta: dict) -> str:
    """How the profile's point was moved off its decode fit (`calibrate --refit --level-point median`), if it was."""
    level = profile_meta.get("point_level")
    return "" if level is None else (f"; point at the median batch-1 level its bands draw: passes x {level:.4f} "
                                     "over the fits")


def provenance_lines(meta: dict) -> list[str]:
    from djinnsim.sim.provenance import describe_simulator

    offline = meta.get("offline")
    profile = meta["profile"]
    lines = []
    if offline:
        lines.append(f"Simulator of this re-comparison: {describe_simulator(offline['simulator'])}.  ")
    sim = meta.get("simulator") if not offline else offline.get("real_runs_simulator")
    lines.append(f"Simulator of the real runs' report: {describe_simulator(sim) if sim else 'not recorded'}.  ")
    frozen = profile.get("frozen_sha256")
    lines.append(f"Profile sha256 `{profile.get('sha256')}`; frozen before the real runs: "
                 + (f"`{frozen}` at {profile.get('frozen_at')}" if frozen else "not recorded") + ".  ")
    sample = meta.get("sample", {})
    if sample:
        why = "; ".join(sample.get("reasons") or []) or (
            "profile frozen before the real runs, no fit holds them or calibrate's runs of the same workload, "
            "model code not newer than the runs")
        lines.append(f"Every figure here is **{sample.get('label')}**: {why}.  ")
    lines.append(f"Bands: {meta.get('bands') or 0} draws of every repeat; spread: {meta.get('band_spread', 'N/A')}.")
    return lines


def _anchored_section(anchor: dict) -> list[str]:
    """validate.anchored: the probed points judged again at the level their probe measured."""
    lines = ["", "## Anchored to the level probe before each point (validate --level-probe)", "",
             "Before its first repeat, each point's own process decoded 40 tokens at batch 1 after a 32-token "
             "prompt, outside the scored runs; m is the median step of that probe over the step the profile "
             "predicts for the same shape. The point is simulated again with every level-bound pass x m "
             "(bands drawing no level on top) and judged by the same rules. The probe after its last repeat "
             "shows how far the level moved during the point. These verdicts are counted apart from the "
             "summary above.", "",
             f"**Anchored: {summary_line(anchor['summary'])}.**", "",
             "| point | probe step before | m before | probe step after | m after | metric | real mean | sim mean | "
             "sim P10 – P90 | coverage | error | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_index = {p["index"]: p for p in anchor["points"]}
    for row in anchor["rows"]:
        head = (f"| {row['label']} | {fmt(row['probe_before_step_s'], 's')} | {_factor(row['factor'])} | "
                f"{fmt(row['probe_after_step_s'], 's')} | {_factor(row['factor_after'])} |")
        point = by_index.get(row["index"])
        if point is None:
            lines.append(f"{head} (no probe step{': ' + row['error'] if row.get('error') else ''}) | | | | | | |")
            continue
        for name in ("latency_mean_s", "latency_p99_s", "per_token_s"):
            c = point["metrics"].get(name)
            if c is None or c.get("real_mean") is None:
                continue
            band = c.get("band")
            lines.append(f"{head} {name} | {fmt(c['real_mean'], 's')} | {fmt(c['sim'], 's')} | "
                         f"{'-' if not band else fmt(band[0], 's') + ' – ' + fmt(band[1], 's')} | {_pct(c.get('coverage'))} | "
                         f"{fmt_err(c['rel_err'])} | {VERDICT_MARK[c['verdict']]} |")
    return lines


def _factor(value: float | None) -> str:
    return "-" if value is None else f"x{value:.3f}"


def markdown(doc: dict, points: list[PointComparison]) -> str:
    meta = doc["meta"]
    offline = meta.get("offline")
    command_label = "Real runs' command" if offline else "Command"
    lines = [
        f"# Validation{' (offline re-comparison)' if offline else ''}: {meta['scenario']} on {meta['machine']['name']}",
        "",
    ]
    if offline:
        lines += [
            f"Offline re-comparison of `{offline['from_real']}`: its real runs (started {meta['started_at']}, "
            f"described below) compared with the simulator re-run for this report, on the CPU of this machine "
            f"({offline['host_cpu']}). Nothing was run for real.  ",
            f"Re-comparison command: `{offline['command']}`",
            "",
        ]
    lines += [
        f"{command_label}: `{meta['command']}`  ",
        f"Started {meta['started_at']}, took {meta['wall_s']:.0f} s (real runs {meta['real_wall_s']:.0f} s).  ",
        f"Machine: {meta['machine']['name']} ({meta['machine']['device']}), driver {meta['machine'].get('driver') or 'N/A'}, "
        f"torch {meta['machine']['torch']}, transformers {meta['machine']['transformers']}, host {meta['machine']['host_cpu']}.  ",
        f"Profile: `{meta['profile']['path']}` ({meta['profile']['how']}; calibrated {meta['profile']['date']}, "
        f"quick={meta['profile']['quick']}{_point_level(meta['profile'])}).  ",
        *provenance_lines(meta),
        "",
        f"Model {meta['model']}, {meta['repeats']} repeats per point, real and simulated (each simulated repeat "
        f"with its own seed); workload as run: {meta['workload']}.",
        "",
        "Ray's two baselines are emulated with processes, because a Ray actor or task is a worker process and "
        "that process is what they time (keep-alive: one resident worker process per agent with its own CUDA "
        "context, model copy and KV; serverless: one worker process per agent that loads the weights for every "
        "phase and frees them after); Ray's scheduler and object store lie outside every timed interval. The link is "
        "emulated on loopback: each end paces its messages to the scenario's rate and holds each back half the RTT; "
        "bytes are counted on the socket.",
        "",
        "Targets (issue 9): a mean within 5% of the real mean, or the real mean's 95% bootstrap interval "
        "(scipy.stats.bootstrap over repeats) overlapping the simulated P10–P90 band while the band's half-width "
        "((P90 - P10) / (P90 + P10)) is at most 10% (marked '(band)'); P99 within 10%; payload bytes exact; keep-alive "
        "OOM N exact. p50, per-token latency and time to first token are judged like the mean. Wire bytes "
        "(payload + framing), peak GPU memory and GPU utilization have no target (info). Each metric is computed "
        "per repeat (a P99 is one repeat's P99) and averaged over repeats on each side; the error is "
        "(sim mean - real mean) / real mean; coverage is the share of real repeat values inside the band. "
        "Held-out and in-sample figures are counted apart.",
        "",
        f"**Summary: {summary_line(doc['summary'])}.**  ",
        *(f"{sample}: {summary_line(doc['summary'][sample])}.  " for sample in SAMPLES if sample in doc["summary"]),
        "",
        "| point | metric | sample | real mean | real 95% CI | real repeats | sim mean | sim P10 – P90 | band half-width | "
        "coverage | error | target | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in points:
        if point.skipped and not any(c.real_values for c in point.metrics):
            lines.append(f"| {point.label} | (not run for real: {point.skipped}) | | | | | | | | | | | |")
            continue
        lines.extend(_metric_row(point, c) for c in point.metrics)
    lines += ["", "## Keep-alive OOM N", ""]
    if doc["oom"]:
        lines += ["| backend | real OOM N | sim OOM N | copies that fit (real) | probed up to | verdict | note |",
                  "|---|---|---|---|---|---|---|"]
        for row in doc["oom"]:
            real = row["real_oom_n"] if row["real_oom_n"] is not None else (
                f"none up to {row['probe_max']}" if row["probe_max"] else "N/A")
            lines.append(f"| {row['backend']} | {real} | {row['sim_oom_n'] if row['sim_oom_n'] is not None else 'none'} | "
                         f"{row['real_loaded']} | {row['probe_max'] or 'N/A'} | {VERDICT_MARK[row['verdict']]} | {row['message']} |")
    else:
        lines.append("No per-agent-weights backend in this validation.")
    lines += ["", "## Where the time goes (mean seconds per request, by stage)", "",
              "| point | side | connect | uplink | queue | load | copy | compute | downlink |",
              "|---|---|---|---|---|---|---|---|---|"]
    for point in points:
        for side, stages in (("real", point.stages_real), ("sim", point.stages_sim)):
            if stages:
                cells = " | ".join(fmt(stages.get(k), "s") for k in
                                   ("connect_s", "uplink_s", "queue_s", "load_s", "copy_s", "compute_s", "downlink_s"))
                lines.append(f"| {point.label} | {side} | {cells} |")
    if doc.get("repeats"):
        lines += ["", "## Repeat by repeat, in the order run", "",
                  "Mean latency and median GPU compute per generated token of each repeat's measured requests, "
                  "real beside the simulated repeat that stands for it (same processes, same shapes already run). "
                  "Warm-shape compute per token moving between repeats of one point is the host's step-time drift.",
                  "", "| started (s) | point | repeat | real mean | sim mean | real compute/token | sim compute/token |",
                  "|---|---|---|---|---|---|---|"]
        if any("part" in row for row in doc["repeats"]):
            lines[-2:-2] = ["Repeats split over commands (`--also-real`): 'started' is `command:seconds` from "
                            "that command's first request; each command's simulated repeats start fresh processes, as its "
                            "real ones did.", ""]
        for row in doc["repeats"]:
            at = f"{row['part'] + 1}:{row['at_s']:.0f}" if "part" in row else f"{row['at_s']:.0f}"
            lines.append(f"| {at} | {row['point']} | {row['repeat']} | {fmt(row['real_mean_s'], 's')} | "
                         f"{fmt(row['sim_mean_s'], 's')} | {fmt(row['real_compute_per_token_s'], 's')} | "
                         f"{fmt(row['sim_compute_per_token_s'], 's')} |")
    if doc.get("anchored"):
        lines += _anchored_section(doc["anchored"])
    skipped = [p for p in points if p.skipped]
    if skipped:
        lines += ["", "## Points not (fully) run for real", ""]
        lines += [f"- {p.label}: {p.skipped}" for p in skipped]
    notes = [*doc.get("notes", []), *(f"{p.label}: {n}" for p in points for n in p.notes)]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Figures: " + ", ".join(f"`{name}`" for name in doc.get("figures", [])), ""]
    return "\n".join(lines)


def overlay_plots(out_dir: Path, agents: bool, curves: dict[str, list[dict]]) -> list[str]:
    """One PNG per backend. `curves[backend]` holds one dict per point:
    decode: {label, t, real_mean, real_min, real_max, sim}; agents: {n, real/sim mean & p99, min/max}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for backend, rows in curves.items():
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        if agents:
            rows = sorted(rows, key=lambda r: r["n"])
            ns = [r["n"] for r in rows]
            for key, style in (("mean", "o"), ("p99", "s")):
                real = [r[f"real_{key}"] for r in rows]
                if any(v is not None for v in real):
                    lo = [max((r[f"real_{key}"] or 0) - (r[f"real_{key}_min"] or 0), 0) for r in rows]
                    hi = [max((r[f"real_{key}_max"] or 0) - (r[f"real_{key}"] or 0), 0) for r in rows]
                    ax.errorbar(ns, [v if v is not None else float("nan") for v in real], yerr=[lo, hi], fmt=style,
                                capsize=4, label=f"real {key} (min–max of repeats)")
                sim = [r[f"sim_{key}"] for r in rows]
                ax.plot(ns, [v if v is not None else float("nan") for v in sim], "-", marker=style, mfc="none",
                        label=f"simulated {key} (mean of repeats)")
            ax.set_xlabel("agents N")
            ax.set_ylabel("per-phase latency (ms)")
            ax.set_xticks(ns)
            ax.set_yscale("log")
        else:
            for row in rows:
                ax.fill_between(row["t"], row["real_min"], row["real_max"], alpha=0.25,
                                label=f"real min–max of repeats ({row['label']})")
                ax.plot(row["t"], row["real_mean"], ".", label="real mean")
                ax.plot(row["t"], row["sim"], "-", label="simulated (mean of repeats)")
            ax.set_xlabel("generated token t")
            ax.set_ylabel("step latency (ms)")
        ax.set_title(backend)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"overlay_{backend}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names
