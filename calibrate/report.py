"""The summary a calibration prints last: fits and their errors, primitives, Exp 2.1, composition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from djinnsim.sim.costmodel import evaluate_fit
from djinnsim.sim.profile import PiecewiseFit, Profile


def _fit_cell(fit) -> str:
    pieces = fit.pieces if isinstance(fit, PiecewiseFit) else [fit]
    worst = max((p.max_rel_err or 0.0) for p in pieces)
    r2 = min((p.r2 if p.r2 is not None else 1.0) for p in pieces)
    n = sum(p.n_samples for p in pieces)
    return f"{len(pieces)} piece(s), min r2 {r2:.4f}, max rel err {100 * worst:.1f}%, {n} points"


def summary_rows(profile: Profile, r: dict[str, Any]) -> list[tuple[str, str]]:
    from .composition import describe_paced, describe_path

    m, e = profile.metadata, profile.end_to_end
    rows = [
        ("device", f"{m.gpu_name} (driver {m.driver}, CUDA {m.cuda}, torch {m.torch}, transformers {m.transformers})"),
        ("model", f"{m.model_id} {m.dtype}, weights {m.weights}{' (quick)' if m.quick else ''}"),
        ("duration", f"{m.duration_s:.0f} s"),
        ("prefill fit", _fit_cell(profile.prefill)),
        ("decode fit", _fit_cell(profile.decode_step)),
    ]
    if profile.cached_prefill is not None:
        rows.append(("cached-context prefill fit", _fit_cell(profile.cached_prefill)))
    if "exp21.total_s.p50" in e:
        ratio = e["exp21.total_s.p50"] / e["exp21.predicted.total_s"]
        rows.append((
            "Exp 2.1 (72+50, b=1)",
            f"measured p50 {e['exp21.total_s.p50'] * 1e3:.1f} ms (p10 {e['exp21.total_s.p10'] * 1e3:.1f}, p90 {e['exp21.total_s.p90'] * 1e3:.1f}) "
            f"vs predicted {e['exp21.predicted.total_s'] * 1e3:.1f} ms (x{ratio:.3f})",
        ))
        rows.append(("decode step b=1", f"p50 {e['exp21.step_s.p50'] * 1e3:.2f} ms, p90 {e['exp21.step_s.p90'] * 1e3:.2f} ms"))
    cold = profile.cold_shapes
    if cold is not None:
        first = f", first forward +{cold.first_forward_s:.2f} s" if cold.first_forward_s is not None else ""
        rows.append(("new attention shape", f"decode step +{cold.decode_extra_s * 1e3:.1f} ms, prefill +{cold.prefill_extra_s * 1e3:.1f} ms "
                     f"+ {cold.prefill_extra_per_token_s * 1e6:.2f} us/token{first} ({cold.n_samples} pairs); from {cold.source}"))
    for name in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "serialize", "deserialize"):
        bw = getattr(profile, name)
        large = f"; above {bw.large_from_bytes / 2**20:.0f} MiB: {bw.large_gbps:.2f} GB/s" if bw.large_gbps else ""
        rows.append((name, f"{bw.latency_s * 1e6:.1f} us + {bw.gbps:.2f} GB/s{large}"))
    if profile.kv_swaps is not None:
        for name, bw in sorted(profile.kv_swaps.fits.items()):
            large = f"; above {bw.large_from_bytes / 2**20:.0f} MiB: {bw.large_gbps:.2f} GB/s" if bw.large_gbps else ""
            rows.append((f"KV swap {name}", f"{bw.latency_s * 1e6:.1f} us + {bw.gbps:.2f} GB/s{large} "
                         f"(a whole session's KV, {profile.kv_swaps.tensors} tensors)"))
    n = profile.network
    rows.append(("tcp loopback", f"connect {n.connect_s * 1e6:.0f} us, RTT {n.loopback_rtt_s * 1e6:.0f} us, {n.loopback_gbps:.2f} GB/s"
                 + (f", in series {n.loopback_serial_gbps:.2f} GB/s" if n.loopback_serial_gbps else "")
                 + (f"; path with serialization {describe_path(n.loopback_path)}" if n.loopback_path else "")
                 + (f"; paced {describe_paced(n.paced_path)}" if n.paced_path else "")))
    for tier, load in profile.weight_load.items():
        agg = ", ".join(f"x{k}: {v:.2f}" for k, v in sorted(load.aggregate_gbps.items()))
        rows.append((f"weight load {tier}", f"{load.fixed_s * 1e3:.0f} ms + {load.gbps:.2f} GB/s; aggregate GB/s {agg or 'n/a'}"))
    for tier, loads in profile.loads_mp.items():
        spread = []
        for k in sorted(loads.runs):
            run = loads.runs[k][-1]
            spread.append(f"x{k}: {loads.aggregate_gbps[k]:.2f} (finishes {min(run.finished_s):.2f}-{max(run.finished_s):.2f} s)")
        note = f"; {loads.note}" if loads.note else ""
        rows.append((f"loads by k processes, {tier}", f"aggregate GB/s {', '.join(spread)}; stopped at: {loads.limit}{note}"))
    ts = profile.timeslice_mp
    if ts is not None:
        steps = ", ".join(f"x{p.processes}: {p.slowdown_p50:.2f} ({p.slowdown_p10:.2f}-{p.slowdown_p90:.2f})"
                          + (f" busy {p.gpu_busy_share:.0%}" if p.gpu_busy_share is not None else "") for p in ts.points)
        rows.append(("decoding by k processes", f"step slowdown p50 (p10-p90) {steps}; time-sliced f = {ts.gpu_busy_fraction:.3f} "
                     f"(worst rel err {100 * (ts.fit_max_rel_err or 0):.0f}%); stopped at: {ts.limit}"))
        fit = timeslice_fit(profile)
        per_k = ", ".join(f"x{k}: {m * 1e3:.1f} / {old * 1e3:.1f} / {new * 1e3:.1f}" for k, m, old, new in fit["points"])
        rows.append(("time-sliced step model", f"g = {ts.gpu_step_s * 1e3:.2f} ms on k = {ts.saturated_k}, lone = decode fit "
                     f"{fit['lone_s'] * 1e3:.1f} ms; per-process step ms measured / relative lone x max(1, k f) / "
                     f"absolute max(lone, k g): {per_k}; rmse {fit['old_rmse_s'] * 1e3:.1f} / {fit['new_rmse_s'] * 1e3:.1f} ms, "
                     f"max rel err {fit['old_max_rel']:.0%} / {fit['new_max_rel']:.0%}"))
    stages = [(k.removeprefix("stage.").removesuffix("_s"), v) for k, v in e.items() if k.startswith("stage.")]
    if stages:
        rows.append(("stage wall times", ", ".join(f"{name} {v:.0f} s" for name, v in stages)))
    mem = profile.memory
    rows.append((
        "memory",
        f"total {mem.total_bytes / 2**30:.1f} GiB, free at start {(mem.free_at_start_bytes or 0) / 2**30:.1f} GiB, "
        f"weights {mem.weight_bytes / 2**30:.2f} GiB, KV {mem.kv_bytes_per_token} B/token, "
        f"context {mem.context_bytes_per_process / 2**20:.0f} MiB"
        + (f", oom-probe copies {mem.oom_probe_copies}" if mem.oom_probe_copies else ""),
    ))
    for row in r.get("composition", []):
        rows.append((
            f"{row['backend']} L={row['seq_len']}",
            f"measured {row['measured_s'] * 1e3:.2f} ms vs primitives {row['predicted_s'] * 1e3:.2f} ms (x{row['measured_s'] / row['predicted_s']:.2f})",
        ))
    if "nvml.exp21.sm_util_pct.p50" in e:
        rows.append((
            "nvml during Exp 2.1",
            f"SM util p50 {e['nvml.exp21.sm_util_pct.p50']:.0f}%, mem util p50 {e['nvml.exp21.mem_util_pct.p50']:.0f}%, "
            f"power p50 {e['nvml.exp21.power_w.p50']:.0f} W, SM clock p50 {e['nvml.exp21.sm_clock_mhz.p50']:.0f} MHz",
        ))
    return rows


def print_summary(console, profile: Profile, r: dict[str, Any], out: Path, samples: Path) -> None:
    from rich.table import Table

    from .fitting import describe_fit

    for name, fit in (("prefill", profile.prefill), ("decode_step", profile.decode_step)):
        for line in describe_fit(fit):
            console.print(f"{name}: {line}", markup=False, highlight=False)
    for name, fit in (("prefill_workspace", profile.memory.prefill_workspace), ("decode_workspace", profile.memory.decode_workspace)):
        if fit is not None:
            for line in describe_fit(fit, unit="B"):
                console.print(f"{name}: {line}", markup=False, highlight=False)
    table = Table(title=f"calibration summary -> {out} (+ {samples.name})", show_lines=False)
    table.add_column("what", no_wrap=True)
    table.add_column("measured")
    for what, value in summary_rows(profile, r):
        table.add_row(what, value)
    console.print(table)


def timeslice_fit(profile: Profile) -> dict:
    """The per-process decode step of timeslice_mp at each k (median) against the two time-sliced
    models as the simulator charges them, the lone step being the decode fit at the stage's context:
    relative, lone x max(1, k f), and absolute, max(lone, k g). (k, measured, relative, absolute)
    per k, with each model's rmse (s) and largest relative error."""
    ts = profile.timeslice_mp
    context = float(np.mean(ts.context_tokens))
    lone = evaluate_fit(profile.decode_step, {"batch": 1, "sum_context": context, "context": context})[0]
    points = [(p.processes, p.step_s_p50, lone * max(1.0, p.processes * ts.gpu_busy_fraction),
               max(lone, p.processes * ts.gpu_step_s)) for p in ts.points]
    measured = np.array([m for _, m, _, _ in points])
    out = {"lone_s": lone, "points": points}
    for name, column in (("old", 2), ("new", 3)):
        predicted = np.array([p[column] for p in points])
        out[f"{name}_rmse_s"] = float(np.sqrt(np.mean((predicted - measured) ** 2)))
        out[f"{name}_max_rel"] = float(np.max(np.abs(predicted - measured) / measured))
    return out


def print_refit(profile: Profile, path: Path) -> None:
    """The summary of a refit profile (no stage results in memory: composition rows come from the profile)."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=170)
    e = profile.end_to_end
    rows = []
    for key in sorted(k for k in e if k.startswith("composition.") and k.endswith(".measured_s")):
        _, backend, length, _ = key.split(".")
        rows.append({
            "backend": backend,
            "seq_len": int(length[1:]),
            "measured_s": e[key],
            "predicted_s": e[f"composition.{backend}.{length}.predicted_s"],
        })
    rows.sort(key=lambda r: (r["seq_len"], r["backend"]))
    print_summary(console, profile, {"composition": rows}, path, Path(profile.samples_file or ""))
