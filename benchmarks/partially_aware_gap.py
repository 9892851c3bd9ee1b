"""partially_aware's per-step miss on a paced loopback link: the records' stages, the composition
stage's paced rows against the same step in validate's real runs, and an IN-SAMPLE what-if profile.

    python benchmarks/partially_aware_gap.py --records DIR [DIR ...] [--profile PROFILE] [--out DIR]

--records: validation folders (records_real.csv and records_sim.csv, plain or gzipped), partially_aware's
  steps after the first (t = 0 sends the prompt), warm-up runs and failures left out, per link rate:
  the median and mean of each stage real / simulated; the link (uplink + downlink) beyond the wire
  at min(rate, the profile's loopback cap), per MB both ways; per repeat, that gap beside the real
  compute over the simulated (the level the point ran at) and the level probe's factors.
--profile: a profile with composition_paced rows (end_to_end): per rate, the row's step, its server
  (h2d, compute, d2h), its link beyond the wire per MB, what the profile charges for the same link
  (sim/engine/link.py: per message + stream_path_s + the wire + deserialize, each way), and the
  copies stage's charge for the same tensors (what validate's real copies track) against the row's own.
--out: a copy of --profile (and its samples file) whose paced_path is raised at each rate by the
  row's copies shortfall per byte (the copies charge - the row's h2d and d2h, over the bytes both
  ways): the row's server found warm host pages where validate's server finds fresh ones, taken as
  costing the host path's buffers as much. Written after seeing H200 runs 12-14: IN-SAMPLE for them.
--first-touch: this machine's cost of a new buffer's fresh pages against a kept one's.
Reads files only (writes only under --out); prints. Not a test.

H200 run 14 (its records and pooled profile, read on the 2-core CPU machine, 2026-12-03), medians
real - simulated per step: link (up and down summed) +20.4, +18.8, +27.7, +25.1 ms; copy +5.7, +8.6, +2.0,
+6.0; compute +3.8, +10.5, +2.7, +7.1; the unsimulated hand-off (queue) +1.6 to +2.0, at 2, 4, 25
and 100 Gbps. The link beyond the wire: +0.246, +0.239, +0.265, +0.244 ms/MB (runs 12 and 13, the
old paced rows: +0.14 to +0.38). The paced rows (L=104) charge exactly what they measured (0.450,
0.519, 0.489, 0.573, 0.655 ms/MB beyond the wire); validate took 0.72-0.93 for that step's bytes.
Their server's copies took 13.1-15.7 ms (d2h 4.5-4.9 ms for 54.6 MB) where validate's server took
46.7 at the same step and the copies stage charges 42.9: a shortfall of 0.250-0.274 ms/MB over
the bytes both ways, the size of the link gap (runs 12 and 13's rows: d2h 27-47 ms, no shortfall).
First touch on the CPU machine: 0.29-0.36 ms/MB for fresh pages. IN-SAMPLE re-judge (--out, then
`djinnsim validate --from-real`): mean error -7.9 -> -2.9%, -13.4 -> -6.5%, -16.5 -> -3.5%,
-18.2 -> -6.1%; PASS 13 -> 10, 12 -> 13, 4 -> 5 (link-low, exp21-25, link-100), band coverage
92 -> 82%, 73 -> 59%, 56 -> 48% (the bands widen upward with the path).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from djinnsim.validate.offline import records_file

PARTS = ("connect_s", "uplink_s", "queue_s", "copy_s", "compute_s", "downlink_s", "latency_s")
RATES = (2.0, 4.0, 10.0, 25.0, 100.0)


def _steps(folder: Path, kind: str) -> pd.DataFrame:
    name = f"records_{kind}.csv"
    path = records_file(folder, name)
    if path is None:
        raise SystemExit(f"{folder}: no {name} (nor {name}.gz)")
    df = pd.read_csv(path)
    keep = (df.backend == "partially_aware") & ~df.warmup.astype(bool) & (df.status == "ok") & (df.step > 0)
    return df[keep]


def _beyond_wire_ms_per_mb(df: pd.DataFrame, wire_ms_per_mb: float) -> pd.Series:
    mb = (df.bytes_up + df.bytes_down) / 1e6
    return ((df.uplink_s + df.downlink_s) * 1e3 - mb * wire_ms_per_mb) / mb


def _probe_factors(folder: Path, gbps: float) -> tuple[float | None, float | None]:
    try:
        rows = json.loads((folder / "validation.json").read_text()).get("anchored", {}).get("rows", [])
    except (OSError, ValueError):
        return None, None
    for row in rows:
        if row["label"].startswith("partially_aware") and row["label"].endswith(f"__{gbps:g}gbps"):
            return row.get("factor"), row.get("factor_after")
    return None, None


def records(folder: Path, cap_Bps: float, step_context: int) -> list[dict]:
    real, sim = _steps(folder, "real"), _steps(folder, "sim")
    repeats = []
    for gbps in sorted(real.link_gbps.unique()):
        r, s = real[real.link_gbps == gbps], sim[sim.link_gbps == gbps]
        wire = 1e3 / (min(gbps * 1e9 / 8, cap_Bps) / 1e6)  # ms per MB
        print(f"{folder}  {gbps:g} Gbps  ({len(r)} real / {len(s)} simulated steps, "
              f"{((r.bytes_up + r.bytes_down) / 1e6).mean():.1f} MB both ways a step on average)")
        print(f"   {'stage':11} {'real p50':>9} {'sim p50':>8} {'diff':>7} | {'real mean':>9} {'sim mean':>8} {'diff':>7}  ms")
        for part in PARTS:
            a, b, c, d = r[part].median() * 1e3, s[part].median() * 1e3, r[part].mean() * 1e3, s[part].mean() * 1e3
            print(f"   {part:11} {a:9.1f} {b:8.1f} {a - b:+7.1f} | {c:9.1f} {d:8.1f} {c - d:+7.1f}")
        rb, sb = _beyond_wire_ms_per_mb(r, wire), _beyond_wire_ms_per_mb(s, wire)
        print(f"   link beyond the wire ({wire:.3f} ms/MB): real {rb.median():.3f}, simulated {sb.median():.3f}, "
              f"gap {rb.median() - sb.median():+.3f} ms/MB (medians over steps)")
        key = ["repeat", "run", "step"]
        both = r.set_index(key).join(s.set_index(key), how="inner", rsuffix="_sim")  # the same step, real and simulated
        mb = (both.bytes_up + both.bytes_down) / 1e6
        gap_ms = (both.uplink_s + both.downlink_s - both.uplink_s_sim - both.downlink_s_sim) * 1e3
        slope, icpt = np.polyfit(mb, gap_ms, 1)
        through_0 = float(np.sum(mb * gap_ms) / np.sum(mb * mb))
        rmse = lambda e: float(np.sqrt(np.mean(e ** 2)))  # noqa: E731
        print(f"   link gap per step over {mb.min():.0f}-{mb.max():.0f} MB: {icpt:+.1f} ms + {slope:.3f} ms/MB (rmse "
              f"{rmse(gap_ms - icpt - slope * mb):.1f}); {through_0:.3f} ms/MB alone (rmse {rmse(gap_ms - through_0 * mb):.1f}); "
              f"{gap_ms.mean():.1f} ms flat (rmse {rmse(gap_ms - gap_ms.mean()):.1f})")
        rr, ss = r[r.context_tokens == step_context], s[s.context_tokens == step_context]
        if len(rr) and len(ss):
            med = lambda df, cols: sum(df[c] for c in cols).median() * 1e3  # noqa: E731
            print(f"   the step at context {step_context} ({len(rr)} real), medians real / simulated: link "
                  f"{med(rr, ['uplink_s', 'downlink_s']):.1f} / {med(ss, ['uplink_s', 'downlink_s']):.1f}, copy "
                  f"{med(rr, ['copy_s']):.1f} / {med(ss, ['copy_s']):.1f}, compute {med(rr, ['compute_s']):.1f} / "
                  f"{med(ss, ['compute_s']):.1f}, step {med(rr, ['latency_s']):.1f} / {med(ss, ['latency_s']):.1f} ms")
        before, after = _probe_factors(folder, gbps)
        probes = f"level probe x{before:.3f} before, x{after:.3f} after" if before and after else "no level probe"
        print(f"   per repeat: link gap ms/MB, real compute / simulated, copy gap ms (medians); {probes}")
        cells = []
        for rep in sorted(r.repeat.unique()):
            rr, ss = r[r.repeat == rep], s[s.repeat == rep]
            gap = _beyond_wire_ms_per_mb(rr, wire).median() - _beyond_wire_ms_per_mb(ss, wire).median()
            level = rr.compute_s.median() / ss.compute_s.median()
            copy = (rr.copy_s.median() - ss.copy_s.median()) * 1e3
            cells.append(f"{rep}: {gap:+.3f}, x{level:.2f}, {copy:+.1f}")
            repeats.append({"gap": gap, "level": level, "copy_gap": copy, "probe_before": before, "probe_after": after})
        print("      " + "; ".join(cells))
    return repeats


def correlations(repeats: list[dict]) -> None:
    """Pearson r over the repeats of every folder: is the link gap the level (a host-speed drift)?"""
    df = pd.DataFrame(repeats)
    print(f"over {len(df)} repeats: r(link gap, real/simulated compute) {df.gap.corr(df.level):+.2f}, "
          f"r(link gap, copy gap) {df.gap.corr(df.copy_gap):+.2f}, r(copy gap, compute) {df.copy_gap.corr(df.level):+.2f}, "
          f"r(link gap, probe before) {df.gap.corr(df.probe_before.astype(float)):+.2f}, "
          f"r(link gap, probe after) {df.gap.corr(df.probe_after.astype(float)):+.2f}")


def paced_rows(profile_path: Path, out: Path | None) -> None:
    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.sim.profile import load_profile, samples_path, save_profile
    from djinnsim.calibrate.composition import step_shape
    from djinnsim.sim.specs import get_model

    profile = load_profile(profile_path)
    spec = get_model(profile.metadata.model_id)
    cost = ProfileCostModel(profile, spec)
    e2e = profile.end_to_end
    cap_Bps = profile.network.loopback_gbps * 1e9
    print(f"{profile_path}: composition_paced partially_aware rows (ms; per MB over the bytes both ways)")
    print(f"   {'Gbps':>5} {'L':>4} {'step':>6} {'h2d':>5} {'comp':>5} {'d2h':>5} {'link':>6} {'beyond':>6} {'ms/MB':>6} | "
          f"{'charged':>7} {'ms/MB':>6} | {'copies fit':>10} {'row':>5} {'short':>5} {'ms/MB':>6}")
    raised = {}
    for gbps in RATES:
        contexts = sorted(int(k.split(".")[2][1:]) for k in e2e if k.startswith("composition_paced.partially_aware.L")
                          and k.endswith(f".{gbps:g}gbps.measured_s"))
        for context in contexts:
            key = f"composition_paced.partially_aware.L{context}.{gbps:g}gbps"
            shape = step_shape("partially_aware", spec, context)
            up, down = shape.up_bytes, shape.down_bytes
            both_mb = (up + down) / 1e6
            h2d, compute, d2h = (e2e[f"{key}.server_{p}_s"] * 1e3 for p in ("h2d", "compute", "d2h"))
            step = e2e[f"{key}.measured_s"] * 1e3
            wire = (up + down) / min(gbps * 1e9 / 8, cap_Bps) * 1e3
            link = step - h2d - compute - d2h
            charged = sum(cost.per_message_s() + cost.stream_path_s(b, gbps) + b / min(gbps * 1e9 / 8, cap_Bps)
                          + cost.deserialize_s(b) for b in (up, down)) * 1e3
            fit = (cost.copy_s(up, "h2d", pinned=False) + cost.copy_s(down, "d2h", pinned=False)) * 1e3
            short = max(fit - h2d - d2h, 0.0)
            raised.setdefault(gbps, []).append(short / both_mb * 1e-9)  # seconds per byte
            print(f"   {gbps:5g} {context:4d} {step:6.1f} {h2d:5.1f} {compute:5.1f} {d2h:5.1f} {link:6.1f} {link - wire:6.1f} "
                  f"{(link - wire) / both_mb:6.3f} | {charged:7.1f} {(charged - wire) / both_mb:6.3f} | "
                  f"{fit:10.1f} {h2d + d2h:5.1f} {short:5.1f} {short / both_mb:6.3f}")
    if out is None or profile.network.paced_path is None:
        return
    paced = [(g, s + float(np.median(raised.get(g, [0.0])))) for g, s in profile.network.paced_path]
    print("   IN-SAMPLE what-if paced_path (ms/MB): "
          + ", ".join(f"{g:g} Gbps {s * 1e9:.3f} -> {t * 1e9:.3f}" for (g, s), (_, t) in zip(profile.network.paced_path, paced)))
    network = profile.network.model_copy(update={"paced_path": paced})
    out.mkdir(parents=True, exist_ok=True)
    save_profile(profile.model_copy(update={"network": network}), out / profile_path.name)
    csv = samples_path(profile, profile_path)
    if csv is not None:
        shutil.copy(csv, out / csv.name)
    print(f"   wrote {out / profile_path.name}")


def first_touch(nbytes: int = 54_589_952, repeats: int = 15) -> None:
    """This machine's cost of a buffer's fresh pages: a new bytearray the size of the L=104 reply,
    filled by one copy, against the same copy into a buffer kept (ms per MB, median, minor faults)."""
    import resource
    import statistics
    import time

    src = np.ones(nbytes, dtype=np.uint8)
    kept = bytearray(nbytes)

    def timed(fill) -> tuple[float, int]:
        runs = []
        for _ in range(repeats):
            faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            fill()
            runs.append((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
        return statistics.median(t for t, _ in runs) * 1e3 / (nbytes / 1e6), statistics.median(f for _, f in runs)

    def fresh() -> None:
        memoryview(bytearray(nbytes))[:] = src.data

    def warm() -> None:
        memoryview(kept)[:] = src.data

    (f_ms, f_faults), (w_ms, w_faults) = timed(fresh), timed(warm)
    print(f"first touch, {nbytes / 1e6:.1f} MB: fresh {f_ms:.3f} ms/MB ({f_faults} faults), kept {w_ms:.3f} ms/MB "
          f"({w_faults} faults): {f_ms - w_ms:.3f} ms/MB for fresh pages")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", nargs="*", default=[], type=Path)
    parser.add_argument("--profile", type=Path, help="the profile the records were judged on (its loopback cap; its paced rows)")
    parser.add_argument("--step-context", type=int, default=103,
                        help="also the records' step with this many tokens of KV sent up (103: the paced rows' L=104 step)")
    parser.add_argument("--out", type=Path, help="write the IN-SAMPLE what-if copy of --profile here")
    parser.add_argument("--first-touch", action="store_true", help="time this machine's fresh pages against kept ones")
    args = parser.parse_args()
    for path in [*args.records, *([args.profile] if args.profile else [])]:
        if not path.exists():
            print(f"no such file or folder: {path}", file=sys.stderr)
            return 1
    if args.out and not args.profile:
        print("--out needs --profile", file=sys.stderr)
        return 1
    cap_Bps = float("inf")
    if args.profile:
        cap_Bps = json.loads(args.profile.read_text())["network"]["loopback_gbps"] * 1e9
    repeats = [row for folder in args.records for row in records(folder, cap_Bps, args.step_context)]
    if len(repeats) > 2:
        correlations(repeats)
    if args.profile:
        paced_rows(args.profile, args.out)
    if args.first_touch:
        first_touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
