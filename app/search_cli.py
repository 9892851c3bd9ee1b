"""`djinnsim search`: parse, validate, delegate to sim.search; registered by app/cli.py."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from djinnsim.errors import DjinnsimError
from djinnsim.overrides_cli import AgentsOption, BackendsOption, GpuOption, LinkGbpsOption, SetOption, collect


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
        help="search only this backend of the scenario (repeatable; default: all)")] = None,
    max_agents: Annotated[int, typer.Option(
        help="largest N probed; a cap that still meets the SLO is reported as limited_by: cap")] = 65536,
    calibration: Annotated[Optional[Path], typer.Option(
        help="calibration profile JSON (default: the bundled profile for the model)")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="output folder (default: results/<scenario file>[__<overrides' hash>]/search-<timestamp>/)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print only the answers as one JSON object")] = False,
    set_: SetOption = None,
    agents: AgentsOption = None,
    backends: BackendsOption = None,
    gpu: GpuOption = None,
    link_gbps: LinkGbpsOption = None,
) -> None:
    """Find capacities (agents under a P99 SLO) or break-even link rates by simulating, not by formula."""
    from djinnsim.sim import search as search_mod
    from djinnsim.sim.run import CostModels
    from djinnsim.sim.overrides import load_overridden

    chosen = [name for name, value in (("--slo-p99-ms", slo_p99_ms), ("--break-even-ms", break_even_ms),
                                       ("--within-native-pct", within_native_pct)) if value is not None]
    if len(chosen) != 1:
        raise DjinnsimError("give exactly one of --slo-p99-ms, --break-even-ms, --within-native-pct"
                            + (f" (got {', '.join(chosen)})" if chosen else ""))
    if calibration is not None and not calibration.is_file():
        raise DjinnsimError(f"calibration profile not found: {calibration}")
    overrides = collect(set_, agents=agents, backends=backends, gpu=gpu, link_gbps=link_gbps)
    loaded, folder = load_overridden(scenario, overrides)
    costs = CostModels(loaded, calibration)
    if slo_p99_ms is not None:
        answers = search_mod.search_capacity(loaded, slo_p99_ms, backend, max_agents=max_agents, costs=costs)
    else:
        answers = search_mod.search_break_even(loaded, break_even_ms, within_native_pct, backend, costs=costs)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = out if out is not None else Path("results") / folder / f"search-{stamp}"
    if out_dir.exists() and not out_dir.is_dir():
        raise DjinnsimError(f"--out {out_dir} exists and is not a folder")
    search_mod.write_search_outputs(answers, out_dir)
    from djinnsim.sim.notices import emit

    emit(costs.warnings)
    if json_output:
        typer.echo(json.dumps(search_mod.answers_json(answers)))
        return
    typer.echo((out_dir / "search.md").read_text())
    typer.echo(f"results: {out_dir}")


def register(app: typer.Typer, wrap: Callable) -> None:
    app.command(name="search")(wrap(search))
