"""`djinnsim calibrate`: parse and check the options, then delegate to `runner.run_calibration`.

This module must not import torch (the CLI imports it to register the command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def calibrate(
    *,
    gpu: Annotated[int, typer.Option(help="CUDA device index to calibrate")] = 0,
    device: Annotated[str, typer.Option(help="cuda, or cpu for small models (CI uses tiny-llama)")] = "cuda",
    model: Annotated[str | None, typer.Option(help="model key or Hugging Face id, e.g. llama-2-7b or meta-llama/Llama-2-7b-hf (default: llama-2-7b; with --device cpu, tiny-llama)")] = None,
    dtype: Annotated[str | None, typer.Option(help="float16, bfloat16 or float32 (default: the model's; cpu runs float16 as float32)")] = None,
    weights: Annotated[str, typer.Option(help="'random' (built from the bundled config) or a local folder with the model's weights")] = "random",
    quick: Annotated[bool, typer.Option(help="thinner grids: every stage, about 2 minutes for a 7B model on an H100")] = False,
    oom_probe: Annotated[bool, typer.Option(help="also count how many model copies fit before an out-of-memory error")] = False,
    out: Annotated[Path | None, typer.Option(help="profile JSON to write (default: results/calibration/<gpu-key>-<model-key>.json); samples CSV beside it")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar, per-point lines or summary")] = False,
    refit: Annotated[Path | None, typer.Option(help="measure nothing: recompute the fits of this profile from its samples CSV (rewritten in place, or to --out)")] = None,
    leave_out: Annotated[list[str] | None, typer.Option(help="with --refit: a sample stage no fit nor the spread may use, e.g. exp21_step to judge Exp 2.1 held out (repeatable)")] = None,
    level_from: Annotated[list[Path] | None, typer.Option(help="with --refit: another calibration (profile JSON, samples beside it) of the same GPU, model and dtype whose batch-1 decode spells join the spread's decode level, for bands that do not rest on one calibration's level (repeatable)")] = None,
    level_point: Annotated[str | None, typer.Option(help="with --refit: where the point's batch-1 launch-bound level sits: 'fit' (the decode fit) or 'median' (the median of the spread's batch-1 spell levels, which the bands draw, so the point is their centre; the spread re-expressed over it, bands unchanged). Default: as the profile refitted has it (fit for a measured one)")] = None,
    loopback_path: Annotated[bool, typer.Option(help="with --refit: also compute network.loopback_path (the real loopback path's host time with serialization, per message size) from the composition rows the profile keeps; recomputed anyway when the profile has one")] = False,
    loads_from: Annotated[Path | None, typer.Option(help="with --refit, for a profile whose calibration stopped before its load stages: an earlier full calibration (profile JSON, samples beside it) of the same GPU, model and dtype whose whole-model loads, k-process loads and k-process decoding the profile carries, named in its metadata and in every run's warnings")] = None,
    force: Annotated[bool, typer.Option(help="measuring: replace the profile at --out if it exists")] = False,
) -> None:
    """Measure a GPU (or the CPU) with microbenchmarks and write a calibration profile."""
    from djinnsim.calibrate.options import command_line, default_model

    model = model or default_model(device)
    command = command_line(gpu=gpu, device=device, model=model, dtype=dtype, weights=weights, quick=quick,
                           oom_probe=oom_probe, out=out, refit=refit, leave_out=leave_out or None,
                           level_from=level_from or None, level_point=level_point, loopback_path=loopback_path,
                           loads_from=loads_from)
    if (leave_out or level_from or level_point is not None or loopback_path or loads_from) and refit is None:
        from djinnsim.errors import DjinnsimError

        flag = ("--leave-out" if leave_out else "--level-from" if level_from else "--level-point"
                if level_point is not None else "--loads-from" if loads_from else "--loopback-path")
        raise DjinnsimError(f"{flag} applies to --refit only (a calibration measures every stage)")
    if refit is not None:
        from djinnsim.calibrate.refit import refit_file
        from djinnsim.calibrate.report import print_refit

        profile, path = refit_file(refit, out=out, command=command, left_out=tuple(leave_out or ()),
                                   level_from=tuple(level_from or ()), level_point=level_point, with_path=loopback_path,
                                   loads_from=loads_from)
        if not quiet:
            print_refit(profile, path)
        return
    from djinnsim.calibrate.runner import run_calibration

    run_calibration(
        gpu=gpu,
        device=device,
        model=model,
        dtype=dtype,
        weights=weights,
        quick=quick,
        oom_probe=oom_probe,
        out=out,
        command=command,
        quiet=quiet,
        force=force,
    )
