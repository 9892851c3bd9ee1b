"""`run_calibration`: every stage in order, fits, the profile and its samples, a summary.

Stages run cheapest and most fundamental first, so an interruption (Ctrl-C, SIGTERM, a time
limit) still leaves a usable profile once the compute grids are done; the samples CSV is rewritten
after every stage either way.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from djinnsim.errors import DjinnsimError
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.profile import Metadata, Profile, save_profile
from djinnsim.sim.specs import ModelSpec, get_model, gpu_key_for_device_name

from . import plan as plans
from .fitting import describe_fit
from .samples import SampleLog
from .session import Session

DEVICES = ("cuda", "cpu")


@dataclass
class CalibrationResult:
    profile: Profile | None
    profile_path: Path | None
    samples_path: Path
    interrupted: bool


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def model_key(spec: ModelSpec) -> str:
    """The bundled spec's file name (llama-2-7b), which names profiles; else the id's last part."""
    from djinnsim.sim.specs import available_models

    stems = [k for k, v in available_models().items() if v == spec and "/" not in k and k != spec.model_id.lower()]
    return stems[0] if stems else spec.key


def default_out(gpu_key: str, spec: ModelSpec) -> Path:
    return Path("results") / "calibration" / f"{gpu_key}-{model_key(spec)}.json"


def _check_inputs(device: str, gpu: int, spec: ModelSpec, weights: str) -> None:
    if device not in DEVICES:
        raise DjinnsimError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if weights != "random" and not Path(weights).exists():
        raise DjinnsimError(f"--weights: no such local path {weights!r} (use 'random' or a folder with config and safetensors)")
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise DjinnsimError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu for small models")
        if not 0 <= gpu < torch.cuda.device_count():
            raise DjinnsimError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) visible")
        total = torch.cuda.get_device_properties(gpu).total_memory
        if spec.weight_bytes > total:
            raise DjinnsimError(f"{spec.model_id} needs {spec.weight_bytes / 2**30:.1f} GiB of weights; GPU {gpu} has {total / 2**30:.1f} GiB")
    elif spec.parameters > 2_000_000_000:
        raise DjinnsimError(f"--device cpu is for small models; {spec.model_id} has {spec.parameters / 1e9:.1f} B parameters")


@contextmanager
def _sigterm_as_interrupt():
    """A time limit's SIGTERM stops the run like Ctrl-C, so what was measured is still written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and CI: wide enough that table rows stay on one line
        console = Console(highlight=False, width=170)
    if quiet:
        return console, None
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    return console, progress


def _work_units(plan: plans.Plan, spec: ModelSpec, device: str) -> float:
    """Progress units: one per grid point or load; a rough weight, refined by the observed rate."""
    from .bench_cached import cached_prefill_points

    copy_kinds = 2 if device.startswith("cuda") else 1
    return float(
        len(plans.prefill_points(plan, spec.max_position_embeddings))
        + len(plans.decode_points(plan, spec.max_position_embeddings, plan.decode_max_sum_context))
        + plan.exp21_runs
        + copy_kinds * len(plan.copy_sizes)
        + len(plan.kv_swap_contexts)
        + len(plan.serde_sizes)
        + 2
        + len(plan.net_sizes)
        + 3 * len(plan.composition_contexts)
        + len(plan.composition_paced_gbps) * len(plan.composition_paced_contexts)
        + 4
        + 2
        + len(cached_prefill_points(plan, spec.max_position_embeddings))
        + 4
        + len(plan.timeslice_k)
    )


def run_calibration(
    *,
    gpu: int = 0,
    device: str = "cuda",
    model: str = "llama-2-7b",
    dtype: str | None = None,
    weights: str = "random",
    quick: bool = False,
    oom_probe: bool = False,
    out: Path | None = None,
    command: str | None = None,
    quiet: bool = False,
    force: bool = False,
) -> CalibrationResult:
    """Measure `model` on one device and write a calibration profile (JSON) and its samples (CSV)."""
    started_at = time.perf_counter()
    if command is None:
        from .options import command_line

        command = command_line(gpu=gpu, device=device, model=model, dtype=dtype, weights=weights, quick=quick,
                               oom_probe=oom_probe, out=out)
    spec = get_model(model)
    _check_inputs(device, gpu, spec, weights)
    import torch

    from .bench_memory import free_before_cuda
    from .environment import host_cpu, software_versions, utc_now
    from .modeling import resolve_dtype

    torch_dtype = resolve_dtype(spec, dtype, device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    dev = f"cuda:{gpu}" if device == "cuda" else "cpu"
    if device == "cuda":
        before = free_before_cuda(gpu)  # before this process's CUDA context exists
        gpu_name = torch.cuda.get_device_name(gpu)
        gpu_key = gpu_key_for_device_name(gpu_name) or _slug(gpu_name)
    else:
        before, gpu_name, gpu_key = None, f"cpu: {host_cpu()}", "cpu"
    explicit_out = out is not None
    out = Path(out) if out is not None else default_out(gpu_key, spec)
    if out.suffix != ".json":
        out = out / f"{gpu_key}-{model_key(spec)}.json" if out.suffix == "" else out.with_suffix(".json")
    if explicit_out and out.exists() and not force:  # checked before minutes of measuring
        raise DjinnsimError(f"--out {out} exists; give --force to replace it")
    samples_path = out.with_suffix(".csv")
    plan = plans.plan_for(dev, quick)
    console, progress = _progress(quiet)
    say = (lambda msg: None) if quiet else (lambda msg: console.print(msg, markup=False, highlight=False))
    s = Session(spec=spec, device=dev, dtype=torch_dtype, plan=plan, log=SampleLog(samples_path), say=say, weights=weights)
    if device == "cpu":
        from .options import CPU_PROFILE_NOTE

        s.notes.append(CPU_PROFILE_NOTE)
    if spec.dtype != dtype_name:
        s.notes.append(f"dtype {dtype_name} (the model's spec says {spec.dtype})")
    r = s.results
    r["kv_bytes_per_token_spec"] = spec.kv_bytes_per_token
    interrupted = False
    with _sigterm_as_interrupt(), (progress or nullcontext()):
        if progress is not None:
            task = progress.add_task(f"calibrating {model_key(spec)} on {dev}", total=_work_units(plan, spec, dev))
            s.advance = lambda units: progress.advance(task, units)
        try:
            _measure(s, before, oom_probe)
        except KeyboardInterrupt:
            interrupted = True
            s.notes.append("interrupted: the profile holds the stages measured before the interruption")
            say("interrupted: writing what was measured")
    s.log.flush()
    versions = software_versions()
    metadata = Metadata(
        source="measured",
        gpu_name=gpu_name,
        gpu_key=gpu_key if device == "cuda" else None,
        gpu_memory_bytes=r.get("memory_start", {}).get("total_bytes"),
        driver=_driver() if device == "cuda" else None,
        cuda=versions["cuda"] if device == "cuda" else None,
        torch=versions["torch"],
        transformers=versions["transformers"],
        python=versions["python"],
        host_cpu=host_cpu(),
        device=device,
        date=utc_now(),
        model_id=spec.model_id,
        dtype=dtype_name,
        weights=weights,
        command=command,
        duration_s=round(time.perf_counter() - started_at, 1),
        quick=quick,
        notes=s.notes,
    )
    from .profile_builder import build_profile

    try:
        profile = build_profile(r, metadata)
    except DjinnsimError as exc:
        if interrupted:
            say(f"no profile written ({exc}); samples kept in {samples_path}")
            raise KeyboardInterrupt from None
        raise
    from .spread import with_spread

    from djinnsim.sim.provenance import file_sha256

    profile = with_spread(profile, s.log.rows).model_copy(
        update={"samples_file": samples_path.name, "samples_sha256": file_sha256(samples_path)})
    save_profile(profile, out)
    if not quiet:
        from .report import print_summary

        print_summary(console, profile, r, out, samples_path)
    if interrupted:
        raise KeyboardInterrupt
    return CalibrationResult(profile, out, samples_path, interrupted)


def _driver() -> str | None:
    from .telemetry import driver_version

    return driver_version()


def _measure(s: Session, before, oom_probe: bool) -> None:
    """Every stage, in order; results land in s.results as each finishes."""
    from .bench_memory import context_overhead, weight_bytes
    from .modeling import build_model

    r = s.results
    r["memory_start"] = context_overhead(s, before)
    t0 = time.perf_counter()
    s.model = build_model(s.spec, s.device, s.dtype, s.weights)
    s.sync()
    r["end_to_end"] = {"model_build_s": time.perf_counter() - t0}
    r["weight_bytes"] = weight_bytes(s.model)
    s.say(f"model: {s.spec.model_id} {s.dtype} built in {r['end_to_end']['model_build_s']:.1f} s, {r['weight_bytes'] / 2**30:.2f} GiB of weights")
    s.advance(1)

    def staged(name: str, fn, *args, optional: bool = False, budget_s: float | None = None):
        t0 = time.perf_counter()
        try:
            value = fn(*args)
        except Exception as exc:  # an optional stage's failure is recorded, the rest still runs
            if not optional:
                raise
            s.notes.append(f"stage {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            s.say(f"-- stage {name} FAILED ({type(exc).__name__}: {exc}); continuing")
            s.free()
            return None
        took_s = time.perf_counter() - t0
        r["end_to_end"][f"stage.{name}_s"] = took_s
        budget = "" if budget_s is None else f" (budget {budget_s:.0f} s{', OVER' if took_s > budget_s else ''})"
        s.say(f"-- stage {name} took {took_s:.1f} s{budget}")
        return value

    try:
        _stages(s, staged, oom_probe)
    finally:
        s.remove_scratch()


def _stages(s: Session, staged, oom_probe: bool) -> None:
    import torch

    from .bench_cached import run_cached_prefill
    from .bench_compute import run_decode_grid, run_exp21, run_prefill_grid, warm_up
    from .bench_copies import run_copies, run_kv_cycle, run_kv_swaps
    from .bench_memory import oom_probe as probe
    from .bench_network import run_loopback, run_serde
    from .bench_processes import run_loads_mp, run_timeslice_mp, timeslice_budget_s
    from .bench_shapes import fit_cold_shapes, run_cold_shapes
    from .bench_weights import run_weight_loads
    from .composition import (describe_paced, describe_path, loopback_path, loopback_serial_gbps, paced_path, paced_path_bytes,
                              run_composition)
    from .profile_builder import build_profile, decode_anchor_points, exp21_prediction, fit_decode, fit_prefill
    from .telemetry import NvmlSampler, nvml_handle

    r = s.results
    r["copies"] = staged("copies", run_copies, s)
    kv_swaps = staged("kv_swaps", run_kv_swaps, s, optional=True)
    if kv_swaps is not None and kv_swaps["fits"]:
        r["kv_swaps"] = kv_swaps
    r["serde"] = staged("serde", run_serde, s)
    r["network"] = staged("network", run_loopback, s)
    staged("warm_up", warm_up, s)
    r["cold_shapes"] = staged("cold_shapes", run_cold_shapes, s, optional=True)
    cycle = staged("kv_cycle", run_kv_cycle, s, optional=True)
    if cycle:  # validate.kv_costs's own swap loop: a fit beside the kv_swaps stage's
        r.setdefault("kv_swaps", {"tensors": 2 * s.spec.num_layers, "fits": {}})["fits"].update(cycle)
    r["prefill"] = staged("prefill", run_prefill_grid, s)
    cached = staged("cached_prefill", run_cached_prefill, s, optional=True, budget_s=s.plan.cached_prefill_budget_s)
    if cached is not None:
        r["cached_prefill"] = cached

    if s.is_cuda:
        free_now, _ = torch.cuda.mem_get_info(s.device)
        margin = max(4 * 2**30, free_now // 10)
        max_sum_context = max(int((free_now - margin) / (s.spec.kv_bytes_per_token * 1.2)), 0)
        nvml, handle = nvml_handle(int(s.device.split(":")[1]), _uuid(s.device))
    else:
        max_sum_context, nvml, handle = 1 << 62, None, None
    sampler = NvmlSampler(nvml, handle) if handle is not None else None
    with sampler or nullcontext():
        if sampler:
            sampler.phase = "decode_grid"
        r["decode"] = staged("decode", run_decode_grid, s, max_sum_context)
        if sampler:
            sampler.phase = "exp21"
        r["exp21"] = staged("exp21", run_exp21, s)
        if sampler:
            sampler.phase = None
    if sampler is not None:
        _log_nvml(s, sampler)
        r["end_to_end"].update(sampler.summary())
    else:
        s.notes.append("no NVML telemetry (nvidia-ml-py or a driver missing, or device cpu)")

    if r.get("cold_shapes") is None:  # the stage failed: the decode grid's first pass still tells
        r["cold_shapes"] = fit_cold_shapes(s.log.rows)
    r["fits"] = {"prefill": fit_prefill(r["prefill"]["points"]),
                 "decode": fit_decode(r["decode"]["points"], decode_anchor_points(s.log.rows))}
    for name, fit in r["fits"].items():
        for line in describe_fit(fit):
            s.say(f"fit {name}: {line}")
    provisional = build_profile(r, Metadata(source="measured", gpu_name="provisional", model_id=s.spec.model_id, dtype=str(s.dtype)))
    cost = ProfileCostModel(provisional, s.spec)
    predicted = exp21_prediction(cost)
    exp21 = r["exp21"]
    r["end_to_end"].update({
        "exp21.total_s.p10": exp21["total"].p10,
        "exp21.total_s.p50": exp21["total"].p50,
        "exp21.total_s.p90": exp21["total"].p90,
        "exp21.prefill_s.p50": exp21["prefill"].p50,
        "exp21.step_s.p50": exp21["step"].p50,
        "exp21.step_s.p90": exp21["step"].p90,
        "exp21.runs": float(len(exp21["total"].samples_s)),
        "exp21.predicted.total_s": predicted["total_s"],
        "exp21.predicted.prefill_s": predicted["prefill_s"],
        "exp21.predicted.step_s_mean": predicted["step_s_mean"],
    })
    s.say(
        f"exp2.1 measured total p50 {exp21['total'].p50 * 1e3:.1f} ms vs fitted model {predicted['total_s'] * 1e3:.1f} ms "
        f"(prefill {exp21['prefill'].p50 * 1e3:.2f} vs {predicted['prefill_s'] * 1e3:.2f} ms, "
        f"step p50 {exp21['step'].p50 * 1e3:.2f} vs mean {predicted['step_s_mean'] * 1e3:.2f} ms)"
    )

    measured = staged("composition", run_composition, s, cost, r["network"].loopback_gbps, optional=True) or []
    rows = [row for row in measured if row.get("paced_gbps") is None]
    r["composition"] = rows
    for row in measured:  # partially_aware paced by the link emulator: network.paced_path, below
        if row.get("paced_gbps") is not None:
            key = f"composition_paced.{row['backend']}.L{row['seq_len']}.{row['paced_gbps']:g}gbps"
            r["end_to_end"][f"{key}.measured_s"] = row["measured_s"]
            for part in ("h2d_s", "compute_s", "d2h_s"):
                r["end_to_end"][f"{key}.server_{part}"] = row["server"][part]
    serial_gbps, path = loopback_serial_gbps(rows), loopback_path(rows)
    paced_rows = [row for row in measured if row.get("paced_gbps") is not None]
    paced = paced_path(paced_rows, cost) if path is not None else None
    r["network"] = r["network"].model_copy(update={"loopback_serial_gbps": serial_gbps, "loopback_path": path,
                                                    "paced_path": paced,
                                                    "paced_path_bytes": paced_path_bytes(paced_rows) if paced else None})
    if serial_gbps is not None:
        s.say(f"loopback host path in series with the link (composition, partially_aware): {serial_gbps:.2f} GB/s each way")
    if path is not None:
        s.say(f"loopback host path with serialization, per message size: {describe_path(path)}")
    if paced is not None:
        s.say(f"loopback host path in series with a paced link, per rate: {describe_paced(paced)}")
    for row in rows:
        key = f"composition.{row['backend']}.L{row['seq_len']}"
        r["end_to_end"][f"{key}.measured_s"] = row["measured_s"]
        r["end_to_end"][f"{key}.predicted_s"] = row["predicted_s"]
        for part in ("h2d_s", "compute_s", "d2h_s"):  # the server's times: a refit recomputes loopback_serial_gbps
            r["end_to_end"][f"{key}.server_{part}"] = row["server"][part]
        r["end_to_end"][f"{key}.predicted_compute_s"] = row["predicted"]["compute"]

    if oom_probe:
        r["oom_copies"] = staged("oom_probe", probe, s, r["weight_bytes"], optional=True)
    weights = staged("weights", run_weight_loads, s, optional=True)
    if weights is not None:
        r["weights"] = weights
        r["end_to_end"].update({k: float(v) for k, v in weights["extra"].items()})
    s.model = None  # the process stages need the device memory: each worker holds its own copy
    s.free()
    loads = staged("loads_mp", run_loads_mp, s, optional=True, budget_s=s.plan.loads_mp_budget_s)
    if loads:
        r["loads_mp"] = loads
    timeslice = staged("timeslice_mp", run_timeslice_mp, s, optional=True, budget_s=timeslice_budget_s(s.plan))
    if timeslice is not None:
        r["timeslice_mp"] = timeslice


def _uuid(device: str) -> str | None:
    import torch

    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except Exception:
        return None


def _log_nvml(s: Session, sampler) -> None:
    for phase, at_s, values in sampler.rows:
        for metric, value in values.items():
            s.log.add("nvml", f"{phase}:{metric}", value, metric.rsplit("_", 1)[-1], rep=int(at_s * 1000))
    s.log.flush()
