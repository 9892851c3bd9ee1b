"""`djinnsim validate`: parse and check the options, then delegate to `pipeline.run_validation`.

This module must not import torch (the CLI imports it to register the command).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from djinnsim.overrides_cli import SetOption


def validate(
    scenario: Annotated[
        Optional[Path],
        typer.Argument(help="scenario YAML whose points to run for real, e.g. scenarios/exp21_decode.yaml"),
    ] = None,
    *,
    from_real: Annotated[
        Optional[Path],
        typer.Option(help="a finished validation folder: re-simulate its points now and compare them with its real "
                          "records, running nothing for real (no GPU needed); takes only --calibration, --bands, --out, --quiet"),
    ] = None,
    also_real: Annotated[
        Optional[list[Path]],
        typer.Option(help="with --from-real: another finished validation with more repeats of the same points (same "
                          "scenario, machine and frozen profile: a validation split over device commands); its "
                          "repeats follow --from-real's (repeatable)"),
    ] = None,
    condition_on_level: Annotated[
        bool,
        typer.Option(help="with --from-real: an IN-SAMPLE diagnostic: scale the profile's passes by the real runs' median "
                          "compute per token over the simulated one, to see what the rest of the model predicts once "
                          "the launch-bound level the runs met is given (never a held-out figure)"),
    ] = False,
    gpu: Annotated[int, typer.Option(help="CUDA device index to run on")] = 0,
    device: Annotated[str, typer.Option(help="cuda, or cpu: the same pipeline with the tiny model (CI)")] = "cuda",
    points: Annotated[
        Optional[list[str]],
        typer.Option("--points", help="points to run: an index or a label glob (e.g. 'full_djinn*', '*n2'); repeatable; default all"),
    ] = None,
    repeats: Annotated[int, typer.Option(help="real runs of each point (the real mean's 95% bootstrap interval is over "
                                              "them; fewer than 5 is reported as too few)")] = 5,
    bands: Annotated[int, typer.Option(help="band draws: the real runs' order simulated this many more times under "
                                            "draws of the profile's spread, for P10-P90 bands (0: none)")] = 10,
    calibration: Annotated[
        Optional[Path],
        typer.Option(help="profile of THIS machine and model (refused otherwise); default: calibrate first (quick); "
                          "with --from-real: a profile of the real runs' machine, default the one they used"),
    ] = None,
    full_calibration: Annotated[bool, typer.Option(help="when calibrating first, run the full calibration, not --quick")] = False,
    out: Annotated[
        Optional[Path],
        typer.Option(help="report folder (default: results/validation/<timestamp>/; with --from-real DIR: DIR-resim)"),
    ] = None,
    runs: Annotated[Optional[int], typer.Option(help="decode workloads: runs per repeat, warm-up included")] = 5,
    warmup_runs: Annotated[Optional[int], typer.Option(help="decode workloads: runs discarded at the start of each repeat")] = 1,
    new_tokens: Annotated[Optional[int], typer.Option(help="tokens generated per run or phase (default: the scenario's)")] = None,
    agents: Annotated[Optional[str], typer.Option(help="agents workloads: comma-separated N values, e.g. 1,2")] = "1,2",
    act_s: Annotated[Optional[float], typer.Option(help="agents workloads: ACT (tool call) seconds, fixed")] = 1.0,
    iterations: Annotated[Optional[int], typer.Option(help="agents workloads: REASON/ACT/REFLECT cycles (default: the scenario's)")] = None,
    oom_probe_max: Annotated[int, typer.Option(help="keep-alive: most model copies tried when looking for the OOM N (GPU only)")] = 8,
    level_probe: Annotated[bool, typer.Option(help="before each point with a resident model process, a 40-token batch-1 decode on it outside the scored runs; the report judges the point again at the level it measured (validate.anchored), counted apart")] = False,
    time_budget_s: Annotated[float, typer.Option(help="no new real run starts after this many seconds (calibration excluded)")] = 1800.0,
    seed: Annotated[Optional[int], typer.Option(help="override the scenario's seed")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress lines or summary table")] = False,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out that holds an earlier djinnsim output")] = False,
    strict: Annotated[bool, typer.Option(help="exit with code 1 when any verdict is FAIL")] = False,
    set_: SetOption = None,
) -> None:
    """Run a scenario's small points for real, simulate the same points, and report the difference."""
    from djinnsim.errors import DjinnsimError

    command = " ".join(["djinnsim", *sys.argv[1:]])
    if also_real and from_real is None:
        raise DjinnsimError("--also-real adds repeats to --from-real DIR: give --from-real too")
    if condition_on_level and from_real is None:
        raise DjinnsimError("--condition-on-level re-judges finished runs: give --from-real DIR")
    if from_real is not None:
        given = {"SCENARIO": scenario is not None, "--gpu": gpu != 0, "--device": device != "cuda",
                 "--points": bool(points), "--repeats": repeats != 5, "--full-calibration": full_calibration,
                 "--runs": runs != 5, "--warmup-runs": warmup_runs != 1, "--new-tokens": new_tokens is not None,
                 "--agents": agents != "1,2", "--act-s": act_s != 1.0, "--iterations": iterations is not None,
                 "--oom-probe-max": oom_probe_max != 8, "--time-budget-s": time_budget_s != 1800.0,
                 "--seed": seed is not None, "--level-probe": level_probe}
        clash = [name for name, on in given.items() if on]
        if clash:
            raise DjinnsimError(f"--from-real re-compares runs already made: {', '.join(clash)} cannot change them")
        from djinnsim.validate.offline import OfflineRequest, run_offline

        if bands == 1 or bands < 0:
            raise DjinnsimError(f"--bands must be 0 (none) or >= 2, not {bands}")
        if set_:
            raise DjinnsimError("--from-real re-compares runs already made: --set cannot change them")
        _check_strict(run_offline(OfflineRequest(from_real=from_real, calibration=calibration, out=out, quiet=quiet,
                                                 command=command, bands=bands, force=force,
                                                 also_real=tuple(also_real or ()),
                                                 condition_on_level=condition_on_level)), strict)
        return
    if scenario is None:
        raise DjinnsimError("give a SCENARIO to validate, or --from-real DIR to re-compare a finished validation")
    from djinnsim.validate.pipeline import ValidateRequest, run_validation
    from djinnsim.validate.points import Shortening, parse_agents

    short = Shortening(runs=runs, warmup_runs=warmup_runs, new_tokens=new_tokens, agents=parse_agents(agents),
                       act_s=act_s, iterations=iterations)
    from djinnsim.sim.overrides import collect

    out_dir = run_validation(
        ValidateRequest(
            scenario_path=scenario,
            gpu=gpu,
            device=device,
            points=tuple(points or ()),
            repeats=repeats,
            bands=bands,
            calibration=calibration,
            full_calibration=full_calibration,
            out=out,
            short=short,
            time_budget_s=time_budget_s,
            oom_probe_max=oom_probe_max,
            seed=seed,
            quiet=quiet,
            command=command,
            force=force,
            overrides=tuple(collect(set_)),
            level_probe=level_probe,
        )
    )
    _check_strict(out_dir, strict)


def _check_strict(out_dir: Path, strict: bool) -> None:
    """`--strict`: exit 1, with one line on stderr, when the report holds a FAIL verdict."""
    if not strict:
        return
    import json

    summary = json.loads((Path(out_dir) / "validation.json").read_text())["summary"]
    failed = int(summary.get("FAIL", 0))
    if failed:
        typer.echo(f"validate --strict: {failed} FAIL verdict(s); see {Path(out_dir) / 'validation.md'}", err=True)
        raise typer.Exit(code=1)
