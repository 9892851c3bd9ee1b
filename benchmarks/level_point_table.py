"""Before / after tables of `calibrate --refit --level-point median`, from validations already made.

    python benchmarks/level_point_table.py DIR

DIR holds fit/<item>/ and median/<item>/: the same real runs (`djinnsim validate --from-real`)
judged on a profile whose point is at its decode fit and on the same profile refitted with
`--level-point median`. Prints markdown: per report, band coverage and PASS count on each side and
the mean of |mean-latency error| over its points; per point, the mean-latency and per-token errors
on each side. Every figure is that of the reports read (their own in-sample labels apply). Reads
files only; prints. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(folder: Path) -> dict:
    return json.loads((folder / "validation.json").read_text())


def _error(point: dict, metric: str) -> float | None:
    m = point["metrics"].get(metric)
    return None if m is None or m.get("rel_err") is None else float(m["rel_err"])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _mean_abs(points: list[dict], metric: str) -> float | None:
    errors = [abs(e) for e in (_error(p, metric) for p in points) if e is not None]
    return sum(errors) / len(errors) if errors else None


IN_SAMPLE_NOTE = ("every figure **in-sample** (`--level-point median` was written after seeing them; the "
                  "reports say why)")


TITLE = "The point at the fit and at the median level"


def tables(root: Path, note: str = IN_SAMPLE_NOTE, sides: tuple[str, str] = ("fit", "median"), title: str = TITLE) -> str:
    b, a = sides
    items = sorted(p.name for p in (root / b).iterdir() if (p / "validation.json").is_file()
                   and (root / a / p.name / "validation.json").is_file())
    if not items:
        raise SystemExit(f"{root}: no item judged both in {b}/ and in {a}/")
    head = [f"# {title}: `{root.as_posix()}`", "",
            f"Real runs on an NVIDIA H200 (each report names its machine), re-simulated on the CPU; {note}. "
            f"Made by `python benchmarks/level_point_table.py` from the reports under `{b}/` and "
            f"`{a}/`; the factor is the `spread.point_level` of the profile the {a} report was judged on.", ""]
    reports = [f"| item | point-level factor | coverage {b} -> {a} | PASS {b} -> {a} (of judged) | "
               f"mean abs mean-latency error {b} -> {a} |", "|---|---|---|---|---|"]
    points = [f"| item | point | mean latency error {b} -> {a} | per-token error {b} -> {a} | "
              "real mean latency |", "|---|---|---|---|---|"]
    for item in items:
        before, after = _load(root / b / item), _load(root / a / item)
        sb, sa = before["summary"], after["summary"]
        judged = sb["PASS"] + sb["FAIL"]
        factor = _factor(after)
        cov = (f"{100 * sb['coverage']:.0f}% -> {100 * sa['coverage']:.0f}%"
               if sb.get("coverage") is not None and sa.get("coverage") is not None else "-")
        reports.append(f"| {item} | {factor} | {cov} | {sb['PASS']} -> {sa['PASS']} (of {judged}) | "
                       f"{_pct(_mean_abs(before['points'], 'latency_mean_s'))} -> "
                       f"{_pct(_mean_abs(after['points'], 'latency_mean_s'))} |".replace("+", ""))
        by_label = {p["label"]: p for p in after["points"]}
        for p in before["points"]:
            q = by_label.get(p["label"])
            if q is None or p.get("skipped"):
                continue
            real = p["metrics"].get("latency_mean_s", {}).get("real_mean")
            points.append(f"| {item} | {p['label']} | {_pct(_error(p, 'latency_mean_s'))} -> {_pct(_error(q, 'latency_mean_s'))} | "
                          f"{_pct(_error(p, 'per_token_s'))} -> {_pct(_error(q, 'per_token_s'))} | "
                          + ("-" if real is None else f"{1e3 * real:.2f} ms") + " |")
    reports.append(_totals(root, items, sides))
    return "\n".join(head + reports) + "\n\n" + _native(root, items, sides) + "\n\n" + "\n".join(points) + "\n"


def _native(root: Path, items: list[str], sides: tuple[str, str] = ("fit", "median")) -> str:
    """Exp 2.1's native_pytorch points (the batch-1 decode alone): mean and mean absolute
    mean-latency error over them, on each side."""
    out = []
    for side in sides:
        errors = [e for item in items for p in _load(root / side / item)["points"]
                  if p["label"].startswith("native_pytorch") and (e := _error(p, "latency_mean_s")) is not None]
        if not errors:
            return "No native_pytorch point."
        out.append((sum(errors) / len(errors), sum(abs(e) for e in errors) / len(errors), len(errors)))
    (mb, ab, n), (ma, aa, _) = out
    return (f"native_pytorch (Exp 2.1), {n} points: mean mean-latency error {_pct(mb)} -> {_pct(ma)}, "
            f"mean absolute {_pct(ab).lstrip('+')} -> {_pct(aa).lstrip('+')}.")


def _totals(root: Path, items: list[str], sides: tuple[str, str] = ("fit", "median")) -> str:
    """The all-reports row: PASS counts and coverage (real repeat values inside the band) summed."""
    cells = []
    for side in sides:
        summaries = [_load(root / side / item)["summary"] for item in items]
        covered, banded = sum(s["covered"] for s in summaries), sum(s["banded"] for s in summaries)
        cells.append((sum(s["PASS"] for s in summaries), sum(s["PASS"] + s["FAIL"] for s in summaries), covered, banded))
    (pb, judged, cb, bb), (pa, _, ca, ba) = cells
    return (f"| **all** | | {100 * cb / bb:.0f}% ({cb} of {bb}) -> {100 * ca / ba:.0f}% ({ca} of {ba}) | "
            f"{pb} -> {pa} (of {judged}) | |")


def _factor(report: dict) -> str:
    """The point_level of the profile a report was judged on, read from the profile it names."""
    path = Path(report["meta"]["profile"]["path"])
    if not path.is_file():
        return "?"
    level = (json.loads(path.read_text()).get("spread") or {}).get("point_level")
    return "-" if level is None else f"x {level:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--note", default=IN_SAMPLE_NOTE, help="what the figures are (held out or in-sample, and why)")
    parser.add_argument("--sides", nargs=2, default=["fit", "median"], metavar=("BEFORE", "AFTER"),
                        help="the two folders under ROOT to compare (default: fit median)")
    parser.add_argument("--title", default=TITLE)
    args = parser.parse_args(argv)
    sys.stdout.write(tables(args.root, args.note, tuple(args.sides), args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
