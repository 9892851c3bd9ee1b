"""How far `cost_model: transfer` carries: the H100 profile moved to the H200 by datasheet ratios,
against the H200's own profile and against real H200 runs.

    python -m djinnsim.validate.transfer_check [--doc PATH] [--runs DIR] [--bands K] [--work DIR]

(a) Primitives: the cost model's answers (decode step, prefill, cached-context prefill, weight
loads per tier and by k loads at once, host<->device copy rates, the KV swap of a 1024-token
context, time-slicing, first use of a shape, capacity) from the transferred profile beside the
measured one; the error is (transferred - measured) / measured. A value the cost model flags as
outside its calibrated range is marked `*`.

(b) Real runs: every validation folder under RUNS (scenario.yaml, records_real.csv or its .gz,
validation.json) re-simulated offline (`djinnsim validate --from-real`) once with the measured
profile the runs were judged with (the folder's calibration/*-heldout.json where there is one,
else --measured) and once with the transferred profile, saved to a file first. Both are judged by
the same rules; the tables put their errors side by side per point and metric, and count per
metric which one lands closer to the real mean.

The transferred profile keeps its honest metadata (source `transferred`, the target GPU's name,
the H100's software): `check_profile` accepts it for the H200 machine because GPU name, model and
torch / transformers versions match, and every row says which cost model it is.

With --doc the tables replace the text between the two marker lines in that file; without it they
go to stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from djinnsim.errors import DjinnsimError
from djinnsim.sim.costmodel import GB, ProfileCostModel, transfer_profile
from djinnsim.sim.profile import Profile, load_profile, save_profile
from djinnsim.sim.provenance import describe_simulator, file_sha256, simulator
from djinnsim.sim.specs import get_gpu, get_model

from .compare import METRIC_BY_NAME
from .report import fmt, fmt_err

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "sim" / "data" / "profiles"
DEFAULT_SOURCE = PROFILES / "h100-80gb-llama-2-7b.json"
DEFAULT_MEASURED = PROFILES / "h200-llama-2-7b.json"
DEFAULT_RUNS = ROOT / "docs" / "validation" / "h200" / "run1"
BEGIN = "<!-- transfer_check: begin (generated; edit validate/transfer_check.py, not this text) -->"
END = "<!-- transfer_check: end -->"
MEASURED, TRANSFERRED = "measured", "transferred"

DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXTS = (128, 512, 1024, 2048)
PREFILL_TOKENS = (128, 512, 2048)
LOAD_CONCURRENCY = (1, 2, 4, 8)
KV_SWAP_TOKENS = 1024
TIMESLICE_CONTEXT = 88  # the time-sliced rows' context where the measured profile has no timeslice_mp stage
RUN_METRICS = ("latency_mean_s", "latency_p99_s", "per_token_s", "ttft_s")
STAGE_METRICS = {"load_s": "weight load per phase (stage mean)"}


@dataclass(frozen=True)
class Primitive:
    """One cost-model answer from both profiles. `outside`: the cost models that flagged the query."""

    group: str
    what: str
    unit: str  # ms | s | GB/s | x | GiB
    measured: float
    transferred: float
    outside: tuple[str, ...] = ()

    @property
    def rel_err(self) -> float:
        return (self.transferred - self.measured) / self.measured if self.measured else float("nan")


def transferred_profile(source: Profile, target_gpu: str) -> Profile:
    """`source` moved to `target_gpu` by the datasheet ratios `cost_model: transfer` uses."""
    meta = source.metadata
    if meta.gpu_key is None:
        raise DjinnsimError(f"profile of {meta.gpu_name!r} names no bundled GPU to transfer from")
    return transfer_profile(source, get_gpu(meta.gpu_key), get_gpu(target_gpu), get_model(meta.model_id))


def _ask(models: dict[str, ProfileCostModel], question) -> tuple[dict[str, float], tuple[str, ...]]:
    """Each cost model's answer to `question(cost)` and which of them flagged it out of range."""
    values, outside = {}, []
    for label, cost in models.items():
        cost.out_of_range.clear()
        values[label] = float(question(cost))
        if cost.out_of_range:
            outside.append(label)
    return values, tuple(outside)


def primitives(measured: Profile, moved: Profile) -> list[Primitive]:
    spec = get_model(measured.metadata.model_id)
    models = {MEASURED: ProfileCostModel(measured, spec), TRANSFERRED: ProfileCostModel(moved, spec)}
    rows: list[Primitive] = []

    def add(group: str, what: str, unit: str, question, scale: float = 1.0) -> None:
        values, outside = _ask(models, question)
        rows.append(Primitive(group, what, unit, values[MEASURED] * scale, values[TRANSFERRED] * scale, outside))

    cap = max(p.domain.get("sum_context", (0, 0))[1] for p in _pieces(measured.decode_step))
    for batch in DECODE_BATCHES:
        for context in DECODE_CONTEXTS:
            if batch * context <= cap:
                add("decode step", f"batch {batch}, context {context}", "ms",
                    lambda c, b=batch, x=context: c.decode_step_s(b, b * x), 1e3)
    for tokens in PREFILL_TOKENS:
        add("prefill", f"{tokens} tokens, batch 1", "ms", lambda c, t=tokens: c.prefill_s(t), 1e3)
    add("prefill", "16 new tokens on a 122-token cached context (REFLECT)", "ms", lambda c: c.prefill_s(16, 1, 122), 1e3)
    nbytes = measured.memory.weight_bytes
    for tier in ("disk", "pageable", "pinned"):
        for k in LOAD_CONCURRENCY:
            add("weight loads", f"{tier}, k = {k}: wall time of k whole-model loads at once", "s",
                lambda c, t=tier, n=k: c.weight_load(t).fixed_s + n * nbytes / (c.load_aggregate_gbps(t, n) * GB))
    for direction in ("h2d", "d2h"):
        for pinned in (True, False):
            add("copies", f"{direction} {'pinned' if pinned else 'pageable'} rate", "GB/s",
                lambda c, d=direction, p=pinned: c.copy_bandwidth(d, p).gbps)
    add("copies", "d2h pageable rate past its large-buffer size", "GB/s",
        lambda c: c.copy_bandwidth("d2h", False).large_gbps or c.copy_bandwidth("d2h", False).gbps)
    kv_bytes = KV_SWAP_TOKENS * measured.memory.kv_bytes_per_token
    for direction, name in (("d2h", "out"), ("h2d", "in")):
        for pinned in (True, False):
            add("KV swap", f"swap-{name} of a {KV_SWAP_TOKENS}-token context ({kv_bytes / 2**20:.0f} MiB), "
                f"{'pinned' if pinned else 'pageable'} host", "ms",
                lambda c, d=direction, p=pinned: c.kv_swap_s(kv_bytes, d, p), 1e3)
    # the time-sliced model as the executors charge it, at the measured profile's timeslice_mp contexts
    stage = measured.timeslice_mp
    context = round(sum(stage.context_tokens) / 2) if stage is not None else TIMESLICE_CONTEXT
    add("time-slicing", f"GPU time of a decode step (g), context {context}", "ms",
        lambda c: c.decode_gpu_s(1, context) or c.gpu_busy_fraction() * c.decode_step_s(1, context), 1e3)
    for k in (1, 2, 4, 8):
        add("time-slicing", f"decode step, k = {k} processes at once: max(lone step, k g)", "ms",
            lambda c, n=k: c.timeslice_step_s(n, context), 1e3)
    add("first use of a shape", "decode step, extra", "ms", lambda c: c.cold_shape_s("decode", 1), 1e3)
    add("first use of a shape", "prefill of 128 tokens, extra", "ms", lambda c: c.cold_shape_s("prefill", 128), 1e3)
    add("memory", "capacity", "GiB", lambda c: c.capacity_bytes / 2**30)
    return rows


def _pieces(fit) -> list:
    return list(getattr(fit, "pieces", [fit]))


# --- (b) real runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRow:
    run: str
    point: str
    metric: str  # a compare.METRICS name or a STAGE_METRICS key
    real: float
    sim: dict[str, float | None]
    err: dict[str, float | None]
    verdict: dict[str, str]

    def closer(self) -> str | None:
        """The cost model whose simulated value is nearer the real mean (None: a tie or a gap)."""
        a, b = self.err.get(MEASURED), self.err.get(TRANSFERRED)
        if a is None or b is None or abs(a) == abs(b):
            return None
        return MEASURED if abs(a) < abs(b) else TRANSFERRED


def run_rows(run: str, reports: dict[str, dict]) -> list[RunRow]:
    """Rows of one run's reports (validation.json documents keyed by cost model): every point with
    real values, every judged latency metric and the stages in STAGE_METRICS."""
    by_label = {label: {p["label"]: p for p in doc["points"]} for label, doc in reports.items()}
    first = next(iter(reports.values()))
    rows = []
    for point in first["points"]:
        name = point["label"]
        entries = {label: points.get(name) for label, points in by_label.items()}
        for metric in RUN_METRICS:
            real = point["metrics"].get(metric, {}).get("real_mean")
            if real is None:
                continue
            cells = {label: (e or {}).get("metrics", {}).get(metric, {}) for label, e in entries.items()}
            if all(c.get("sim") is None for c in cells.values()):
                continue  # not simulated (time to first token of agent phases): nothing to compare
            rows.append(RunRow(run, name, metric, real, {k: c.get("sim") for k, c in cells.items()},
                               {k: c.get("rel_err") for k, c in cells.items()},
                               {k: c.get("verdict", "N/A") for k, c in cells.items()}))
        for stage in STAGE_METRICS:
            real = (point.get("stages_real") or {}).get(stage)
            if not real:
                continue
            sims = {label: ((e or {}).get("stages_sim") or {}).get(stage) for label, e in entries.items()}
            rows.append(RunRow(run, name, stage, real, sims,
                               {k: None if v is None else (v - real) / real for k, v in sims.items()},
                               {k: "info" for k in sims}))
    return rows


def real_run_folders(runs: Path) -> list[Path]:
    """The validation folders under `runs` made with real runs (an offline re-comparison, whose
    validation.json has meta.offline, holds the same real runs again and is left out)."""
    if not runs.is_dir():
        return []
    folders = []
    for report in sorted(runs.glob("*/validation.json")):
        try:
            offline = json.loads(report.read_text()).get("meta", {}).get("offline")
        except ValueError as exc:
            raise DjinnsimError(f"cannot read {report}: {exc}") from None
        if not offline:
            folders.append(report.parent)
    return folders


def _sample(sample: dict) -> str:
    """'held-out', or 'in-sample (simulator, profile)': the label and the kinds of its reasons."""
    kinds = [reason.split(":", 1)[0] for reason in sample.get("reasons", [])]
    return sample["label"] + (f" ({', '.join(kinds)})" if kinds else "")


def _measured_for(folder: Path, default: Path) -> Path:
    held_out = sorted((folder / "calibration").glob("*-heldout.json"))
    return held_out[0] if held_out else default


def resimulate(folders: list[Path], measured: Path, moved: Path, work: Path, bands: int,
               quiet: bool = True) -> tuple[list[RunRow], dict[str, dict]]:
    """Offline re-comparisons of every folder with both profiles; returns the rows and, per run,
    which profile each cost model used and its report's summary counts."""
    from .offline import OfflineRequest, run_offline

    rows, runs = [], {}
    for folder in folders:
        profiles = {MEASURED: _measured_for(folder, measured), TRANSFERRED: moved}
        reports = {}
        for label, path in profiles.items():
            out = run_offline(OfflineRequest(from_real=folder, calibration=path, out=work / folder.name / label,
                                             quiet=quiet, bands=bands,
                                             command=f"python -m djinnsim.validate.transfer_check ({label})"))
            reports[label] = json.loads((out / "validation.json").read_text())
        rows += run_rows(folder.name, reports)
        runs[folder.name] = {label: {"profile": path, "summary": reports[label]["summary"],
                                     "sample": _sample(reports[label]["meta"]["sample"])}
                             for label, path in profiles.items()}
    return rows, runs


# --- markdown ------------------------------------------------------------------------------------


def _num(value: float, unit: str) -> str:
    return f"{value:.3g}" if unit == "x" else f"{value:.4g}"


def primitives_table(rows: list[Primitive]) -> list[str]:
    lines = ["| group | query | measured (H200 profile) | transferred (H100 profile -> H200) | transferred vs measured |",
             "|---|---|---|---|---|"]
    for r in rows:
        star = {label: " *" if label in r.outside else "" for label in (MEASURED, TRANSFERRED)}
        lines.append(f"| {r.group} | {r.what} | {_num(r.measured, r.unit)} {r.unit}{star[MEASURED]} | "
                     f"{_num(r.transferred, r.unit)} {r.unit}{star[TRANSFERRED]} | {fmt_err(r.rel_err)} |")
    return lines


def _metric_label(metric: str) -> str:
    return STAGE_METRICS.get(metric) or METRIC_BY_NAME[metric].label


def runs_table(rows: list[RunRow]) -> list[str]:
    lines = ["| run | point | metric | real mean | measured: sim (error, verdict) | transferred: sim (error, verdict) | closer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{fmt(r.sim.get(k), 's')} ({fmt_err(r.err.get(k))}, {r.verdict.get(k, 'N/A')})" for k in (MEASURED, TRANSFERRED)]
        point = r.point.replace("__llama-2-7b-hf__h200__", " ")
        lines.append(f"| {r.run} | {point} | {_metric_label(r.metric)} | {fmt(r.real, 's')} | {cells[0]} | {cells[1]} | "
                     f"{r.closer() or 'tie'} |")
    return lines


def per_metric_summary(rows: list[RunRow]) -> list[dict]:
    """Per metric: points, PASS counts, mean |error| and how often each cost model is closer."""
    out = []
    for metric in (*RUN_METRICS, *STAGE_METRICS):
        mine = [r for r in rows if r.metric == metric and all(r.err.get(k) is not None for k in (MEASURED, TRANSFERRED))]
        if not mine:
            continue
        entry = {"metric": metric, "points": len(mine)}
        for label in (MEASURED, TRANSFERRED):
            entry[f"{label}_pass"] = sum(r.verdict.get(label) == "PASS" for r in mine)
            entry[f"{label}_mean_abs_err"] = sum(abs(r.err[label]) for r in mine) / len(mine)
            entry[f"{label}_closer"] = sum(r.closer() == label for r in mine)
        a, b = entry[f"{MEASURED}_mean_abs_err"], entry[f"{TRANSFERRED}_mean_abs_err"]
        entry["better"] = MEASURED if a < b else TRANSFERRED if b < a else "tie"
        out.append(entry)
    return out


def summary_table(summary: list[dict]) -> list[str]:
    lines = ["| metric | points | measured: PASS / mean abs error / closer | transferred: PASS / mean abs error / closer | better (mean abs error) |",
             "|---|---|---|---|---|"]
    for e in summary:
        judged = e["metric"] in RUN_METRICS
        cells = [f"{e[f'{k}_pass'] if judged else '-'} / {100 * e[f'{k}_mean_abs_err']:.1f}% / {e[f'{k}_closer']}"
                 for k in (MEASURED, TRANSFERRED)]
        lines.append(f"| {_metric_label(e['metric'])} | {e['points']} | {cells[0]} | {cells[1]} | **{e['better']}** |")
    return lines


def _rel(path: Path) -> str:
    """Inside the checkout: the path from its root; elsewhere (a temporary file): the file name."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def render(command: str, source: Path, measured: Path, prim: list[Primitive], rows: list[RunRow] | None,
           runs: dict[str, dict] | None, bands: int) -> str:
    src, dst = load_profile(source).metadata, load_profile(measured).metadata
    a, b = get_gpu(src.gpu_key), get_gpu(dst.gpu_key)
    lines = [BEGIN, "",
             f"Made by `{command}` ({describe_simulator(simulator())}); CPU only, nothing measured.",
             f"Transferred: `{_rel(source)}` (sha256 `{file_sha256(source)[:16]}`, {src.gpu_name}) moved to {b.name} by "
             f"`sim.costmodel.transfer_profile`, datasheet ratios from `sim/data/gpus/`: compute x{a.peak_tflops_fp16 / b.peak_tflops_fp16:.3g} "
             f"({a.peak_tflops_fp16:g} -> {b.peak_tflops_fp16:g} TFLOP/s), memory x{a.hbm_gbps / b.hbm_gbps:.3g} "
             f"({a.hbm_gbps:g} -> {b.hbm_gbps:g} GB/s), PCIe x{a.pcie_gbps / b.pcie_gbps:.3g} ({a.pcie_gbps:g} -> {b.pcie_gbps:g} GB/s); "
             "host-side terms, disk loads and the large-buffer copy rates unchanged.",
             f"Measured: `{_rel(measured)}` (sha256 `{file_sha256(measured)[:16]}`, {dst.gpu_name}, {dst.date[:10]}).",
             "", "### (a) Primitives: transferred vs measured cost model", "",
             "`*`: the cost model flags the query as outside its calibrated range (it extrapolates).", "",
             *primitives_table(prim)]
    if rows is not None and runs is not None:
        lines += ["", "### (b) Against the real H200 runs: measured vs transferred cost model", "",
                  f"Each run re-simulated offline (`djinnsim validate --from-real`, {bands} band draws) with each profile and "
                  "judged by the same rules (mean within 5% or the real 95% interval meeting a P10-P90 band of "
                  "half-width <= 10%; P99 within 10%). The weight-load stage is not judged (info). 'labelled' is "
                  "the re-comparison's own held-out / in-sample label with the kinds of its reasons "
                  "(`validate/heldout.py`): `simulator` when the model code is newer than the runs, `profile` when "
                  "the profile is not the one frozen before them (the transferred one never is). Neither profile's "
                  "fits hold these runs: the measured ones were frozen before them, the transferred one comes from "
                  "another machine.", ""]
        lines += ["| run | cost model | profile | labelled | PASS / FAIL |", "|---|---|---|---|---|"]
        for run, by_label in runs.items():
            for label, info in by_label.items():
                s = info["summary"]
                lines.append(f"| {run} | {label} | `{_rel(info['profile'])}` | {info['sample']} | {s.get('PASS', 0)} / {s.get('FAIL', 0)} |")
        lines += ["", "Per metric over every point with real values:", "", *summary_table(per_metric_summary(rows)),
                  "", "Every point:", "", *runs_table(rows)]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def splice(text: str, section: str) -> str:
    """`text` with the part from the BEGIN line to the END line replaced by `section`."""
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise DjinnsimError(f"the document has no '{BEGIN}' ... '{END}' section to replace")
    return text[:start] + section.rstrip("\n") + text[stop + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m djinnsim.validate.transfer_check", description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the profile to transfer (default: the bundled H100 one)")
    parser.add_argument("--measured", type=Path, default=DEFAULT_MEASURED, help="the target GPU's measured profile")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="folder of validation folders of real runs on the target GPU")
    parser.add_argument("--no-runs", action="store_true", help="primitives only (part a)")
    parser.add_argument("--bands", type=int, default=10, help="band draws of each offline re-comparison")
    parser.add_argument("--work", type=Path, default=None, help="keep the transferred profile and the re-comparisons here")
    parser.add_argument("--doc", type=Path, default=None, help="write the tables between the markers of this file")
    args = parser.parse_args(argv)
    command = " ".join([parser.prog, *(shlex.quote(str(a)) for a in (argv if argv is not None else sys.argv[1:]))])
    try:
        for path in (args.source, args.measured):
            if not path.is_file():
                raise DjinnsimError(f"profile not found: {path}")
        measured = load_profile(args.measured)
        if measured.metadata.gpu_key is None:
            raise DjinnsimError(f"{args.measured} names no bundled GPU")
        moved = transferred_profile(load_profile(args.source), measured.metadata.gpu_key)
        prim = primitives(measured, moved)
        rows = runs = None
        if not args.no_runs:
            folders = real_run_folders(args.runs)
            if not folders:
                raise DjinnsimError(f"--runs {args.runs} holds no validation folders (*/validation.json)")
            with tempfile.TemporaryDirectory(prefix="transfer-check-") as tmp:
                work = args.work or Path(tmp)
                work.mkdir(parents=True, exist_ok=True)
                moved_path = save_profile(moved, work / f"{args.source.stem}-to-{measured.metadata.gpu_key}.json")
                rows, runs = resimulate(folders, args.measured, moved_path, work, args.bands)
        section = render(command, args.source, args.measured, prim, rows, runs, args.bands)
        if args.doc is None:
            sys.stdout.write(section)
        else:
            args.doc.write_text(splice(args.doc.read_text(), section))
    except (DjinnsimError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
