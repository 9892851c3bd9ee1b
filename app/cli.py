"""The `djinnsim` command: parse, validate, delegate to one library function per command.

Bad input raises DjinnsimError somewhere below; here it becomes one line on stderr and exit 1.
Heavy modules (pandas, matplotlib, torch) are imported by the commands that need them.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from djinnsim.errors import DjinnsimError
from djinnsim.overrides_cli import AgentsOption, BackendsOption, GpuOption, LinkGbpsOption, SetOption, collect

LOCAL_RAY = "local"  # `--ray` with no address (sim.parallel.LOCAL_RAY; the CLI imports no simulator)

# What `pip install 'djinnsim[gpu]'` brings; only calibrate and validate import them.
GPU_EXTRA_MODULES = {"torch", "transformers", "pynvml", "safetensors"}

app = typer.Typer(
    name="djinnsim",
    help="Simulate Djinn-style GPU disaggregation, calibrated by GPU microbenchmarks and validated on real runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from djinnsim import __version__

        typer.echo(f"djinnsim {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Simulate Djinn-style GPU disaggregation, calibrated by GPU microbenchmarks and validated on real runs."""


def one_line_errors(func):
    """Turn a DjinnsimError (bad input, missing file) into `error: ...` and exit code 1. (A Ctrl-C
    is the console entry's: djinnsim.main says `interrupted` once, whenever it comes.)"""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DjinnsimError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in GPU_EXTRA_MODULES:
                raise
            typer.echo(f"error: {exc.name} is not installed: this command needs the gpu extra "
                       "(pip install 'djinnsim[gpu]')", err=True)
            raise typer.Exit(code=1) from None

    return wrapper


class _RunCommand(typer.core.TyperCommand):
    """`run` and `search`, whose `--ray` takes an optional value (typer's parser has none): `--ray` alone (last,
    or before another option or the scenario file) is a local Ray, `--ray ADDRESS` a cluster's."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, arg in enumerate(args[: args.index("--") if "--" in args else len(args)]):
            following = args[i + 1] if i + 1 < len(args) else "-"
            if arg == "--ray" and (following.startswith("-") or following.endswith((".yaml", ".yml"))):
                args[i] = f"--ray={LOCAL_RAY}"
        return super().parse_args(ctx, args)


@app.command(cls=_RunCommand)
@one_line_errors
def run(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML, e.g. scenarios/agents32.yaml")],
    *,
    calibration: Annotated[
        Optional[Path], typer.Option(help="calibration profile JSON (default: the bundled profile for the model)")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="output folder (default: results/<scenario file>[__<overrides' hash>]/<timestamp>/)")
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="override the scenario's seed")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar or summary table")] = False,
    bands: Annotated[
        Optional[int], typer.Option(help="prediction bands: K draws of the profile's spread per point, P10-P90 of "
                                         "every metric in summary.json and bands.md (default: the scenario's bands)")
    ] = None,
    jobs: Annotated[int, typer.Option(help="simulate points in this many local processes")] = 1,
    ray: Annotated[Optional[str], typer.Option(
        metavar="[ADDRESS]",
        help="run each point as a Ray task on the cluster at ADDRESS (alone: a local Ray); needs the ray extra")] = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out that holds earlier djinnsim results")] = False,
    set_: SetOption = None,
    agents: AgentsOption = None,
    backends: BackendsOption = None,
    gpu: GpuOption = None,
    link_gbps: LinkGbpsOption = None,
) -> None:
    """Simulate a scenario and write its results, figures and claims report."""
    from djinnsim.sim.run import run_scenario_file

    overrides = collect(set_, agents=agents, backends=backends, gpu=gpu, link_gbps=link_gbps)
    run_scenario_file(scenario, calibration=calibration, out=out, seed=seed, quiet=quiet, bands=bands, jobs=jobs,
                      ray_address=ray, force=force, overrides=overrides)


__import__("djinnsim.search_cli").search_cli.register(app, one_line_errors, _RunCommand)


def _register_optional_commands() -> None:
    """calibrate and validate live in their own packages; their modules import torch lazily."""
    from djinnsim.calibrate.cli import calibrate
    from djinnsim.validate.cli import validate

    app.command(name="calibrate")(one_line_errors(calibrate))
    app.command(name="validate")(one_line_errors(validate))


try:
    _register_optional_commands()
except ImportError as exc:  # a partial checkout; `run` still works
    print(f"djinnsim: calibrate/validate unavailable ({exc})", file=sys.stderr)


if __name__ == "__main__":
    app()
