"""Run a scenario: pick a cost model per point, simulate every point, write the outputs."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from djinnsim.errors import DjinnsimError

from .backends import get_backend
from .costmodel import CostModel, ProfileCostModel, RooflineCostModel, transfer_profile
from . import notices
from .estimate import check_workload
from .outputs import OutputFolder, utc_stamp
from .overrides import Override, load_overridden
from .parallel import held, map_points
from .profile import Profile, load_profile
from .records import Record, RecordTable
from .safeyaml import require_file
from .scenario import MAX_BANDS, Point, Scenario, check_seed, dump_scenario, expand_points
from .simulate import PointResult, simulate_point
from .specs import get_gpu


@dataclass
class SimulationResult:
    scenario: Scenario
    points: list[PointResult]
    warnings: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    costs: "CostModels | None" = None  # the cost models that served the points (claims search with them)

    @property
    def records(self) -> list[Record]:
        return [r for p in self.points for r in p.records]

    @property
    def events(self) -> int:
        return sum(p.events for p in self.points)


def bundled_profiles() -> list[Path]:
    folder = Path(str(resources.files("djinnsim.sim") / "data" / "profiles"))
    return sorted(folder.glob("*.json"))


def _default_profile(model_id: str, gpu_key: str) -> Path | None:
    """The bundled measured profile for this model, preferring one from this GPU."""
    matches = []
    for path in bundled_profiles():
        profile = load_profile(path)
        if profile.metadata.model_id == model_id:
            matches.append((profile.metadata.gpu_key != gpu_key, path.name, path))
    return min(matches)[2] if matches else None


class CostModels:
    """Builds (once) the cost model of each (model, GPU) a scenario needs."""

    def __init__(self, scenario: Scenario, calibration: Path | None) -> None:
        self.scenario = scenario
        self.calibration = calibration
        self.warnings: list[str] = []
        self._built: dict[tuple[str, str], CostModel] = {}
        self._profiles: dict[Path, Profile] = {}

    @property
    def profile_paths(self) -> list[Path]:
        return list(self._profiles)

    def _profile(self, path: Path) -> Profile:
        if path not in self._profiles:
            self._profiles[path] = load_profile(path)
        return self._profiles[path]

    def for_point(self, point: Point) -> CostModel:
        key = (point.model.model_id, point.gpu.key)
        if key not in self._built:
            self._built[key] = self._build(point)
        return self._built[key]

    def _build(self, point: Point) -> CostModel:
        mode = self.scenario.cost_model
        if mode == "roofline":
            return RooflineCostModel(point.gpu, point.model)
        path = self.calibration or _default_profile(point.model.model_id, point.gpu.key)
        if path is None:
            self.warnings.append(notices.roofline_fallback(point.model.model_id, point.gpu.name))
            return RooflineCostModel(point.gpu, point.model)
        profile = self._profile(Path(path))
        meta = profile.metadata
        if meta.device == "cpu":
            self.warnings.append(notices.cpu_profile(str(path)))
        if meta.loads_from is not None:
            self.warnings.append(notices.loads_from(str(path), meta.loads_from.path, meta.loads_from.date,
                                                     meta.loads_from.sections))
        if meta.model_id != point.model.model_id:
            raise DjinnsimError(
                f"calibration {path} is for model {meta.model_id}, but the scenario asks {point.model.model_id}"
            )
        if meta.gpu_key == point.gpu.key:
            return ProfileCostModel(profile, point.model)
        if meta.device == "cpu":  # no GPU to move from: transfer would fail on it
            raise DjinnsimError(
                f"calibration {path} was measured on the CPU and stands for no GPU, but the scenario asks "
                f"{point.gpu.key}; use it with `djinnsim validate --device cpu`, or set cost_model: roofline"
            )
        if mode == "transfer":
            if meta.gpu_key is None:
                raise DjinnsimError(f"calibration {path}: GPU {meta.gpu_name!r} has no datasheet to transfer from")
            moved = transfer_profile(profile, get_gpu(meta.gpu_key), point.gpu, point.model)
            return ProfileCostModel(moved, point.model)
        raise DjinnsimError(
            f"calibration {path} was measured on {meta.gpu_name} ({meta.gpu_key or 'no datasheet key'}), "
            f"but the scenario asks {point.gpu.key}; "
            "set cost_model: transfer (move it by datasheet ratios, e.g. --set cost_model=transfer) or roofline"
        )


def point_seed(seed: int, point: Point, repeat: int = 0) -> np.random.SeedSequence:
    """The random streams of a point, keyed by what it simulates except the backend and the link.

    Backends and link rates compared at the same model, GPU and N draw the same step-time jitter,
    ACT times and arrivals (common random numbers), so their difference is the backends' or the
    links', not the draws' (a link sweep's per-token times then differ by bytes / rate alone);
    and a point draws the same whatever else its scenario sweeps. `repeat` > 0 gives further
    independent draws of the same point (validate simulates a point as often as it ran it for
    real); repeat 0 is the draw `djinnsim run` makes.
    """
    key = f"{point.model.model_id}|{point.gpu.key}|{point.n_agents}"
    entropy = [seed, zlib.crc32(key.encode())]
    return np.random.SeedSequence(entropy + [repeat] if repeat else entropy)


def _simulate_task(task: tuple) -> PointResult:
    return simulate_point(*task)


def simulate_scenario(scenario: Scenario, calibration: Path | None = None, seed: int | None = None,
                      progress=None, jobs: int | None = None, ray_address: str | None = None,
                      on_point: Callable[[PointResult], PointResult] | None = None,
                      in_process: bool = False, row_stream: Callable | None = None) -> SimulationResult:
    """Simulate every point of a scenario, in `jobs` local processes or as Ray tasks
    (sim.parallel.map_points; neither: on the executor held now, else one by one);
    `progress(done, total, label)` is called after each point.
    `on_point(result)` takes each point's result in point order and returns what the
    SimulationResult keeps of it; with `in_process` (the points run here, one by one) it sees each
    as soon as it is simulated, so a point's records need not outlive its outputs; there
    `row_stream(point)` may also give the point's RecordBuilder `on_flush` (records written out
    while it runs)."""
    started = time.perf_counter()
    points = expand_points(scenario)
    models = CostModels(scenario, calibration)
    base_seed = scenario.seed if seed is None else seed
    tasks = [(scenario, point, models.for_point(point), point_seed(base_seed, point)) for point in points]
    streamed = on_point is not None and in_process
    results = map_points(functools.partial(_streamed_task, on_point, row_stream) if streamed else _simulate_task, tasks,
                         jobs=jobs, ray_address=ray_address,
                         progress=progress and (lambda done, total, i: progress(done, total, points[i].label)))
    if on_point is not None and not streamed:
        results = [on_point(result) for result in results]
    warnings = list(models.warnings)
    override = scenario.server.scheduler
    for name in scenario.backends:
        backend = get_backend(name, scenario.custom_backends)
        if override and override != backend.scheduler and backend.weights != "shared" and not override.startswith("time_sliced"):
            warnings.append(notices.scheduler_across_processes(name, backend.scheduler, override))
    outside: dict[str, list[str]] = {}
    for result in results:
        for item in result.out_of_range:
            outside.setdefault(item, []).append(result.point.label)
    warnings += notices.outside_calibration(outside)
    return SimulationResult(scenario, results, notices.once(warnings), time.perf_counter() - started, costs=models)


def _streamed_task(on_point: Callable[[PointResult], PointResult], row_stream: Callable | None,
                   task: tuple) -> PointResult:
    return on_point(simulate_point(*task, on_flush=row_stream(task[1]) if row_stream is not None else None))


def without_records(result: PointResult) -> PointResult:
    """A point's result once its records are written: its summary fields, no records."""
    return dataclasses.replace(result, records=RecordTable(0, {}))


def default_out_dir(scenario: Scenario, folder: str | None = None) -> Path:
    """results/<folder>/<UTC stamp>; `folder` (sim.overrides.results_folder) follows the scenario
    file and its overrides, else the scenario's name."""
    return Path("results") / (folder or scenario.name) / utc_stamp()


def run_scenario_file(path: Path, calibration: Path | None = None, out: Path | None = None,
                      seed: int | None = None, quiet: bool = False, bands: int | None = None, jobs: int = 1,
                      ray_address: str | None = None, force: bool = False,
                      overrides: Sequence[Override] = ()) -> Path:
    """`djinnsim run`: load, simulate, write results; returns the output folder.
    `overrides`: `--set` and its shortcuts (sim.overrides), applied to the file before anything else.
    `bands` (default: the scenario's `bands`): draws of the profile's spread for P10-P90 bands;
    `jobs` / `ray_address`: where the points run (sim.parallel.map_points); `force`: replace a
    non-empty `out` (sim.outputs.OutputFolder: the folder appears only once complete)."""
    scenario, results_name = load_overridden(path, overrides)
    if seed is not None:
        scenario = scenario.model_copy(update={"seed": check_seed(seed)})
    if bands is not None:
        if bands < 0:
            raise DjinnsimError(f"--bands must be >= 0, not {bands}")
        scenario = scenario.model_copy(update={"bands": bands})
    if bands is not None and bands > MAX_BANDS:
        raise DjinnsimError(f"--bands must be <= {MAX_BANDS}, not {bands}")
    if calibration is not None:
        require_file(calibration, "calibration profile")
    folder = OutputFolder(out, default_out_dir(scenario, results_name), force=force)
    workload_warning = check_workload(scenario, jobs=jobs)
    if workload_warning and not quiet:
        print(f"warning: {workload_warning}", file=sys.stderr)

    # one executor for the sweep and the claims' searches: Ray starts (or connects) once
    with held(jobs, ray_address):
        return _simulate_and_write(scenario, calibration, folder, quiet, in_process=jobs == 1 and ray_address is None)


def _simulate_and_write(scenario: Scenario, calibration: Path | None, folder: OutputFolder, quiet: bool,
                        in_process: bool = False) -> Path:
    from .report import PointWriter, print_summary

    console = None  # quiet: nothing printed, rich not imported (start-up time)
    if not quiet:
        from rich.console import Console

        console = Console(stderr=False)
        if not console.is_terminal:  # piped or logged: rich's 80 columns would cut the points' names short
            console = Console(stderr=False, width=170)
    points = expand_points(scenario)
    if not points:
        raise DjinnsimError(f"scenario {scenario.name!r} expanded to no points")
    with folder as out_dir:
        (out_dir / "scenario.yaml").write_text(dump_scenario(scenario))
        # each point's outputs are written as it comes (in_process: as soon as it is simulated),
        # then its records are dropped
        with PointWriter(scenario, out_dir, len(points)) as writer:
            def on_point(point_result: PointResult) -> PointResult:
                writer.write_point(point_result)
                return without_records(point_result)

            if console is None or not console.is_terminal:  # a progress bar only where someone watches it
                result = simulate_scenario(scenario, calibration, progress=None, on_point=on_point,
                                           in_process=in_process, row_stream=writer.row_stream)
            else:
                from rich.progress import Progress

                with Progress(console=console, transient=True) as bar:
                    task = bar.add_task(f"simulating {scenario.name}", total=None)

                    def progress(done: int, total: int, label: str) -> None:
                        bar.update(task, completed=done, total=total, description=label)

                    result = simulate_scenario(scenario, calibration, progress=progress, on_point=on_point,
                                               in_process=in_process, row_stream=writer.row_stream)

        try:
            bands_per_point = None
            if scenario.bands:
                from .bands import bands_markdown, scenario_bands
                from .report import point_summary

                bands_per_point = scenario_bands(
                    scenario, [p.point for p in result.points], result.costs.for_point, scenario.seed, scenario.bands,
                    lambda r: point_summary(r, scenario.workload.kind))
            _, summaries = writer.finish(result, bands=bands_per_point)
        finally:
            writer.release()
        from .provenance import provenance
        from .report import _write_json

        cost_models = [p.cost_model for p in result.points]
        _write_json(out_dir / "provenance.json", provenance(result.costs.profile_paths, cost_models))
        if scenario.bands:
            (out_dir / "bands.md").write_text(bands_markdown(summaries, scenario.workload.kind, scenario.bands,
                                                             cost_models))
    out_dir = folder.path
    if not quiet:
        print_summary(result, console, summaries=summaries)
    notices.emit(result.warnings)
    if not quiet:
        console.print(f"results: {out_dir}")
    return out_dir
