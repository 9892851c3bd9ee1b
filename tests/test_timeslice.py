"""The time-sliced model in absolute GPU time: k processes decoding at once each step in
max(lone step, k g), g fitted in seconds from timeslice_mp's saturated points, the lone step the
cost model's own decode step (so a moved launch-bound level moves it, and not k g)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import simpy

from djinnsim.calibrate.refit import timeslice_steps
from djinnsim.calibrate.report import timeslice_fit
from djinnsim.sim.bands import level_scaled
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.engine.executors import FluidTimeSliced, GpuWork, PassTimer, TimeSliced
from djinnsim.sim.profile import Timeslice, TimeslicePoint, fit_gpu_step_s, load_profile
from djinnsim.sim.specs import get_model

LLAMA = get_model("llama-2-7b")
REPO = Path(__file__).resolve().parents[1]
RUN3 = REPO / "docs" / "calibration" / "h200-run3" / "h200-llama-2-7b.json"


def _rows(steps: dict[int, list[float]]) -> list[dict[str, str]]:
    """timeslice_mp rows as the samples CSV holds them, plus a row of another stage."""
    rows = [{"stage": "decode", "unit": "s", "concurrent": "", "value": "0.5"}]
    for k, values in steps.items():
        rows += [{"stage": "timeslice_mp", "unit": "s", "concurrent": str(k), "value": f"{v:.5g}"} for v in values]
    return rows


@pytest.mark.parametrize("lone_s,gpu_s,saturated", [(0.030, 0.008, [4, 8, 16]), (0.020, 0.008, [4, 8, 16]),
                                                     (0.012, 0.008, [2, 4, 8, 16]), (0.050, 0.004, [16])])
def test_the_fit_recovers_g_and_where_the_gpu_saturates(lone_s, gpu_s, saturated):
    rng = np.random.default_rng(7)
    steps = {k: list(max(lone_s, k * gpu_s) * rng.uniform(0.97, 1.03, size=40)) for k in (1, 2, 4, 8, 16)}
    measured = {k: float(np.median(v)) for k, v in timeslice_steps(_rows(steps)).items()}
    g, on_line = fit_gpu_step_s(list(measured.items()))
    assert g == pytest.approx(gpu_s, rel=0.02)
    assert on_line == saturated


def test_the_lone_level_below_the_line_does_not_move_g():
    """Two calibrations alike but for the lone (launch-bound) level, as H200 runs 2 and 3: one g."""
    line = [(4, 0.0321), (8, 0.0649)]
    g_slow, _ = fit_gpu_step_s([(1, 0.0368), (2, 0.0216), *line])
    g_fast, _ = fit_gpu_step_s([(1, 0.0209), (2, 0.0250), *line])
    assert g_slow == g_fast == pytest.approx(np.sqrt(0.0321 / 4 * 0.0649 / 8))


def test_a_profile_without_g_fits_it_from_its_points_on_load():
    points = [TimeslicePoint(processes=k, step_s_p10=y, step_s_p50=y, step_s_p90=y, slowdown_p10=y / 0.03,
                             slowdown_p50=y / 0.03, slowdown_p90=y / 0.03) for k, y in ((1, 0.03), (4, 0.032), (8, 0.064))]
    ts = Timeslice.model_validate({"points": [p.model_dump() for p in points], "context_tokens": (72, 103),
                                   "gpu_busy_fraction": 0.5})
    assert ts.gpu_step_s == pytest.approx(0.008) and ts.saturated_k == [4, 8]


def _per_process_step_s(cost, k: int, steps: int = 60, kind=FluidTimeSliced) -> float:
    """Mean per-process decode step with k processes decoding `steps` steps at once at the
    timeslice_mp stage's contexts (jitter 1: the model alone)."""
    env = simpy.Environment()
    server = kind(env, PassTimer(cost, np.random.default_rng(0)))
    context = cost.profile.timeslice_mp.context_tokens
    passes = [("decode", context[0] + i % (context[1] - context[0] + 1)) for i in range(steps)]
    for _ in range(k):
        env.process(server.execute(GpuWork(passes, process=object())))
    env.run()
    return env.now / steps


def _no_jitter(profile):
    return profile.model_copy(update={"jitter_decode": [1.0], "jitter_decode_sequence": []})


@pytest.mark.parametrize("kind", [FluidTimeSliced, TimeSliced])
def test_at_large_k_the_step_is_k_g_whatever_the_lone_level(kind):
    """H200 run 3 (IN-SAMPLE: the run where the relative model's miss was seen): its decode fit
    puts the lone step near 36 ms, its own lone process ran at 20.9 ms, and at k = 8 each process
    stepped in 65.1 ms. The simulator gives 8 g there at the fit's level and at 1.5 times it; the
    relative model, lone x max(1, 8 f) with f = 0.447, gave 128 ms."""
    profile = _no_jitter(load_profile(RUN3))
    g = profile.timeslice_mp.gpu_step_s
    measured = next(p.step_s_p50 for p in profile.timeslice_mp.points if p.processes == 8)
    for level in (1.0, 1.5):
        cost = ProfileCostModel(level_scaled(profile, level), LLAMA)
        assert _per_process_step_s(cost, 8, kind=kind) == pytest.approx(8 * g, rel=0.02)
        assert _per_process_step_s(cost, 8, kind=kind) == pytest.approx(measured, rel=0.03)
    lone = [_per_process_step_s(ProfileCostModel(level_scaled(profile, level), LLAMA), 1) for level in (1.0, 1.5)]
    assert lone[1] == pytest.approx(1.5 * lone[0], rel=1e-9)  # the level draw moves the lone step


def test_the_refit_report_puts_both_models_against_the_measured_steps():
    fit = timeslice_fit(load_profile(RUN3))
    by_k = {k: (m, old, new) for k, m, old, new in fit["points"]}
    m, old, new = by_k[8]
    assert abs(new - m) / m < 0.03 < abs(old - m) / m
    assert fit["new_rmse_s"] < fit["old_rmse_s"]


def test_a_transferred_profile_moves_g_by_the_hbm_ratio():
    from djinnsim.sim.costmodel import transfer_profile
    from djinnsim.sim.specs import get_gpu

    profile = load_profile(RUN3)
    h200, h100 = get_gpu("h200"), get_gpu("h100-80gb")
    moved = transfer_profile(profile, h200, h100, LLAMA)
    ratio = h200.hbm_gbps / h100.hbm_gbps
    assert moved.timeslice_mp.gpu_step_s == pytest.approx(profile.timeslice_mp.gpu_step_s * ratio)


def test_a_transferred_profile_keeps_the_prefill_floors_and_says_what_moved():
    """The max-form prefill's floor is the host's launch time: a datasheet transfer leaves it (the
    GPU polynomial moves), and the moved profile's notes say so beside g's HBM ratio."""
    from djinnsim.sim.costmodel import evaluate_fit, transfer_profile
    from djinnsim.sim.specs import get_gpu

    profile = load_profile(REPO / "sim" / "data" / "profiles" / "h200-llama-2-7b.json")
    h200, h100 = get_gpu("h200"), get_gpu("h100-80gb")
    moved = transfer_profile(profile, h200, h100, LLAMA)
    for name in ("prefill", "cached_prefill"):
        assert getattr(moved, name).floor_s == getattr(profile, name).floor_s is not None
        assert getattr(moved, name).coef != getattr(profile, name).coef
    short = evaluate_fit(moved.prefill, {"prompt_tokens": 16, "batch": 1, "context": 0, "tokens": 16})[0]
    assert short == profile.prefill.floor_s  # a launch-bound prompt: the host's floor, as measured
    said = " ".join(moved.metadata.notes)
    assert "floor_s" in said and "gpu_step_s" in said and f"{h200.hbm_gbps / h100.hbm_gbps:.3g}" in said
    assert ProfileCostModel(moved, LLAMA).describe() == ProfileCostModel(
        profile.model_copy(update={"metadata": moved.metadata.model_copy(update={"notes": moved.metadata.notes[:-1]})}),
        LLAMA).describe()  # the one-line description names the source GPU only, as before


def _refit_damaged(tmp_path, stage: str, column: str, value: str):
    """calibrate --refit of the bundled H200 profile beside a copy of its samples whose first timed
    row of `stage` has `column` set to `value` (the profile's samples hash set to the copy's)."""
    import csv
    import json

    from typer.testing import CliRunner

    from djinnsim.cli import app
    from djinnsim.sim.provenance import file_sha256

    bundled = REPO / "sim" / "data" / "profiles" / "h200-llama-2-7b"
    rows = list(csv.DictReader(bundled.with_suffix(".csv").open(newline="")))
    hit = next(r for r in rows if r["stage"] == stage and r["unit"] == "s" and (stage != "timeslice_mp" or r["concurrent"] == "8"))
    hit[column] = value
    samples = tmp_path / "h200-llama-2-7b.csv"
    with samples.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    doc = json.loads(bundled.with_suffix(".json").read_text())
    doc["samples_sha256"] = file_sha256(samples)
    (tmp_path / "h200-llama-2-7b.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["calibrate", "--refit", str(tmp_path / "h200-llama-2-7b.json"),
                                      "--out", str(tmp_path / "r.json"), "--quiet"])
    lines = [line for line in result.output.splitlines() if line.strip()]  # stdout and stderr together
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "r.json").exists()
    return lines[0]


@pytest.mark.parametrize("column,value", [("value", "nan"), ("value", "-0.01"), ("value", "inf"), ("concurrent", "x"),
                                          ("concurrent", "0")])
def test_a_refit_from_damaged_timeslice_samples_is_one_line(tmp_path, column, value):
    """calibrate --refit re-fits g from the samples' timeslice_mp rows: a step that is not a finite
    time > 0, or a k that is not a whole number >= 1, stops it in one line naming the stage."""
    assert "timeslice_mp" in _refit_damaged(tmp_path, "timeslice_mp", column, value)


@pytest.mark.parametrize("stage", ["prefill", "cached_prefill", "decode"])
@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "fast"])
def test_a_refit_from_a_damaged_timed_sample_is_one_line(tmp_path, stage, value):
    """Every timed sample (unit s) the refit reads must be a time > 0: a 'nan' stopped the prefill,
    cached-prefill and decode fits with a LAPACK message and a traceback, and -1, 0 or inf refit
    silently (the floor fit took them as points)."""
    line = _refit_damaged(tmp_path, stage, "value", value)
    assert stage in line and "h200-llama-2-7b.csv" in line, line


H200 = REPO / "sim" / "data" / "profiles" / "h200-llama-2-7b.json"


def _h200_cost() -> ProfileCostModel:
    """The shipped H200 profile without jitter (prefill and decode): the model alone."""
    return ProfileCostModel(_no_jitter(load_profile(H200)).model_copy(update={"jitter_prefill": [1.0]}), LLAMA)


def _gpu_work_s(fit, inputs) -> float:
    """The GPU term of a max(floor, GPU work) fit, by hand from its coefficients."""
    values = {"1": 1.0, "batch": inputs["batch"], "tokens": inputs["batch"] * inputs["prompt_tokens"],
              "tokens_sq": inputs["batch"] * inputs["prompt_tokens"] ** 2,
              "tokens_ctx": inputs["batch"] * inputs["prompt_tokens"] * inputs["context"],
              "sum_context": inputs["batch"] * inputs["context"]}
    return sum(k * values[f] for k, f in zip(fit.coef, fit.features))


@pytest.mark.parametrize("prompt,context,fit", [(128, 0, "prefill"), (2048, 0, "prefill"), (16, 122, "cached_prefill"),
                                                (512, 1024, "cached_prefill")])
def test_a_prefill_splits_into_its_own_fits_gpu_work_and_host_launches(prompt, context, fit):
    """A prefill's GPU part is the GPU term of its own max(floor, GPU work) fit (prefill, or
    cached_prefill on a cached context), the rest host launches: not a decode step's split."""
    cost = _h200_cost()
    timer = PassTimer(cost, np.random.default_rng(0))
    gpu_s = _gpu_work_s(getattr(cost.profile, fit), {"prompt_tokens": prompt, "batch": 1, "context": context})
    p = ("prefill", prompt, context)
    duration = cost.prefill_s(prompt, 1, context)
    assert timer.host_s(p, 1, duration) == pytest.approx(max(duration - gpu_s, 0.0), rel=1e-12, abs=1e-15)
    assert cost.prefill_gpu_s(prompt, 1, context) == pytest.approx(gpu_s, rel=1e-12)
    total, busy = timer.totals_s(GpuWork([p, ("decode", context + prompt)]))
    step = cost.decode_step_s(1, context + prompt)
    assert busy == pytest.approx(min(gpu_s, duration) + cost.decode_gpu_s(1, context + prompt), rel=1e-12)
    assert total == pytest.approx(duration + step, rel=1e-12)


@pytest.mark.parametrize("kind", [FluidTimeSliced, TimeSliced])
def test_k_processes_prefilling_at_once_take_max_of_the_lone_prefill_and_k_times_its_gpu_work(kind):
    """k processes each prefilling once at the same time: the fluid model finishes them in
    max(D, k G), G the prefill fit's GPU work (the per-pass model agrees: one pass each, the last
    turn ends at host + k G)."""
    cost = _h200_cost()
    for prompt in (128, 2048):
        duration = cost.prefill_s(prompt)
        gpu_s = _gpu_work_s(cost.profile.prefill, {"prompt_tokens": prompt, "batch": 1, "context": 0})
        for k in (1, 4, 16):
            env = simpy.Environment()
            server = kind(env, PassTimer(cost, np.random.default_rng(0)))
            for _ in range(k):
                env.process(server.execute(GpuWork([("prefill", prompt, 0)], process=object())))
            env.run()
            assert env.now == pytest.approx(max(duration, (duration - gpu_s) + k * gpu_s if kind is TimeSliced
                                                else k * gpu_s), rel=1e-9)


def test_a_prefill_fit_without_a_floor_splits_as_a_decode_step_launches():
    """An additive prefill fit (no floor_s: older profiles) gives no GPU term: a prefill launches
    as much as a decode step at its batch and context, the rest is the GPU's (as before)."""
    profile = _no_jitter(load_profile(H200))
    profile = profile.model_copy(update={"prefill": profile.prefill.model_copy(update={"floor_s": None})})
    cost = ProfileCostModel(profile, LLAMA)
    assert cost.prefill_gpu_s(128) is None
    timer = PassTimer(cost, np.random.default_rng(0))
    duration = cost.prefill_s(128)
    launch = cost.decode_step_s(1, 128) - cost.decode_gpu_s(1, 128)
    assert timer.host_s(("prefill", 128, 0), 1, duration) == pytest.approx(min(launch, duration), rel=1e-12)


def _overlapping(kind, cost, k: int, start_every_s: float = 0.0) -> None:
    """k processes each decoding 20 steps on a time-sliced executor, one started every `start_every_s`."""
    env = simpy.Environment()
    server = kind(env, PassTimer(cost, np.random.default_rng(0)))

    def process(i):
        yield env.timeout(i * start_every_s)
        yield from server.execute(GpuWork([("decode", 88 + j) for j in range(20)], process=i))

    for i in range(k):
        env.process(process(i))
    env.run()


@pytest.mark.parametrize("kind", [FluidTimeSliced, TimeSliced])
def test_more_processes_at_once_than_timeslice_mp_measured_is_flagged(kind):
    """The stage measured k up to 8 (H200 profile): a ninth process decoding at the same time is
    past it and goes to the run's warnings; eight, or any number one after another, are not."""
    flag = "time-sliced decoding with more than 8 processes"
    assert load_profile(H200).timeslice_mp.max_k == 8
    for k, start_every_s, flagged in ((8, 0.0, False), (9, 0.0, True), (16, 10.0, False)):
        cost = _h200_cost()
        _overlapping(kind, cost, k, start_every_s)
        assert (flag in cost.out_of_range) == flagged, (k, start_every_s)
    from djinnsim.sim.notices import outside_calibration

    said = outside_calibration({flag: ["point a"]})
    assert len(said) == 1 and "more than 8 processes" in said[0] and "(point a)" in said[0]
