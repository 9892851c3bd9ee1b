"""Where partially_aware's per-token time goes, real against simulated, from runs already made.

    python benchmarks/partially_aware_host.py --records DIR [DIR ...] --calibration LOG [LOG ...]

For each validation folder (records_real.csv and records_sim.csv of one `djinnsim validate`, plain
or gzipped as committed): partially_aware's steps after the first (t = 0 sends the prompt, not a
KV), warm-up runs and failures left out, per link rate: the mean of each record component real /
simulated, then uplink_s and downlink_s fitted per step as a + b * MB (the KV grows 0.5 MB a step),
b beside the emulated wire's 1 / rate. For each calibrate.log: the composition stage's partially_aware rows
(validate's own kind of server process, a new connection per request, no pacing), the host path
being measured - server h2d - compute - d2h, per MB each way, beside what the stage predicted for
the same path (connect + serialize + bytes / loopback cap + deserialize), and the loopback stage's
largest-size up and down. Reads files only; prints. Not a test.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from djinnsim.validate.offline import records_file

PARTS = ("connect_s", "uplink_s", "queue_s", "copy_s", "compute_s", "downlink_s", "latency_s")
MS = r"([\d.]+) (ms|s|us)"


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]


def _steps(folder: Path, kind: str) -> pd.DataFrame:
    name = f"records_{kind}.csv"
    path = records_file(folder, name)
    if path is None:
        raise SystemExit(f"{folder}: no {name} (nor {name}.gz)")
    df = pd.read_csv(path)  # a .gz decompressed (pandas infers it from the name)
    keep = (df.backend == "partially_aware") & ~df.warmup.astype(bool) & (df.status == "ok") & (df.step > 0)
    return df[keep]


def records(folder: Path) -> None:
    real, sim = _steps(folder, "real"), _steps(folder, "sim")
    if real.empty:
        print(f"{folder}: no partially_aware steps")
        return
    for gbps in sorted(real.link_gbps.unique()):
        r, s = real[real.link_gbps == gbps], sim[sim.link_gbps == gbps]
        per_mb_wire = 8e3 / (gbps * 1e9) * 1e6  # ms per MB at the emulated rate
        print(f"{folder}  {gbps:g} Gbps  ({len(r)} real / {len(s)} simulated steps, "
              f"KV {r.bytes_up.min() / 1e6:.1f}-{r.bytes_up.max() / 1e6:.1f} MB up)")
        print("   part         real ms    sim ms   real-sim")
        for part in PARTS:
            a, b = r[part].mean() * 1e3, s[part].mean() * 1e3
            print(f"   {part:11} {a:8.1f}  {b:8.1f}  {a - b:+8.1f}")
        for part, nbytes in (("uplink_s", "bytes_up"), ("downlink_s", "bytes_down")):
            fits = []
            for name, df in (("real", r), ("sim", s)):
                slope, icpt = np.polyfit(df[nbytes].to_numpy() / 1e6, df[part].to_numpy() * 1e3, 1)
                fits.append(f"{name} {icpt:+6.1f} ms + {slope:.3f} ms/MB")
            print(f"   {part:11} per step: {'; '.join(fits)}; wire 1/rate {per_mb_wire:.3f} ms/MB")


def serial_and_max(folders: list[Path]) -> None:
    """Fit each direction's link time over every step of `folders` as bytes * (s + max(1/rate, c)):
    s a host cost per MB in series with the wire, c the host stack's own ms per MB, which the
    emulated rate hides when slower (the simulator's form is s = serialize, c = 1 / loopback cap)."""
    for kind in ("real", "sim"):
        frames = [_steps(folder, kind) for folder in folders]
        df = pd.concat(frames)
        for part, nbytes in (("uplink_s", "bytes_up"), ("downlink_s", "bytes_down")):
            mb = df[nbytes].to_numpy() / 1e6
            wire = 8e3 / (df.link_gbps.to_numpy() * 1e9) * 1e6
            ms = df[part].to_numpy() * 1e3
            best = None
            for c in np.linspace(0.0, 3.0, 3001):
                x = mb * np.maximum(wire, c)
                s = max(float(np.sum(mb * (ms - x)) / np.sum(mb * mb)), 0.0)
                err = float(np.sqrt(np.mean((ms - mb * s - x) ** 2)))
                if best is None or err < best[0]:
                    best = (err, s, c)
            err, s, c = best
            print(f"{kind:4} {part:10}: s {s:.3f} ms/MB in series, c {c:.3f} ms/MB ({1 / c if c else float('inf'):.2f} GB/s), "
                  f"rmse {err:.1f} ms over {len(ms)} steps at {', '.join(f'{g:g}' for g in sorted(df.link_gbps.unique()))} Gbps")


COMPOSITION = re.compile(
    rf"composition partially_aware L=\s*(\d+): measured p50 {MS} .*?\| predicted\s+([\d.]+) ms .*?"
    rf"server h2d {MS}, compute {MS} \(predicted [\d.]+\), d2h {MS}; up ([\d.]+) MB, down ([\d.]+) MB")
LOOPBACK = re.compile(rf"tcp loopback\s+([\d.]+) MiB: up p50 {MS} .*?\| down p50 {MS}")
CAP = re.compile(r"tcp loopback: .*?([\d.]+) GB/s")
SERIALIZE = re.compile(r"fit serialize: ([\d.]+) us \+ bytes / ([\d.]+) GB/s")


def calibration(log: Path, profile_path: Path | None = None, out: Path | None = None, with_path: bool = False) -> None:
    lines = log.read_text().splitlines()
    text = " ".join(line.rstrip() for line in lines)  # the log wraps long lines
    text = re.sub(r" {2,}", " ", text)
    print(f"{log}")
    if m := SERIALIZE.search(text):
        print(f"   serialize fit {float(m[1]):.1f} us + bytes / {float(m[2]):.2f} GB/s")
    sizes = LOOPBACK.findall(text)
    if sizes:
        mib, up, up_u, down, down_u = sizes[-1]
        mb = float(mib) * 2**20 / 1e6
        print(f"   loopback stage at {float(mib):g} MiB: up {_seconds(up, up_u) * 1e3 / mb:.3f} ms/MB, "
              f"down {_seconds(down, down_u) * 1e3 / mb:.3f} ms/MB (pack not included)")
    if m := CAP.search(text):
        print(f"   loopback cap {float(m[1]):.2f} GB/s = {1 / float(m[1]):.3f} ms/MB")
    rows = []
    for m in COMPOSITION.finditer(text):
        seq_len = int(m[1])
        measured = _seconds(m[2], m[3])
        predicted = float(m[4]) * 1e-3
        h2d, compute, d2h = _seconds(m[5], m[6]), _seconds(m[7], m[8]), _seconds(m[9], m[10])
        up, down = float(m[11]), float(m[12])
        host = measured - h2d - compute - d2h
        print(f"   composition L={seq_len:>5}: measured {measured * 1e3:7.1f} ms, predicted {predicted * 1e3:7.1f} ms "
              f"(x{measured / predicted:.2f}); server h2d {h2d * 1e3:.1f} + compute {compute * 1e3:.1f} + "
              f"d2h {d2h * 1e3:.1f} ms; host path {host * 1e3:.1f} ms for {up:.1f} + {down:.1f} MB = "
              f"{host * 1e3 / (up + down):.3f} ms/MB each way")
        rows.append((seq_len, measured, {"h2d_s": h2d, "compute_s": compute, "d2h_s": d2h}))
    if profile_path is not None:
        serial_from_profile(rows, profile_path, out, with_path)


def serial_from_profile(logged: list, profile_path: Path, out: Path | None, with_path: bool = False) -> None:
    """calibrate's loopback_serial_gbps (and loopback_path) from the logged composition rows, the link
    parts predicted with `profile_path`'s primitives; with `out`, a copy of the profile (and its
    samples CSV) with the first (`with_path`: with both)."""
    import shutil

    from djinnsim.calibrate.composition import composition_row, describe_path, loopback_path, loopback_serial_gbps
    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.sim.profile import load_profile, samples_path, save_profile
    from djinnsim.sim.specs import get_model

    profile = load_profile(profile_path)
    spec = get_model(profile.metadata.model_id)
    cost = ProfileCostModel(profile, spec)
    rows = [composition_row(cost, profile.network.loopback_gbps, spec, seq_len, measured, server)
            for seq_len, measured, server in logged]
    gbps, path = loopback_serial_gbps(rows), loopback_path(rows)
    print(f"   loopback_serial_gbps with {profile_path}: {gbps if gbps is None else f'{gbps:.3f}'}"
          + (f" GB/s = {1 / gbps:.3f} ms/MB" if gbps else ""))
    print(f"   loopback_path: {'none' if path is None else describe_path(path)}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        network = profile.network.model_copy(update={"loopback_serial_gbps": gbps,
                                                      **({"loopback_path": path} if with_path else {})})
        save_profile(profile.model_copy(update={"network": network}), out / profile_path.name)
        csv = samples_path(profile, profile_path)
        if csv is not None and csv.exists():
            shutil.copy(csv, out / csv.name)
        print(f"   wrote {out / profile_path.name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", nargs="*", default=[], type=Path)
    parser.add_argument("--calibration", nargs="*", default=[], type=Path)
    parser.add_argument("--profile", nargs="*", default=[], type=Path,
                        help="one profile per --calibration log: compute calibrate's loopback_serial_gbps with it")
    parser.add_argument("--out", nargs="*", default=[], type=Path, help="one folder per --profile: write a copy with it")
    parser.add_argument("--with-path", action="store_true",
                        help="the copies written by --out also get calibrate's loopback_path (the host path with serialization)")
    parser.add_argument("--fit", action="store_true", help="fit s + max(1/rate, c) over all --records folders")
    args = parser.parse_args()
    if len(args.profile) not in (0, len(args.calibration)) or len(args.out) not in (0, len(args.profile)):
        print("--profile needs one per --calibration, --out one per --profile", file=sys.stderr)
        return 1
    for path in [*args.records, *args.calibration, *args.profile]:
        if not path.exists():
            print(f"no such file or folder: {path}", file=sys.stderr)
            return 1
    for folder in args.records:
        records(folder)
    for i, log in enumerate(args.calibration):
        calibration(log, args.profile[i] if args.profile else None, args.out[i] if args.out else None, args.with_path)
    if args.fit and args.records:
        serial_and_max(args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
