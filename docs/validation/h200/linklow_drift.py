"""Why link-low's simulation moved between H200 runs 6 and 10 while the real runs did not.

    python docs/validation/h200/linklow_drift.py [--out /tmp/linklow-drift]

Reads the committed runs only (no GPU). Three tables, printed:

1. Cross-judging: run 6's and run 10's real link-low records re-simulated (`djinnsim validate
   --from-real`, this code) on the profile each run was judged with live, and on the other's.
2. Swaps: run 6's profile turned into run 10's one group of fields at a time (cumulative, in the
   order listed in SWAPS), plus a few single changes to run 10's profile; each re-judges both runs'
   real records. A part's column moves only when the field that sets it changes, so each row's
   difference from the row above is that group's share of the drift. Band draws are off (--bands 0):
   the point estimates do not depend on them.
3. Per message: partially_aware's host time in series with the paced wire, per step (message size),
   real (each direction's time less its bytes at the emulated rate and half the RTT, median over the
   repeats, both rates) against what each profile charges a message of that size over loopback
   (Link.costs_s: per-message time plus the loopback path, or serialize plus the series rate, plus
   half the RTT and deserialize, less the RTT half, as the real figure is).
4. By rate: the same real figure per MB at 2, 4, 25 and 100 Gbps (runs 6, 7, 9, 10), beside run 10's
   profile's charge, to show where the loopback path's charge holds and where it does not.

Every variant profile is written under --out with its samples CSV beside it. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from djinnsim.validate.offline import records_file

from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.profile import load_profile, save_profile
from djinnsim.sim.specs import get_model

HERE = Path(__file__).resolve().parent
RUNS = {6: HERE / "run6" / "link-low", 10: HERE / "run10" / "link-low"}
PROFILE = "calibration/h200-llama-2-7b-heldout.json"
RUN6_PATH = HERE / "link-path" / "calibration" / "run6" / "h200-llama-2-7b-heldout.json"  # run 6's own path (in-sample refit)
PARTS = ("uplink_s", "downlink_s", "copy_s", "compute_s")
RTT_S = 0.2e-3  # link_low.yaml
# run 6's profile becomes run 10's a group at a time; the network without its path first, so the
# path's row is the change dbb5d0e made (the path charged in place of serialize and the series rate)
SWAPS = (
    ("copies", ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")),
    ("decode fit", ("decode_step",)),
    ("jitter sequence", ("jitter_decode_sequence", "jitter_decode")),
    ("serde, cap, series rate", ("serialize", "deserialize", "network-no-path")),
    ("loopback_path", ("network",)),
)


def swap(base, other, fields):
    update = {}
    for field in fields:
        if field == "network-no-path":
            update["network"] = other.network.model_copy(update={"loopback_path": None})
        else:
            update[field] = getattr(other, field)
    return base.model_copy(update=update)


def write(profile, source: Path, out: Path) -> Path:
    """The profile at `out`/name of `source`, with `source`'s samples CSV beside it."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / source.name
    save_profile(profile, target)
    if profile.samples_file:
        shutil.copy(source.parent / profile.samples_file, out / profile.samples_file)
    return target


def judge(run: int, profile: Path, out: Path) -> dict:
    """Per point: the simulated parts' means per request (ms), per-token latency sim and real (ms)."""
    subprocess.run([sys.executable, "-m", "djinnsim", "validate", "--from-real", str(RUNS[run]),
                    "--calibration", str(profile), "--out", str(out), "--bands", "0", "--quiet", "--force"],
                   check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "validation.json").read_text())
    result = {}
    for point in report["points"]:
        token = point["metrics"]["per_token_s"]
        result[point["link_gbps"]] = ({part: point["stages_sim"][part] * 1e3 for part in PARTS},
                                      token["sim"] * 1e3, token["real_mean"] * 1e3)
    return result


def print_judged(title: str, rows: list[tuple[str, dict, dict]]) -> None:
    print(f"\n{title}\n")
    print("| profile | Gbps | uplink | downlink | copy | compute | sim per token | vs run 6 real | vs run 10 real |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, on6, on10 in rows:
        for gbps in sorted(on6):
            parts, sim, real6 = on6[gbps]
            real10 = on10[gbps][2]
            print(f"| {name} | {gbps:g} | " + " | ".join(f"{parts[p]:.1f}" for p in PARTS)
                  + f" | {sim:.1f} | {(sim - real6) / real6:+.1%} | {(sim - real10) / real10:+.1%} |")


def host_charge_s(cost: ProfileCostModel, nbytes: float) -> float:
    """What Link.costs_s charges one message over loopback beyond the wire and half the RTT."""
    path_s = cost.stream_path_s(nbytes)
    host_s = path_s if path_s is not None else cost.serialize_s(nbytes) + cost.stream_serial_s(nbytes)
    return cost.per_message_s() + host_s + cost.deserialize_s(nbytes)


def per_message(profiles: dict[str, Path]) -> None:
    frames = []
    for run, folder in RUNS.items():
        df = pd.read_csv(records_file(folder, "records_real.csv"))
        df = df[(df.backend == "partially_aware") & ~df.warmup.astype(bool) & (df.status == "ok") & (df.step > 0)]
        for part, wire in (("uplink_s", "wire_bytes_up"), ("downlink_s", "wire_bytes_down")):
            excess = df[part] - df[wire] * 8 / (df.link_gbps * 1e9) - RTT_S / 2
            frames.append(pd.DataFrame({"run": run, "dir": part[:-len("link_s")], "gbps": df.link_gbps,
                                        "step": df.step, "bytes": df["bytes_up" if part == "uplink_s" else "bytes_down"],
                                        "excess_ms": excess * 1e3}))
    real = pd.concat(frames)
    costs = {name: ProfileCostModel(load_profile(path), get_model(load_profile(path).metadata.model_id))
             for name, path in profiles.items()}
    print("\nPer message: host time in series with the paced wire, ms (real: median over repeats; "
          "profiles: what the link charges a message of that size beyond the wire and RTT/2)\n")
    head = " | ".join(costs)
    print(f"| step | MB up / down | real run 6: 2 Gbps up, down; 4 Gbps up, down | real run 10: the same | {head} (up / down) |")
    print("|---|---|---|---|" + "---|" * len(costs))
    for step in (1, 5, 10, 15, 19):
        sel = real[real.step == step]
        mb_up = sel[sel.dir == "up"].bytes.iloc[0]
        mb_down = sel[sel.dir == "down"].bytes.iloc[0]

        def cell(run):
            s = sel[sel.run == run]
            return ", ".join(f"{s[(s.dir == d) & (s.gbps == g)].excess_ms.median():.1f}" for g in (2.0, 4.0) for d in ("up", "down"))

        charged = " | ".join(f"{host_charge_s(c, mb_up) * 1e3:.1f} / {host_charge_s(c, mb_down) * 1e3:.1f}"
                             for c in costs.values())
        print(f"| {step} | {mb_up / 1e6:.1f} / {mb_down / 1e6:.1f} | {cell(6)} | {cell(10)} | {charged} |")
    print("\nPer MB (least squares through zero over every step after the first, both rates, both directions):\n")
    for run in RUNS:
        s = real[real.run == run]
        mb = s.bytes.to_numpy() / 1e6
        print(f"- real run {run}: {np.sum(mb * s.excess_ms.to_numpy()) / np.sum(mb * mb):.3f} ms/MB")
    sizes = np.sort(real[real.run == 10].bytes.unique())  # the messages both runs sent
    for name, c in costs.items():
        charged = np.array([host_charge_s(c, b) for b in sizes]) * 1e3
        mb = sizes / 1e6
        per_mb = charged / mb
        print(f"- {name}: {np.sum(mb * charged) / np.sum(mb * mb):.3f} ms/MB (from {per_mb.min():.3f} to {per_mb.max():.3f} "
              f"over {mb.min():.1f}-{mb.max():.1f} MB)")


def by_rate() -> None:
    """Each rate's real host time beyond the emulated wire per MB (partially_aware, both directions),
    beside what run 10's profile charges there: where the wire is slower than the loopback cap, the
    path alone; where it is faster, the path plus the bytes at the cap less those at the line rate."""
    folders = [HERE / f"run{n}" / item for n, item in ((6, "link-low"), (10, "link-low"), (6, "exp21-25"), (7, "exp21-25"),
                                                       (9, "exp21-25"), (6, "link-100"), (7, "link-100"))]
    p10 = load_profile(RUNS[10] / PROFILE)
    cost = ProfileCostModel(p10, get_model(p10.metadata.model_id))
    cap_s_per_byte = 1 / (p10.network.loopback_gbps * 1e9)
    print("\nBy rate: real host time beyond the emulated wire, ms/MB (least squares through zero, both directions, "
          "steps after the first), and what run 10's profile charges for the same messages\n")
    print("| real run | Gbps | real ms/MB | run 10's profile ms/MB |")
    print("|---|---|---|---|")
    for folder in folders:
        df = pd.read_csv(records_file(folder, "records_real.csv"))
        df = df[(df.backend == "partially_aware") & ~df.warmup.astype(bool) & (df.status == "ok") & (df.step > 0)]
        for gbps in sorted(df.link_gbps.unique()):
            d = df[df.link_gbps == gbps]
            wire_s_per_byte = 8 / (gbps * 1e9)
            mb, excess, charged = [], [], []
            for part, nbytes, wire in (("uplink_s", "bytes_up", "wire_bytes_up"), ("downlink_s", "bytes_down", "wire_bytes_down")):
                mb.append(d[nbytes].to_numpy() / 1e6)
                excess.append((d[part] - d[wire] * wire_s_per_byte - RTT_S / 2).to_numpy() * 1e3)
                hidden = np.maximum(cap_s_per_byte - wire_s_per_byte, 0.0) * d[wire].to_numpy()
                charged.append((np.array([host_charge_s(cost, b) for b in d[nbytes]]) + hidden) * 1e3)
            mb, excess, charged = (np.concatenate(x) for x in (mb, excess, charged))
            print(f"| {folder.parent.name} {folder.name} | {gbps:g} | {np.sum(mb * excess) / np.sum(mb * mb):.3f} | "
                  f"{np.sum(mb * charged) / np.sum(mb * mb):.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/linklow-drift"))
    out = parser.parse_args().out
    print("# link-low: run 6's simulation against run 10's, by profile field\n")
    print("Made by `python docs/validation/h200/linklow_drift.py` (reads the committed runs; no GPU). Written after "
          "seeing run 10: a diagnosis, no figure here is held out.")
    p6_path, p10_path = RUNS[6] / PROFILE, RUNS[10] / PROFILE
    p6, p10 = load_profile(p6_path), load_profile(p10_path)

    cross = []
    for name, path in (("run 6 (as judged live)", p6_path), ("run 10 (as judged live)", p10_path)):
        tag = name.split(" (")[0].replace(" ", "")
        cross.append((name, judge(6, path, out / f"cross/{tag}-run6"), judge(10, path, out / f"cross/{tag}-run10")))
    print_judged("Cross-judged (this code; each run's real records on each profile)", cross)

    rows, current, variants = [], p6, {}
    rows.append(("run 6", *cross[0][1:]))
    for i, (label, fields) in enumerate(SWAPS):
        current = swap(current, p10, fields)
        path = write(current, p6_path, out / f"swap{i + 1}")
        rows.append((f"+ run 10's {label}", judge(6, path, out / f"swap{i + 1}/run6"), judge(10, path, out / f"swap{i + 1}/run10")))
    variants["run 10 without its path"] = p10.model_copy(update={"network": p10.network.model_copy(update={"loopback_path": None})})
    rows_80_104 = [row for row in p10.network.loopback_path if not 40e6 < row[0] < 56e6]
    variants["run 10, path without the 40 and 52 MiB rows"] = p10.model_copy(
        update={"network": p10.network.model_copy(update={"loopback_path": rows_80_104})})
    own6 = load_profile(RUN6_PATH).network.loopback_path
    variants["run 6 with its own path (link-path/)"] = p6.model_copy(update={"network": p6.network.model_copy(update={"loopback_path": own6})})
    variants["run 10 with run 6's path"] = p10.model_copy(update={"network": p10.network.model_copy(update={"loopback_path": own6})})
    variants["run 10 with run 6's decode fit and sequence"] = swap(p10, p6, ("decode_step", "jitter_decode_sequence", "jitter_decode"))
    paths = {}
    for i, (label, profile) in enumerate(variants.items()):
        source = p6_path if label.startswith("run 6") else p10_path
        paths[label] = path = write(profile, source, out / f"single{i + 1}")
        rows.append((label, judge(6, path, out / f"single{i + 1}/run6"), judge(10, path, out / f"single{i + 1}/run10")))
    print_judged("Run 6's profile turned into run 10's (cumulative), then single changes (parts: mean ms per request)", rows)

    per_message({"run 6": p6_path, "run 6 + own path": paths["run 6 with its own path (link-path/)"],
                 "run 10": p10_path, "run 10 without path": paths["run 10 without its path"],
                 "run 10 path w/o 40, 52 MiB": paths["run 10, path without the 40 and 52 MiB rows"]})
    by_rate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
