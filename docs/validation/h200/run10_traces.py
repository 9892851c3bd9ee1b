"""Run 10's two untraced misses, split into the parts the simulator charges (IN-SAMPLE: after run 10).

    python docs/validation/h200/run10_traces.py [--out /tmp/run10-traces]

Reads the committed runs only (no GPU); prints markdown. Two parts:

A. Djinn serial FCFS, N = 16 (run10/djinn-fcfs-16): each phase's compute, real against simulated,
   warm and the first use of each phase's shapes apart; what the profile charges a phase, pass by
   pass (prefill, decode steps below and above context 96, the jitter's mean); how serial FCFS turns
   a per-phase error into a latency error (a replay of the records: one server, FCFS, each REFLECT
   issued as long after its REASON as it was); the decode fit's batch-1 points by the stage that
   measured them; and the point re-simulated (`djinnsim validate --from-real`) on a copy of the
   profile whose piece over contexts 96-2052 takes the piece below it (no step at 96).
B. The KV costs (kv-costs-h200-run5 and -run6): each re-prefill split into what the engine charges
   (the swap-in, the pass: a cached-context prefill fit, the prefill fit, or the decode-step floor
   under them, whichever is larger, times the prefill jitter), beside the real figure less its
   swap-in.

What-if profiles are written under --out with their samples CSV beside them.
"""

from __future__ import annotations

import argparse
import heapq
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from djinnsim.validate.offline import records_file

from djinnsim.calibrate.fitting import fit_linear, fit_piecewise, whole_fit_stats
from djinnsim.calibrate.profile_builder import DECODE_FEATURES, DECODE_SCALE
from djinnsim.calibrate.refit import decode_points, read_samples
from djinnsim.sim.costmodel import ProfileCostModel, evaluate_fit
from djinnsim.sim.profile import PiecewiseFit, load_profile
from djinnsim.sim.specs import get_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
RUN = HERE / "run10" / "djinn-fcfs-16"
PROFILE = HERE / "run10" / "pooled-profile" / "h200-llama-2-7b.json"


def _samples(profile: Path) -> Path:
    """The samples file beside `profile` (its gzipped copy, as committed), its sha256 checked."""
    from djinnsim.sim.profile import load_profile, samples_path

    return samples_path(load_profile(profile), profile)
KV = {"run 5": (ROOT / "docs/validation/kv-costs-h200-run5/kv_costs.json", HERE / "run5/pooled-profile/h200-llama-2-7b.json"),
      "run 6": (ROOT / "docs/validation/kv-costs-h200-run6/kv_costs.json", PROFILE)}
REFLECT_TOKENS = 16


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def records(side: str, where: Path = RUN) -> pd.DataFrame:
    d = pd.read_csv(records_file(where, f"records_{side}.csv")).sort_values(["repeat", "started_at"]).reset_index(drop=True)
    first = d.groupby(["repeat", "phase"])["started_at"].transform("min") == d["started_at"]
    d["cold"] = first & (d["repeat"] == d["repeat"].min())  # each phase's shapes run first in the process
    return d


def phase_passes(cost: ProfileCostModel) -> dict[str, list[tuple]]:
    """The passes the engine runs for each phase (sim/engine/plan.py): a prefill of the new tokens
    after the cached context, then new_tokens - 1 decode steps."""
    reason = [("prefill", 72, 0)] + [("decode", 72 + t) for t in range(49)]
    reflect = [("prefill", 16, 122)] + [("decode", 138 + t) for t in range(49)]
    return {"reason": reason, "reflect": reflect}


def charge(cost: ProfileCostModel, p: tuple) -> float:
    return cost.prefill_s(p[1], 1, p[2]) if p[0] == "prefill" else cost.decode_step_s(1, p[1])


def replay(d: pd.DataFrame, compute: pd.Series) -> float:
    """Mean latency of the records replayed on one FCFS server with `compute` as each request's
    service: REASONs issued when they were, each REFLECT issued as long after its REASON's end as
    it was, the parts outside queue and compute (link, connect, copy) kept as recorded."""
    lat = []
    for _, g in d.groupby("repeat"):
        over = g["latency_s"] - g["queue_s"] - g["compute_s"]
        t0 = g["issued_at"].min()
        rows = {(r.agent, r.phase): i for i, r in g.iterrows()}
        pending = [(g.at[i, "issued_at"] - t0, "reason", a) for (a, ph), i in rows.items() if ph == "reason"]
        heapq.heapify(pending)
        free = 0.0
        while pending:
            at, ph, a = heapq.heappop(pending)
            i = rows[(a, ph)]
            free = max(free, at) + compute.at[i]
            end = free + over.at[i]
            lat.append(end - at)
            if ph == "reason":
                j = rows[(a, "reflect")]
                heapq.heappush(pending, (end + g.at[j, "issued_at"] - g.at[i, "finished_at"], "reflect", a))
    return float(np.mean(lat))


def flat_profile(out: Path) -> Path:
    """The profile with the decode piece over contexts 96-2052 given the coefficients of the piece
    below it (batch 1-4): the same batch-1 step at every context."""
    doc = json.loads(PROFILE.read_text())
    pieces = doc["decode_step"]["pieces"]
    assert pieces[0]["domain"]["context"] == [68.0, 96.0] and pieces[1]["domain"]["context"][0] == 96.0
    pieces[1]["coef"] = list(pieces[0]["coef"])
    out.mkdir(parents=True, exist_ok=True)
    doc["samples_file"] = "flat.csv"
    (out / "flat.json").write_text(json.dumps(doc, indent=1))
    src = _samples(PROFILE)
    shutil.copy(src, out / ("flat.csv" + (".gz" if src.suffix == ".gz" else "")))
    return out / "flat.json"


def part_a(out: Path) -> None:
    prof = load_profile(PROFILE)
    cost = ProfileCostModel(prof, get_model(prof.metadata.model_id))
    real, sim = records("real"), records("sim")
    n = len(real)
    print("## A. Djinn serial FCFS, N = 16\n")
    print("Compute per phase, ms (warm: every phase but the first REASON and first REFLECT of the first repeat, "
          "which run their shapes first in the process)\n")
    print("| side | all phases | warm REASON | warm REFLECT | REFLECT / REASON | first REASON | first REFLECT | first use, per request |")
    print("|---|---|---|---|---|---|---|---|")
    warm = {}
    for side, d in (("real", real), ("sim", sim)):
        w = d[~d["cold"]].groupby("phase")["compute_s"].mean()
        c = d[d["cold"]].set_index("phase")["compute_s"]
        warm[side] = w
        first_use = float((c - w.reindex(c.index)).sum()) / n
        print(f"| {side} | {ms(d['compute_s'].mean())} | {ms(w['reason'])} | {ms(w['reflect'])} | {w['reflect'] / w['reason']:.3f} "
              f"| {ms(c['reason'])} | {ms(c['reflect'])} | {ms(first_use)} |")
    diff = sim["compute_s"].mean() - real["compute_s"].mean()
    share = {ph: float((warm["sim"][ph] - warm["real"][ph]) * (~real["cold"] & (real["phase"] == ph)).sum() / n)
             for ph in ("reason", "reflect")}
    print(f"\nPer request the simulation charges {ms(diff)} ms more compute: warm REASONs {ms(share['reason'])}, "
          f"warm REFLECTs {ms(share['reflect'])}, first uses {ms(diff - sum(share.values()))}.\n")

    seq = float(np.mean(prof.jitter_decode_sequence))
    jp = float(np.mean(prof.jitter_prefill))
    print("What the profile charges a phase (batch 1, before jitter), ms; the decode jitter's mean factor "
          f"is {seq:.4f} (the sequence's mean: 128-step runs from uniform starts), the prefill's {jp:.4f}\n")
    print("| phase | prefill pass | its fit | decode steps at context <= 96 | at > 96 | sum | x jitter means | flat at piece 1 (x jitter) | piece 2's step (x jitter) | sim warm mean | real warm mean |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    flat_prof = load_profile(flat_profile(out / "profiles"))
    flat_cost = ProfileCostModel(flat_prof, get_model(flat_prof.metadata.model_id))
    for ph, passes in phase_passes(cost).items():
        pre = passes[0]
        fit, _ = evaluate_fit(cost.profile.cached_prefill if pre[2] else cost.profile.prefill,
                              {"prompt_tokens": pre[1], "batch": 1, "context": pre[2], "tokens": pre[1]})
        low = [charge(cost, p) for p in passes[1:] if p[1] <= 96]  # piece 1's domain ends at 96, inclusive
        high = [charge(cost, p) for p in passes[1:] if p[1] > 96]
        total = charge(cost, pre) * jp + (sum(low) + sum(high)) * seq
        flat = charge(flat_cost, pre) * jp + sum(charge(flat_cost, p) for p in passes[1:]) * seq
        lows = f"{len(low)} x {ms(low[0])}" if low else "0"
        highs = f"{len(high)} x {ms(high[0])}" if high else "0"
        print(f"| {ph} | {ms(charge(cost, pre))} | {ms(fit)} | {lows} | {highs} | {ms(charge(cost, pre) + sum(low) + sum(high))} "
              f"| {ms(total)} | {ms(flat)} | {ms(total - flat)} | {ms(warm['sim'][ph])} | {ms(warm['real'][ph])} |")

    print("\nSerial FCFS: the records replayed on one server (REFLECT issued as long after its REASON as it was)\n")
    base_real, base_sim = replay(real, real["compute_s"]), replay(sim, sim["compute_s"])
    print(f"- replay with each side's own compute: real {base_real:.3f} s (recorded {real['latency_s'].mean():.3f} s), "
          f"sim {base_sim:.3f} s (recorded {sim['latency_s'].mean():.3f} s)")
    print(f"- mean latency over mean compute: real {real['latency_s'].mean() / real['compute_s'].mean():.2f}, "
          f"sim {sim['latency_s'].mean() / sim['compute_s'].mean():.2f} (a phase waits behind about that many phases' service)")
    for e in (0.01, 0.10):
        r = replay(real, real["compute_s"] * (1 + e))
        print(f"- real compute x {1 + e:.2f}: mean latency {r:.3f} s ({(r / base_real - 1) * 100:+.1f}%)")
    for ph in ("reason", "reflect"):
        c = real["compute_s"].where(real["phase"] != ph, real["compute_s"] * 1.01)
        r = replay(real, c)
        print(f"- real {ph.upper()} compute alone x 1.01: mean latency {(r - base_real) * 1e3:+.0f} ms "
              f"({(r / base_real - 1) * 100:+.2f}%)")
    steps = []  # the real records with the simulation's warm phase means, one change at a time
    c = real["compute_s"].copy()
    for ph in ("reason", "reflect"):
        mask = ~real["cold"] & (real["phase"] == ph)
        c = c.where(~mask, c * warm["sim"][ph] / warm["real"][ph])
        steps.append((f"+ warm {ph.upper()}s scaled to the sim's mean", replay(real, c)))
    for _, row in sim[sim["cold"]].iterrows():
        c[real.index[real["cold"] & (real["phase"] == row["phase"])][0]] = row["compute_s"]
    steps.append(("+ the sim's first uses", replay(real, c)))
    print("\n| real records replayed with | mean latency s | step | vs real replay |")
    print("|---|---|---|---|")
    prev = base_real
    print(f"| their own compute | {base_real:.3f} | | |")
    for label, r in steps:
        print(f"| {label} | {r:.3f} | {(r - prev) * 1e3:+.0f} ms | {(r / base_real - 1) * 100:+.1f}% |")
        prev = r

    print("\nThe decode fit's batch-1 points (ms) by the stage that measured them, and the pieces\n")
    rows = read_samples(_samples(PROFILE))
    stage_of = {}
    for row in rows:
        if row["stage"] in ("decode", "exp21_step", "warm_decode") and float(row.get("batch") or 1) == 1.0:
            stage_of.setdefault(row["stage"], set()).add(row["point"])
    pts = [p for p in decode_points(rows) if p.inputs["batch"] == 1.0]
    grid = sorted((p.inputs["context"], p.value) for p in pts if p.inputs["context"] in (68.0, 260.0, 516.0, 1028.0, 2052.0))
    exp21 = sorted(p.value for p in pts if p.inputs["context"] == 96.0)
    warmd = sorted((p.inputs["context"], p.value) for p in pts if p.inputs["context"] not in (68.0, 96.0, 260.0, 516.0, 1028.0, 2052.0))
    print("- decode grid (stage `decode`, measured first): " + ", ".join(f"c{c:.0f} {v * 1e3:.1f}" for c, v in grid))
    print(f"- Exp 2.1's {len(exp21)} kept runs (stage `exp21_step`, after the grid; each at median context 96): "
          + ", ".join(f"{v * 1e3:.1f}" for v in exp21) + f"; median {np.median(exp21) * 1e3:.1f}")
    print("- cold_shapes' warm passes (stage `warm_decode`, before the grid): " + ", ".join(f"c{c:.0f} {v * 1e3:.1f}" for c, v in warmd))
    for i, piece in enumerate(cost.profile.decode_step.pieces):
        dom = piece.domain
        print(f"- piece {i + 1}: batch {dom['batch'][0]:g}-{dom['batch'][1]:g}, context {dom['context'][0]:g}-{dom['context'][1]:g}, "
              f"n = {piece.n_samples}: batch-1 step {ms(evaluate_fit(piece, {'batch': 1, 'context': max(dom['context'][0], 68), 'sum_context': max(dom['context'][0], 68)})[0])} ms")

    low = [p for p in decode_points(rows) if p.inputs["batch"] <= 4]
    single = fit_linear(low, DECODE_FEATURES, DECODE_SCALE, ["batch", "context", "sum_context"])
    split = whole_fit_stats(PiecewiseFit(pieces=list(cost.profile.decode_step.pieces[:2])), low)
    no_spells = fit_piecewise([p for p in low if p.inputs["context"] != 96.0], DECODE_FEATURES, DECODE_SCALE,
                              ["batch", "context", "sum_context"], ["batch", "context"])
    flat_pieces = no_spells.pieces if isinstance(no_spells, PiecewiseFit) else [no_spells]
    print(f"- batch 1-4 in one piece: max relative error {single.max_rel_err * 100:.1f}%; split at context 96 (pieces 1, 2): "
          f"{split['max_rel_err'] * 100:.1f}%")
    print(f"- batch 1-4 without the Exp 2.1 spells: {len(flat_pieces)} piece(s), batch-1 step "
          + ", ".join(f"{ms(evaluate_fit(p, {'batch': 1, 'context': 138, 'sum_context': 138})[0])} ms" for p in flat_pieces))

    print("\nRe-simulated on the profile without the step at 96 (`djinnsim validate --from-real` "
          f"{RUN.relative_to(ROOT)} --calibration {out / 'profiles' / 'flat.json'})\n")
    dest = out / "flat-djinn-fcfs-16"
    subprocess.run([sys.executable, "-m", "djinnsim.main", "validate", "--from-real", str(RUN), "--calibration",
                    str(out / "profiles" / "flat.json"), "--out", str(dest), "--quiet", "--force"], check=True)
    doc = json.loads((dest / "validation.json").read_text())
    live = json.loads((RUN / "validation.json").read_text())
    print("| profile | sim mean latency | error | p99 error | per-token error | sim compute per request | PASS / FAIL |")
    print("|---|---|---|---|---|---|---|")
    for label, d, where in (("as judged live", live, RUN), ("flat at piece 1", doc, dest)):
        m = d["points"][0]["metrics"]
        s = d["summary"]
        simc = pd.read_csv(records_file(where, "records_sim.csv"))["compute_s"].mean()
        print(f"| {label} | {m['latency_mean_s']['sim']:.3f} s | {m['latency_mean_s']['rel_err'] * 100:+.1f}% "
              f"| {m['latency_p99_s']['rel_err'] * 100:+.1f}% | {m['per_token_s']['rel_err'] * 100:+.1f}% | {ms(simc)} ms "
              f"| {s['PASS']} / {s['FAIL']} |")


def kv_parts(cost: ProfileCostModel, op: str, context: int) -> tuple[str, float, float]:
    """(what binds, the pass's charge before jitter, the other candidate) for a REFLECT of 16 tokens."""
    if op == "reflect_discard":
        tokens, cached = context + REFLECT_TOKENS, 0
    else:
        tokens, cached = REFLECT_TOKENS, context
    name, fit = cost._prefill_fit(cached)
    fitted, _ = evaluate_fit(fit, {"prompt_tokens": tokens, "batch": 1, "context": cached, "tokens": tokens})
    floor, _ = evaluate_fit(cost.profile.decode_step, {"batch": 1, "sum_context": cached, "context": cached})
    if name == "prefill" and fit.floor_s is not None and fitted <= fit.floor_s + 1e-12:
        name = "prefill's launch floor"
    return (name if fitted >= floor else "decode-step floor"), max(fitted, floor), min(fitted, floor)


def part_b() -> None:
    from djinnsim.validate.kv_costs import simulated_costs

    print("\n## B. KV costs: re-prefills\n")
    print("Sim: the engine's charge (simulated_costs, 64 draws, as kv_costs.py); its pass is max(fit, decode-step floor) x the "
          "prefill jitter. Real pass: the real REFLECT less the real swap-in (means; after_swap only).\n")
    print("| run | op | C | real ms | sim ms | error | real swap-in | sim swap-in | real pass | sim pass | what binds (charge / other) | pass error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for run, (path, prof_path) in KV.items():
        doc = json.loads(path.read_text())
        prof = load_profile(prof_path)
        spec = get_model(prof.metadata.model_id)
        cost = ProfileCostModel(prof, spec)
        rows = {(r["op"], r["host"], r["context_tokens"]): r for r in doc["rows"]}
        for context in (128, 512, 1024, 2048):
            sim = simulated_costs(cost, spec, context, ("pinned", "pageable"), int(doc["meta"]["sim_draws"]), int(doc["meta"]["seed"]))
            for op, host in (("reflect_preserve", None), ("reflect_discard", None),
                             ("reflect_after_swap", "pinned"), ("reflect_after_swap", "pageable")):
                r = rows[(op, host, context)]
                real_s, sim_s = r["real_mean_s"], sim[(op, host)]
                swap_real = rows[("swap_in", host, context)]["real_mean_s"] if host else 0.0
                swap_sim = sim[("swap_in", host)] if host else 0.0
                binds, value, other = kv_parts(cost, op, context)
                label = op.replace("reflect_", "") + (f" ({host})" if host else "")
                pass_err = ((sim_s - swap_sim) / (real_s - swap_real) - 1) * 100
                print(f"| {run} | {label} | {context} | {ms(real_s)} | {ms(sim_s)} | {(sim_s / real_s - 1) * 100:+.1f}% "
                      f"| {ms(swap_real) if host else ''} | {ms(swap_sim) if host else ''} | {ms(real_s - swap_real)} "
                      f"| {ms(sim_s - swap_sim)} | {binds} ({ms(value)} / {ms(other)}) | {pass_err:+.1f}% |")


def part_b_level() -> None:
    """The same 16-token pass as its calibration measured it (stage cached_prefill, batch 1, median),
    beside the real REFLECT on the resident cache minutes later."""
    print("\nThe 16-token pass on a resident cache (reflect_preserve), ms: the calibration's own measurement of the same "
          "shape (stage `cached_prefill`, batch 1, median) against the real one minutes later\n")
    print("| KV run | calibration | C | calibration ms | real ms | real / calibration | sim ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run, cal in (("run 5", "h200-run5"), ("run 6", "h200-run10")):
        doc = json.loads(KV[run][0].read_text())
        rows = {(r["op"], r["context_tokens"]): r for r in doc["rows"]}
        samples = pd.read_csv(_samples(ROOT / "docs/calibration" / cal / "h200-llama-2-7b.json"))
        cp = samples[(samples["stage"] == "cached_prefill") & (samples["batch"] == 1) & (samples["prompt_tokens"] == REFLECT_TOKENS)]
        for context in (128, 512, 1024):
            cal_s = float(cp[cp["context"] == context]["value"].median())
            r = rows[("reflect_preserve", context)]
            print(f"| {run} | {cal} | {context} | {ms(cal_s)} | {ms(r['real_mean_s'])} | {r['real_mean_s'] / cal_s:.2f} | {ms(r['sim_s'])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/run10-traces"))
    args = ap.parse_args()
    part_a(args.out)
    part_b()
    part_b_level()


if __name__ == "__main__":
    main()
