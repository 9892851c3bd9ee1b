"""`run_validation`: profile (calibrating first if none is given), real runs, simulation of the
same points, comparison, report. The CLI delegates here.

This process is the client of the real runs and never creates a CUDA context: calibration runs
in a child process, the servers in theirs, so the GPU memory this process would hold cannot
distort the memory figures or the keep-alive OOM N.
"""

from __future__ import annotations

import importlib.metadata
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from djinnsim.errors import DjinnsimError
from djinnsim.sim import notices
from djinnsim.sim.outputs import OutputFolder
from djinnsim.sim.profile import Profile, load_profile
from djinnsim.sim.records import Record, records_frame
from djinnsim.sim.overrides import apply_overrides
from djinnsim.sim.scenario import AgentsWorkload, Scenario, dump_scenario, expand_points, load_scenario
from djinnsim.sim.specs import ModelSpec, get_model

from djinnsim.sim.provenance import file_sha256, simulator

from . import anchored, compare, heldout, report
from .points import CPU_MODEL, Shortening, select_points, validation_scenario
from .realrun import RealOptions, RealResult, RealRunner

DEVICES = ("cuda", "cpu")


# Why processes stand for Ray here: what the baselines measure is one worker process per actor (its own
# CUDA context and model copy, kernels time-sliced with the others) and a fresh process per serverless task;
# Ray's scheduler and object store sit outside every measured interval.
RAY_EMULATION = ("emulated with processes: a Ray actor is a worker process with its own CUDA context and model "
                 "copy, and a serverless task a fresh process that loads the weights, so one process per actor "
                 "and one per task reproduce what the baselines time; Ray's scheduler and object store lie "
                 "outside every timed interval")


@dataclass(frozen=True)
class ValidateRequest:
    scenario_path: Path
    gpu: int = 0
    device: str = "cuda"
    points: tuple[str, ...] = ()
    repeats: int = 5
    bands: int = 10
    calibration: Path | None = None
    full_calibration: bool = False
    out: Path | None = None
    force: bool = False  # replace a non-empty `out` holding an earlier djinnsim output
    short: Shortening = Shortening()
    time_budget_s: float = 1800.0
    oom_probe_max: int = 8
    seed: int | None = None
    quiet: bool = False
    command: str = "djinnsim validate"
    overrides: tuple = ()  # sim.overrides.Override: `--set FIELD=VALUE`, applied to the scenario file first
    level_probe: bool = False  # validate.anchored: probe each point's level before it, judge it anchored too


@dataclass
class Machine:
    device: str  # cuda | cpu
    name: str  # the GPU's name as CUDA/NVML report it, or "cpu: <host cpu>" as calibrate writes it
    gpu_index: int
    memory_bytes: int | None
    driver: str | None
    torch: str
    transformers: str
    host_cpu: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "notes"}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise DjinnsimError(f"{package} is not installed: validate runs models (pip install 'djinnsim[gpu]')") from None


def _public_version(version: str | None) -> str | None:
    """`2.11.0+cu130` (torch.__version__) and `2.11.0` (package metadata) are the same release."""
    return version.split("+", 1)[0] if version else version


def this_machine(device: str, gpu: int) -> Machine:
    """What this machine is, read without creating a CUDA context (NVML and package metadata)."""
    from djinnsim.calibrate.environment import host_cpu

    from .gpumon import gpu_facts

    if device not in DEVICES:
        raise DjinnsimError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    versions = {"torch": _version("torch"), "transformers": _version("transformers")}
    cpu = host_cpu()
    if device == "cpu":
        return Machine("cpu", f"cpu: {cpu}", gpu, None, None, host_cpu=cpu, **versions)
    facts = gpu_facts(gpu)
    if facts is None:
        raise DjinnsimError(f"--device cuda: GPU {gpu} is not visible through NVML; use --device cpu for the tiny model")
    return Machine("cuda", facts.name, gpu, facts.memory_bytes, facts.driver, host_cpu=cpu, **versions)


def check_profile(profile: Profile, path: Path, machine: Machine, spec: ModelSpec, dtype: str | None,
                  hint: str = "calibrate here first (leave out --calibration)") -> None:
    """Refuse a profile from another GPU, model, dtype or software stack, in one line."""
    meta = profile.metadata
    problems = []
    if meta.device != machine.device:
        problems.append(f"device {meta.device} (this run: {machine.device})")
    elif meta.gpu_name.strip().lower() != machine.name.strip().lower():
        problems.append(f"GPU {meta.gpu_name!r} (this machine: {machine.name!r})")
    if meta.model_id != spec.model_id:
        problems.append(f"model {meta.model_id} (this run: {spec.model_id})")
    if dtype is not None and meta.dtype != dtype:
        problems.append(f"dtype {meta.dtype} (this run: {dtype})")
    for package in ("torch", "transformers"):
        theirs, ours = getattr(meta, package), getattr(machine, package)
        if _public_version(theirs) != _public_version(ours):
            problems.append(f"{package} {theirs} (this machine: {ours})")
    if problems:
        raise DjinnsimError(f"calibration {path} does not describe this machine: {'; '.join(problems)}; {hint}")


def _calibration_child(kwargs: dict) -> None:
    from djinnsim.calibrate.runner import run_calibration

    try:
        run_calibration(**kwargs)
    except DjinnsimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def calibrate_now(req: ValidateRequest, model_key: str, out_dir: Path, say: Callable[[str], None]) -> Path:
    """Calibrate this machine in a child process (its CUDA context goes away with it)."""
    path = out_dir / "calibration" / f"{'cpu' if req.device == 'cpu' else 'gpu'}-{model_key}.json"
    kwargs = dict(gpu=req.gpu, device=req.device, model=model_key, quick=not req.full_calibration, out=path,
                  command=f"{req.command} (calibrating first)", quiet=req.quiet)
    say(f"calibrating {model_key} on {req.device} ({'full' if req.full_calibration else 'quick'}) first")
    process = multiprocessing.get_context("spawn").Process(target=_calibration_child, args=(kwargs,))
    process.start()
    process.join(timeout=1800)
    if process.is_alive():
        process.terminate()
        process.join(10)
        raise DjinnsimError("calibration did not finish within 30 minutes")
    if process.exitcode != 0 or not path.is_file():
        raise DjinnsimError(f"calibration failed (exit code {process.exitcode}); its output is above")
    return path


OUT_OF_RANGE_NOTE = "simulator asked outside the calibrated range: "


def simulate(scenario: Scenario, profile_path: Path, profile: Profile, repeats: int,
             order: list[tuple[int, int]] | None = None, band_draw: int | None = None,
             spread=None, parts: dict[tuple[int, int], int] | None = None) -> dict[int, list]:
    """Simulate every point `repeats` times with this machine's profile as measured (no transfer),
    as often as it was run for real: one draw of a few runs moves by several percent (step-time
    spells). Repeat r draws from `point_seed(seed, point, r)`; repeat 0 is `djinnsim run`'s draw.

    The real runs reuse their GPU processes from repeat to repeat and point to point, and a process
    pays for an attention shape only the first time it runs it; so the simulated repeats run in
    `order` ((point index, repeat) as they ran for real; the rest after, in order) and each real
    process's shapes carry over to the next simulated run that uses it.

    `band_draw` d (with the profile's `spread`): a band draw of the same replay, each repeat r with
    its own factors and streams (draw d * BAND_STRIDE + r of sim.bands): the level a repeat runs at
    is drawn per repeat, as each real repeat met the machine in its own spell."""
    from djinnsim.sim.bands import BAND_REPEAT_BASE, banded_cost, draw_factors, factor_rng
    from djinnsim.sim.run import point_seed
    from djinnsim.sim.simulate import simulate_point

    cost_of = cost_for(scenario, profile_path, profile)
    points = {p.index: p for p in expand_points(scenario)}
    runs = [run for run in (order or []) if run[0] in points and run[1] < repeats]
    runs += [(i, r) for i in points for r in range(repeats) if (i, r) not in set(runs)]
    seen_by_process: dict[tuple, set] = {}
    out: dict[int, list] = {i: [None] * repeats for i in points}
    for index, r in runs:
        point = points[index]
        cost = cost_of(point)
        seed = point_seed(scenario.seed, point, r)
        if band_draw is not None:
            draw = band_draw * BAND_STRIDE + r
            cost = banded_cost(cost, draw_factors(spread, factor_rng(scenario.seed, point, draw)))
            seed = point_seed(scenario.seed, point, BAND_REPEAT_BASE + draw)
        part = (parts or {}).get((index, r), 0)  # each command of a split validation starts its own processes
        seen = {key: seen_by_process.setdefault((part, real), set()) for key, real in real_processes(point).items()}
        out[index][r] = simulate_point(scenario, point, cost, seed, seen)
    return out


def cost_for(scenario: Scenario, profile_path: Path, profile: Profile) -> Callable:
    """point -> the cost model this machine's profile gives it, as measured (no transfer). A CPU
    profile names no GPU, so the scenario's GPU cannot match it: it is evaluated directly."""
    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.sim.run import CostModels

    if profile.metadata.gpu_key is None:
        return lambda point: ProfileCostModel(profile, point.model)
    return CostModels(scenario, profile_path).for_point


BAND_STRIDE = 1000  # most repeats a band draw can stand for


def simulate_bands(scenario: Scenario, profile_path: Path, profile: Profile, spread, repeats: int,
                   order: list[tuple[int, int]] | None, draws: int,
                   parts: dict[tuple[int, int], int] | None = None) -> dict[int, list]:
    """`draws` band replays of the real runs' order; per point, every draw's every repeat."""
    out: dict[int, list] = {}
    for d in range(draws):
        for index, results in simulate(scenario, profile_path, profile, repeats, order, d, spread, parts).items():
            out.setdefault(index, []).append(results)
    return out


def spread_for(profile: Profile, profile_path: Path) -> tuple[object | None, str]:
    """The spread to draw bands from: the profile's own, else computed now from its samples file
    (nothing else in the profile changes), else none; with a sentence saying which."""
    if profile.spread is not None:
        return profile.spread, "the profile's spread section"
    from djinnsim.sim.profile import samples_path

    file = samples_path(profile, profile_path)
    if file is not None:
        from djinnsim.calibrate.refit import read_samples
        from djinnsim.calibrate.spread import spread_from_samples

        rows = read_samples(file)
        return spread_from_samples(profile, rows), f"computed for this report from {profile.samples_file}"
    return None, "none: the profile has no spread section and no samples file"


def real_processes(point) -> dict[object, tuple]:
    """The simulator's GPU processes of a point -> the real runs' processes: one shared server per
    link rate; keep-alive and serverless workers by agent index, reused across N."""
    b = point.backend
    if b.weights == "shared":
        return {"server": ("shared", point.link.gbps)}
    return {i: (b.weights, b.name, i) for i in range(point.n_agents or 1)}


def _repeat_figures(records) -> tuple[float | None, float | None]:
    """(mean latency, median compute per generated token) of a repeat's measured requests."""
    measured = [r for r in records if not r.warmup and r.status == "ok"]
    if not measured:
        return None, None
    per_token = [r.compute_s / r.new_tokens for r in measured if r.new_tokens > 0]
    return float(np.mean([r.latency_s for r in measured])), float(np.median(per_token)) if per_token else None


def repeat_rows(real: RealResult, sims: dict) -> list[dict]:
    """Each real repeat beside its simulated twin, in the order they ran: the host's step-time drift
    over the run and the repeats that met new attention shapes show here, not in the means."""
    first: dict[int, float] = {}  # per command (part): its clock is its own
    for rp in real.points:
        for rep in rp.repeats:
            for r in rep.records:
                first[rep.part] = min(first.get(rep.part, r.issued_at), r.issued_at)
    rows = []
    for rp in real.points:
        for i, rep in enumerate(rp.repeats):
            if not rep.records:
                continue
            real_mean, real_tok = _repeat_figures(rep.records)
            sim = sims.get(rp.point.index, [])
            sim_mean, sim_tok = _repeat_figures(sim[i].records) if i < len(sim) and sim[i] is not None else (None, None)
            rows.append({"point": rp.point.label, "repeat": i, **({"part": rep.part} if len(first) > 1 else {}),
                         "at_s": min(r.issued_at for r in rep.records) - first[rep.part],
                         "real_mean_s": real_mean, "sim_mean_s": sim_mean,
                         "real_compute_per_token_s": real_tok, "sim_compute_per_token_s": sim_tok})
    return sorted(rows, key=lambda row: (row.get("part", 0), row["at_s"]))


def real_parts(real: RealResult) -> dict[tuple[int, int], int]:
    """(point index, repeat) -> the command that ran it, for a validation split over commands."""
    return {(rp.point.index, i): rep.part for rp in real.points for i, rep in enumerate(rp.repeats) if rep.part}


def real_order(real: RealResult) -> list[tuple[int, int]]:
    """(point index, repeat) in the order the real repeats started (command by command when split)."""
    started = []
    for rp in real.points:
        for i, rep in enumerate(rp.repeats):
            at = min((r.issued_at for r in rep.records), default=None)
            if at is not None:
                started.append((rep.part, at, rp.point.index, i))
    return [(index, i) for _, _, index, i in sorted(started)]


def _sim_oom_n(point_results: list, simulate_at: Callable[[int], Any] | None = None,
               cap: int | None = None) -> int | None:
    """The first N at which the simulated keep-alive runs out of memory: the smallest swept N with an
    OOM record in any repeat, or, with `simulate_at(n)` (n -> the records of a simulation at N = n),
    a smaller one that sim.search finds by simulating N = 1 .. `cap` for OOM alone. Never the
    closed-form memory bound: a verdict on this N rests on simulated behaviour."""
    swept = min((pr.point.n_agents for pr in point_results
                 if pr.point.n_agents is not None and any(r.status == "oom" for r in pr.records)), default=None)
    limits = [x for x in (cap, None if swept is None else swept - 1) if x is not None]
    if simulate_at is None or not limits or min(limits) < 1:
        return swept
    limit = min(limits)
    from djinnsim.sim.search import Probe, largest_feasible

    def evaluate(n: int) -> Probe:
        oom = any(r.status == "oom" for r in simulate_at(n))
        return Probe(n, None, oom, False, not oom)

    _, above, _ = largest_feasible(evaluate, math.inf, limit)
    return int(above.x) if above is not None else swept


def _simulate_at(scenario: Scenario, point, cost) -> Callable[[int], Any]:
    """n -> the records of `point` at N = n, drawn as `djinnsim run` draws it."""
    from djinnsim.sim.run import point_seed
    from djinnsim.sim.simulate import simulate_point

    def at(n: int):
        at_n = point.model_copy(update={"n_agents": n})
        return simulate_point(scenario, at_n, cost, point_seed(scenario.seed, at_n)).records

    return at


def _real_repeat_metrics(repeat, agents: bool, cuda: bool) -> dict:
    metrics = compare.record_metrics(repeat.records, agents)
    metrics["peak_gpu_mem_bytes"] = float(repeat.peak_mem_bytes) if repeat.peak_mem_bytes is not None else None
    if cuda:
        metrics["gpu_util"] = repeat.gpu_util  # NVML; on the CPU the servers' own compute stamps stay
    if agents:
        metrics["ttft_s"] = repeat.ttft_s
    return metrics


def _decode_curve(records: list[Record]) -> dict[int, float]:
    rows = compare.measured(records)
    by_t: dict[int, list[float]] = {}
    for r in rows:
        by_t.setdefault(r.step, []).append(r.latency_s * 1e3)
    return {t: float(np.mean(v)) for t, v in sorted(by_t.items())}


def _curves(agents: bool, comparisons: list[compare.PointComparison], real: RealResult, sims: dict) -> dict:
    curves: dict[str, list[dict]] = {}
    real_by_index = {p.point.index: p for p in real.points}
    for pc in comparisons:
        rp = real_by_index[pc.index]
        if not rp.repeats:
            continue
        if agents:
            m = {c.metric: c for c in pc.metrics}
            mean, p99 = m["latency_mean_s"], m["latency_p99_s"]

            def ms(v):
                return None if v is None else v * 1e3

            curves.setdefault(pc.backend, []).append({
                "n": pc.n_agents, "real_mean": ms(mean.real_mean), "real_mean_min": ms(mean.real_min),
                "real_mean_max": ms(mean.real_max), "sim_mean": ms(mean.sim), "real_p99": ms(p99.real_mean),
                "real_p99_min": ms(p99.real_min), "real_p99_max": ms(p99.real_max), "sim_p99": ms(p99.sim)})
        else:
            per_repeat = [_decode_curve(rep.records) for rep in rp.repeats]
            sim_repeats = [_decode_curve(pr.records) for pr in sims[pc.index]]
            sim_ts = set.intersection(*(set(c) for c in sim_repeats)) if sim_repeats else set()
            ts = sorted(set.intersection(*(set(c) for c in per_repeat)) & sim_ts) if per_repeat else []
            if not ts:
                continue
            curves.setdefault(pc.backend, []).append({
                "label": f"{pc.link_gbps:g} Gbps", "t": ts,
                "real_mean": [float(np.mean([c[t] for c in per_repeat])) for t in ts],
                "real_min": [min(c[t] for c in per_repeat) for t in ts],
                "real_max": [max(c[t] for c in per_repeat) for t in ts],
                "sim": [float(np.mean([c[t] for c in sim_repeats])) for t in ts]})
    return curves


def _write_records(path: Path, records: list[Record], repeats: list[int] | None = None) -> None:
    frame = records_frame(records)
    if repeats is not None:
        frame.insert(0, "repeat", repeats)
    frame.to_csv(path, index=False)


def _say(quiet: bool) -> Callable[[str], None]:
    return (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))


def run_validation(req: ValidateRequest) -> Path:
    """Validate a scenario's small points on this machine; returns the report folder."""
    started_wall = time.perf_counter()
    started_at = datetime.now(timezone.utc).replace(microsecond=0)
    say = _say(req.quiet)
    if req.repeats < 1:
        raise DjinnsimError(f"--repeats must be >= 1, not {req.repeats}")
    if req.time_budget_s <= 0:
        raise DjinnsimError(f"--time-budget-s must be > 0, not {req.time_budget_s}")
    scenario = apply_overrides(load_scenario(req.scenario_path), req.overrides, str(req.scenario_path))
    machine = this_machine(req.device, req.gpu)
    model_key = CPU_MODEL if req.device == "cpu" else scenario.model
    spec = get_model(model_key)
    if req.calibration is not None and not Path(req.calibration).is_file():
        raise DjinnsimError(f"calibration profile not found: {req.calibration}")
    # written into a temporary folder renamed into place at the end (sim/outputs.py)
    folder = OutputFolder(req.out, Path("results") / "validation" / started_at.strftime("%Y%m%dT%H%M%SZ"),
                          force=req.force)
    if req.bands == 1 or req.bands < 0:
        raise DjinnsimError(f"--bands must be 0 (none) or >= 2, not {req.bands}")
    # Check what can be checked before spending minutes calibrating.
    draft_scenario = validation_scenario(scenario, req.short, model_key if req.device == "cpu" else None, None)
    from djinnsim.calibrate.modeling import resolve_dtype

    dtype = str(resolve_dtype(spec, None, req.device)).removeprefix("torch.")
    with folder as out_dir:
        if req.calibration is not None:
            profile_path, how = Path(req.calibration), "given with --calibration"
        else:
            profile_path = calibrate_now(req, model_key, out_dir, say)
            how = f"calibrated by this validation ({'full' if req.full_calibration else 'quick'})"
        profile = load_profile(profile_path)
        check_profile(profile, profile_path, machine, spec, dtype)
        if heldout.is_exp21_workload(draft_scenario) and heldout.decode_fit_holds_exp21(profile, profile_path) \
                and heldout.has_samples(profile, profile_path):
            # Exp 2.1 is judged on a profile whose fits hold none of calibrate's own Exp 2.1 runs.
            profile_path = heldout.held_out_profile(profile_path, out_dir / "calibration")
            how += "; refitted without calibrate's own Exp 2.1 runs, held out for this workload"
            say(f"Exp 2.1: judging with {profile_path}, refitted without calibrate's own Exp 2.1 runs")
            profile = load_profile(profile_path)

        scenario_v = validation_scenario(scenario, req.short, model_key if req.device == "cpu" else None,
                                         profile.metadata.gpu_key)
        if req.seed is not None:
            scenario_v = scenario_v.model_copy(update={"seed": req.seed})
        (out_dir / "scenario.yaml").write_text(dump_scenario(scenario_v))
        points = select_points(expand_points(scenario_v), list(req.points) or None)
        cuda = req.device == "cuda"

        draft = simulate(scenario_v, profile_path, profile, 1)  # how long each point should take: shortest runs first
        expected_s = {i: max((r.finished_at for r in prs[0].records), default=0.0) for i, prs in draft.items()}
        options = RealOptions(
            device=f"cuda:{req.gpu}" if cuda else "cpu", gpu_index=req.gpu, repeats=req.repeats, seed=scenario_v.seed,
            deadline=time.perf_counter() + req.time_budget_s, oom_probe_max=req.oom_probe_max,
            context_bytes_per_process=profile.memory.context_bytes_per_process, weight_bytes=profile.memory.weight_bytes,
            dtype=profile.metadata.dtype,
            request_timeout_s=300.0 if cuda else 60.0, start_timeout_s=600.0 if cuda else 120.0, expected_s=expected_s,
            level_probe=req.level_probe,
        )
        # Frozen: the hash of the profile every figure is judged with, taken before the first real run.
        frozen = {"sha256": file_sha256(profile_path),
                  "frozen_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
        say(f"profile frozen before the real runs: {profile_path} sha256 {frozen['sha256'][:16]}")
        runs_started_at = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        say(f"real runs: {len(points)} points x {req.repeats} repeats on {machine.name}")
        real = RealRunner(scenario_v, points, options, say).run()
        if file_sha256(profile_path) != frozen["sha256"]:
            raise DjinnsimError(f"{profile_path} changed while the real runs ran: its figures would not be held out")
        meta = {
            "scenario": scenario.name, "scenario_path": str(req.scenario_path), "command": req.command,
            "started_at": started_at.isoformat(), "wall_s": None, "real_wall_s": real.wall_s,
            "machine": machine.to_dict(), "model": spec.model_id, "repeats": req.repeats,
            "workload": scenario_v.workload.model_dump(mode="json"), "seed": scenario_v.seed,
            "profile": {**profile_meta(profile_path, how, profile, (out_dir, folder.path)),
                        "frozen_sha256": frozen["sha256"],
                        "frozen_at": frozen["frozen_at"]},
            "runs_started_at": runs_started_at, "simulator": simulator(), "bands": req.bands,
            "ray": RAY_EMULATION,
        }
        if req.level_probe:
            meta["level_probe"] = True
        real_records = [r for rp in real.points for rep in rp.repeats for r in rep.records]
        real_repeats = [i for rp in real.points for i, rep in enumerate(rp.repeats) for _ in rep.records]
        _write_records(out_dir / "records_real.csv", real_records, real_repeats)
        compare_and_report(out_dir, scenario_v, points, real, profile_path, profile, meta, say, req.quiet,
                           started_wall=started_wall)
    if not req.quiet:
        print(f"report: {folder.path / 'validation.md'}")
    return folder.path


def profile_meta(path: Path, how: str, profile: Profile, moved: tuple[Path, Path] | None = None) -> dict:
    """`moved` (staging, final): a profile written inside the temporary output folder is recorded
    where it will be once the folder is renamed into place."""
    recorded = path
    if moved is not None and path.is_relative_to(moved[0]):
        recorded = moved[1] / path.relative_to(moved[0])
    meta = {"path": str(recorded), "how": how, "date": profile.metadata.date, "quick": profile.metadata.quick,
            "gpu_name": profile.metadata.gpu_name, "sha256": file_sha256(path)}
    if profile.spread is not None and profile.spread.point_level is not None:  # `calibrate --level-point median`
        meta["point_level"] = profile.spread.point_level
    return meta


def profile_notes(profile_path, profile) -> list[str]:
    """What the judged profile carries from elsewhere, as a run's warnings say it (a report judged on
    a profile whose load stages came from another calibration names that calibration)."""
    source = profile.metadata.loads_from if profile is not None else None
    if source is None:
        return []
    return [notices.loads_from(str(profile_path), source.path, source.date, source.sections)]


def device_notes(scenario_v: Scenario, device: str, model_id: str) -> list[str]:
    """Notes the report adds for the device the real runs used (not part of the real runs' own notes)."""
    if device == "cuda":
        return []
    return [(f"device cpu: point labels keep the scenario's GPU key ({scenario_v.gpu}); every "
             f"figure here is from this CPU and {model_id}")]


def compare_and_report(out_dir: Path, scenario_v: Scenario, points: list, real: RealResult, profile_path: Path,
                       profile: Profile, meta: dict, say: Callable[[str], None], quiet: bool,
                       started_wall: float | None = None) -> dict:
    """Simulate `points`, compare them with the real runs in `real` (live or read back from disk),
    and write the report (validation.json and .md, overlays, records_sim.csv) into `out_dir`.
    `meta` describes the real runs and the profile; `started_wall` (perf_counter) sets meta's wall_s."""
    agents = isinstance(scenario_v.workload, AgentsWorkload)
    cuda = meta["machine"]["device"] == "cuda"
    n_repeats = int(meta["repeats"])
    say(f"simulating the same points, {n_repeats} repeats each, in the order they ran for real")
    order = real_order(real)
    parts = real_parts(real)
    sims = simulate(scenario_v, profile_path, profile, n_repeats, order, parts=parts)
    draws = int(meta.get("bands") or 0)
    spread, spread_how = spread_for(profile, profile_path) if draws else (None, "no bands asked")
    meta["band_spread"] = spread_how
    band_sims: dict[int, list] = {}
    if draws and spread is not None:
        say(f"simulating {draws} band draws of every repeat (P10-P90 prediction bands)")
        band_sims = simulate_bands(scenario_v, profile_path, profile, spread, n_repeats, order, draws, parts)
    why = heldout.reasons(scenario_v, profile, profile_path, meta["profile"]["sha256"],
                          meta["profile"].get("frozen_sha256"), meta.get("runs_started_at"),
                          meta.get("offline", {}).get("simulator"))
    meta["sample"] = {"label": heldout.label(why), "reasons": why}

    comparisons = []
    for rp in real.points:
        p = rp.point
        repeats = [_real_repeat_metrics(rep, agents, cuda) for rep in rp.repeats]
        all_real = [r for rep in rp.repeats for r in rep.records]
        # As many simulated repeats as real ones: a repeat cut by the budget has no twin (the extra
        # simulated ones would run last, on warm processes, and pull the simulated mean down).
        twins = sims[p.index][:len(rp.repeats) or len(sims[p.index])]
        sim_repeats = [compare.sim_repeat_metrics(pr.records, pr.peak_mem_bytes, agents) for pr in twins]
        all_sim = [r for pr in twins for r in pr.records]
        n_twins = len(twins)
        band_repeats = [compare.sim_repeat_metrics(pr.records, pr.peak_mem_bytes, agents)
                        for draw in band_sims.get(p.index, []) for pr in draw[:n_twins]] if band_sims else None
        pc = compare.compare_point(p.index, p.label, p.backend.name, p.n_agents, p.link.gbps,
                                   sim_repeats, compare.stage_means(all_sim), repeats, compare.stage_means(all_real),
                                   band_repeats)
        pc.sample, pc.sample_reasons = meta["sample"]["label"], why
        pc.skipped = rp.skipped
        pc.notes = [e for rep in rp.repeats for e in rep.errors]
        outside = sorted({item for pr in sims[p.index] for item in pr.out_of_range})
        pc.notes += [f"{OUT_OF_RANGE_NOTE}{item}" for item in outside[:2]]
        comparisons.append(pc)

    oom_rows = []
    for probe in real.oom_probes:
        # Every simulated repeat counts: the first N at which any draw runs out.
        sim_points = [pr for prs in sims.values() for pr in prs if pr.point.backend.name == probe.backend]
        probe_max = probe.max_n if cuda else None
        # judged (on a GPU): below the swept N, the first OOM N searched by simulation up to the probe's max + 1
        at = None
        if probe_max is not None and sim_points:
            point = sim_points[0].point
            at = _simulate_at(scenario_v, point, cost_for(scenario_v, profile_path, profile)(point))
        sim_n = _sim_oom_n(sim_points, at, None if probe_max is None else probe_max + 1)
        oom_rows.append({"backend": probe.backend, "real_oom_n": probe.oom_n if cuda else None, "sim_oom_n": sim_n,
                         "real_loaded": probe.loaded, "probe_max": probe_max,
                         "verdict": compare.judge_oom(sim_n, probe.oom_n, probe_max), "message": probe.message})
    summary = compare.summarize(comparisons)
    for row in oom_rows:
        compare.add_oom(summary, row["verdict"], meta["sample"]["label"])

    anchor = anchored.anchored(out_dir, scenario_v, real, profile_path, profile, n_repeats,
                               draws if spread is not None else 0, agents, cuda, meta["sample"]["label"], say)
    figures = report.overlay_plots(out_dir, agents, _curves(agents, comparisons, real, sims))
    doc = {
        "meta": meta,
        "summary": summary,
        "points": [pc.to_dict() for pc in comparisons],
        "oom": oom_rows,
        "repeats": repeat_rows(real, sims),
        "notes": real.notes + device_notes(scenario_v, meta["machine"]["device"], meta["model"]) + profile_notes(meta["profile"]["path"], profile),
        "figures": figures,
    }
    if anchor is not None:
        doc["level_probes"] = anchored.probes_of(real)
        doc["anchored"] = {k: v for k, v in anchor.items() if k != "comparisons"}
    if started_wall is not None:
        meta["wall_s"] = time.perf_counter() - started_wall
    report.write_json(doc, out_dir / "validation.json")
    (out_dir / "validation.md").write_text(report.markdown(doc, comparisons))
    sim_runs = [(i, pr) for p in points for i, pr in enumerate(sims[p.index])]
    _write_records(out_dir / "records_sim.csv", [r for _, pr in sim_runs for r in pr.records],
                   [i for i, pr in sim_runs for _ in pr.records])
    if not quiet:
        print(short_table(comparisons, oom_rows, summary))
        if anchor is not None:
            print(anchored_table(anchor))
    return doc


def anchored_table(anchor: dict) -> str:
    """One line per probed point: the level factor before and after it, the anchored mean's error."""
    by_index = {pc.index: pc for pc in anchor["comparisons"]}
    lines = [f"{'anchored to the level probe before the point':58} {'m before':>8} {'m after':>8} "
             f"{'mean sim':>11} {'err':>7} {'p99 err':>8}  verdicts"]
    for row in anchor["rows"]:
        pc = by_index.get(row["index"])
        m_before = "-" if row["factor"] is None else f"x{row['factor']:.3f}"
        m_after = "-" if row["factor_after"] is None else f"x{row['factor_after']:.3f}"
        if pc is None:
            lines.append(f"{row['label'][:58]:58} {m_before:>8} {m_after:>8}  no probe step: {row.get('error') or '-'}")
            continue
        m = {c.metric: c for c in pc.metrics}
        verdicts = "".join({"PASS": "P", "FAIL": "F", "info": ".", "N/A": "-"}[v] for v in pc.verdicts)
        lines.append(f"{row['label'][:58]:58} {m_before:>8} {m_after:>8} {report.fmt(m['latency_mean_s'].sim, 's'):>11} "
                     f"{report.fmt_err(m['latency_mean_s'].rel_err):>7} {report.fmt_err(m['latency_p99_s'].rel_err):>8}  {verdicts}")
    lines.append(f"anchored summary (apart from the verdicts above): {report.summary_line(anchor['summary'])}")
    return "\n".join(lines)


def short_table(comparisons: list[compare.PointComparison], oom_rows: list[dict], summary: dict) -> str:
    """One line per point: mean and p99 latency real vs sim, payload bytes, verdicts."""
    lines = [f"{'point':58} {'mean real':>11} {'mean sim':>11} {'err':>7} {'p99 err':>8} {'bytes err':>9}  verdicts"]
    for pc in comparisons:
        m = {c.metric: c for c in pc.metrics}
        mean, p99 = m["latency_mean_s"], m["latency_p99_s"]
        down, up = m["bytes_down"], m["bytes_up"]
        bytes_err = max((abs(c.rel_err) for c in (up, down) if c.rel_err is not None), default=None)
        verdicts = "".join({"PASS": "P", "FAIL": "F", "info": ".", "N/A": "-"}[v] for v in pc.verdicts)
        if pc.skipped and not mean.real_values:
            lines.append(f"{pc.label[:58]:58} not run: {pc.skipped}")
            continue
        lines.append(f"{pc.label[:58]:58} {report.fmt(mean.real_mean, 's'):>11} {report.fmt(mean.sim, 's'):>11} "
                     f"{report.fmt_err(mean.rel_err):>7} {report.fmt_err(p99.rel_err):>8} "
                     f"{report.fmt_err(bytes_err):>9}  {verdicts}")
    for row in oom_rows:
        lines.append(f"OOM N {row['backend']}: real {row['real_oom_n']} sim {row['sim_oom_n']} -> {row['verdict']}")
    lines.append(f"summary: {report.summary_line(summary)} "
                 f"(verdict letters in metric order: {', '.join(m.name for m in compare.METRICS)})")
    for sample in compare.SAMPLES:
        lines.append(f"  {sample}: {report.summary_line(summary[sample])}")
    return "\n".join(lines)
