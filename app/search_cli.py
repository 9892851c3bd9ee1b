"""`djinnsim search`: parse, validate, delegate to sim.search; registered by app/cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from djinnsim.errors import DjinnsimError
from djinnsim.overrides_cli import AgentsOption, GpuOption, LinkGbpsOption, SetOption, collect

# `run --backends B,...` replaces the scenario's list; a search picks among the scenario's backends
# with `--backend B` (repeatable). `--backends B,...` is kept, hidden, as another spelling of the
# same choice (the same answers and the same results folder), not as an override of the scenario.
BackendsAlias = Annotated[Optional[list[str]], typer.Option(
    "--backends", hidden=True, help="the same as --backend, comma-separated")]


def search(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML, e.g. scenarios/agents32.yaml")],
    *,
    slo_p99_ms: Annotated[Optional[float], typer.Option(
        help="agents scenarios: the largest N whose simulated P99 per phase is at most this, no OOM or rejection")] = None,
    break_even_ms: Annotated[Optional[float], typer.Option(
        help="decode scenarios: the slowest link at which each remote backend's mean per-token latency is at most this")] = None,
    within_native_pct: Annotated[Optional[float], typer.Option(
        help="decode scenarios: the slowest link at which each remote backend is within this % of native_pytorch")] = None,
    backend: Annotated[Optional[list[str]], typer.Option(
        metavar="B", help="search only this backend of the scenario (repeatable, or comma-separated; "
                          "default: all; --set backends=[...] changes the scenario's list)")] = None,
    max_agents: Annotated[int, typer.Option(
        help="largest N probed; a cap that still meets the SLO is reported as limited_by: cap")] = 65536,
    calibration: Annotated[Optional[Path], typer.Option(
        help="calibration profile JSON (default: the bundled profile for the model)")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="output folder (default: results/<scenario file>[__<overrides' hash>]/search-<timestamp>/)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print only the answers as one JSON object")] = False,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out that holds earlier djinnsim results")] = False,
    jobs: Annotated[int, typer.Option(help="search the groups (backend, model, GPU, link) in this many local processes")] = 1,
    ray: Annotated[Optional[str], typer.Option(
        metavar="[ADDRESS]",
        help="search each group as a Ray task on the cluster at ADDRESS (alone: a local Ray); needs the ray extra")] = None,
    set_: SetOption = None,
    agents: AgentsOption = None,
    backends: BackendsAlias = None,
    gpu: GpuOption = None,
    link_gbps: LinkGbpsOption = None,
) -> None:
    """Find capacities (agents under a P99 SLO) or break-even link rates by simulating, not by formula."""
    from djinnsim.sim import search as search_mod
    from djinnsim.sim.outputs import OutputFolder, utc_stamp
    from djinnsim.sim.parallel import held
    from djinnsim.sim.safeyaml import require_file, strict_json
    from djinnsim.sim.run import CostModels
    from djinnsim.sim.overrides import load_overridden

    chosen = [name for name, value in (("--slo-p99-ms", slo_p99_ms), ("--break-even-ms", break_even_ms),
                                       ("--within-native-pct", within_native_pct)) if value is not None]
    if len(chosen) != 1:
        raise DjinnsimError("give exactly one of --slo-p99-ms, --break-even-ms, --within-native-pct"
                            + (f" (got {', '.join(chosen)})" if chosen else ""))
    if calibration is not None:
        require_file(calibration, "calibration profile")
    for name, value in (("--slo-p99-ms", slo_p99_ms), ("--break-even-ms", break_even_ms),
                        ("--within-native-pct", within_native_pct)):
        if value is not None and not -float("inf") < value < float("inf"):  # the range: sim.search
            raise DjinnsimError(f"{name} must be a finite number, not {value}")
    if not 1 <= max_agents <= search_mod.DEFAULT_MAX_AGENTS * 16:
        raise DjinnsimError(f"--max-agents must be in 1..{search_mod.DEFAULT_MAX_AGENTS * 16}, not {max_agents}")
    chosen_backends = selected_backends([*(backend or ()), *(backends or ())])
    overrides = collect(set_, agents=agents, gpu=gpu, link_gbps=link_gbps)
    loaded, results_name = load_overridden(scenario, overrides)
    folder = OutputFolder(out, Path("results") / results_name / f"search-{utc_stamp()}", force=force)
    costs = CostModels(loaded, calibration)
    with held(jobs, ray):  # the groups run as `djinnsim run --jobs / --ray` runs points; answers do not change
        if slo_p99_ms is not None:
            answers = search_mod.search_capacity(loaded, slo_p99_ms, chosen_backends, max_agents=max_agents, costs=costs)
        else:
            answers = search_mod.search_break_even(loaded, break_even_ms, within_native_pct, chosen_backends, costs=costs)
    with folder as staging:
        search_mod.write_search_outputs(answers, staging)
    out_dir = folder.path
    from djinnsim.sim.notices import emit

    emit(costs.warnings)
    if json_output:
        typer.echo(strict_json(search_mod.answers_json(answers)))
        return
    typer.echo((out_dir / "search.md").read_text())
    typer.echo(f"results: {out_dir}")


def selected_backends(values: list[str]) -> list[str] | None:
    """The backends named by `--backend` (each value may be a comma-separated list), in order,
    each once; None (all of the scenario's) when none is named."""
    names = [name.strip() for value in values for name in value.split(",")]
    if any(not name for name in names):
        raise DjinnsimError(f"--backend: an empty backend name in {','.join(values)!r}")
    return list(dict.fromkeys(names)) or None


def register(app: typer.Typer, wrap: Callable, command_class: type | None = None) -> None:
    """`command_class`: the click command class `run` uses (its `--ray` takes an optional value)."""
    app.command(name="search", cls=command_class)(wrap(search))
