"""Re-judge finished validations by the current rules, with held-out and in-sample counted apart.

    python -m djinnsim.validate.rejudge FOLDER [--out REPORT.md]

FOLDER holds one sub-folder per reference run (`<run>/exp21`, `<run>/agents`: the reports made on
the GPU machine right after the real runs; `<run>/*-resim`: offline re-comparisons by
`djinnsim validate --from-real`). Nothing is simulated here:

- A report as made on the GPU is re-judged from the values it stored (each real repeat's and each
  simulated repeat's metric): the 95% bootstrap interval of the real mean, the 5% / 10% / exact
  targets. It has no prediction band (made before bands existed), so the band half of the mean
  rule cannot pass it. Its figures are held out when its profile was calibrated before its real
  runs (the report names the profile and its date; the simulator was the one of that day) and its
  decode fit does not hold calibrate's own runs of its workload (validate.heldout); else in-sample.
- A re-comparison already carries its verdicts and its held-out / in-sample label.

The report (REPORT.md and REPORT.json beside it) lists every point's mean latency and P99 with
the label, and counts verdicts per label; it records this simulator's version and every profile's
path and sha256.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from djinnsim.errors import DjinnsimError
from djinnsim.sim.profile import load_profile
from djinnsim.sim.provenance import describe_simulator, file_sha256, simulator
from djinnsim.sim.scenario import load_scenario

from . import compare, heldout
from .report import fmt, fmt_err, summary_line

PARTS = ("exp21", "agents")
HEADLINE = ("latency_mean_s", "latency_p99_s")


def _profile_of(folder: Path, meta: dict) -> Path | None:
    named = Path(meta["profile"]["path"])
    for candidate in (folder / "calibration" / named.name, folder.parent / "exp21" / "calibration" / named.name,
                      folder.parent / named.name):
        if candidate.is_file():
            return candidate
    return None


def as_run(folder: Path) -> dict:
    """A report as made on the GPU, re-judged from its stored values by the current rules."""
    doc = json.loads((folder / "validation.json").read_text())
    meta = doc["meta"]
    scenario = load_scenario(folder / "scenario.yaml")
    profile_path = _profile_of(folder, meta)
    why = []
    if profile_path is None:
        why.append("profile: the profile it was judged with is not in the folder")
    else:
        profile = load_profile(profile_path)
        # A validation that calibrates first does so before any real run (its started_at predates the
        # calibration); one given --calibration must name a profile made before it started.
        calibrated, started = profile.metadata.date, meta["started_at"]
        made_here = "calibrated by this validation" in meta["profile"].get("how", "")
        if not made_here and (calibrated is None or datetime.fromisoformat(calibrated) > datetime.fromisoformat(started)):
            why.append("profile: calibrated after the real runs started")
        if heldout.is_exp21_workload(scenario) and heldout.decode_fit_holds_exp21(profile, profile_path):
            why.append("workload: the decode fit holds calibrate's own Exp 2.1 runs of this workload "
                       "(same machine, minutes before the scored runs)")
    label = heldout.label(why)
    points = []
    for row in doc["points"]:
        pc = compare.PointComparison(row["index"], row["label"], row["backend"], row.get("n_agents"), row["link_gbps"],
                                     skipped=row.get("skipped"), sample=label, sample_reasons=why)
        for metric in compare.METRICS:
            stored = row["metrics"].get(metric.name)
            if stored is None:
                continue
            pc.metrics.append(compare.judge(metric, stored.get("sim_values") or [stored.get("sim")],
                                            stored.get("real_values") or []))
        points.append(pc)
    summary = compare.summarize(points)
    for oom in doc.get("oom", []):
        verdict = compare.judge_oom(oom["sim_oom_n"], oom["real_oom_n"], oom["probe_max"])
        compare.add_oom(summary, verdict, label)
    return {"folder": str(folder), "kind": "as run on the GPU, re-judged", "label": label, "reasons": why,
            "profile": None if profile_path is None else {"path": str(profile_path), "sha256": file_sha256(profile_path)},
            "points": points, "summary": summary}


def resim(folder: Path) -> dict:
    """An offline re-comparison: its own verdicts and label, read back."""
    doc = json.loads((folder / "validation.json").read_text())
    meta = doc["meta"]
    points = []
    for row in doc["points"]:
        pc = compare.PointComparison(row["index"], row["label"], row["backend"], row.get("n_agents"), row["link_gbps"],
                                     skipped=row.get("skipped"), sample=row.get("sample", compare.IN_SAMPLE),
                                     sample_reasons=row.get("sample_reasons", []))
        pc.metrics = [compare.Comparison(**{**c, "real_ci": c.get("real_ci")}) for c in row["metrics"].values()]
        points.append(pc)
    sample = meta.get("sample", {"label": compare.IN_SAMPLE, "reasons": ["not recorded"]})
    return {"folder": str(folder), "kind": "re-compared offline by the simulator now", "label": sample["label"],
            "reasons": sample["reasons"], "profile": {"path": meta["profile"]["path"], "sha256": meta["profile"].get("sha256")},
            "points": points, "summary": doc["summary"]}


def _row(run: str, entry: dict, pc: compare.PointComparison) -> str:
    m = {c.metric: c for c in pc.metrics}
    mean, p99 = m.get("latency_mean_s"), m.get("latency_p99_s")
    if mean is None or not mean.real_values:
        return f"| {run} | {pc.label} | {entry['label']} | not run | | | | | | |"
    ci = "N/A" if not mean.real_ci else f"{fmt(mean.real_ci[0], 's')} – {fmt(mean.real_ci[1], 's')}"
    band = "none" if not mean.band else f"{fmt(mean.band[0], 's')} – {fmt(mean.band[1], 's')}"
    return (f"| {run} | {pc.label} | {entry['label']} | {fmt(mean.real_mean, 's')} ({len(mean.real_values)}) | {ci} | "
            f"{fmt(mean.sim, 's')} | {band} | {fmt_err(mean.rel_err)} {mean.verdict} | "
            f"{fmt_err(p99.rel_err) if p99 else 'N/A'} {p99.verdict if p99 else ''} |")


def rejudge(folder: Path) -> tuple[str, dict]:
    entries = []
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        for part in PARTS:
            for sub, reader in ((run / part, as_run), (run / f"{part}-resim", resim)):
                if (sub / "validation.json").is_file():
                    entries.append((run.name, part, reader(sub)))
    if not entries:
        raise DjinnsimError(f"{folder} holds no <run>/exp21 or <run>/agents validation")
    totals = {label: {v: 0 for v in compare.COUNTED} for label in compare.SAMPLES}
    for _, _, entry in entries:
        for label in compare.SAMPLES:
            for verdict in compare.COUNTED:
                totals[label][verdict] += entry["summary"].get(label, {}).get(verdict, 0)
    sim = simulator()
    lines = [f"# {folder.name}: every reference run re-judged by the issue 9 rules", "",
             f"Made by `python -m djinnsim.validate.rejudge {folder}` with {describe_simulator(sim)}. Targets: mean "
             "within 5% of the real mean, or the real mean's 95% bootstrap interval meeting a simulated P10–P90 band "
             "of half-width <= 10%; P99 within 10%; payload bytes exact; keep-alive OOM N exact.", "",
             "| counted | PASS | FAIL | info | N/A |", "|---|---|---|---|---|"]
    for label in compare.SAMPLES:
        t = totals[label]
        lines.append(f"| {label} | {t['PASS']} | {t['FAIL']} | {t['info']} | {t['N/A']} |")
    lines += ["", "## Reports", "", "| run | report | kind | label | why in-sample | profile sha256 | verdicts |",
              "|---|---|---|---|---|---|---|"]
    for run, part, entry in entries:
        profile = entry["profile"] or {}
        lines.append(f"| {run} | `{Path(entry['folder']).name}` | {entry['kind']} | {entry['label']} | "
                     f"{'; '.join(entry['reasons']) or '-'} | `{(profile.get('sha256') or 'N/A')[:16]}` | "
                     f"{summary_line(entry['summary'])} |")
    lines += ["", "## Mean latency and P99, point by point", "",
              "| run | point | label | real mean (repeats) | real 95% CI | sim mean | sim P10–P90 | mean error, verdict | "
              "P99 error, verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for run, part, entry in entries:
        lines += [_row(f"{run} {Path(entry['folder']).name}", entry, pc) for pc in entry["points"]]
    doc = {"simulator": sim, "totals": totals,
           "reports": [{k: v for k, v in entry.items() if k != "points"} | {"run": run, "part": part}
                       for run, part, entry in entries]}
    return "\n".join(lines) + "\n", doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m djinnsim.validate.rejudge", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="report (default: FOLDER/rejudged.md; .json beside it)")
    args = parser.parse_args(argv)
    try:
        text, doc = rejudge(args.folder)
    except (DjinnsimError, OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = args.out or args.folder / "rejudged.md"
    out.write_text(text)
    from .report import write_json

    write_json(doc, out.with_suffix(".json"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
