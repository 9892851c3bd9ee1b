"""What the cost model makes of the schema-2 sections: loads by k processes, time slicing between
processes, prefill on a cached context; each flagged past what was measured; schema 1 still reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from djinnsim.calibrate.bench_cached import cached_prefill_points, fit_cached_prefill
from djinnsim.calibrate.fitting import FitPoint
from djinnsim.calibrate.plan import plan_for
from djinnsim.errors import DjinnsimError
from djinnsim.sim.costmodel import ProfileCostModel, transfer_profile
from djinnsim.sim.profile import (
    SCHEMA_VERSION,
    ProcessLoads,
    ProcessRun,
    Timeslice,
    TimeslicePoint,
    load_profile,
    save_profile,
)
from djinnsim.sim.run import run_scenario_file
from djinnsim.sim.specs import get_gpu, get_model

LLAMA = get_model("llama-2-7b")
REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "sim" / "data" / "profiles" / "h100-80gb-llama-2-7b.json"
GB = 1e9


def _loads(nbytes: int, aggregate: dict[int, float]) -> ProcessLoads:
    runs = {k: [ProcessRun(started_s=[0.0] * k, finished_s=[k * nbytes / (g * GB)] * k)] for k, g in aggregate.items()}
    return ProcessLoads(nbytes=nbytes, aggregate_gbps=aggregate, runs=runs, limit="the plan's largest k")


def _timeslice(slowdowns: dict[int, float], f: float = 0.3) -> Timeslice:
    points = [TimeslicePoint(processes=k, step_s_p10=0.02 * s, step_s_p50=0.02 * s, step_s_p90=0.02 * s,
                             slowdown_p10=s, slowdown_p50=s, slowdown_p90=s) for k, s in slowdowns.items()]
    return Timeslice(points=points, context_tokens=(72, 103), gpu_busy_fraction=f)


def test_process_loads_replace_the_thread_aggregates_minus_the_fixed_part(h100_profile):
    nbytes = 10 * 2**30
    profile = h100_profile.model_copy(update={"loads_mp": {"disk": _loads(nbytes, {1: 1.5, 2: 2.0, 4: 3.0, 8: 3.2})}})
    cost = ProfileCostModel(profile, LLAMA)
    fixed_s = profile.weight_load["disk"].fixed_s  # 0.4 s
    wall_s = 4 * nbytes / (3.0 * GB)
    assert cost.load_aggregate_gbps("disk", 4) == pytest.approx(4 * nbytes / (wall_s - fixed_s) / GB)
    # k loads at once through the simulator's pipe: fixed part, then k B at the aggregate: the measured wall
    for k in (2, 4, 8):
        measured_wall_s = k * nbytes / (profile.loads_mp["disk"].aggregate_gbps[k] * GB)
        assert fixed_s + k * nbytes / (cost.load_aggregate_gbps("disk", k) * GB) == pytest.approx(measured_wall_s)
    assert cost.load_aggregate_gbps("disk", 1) == profile.weight_load["disk"].gbps
    assert cost.out_of_range == set()
    six = cost.load_aggregate_gbps("disk", 6)
    assert cost.load_aggregate_gbps("disk", 4) < six < cost.load_aggregate_gbps("disk", 8)


def test_loads_past_the_largest_k_are_flagged_processes_or_threads(h100_profile):
    profile = h100_profile.model_copy(update={"loads_mp": {"disk": _loads(2**30, {1: 1.5, 2: 2.0})}})
    cost = ProfileCostModel(profile, LLAMA)
    assert cost.load_aggregate_gbps("disk", 8) == cost.load_aggregate_gbps("disk", 2)
    assert cost.out_of_range == {"weight loads from disk with more than 2 at once"}
    threads = ProfileCostModel(h100_profile, LLAMA)  # schema 1: aggregates from threads, up to 4
    threads.load_aggregate_gbps("disk", 4)
    assert threads.out_of_range == set()
    threads.load_aggregate_gbps("disk", 5)
    threads.load_aggregate_gbps("pinned", 2)  # nothing measured at 2: the lone rate, flagged
    assert len(threads.out_of_range) == 2


def test_timeslice_slowdown_interpolates_and_flags_past_the_largest_k(h100_profile):
    profile = h100_profile.model_copy(update={"timeslice_mp": _timeslice({1: 1.0, 2: 1.1, 4: 1.6, 8: 3.0}, f=0.36)})
    cost = ProfileCostModel(profile, LLAMA)
    assert cost.timeslice_slowdown(1) == 1.0
    assert cost.timeslice_slowdown(6) == pytest.approx(2.3)
    assert cost.gpu_busy_fraction() == 0.36  # the executor's f comes from the measured slowdown
    assert cost.out_of_range == set()
    assert cost.timeslice_slowdown(16) == pytest.approx(6.0)  # saturated: in proportion to k
    assert cost.out_of_range == {"time-sliced decoding with more than 8 processes"}


def test_without_the_stage_the_slowdown_is_the_time_sliced_model_of_the_utilization(h100_profile):
    cost = ProfileCostModel(h100_profile, LLAMA)
    f = cost.gpu_busy_fraction()
    assert cost.timeslice_slowdown(1) == 1.0
    assert cost.out_of_range == set()  # one process alone is not time-sliced
    assert cost.timeslice_slowdown(16) == pytest.approx(max(1.0, 16 * f))
    # never measured, so the run's warnings say so (H200 run 11's keep-alive at k = 10 ran on it unflagged)
    assert cost.out_of_range == {"time-sliced decoding by several processes at once (no timeslice_mp stage)"}


def _synthetic_cached_fit(plan):
    """Known costs on the plan's grid: 20 ms + 40 us/token + 2 ns/token/context-token."""
    points = [FitPoint({"prompt_tokens": p, "batch": b, "context": c}, 0.02 + 4e-5 * b * p + 2e-9 * b * p * c)
              for b, c, p in cached_prefill_points(plan, LLAMA.max_position_embeddings)]
    return fit_cached_prefill(points)


def test_prefill_on_a_cached_context_uses_the_stage_fit(h100_profile):
    fit = _synthetic_cached_fit(plan_for("cuda", quick=False))
    cost = ProfileCostModel(h100_profile.model_copy(update={"cached_prefill": fit}), LLAMA)
    assert cost.prefill_s(16, 1, 122) == pytest.approx(0.02 + 4e-5 * 16 + 2e-9 * 16 * 122, rel=0.02)
    assert cost.out_of_range == set()
    cost.prefill_s(16, 1, 2048)  # the KV-costs table's longest session: inside the grid
    assert cost.out_of_range == set()
    cost.prefill_s(16, 1, 3000)  # past the largest context measured
    assert [item.split(" ")[0] for item in cost.out_of_range] == ["cached_prefill"]
    cost.out_of_range.clear()
    cost.prefill_s(64, 1, 0)  # no context: the prefill grid's fit, as before
    assert cost.out_of_range == set()


@pytest.mark.parametrize("quick", [False, True])
def test_the_gpu_plans_cached_grid_reaches_2048_and_brackets_reflect(quick):
    """Both GPU plans time a prefill after 2048 cached tokens (the KV-costs table's longest
    session) at every batch, within the 7B model's positions, and bracket REFLECT's 16-24 new
    tokens at batch 1."""
    plan = plan_for("cuda", quick=quick)
    grid = cached_prefill_points(plan, LLAMA.max_position_embeddings)
    assert len(grid) == len(plan.cached_prefill_batches) * len(plan.cached_prefill_contexts) * len(plan.cached_prefill_tokens)
    assert {b for b, c, _ in grid if c == 2048} == set(plan.cached_prefill_batches)
    tokens = {p for b, c, p in grid if b == 1 and c == 2048}
    assert 16 in tokens and max(tokens) >= 24 and min(tokens) < 16


def test_a_profile_without_the_stage_keeps_flagging_cached_prefill():
    cost = ProfileCostModel(load_profile(BUNDLED), LLAMA)  # its prefill fit's domain pins context to 0
    cost.prefill_s(16, 1, 122)
    assert [item.split(" ")[0] for item in cost.out_of_range] == ["prefill"]


@pytest.mark.parametrize("scenario", ["agents32", "agents32_batching"])
def test_the_gpu_plans_grid_covers_the_shipped_agent_scenarios(scenario, tmp_path):
    """With a cached_prefill fit over the full GPU plan's grid, REFLECT's prefill asks no cost
    outside the calibrated range (the bundled H100 profile, without the stage, still warns)."""
    profile = load_profile(BUNDLED)
    with_stage = profile.model_copy(update={"cached_prefill": _synthetic_cached_fit(plan_for("cuda", quick=False))})
    path = save_profile(with_stage, tmp_path / "h100-cached.json")
    out = run_scenario_file(REPO / "scenarios" / f"{scenario}.yaml", calibration=path, out=tmp_path / "o", quiet=True)
    warnings = json.loads((out / "summary.json").read_text())["warnings"]
    assert not [w for w in warnings if "prefill" in w], warnings


def test_schema_1_profiles_still_load_and_new_ones_are_written_as_2(h100_profile, tmp_path):
    bundled = load_profile(BUNDLED)
    assert bundled.schema_version == 1 and bundled.loads_mp == {} and bundled.timeslice_mp is None
    assert bundled.cached_prefill is None
    full = h100_profile.model_copy(update={
        "schema_version": SCHEMA_VERSION, "loads_mp": {"disk_cold": _loads(2**30, {1: 1.0, 2: 1.9})},
        "timeslice_mp": _timeslice({1: 1.0, 2: 1.4}), "cached_prefill": _synthetic_cached_fit(plan_for("cpu", quick=True))})
    back = load_profile(save_profile(full, tmp_path / "p.json"))
    assert back == full and back.schema_version == 2
    raw = json.loads((tmp_path / "p.json").read_text())
    raw["schema_version"] = 3
    (tmp_path / "p3.json").write_text(json.dumps(raw))
    with pytest.raises(DjinnsimError, match="schema_version 3"):
        load_profile(tmp_path / "p3.json")


def test_transfer_moves_the_new_sections(h100_profile):
    fit = _synthetic_cached_fit(plan_for("cuda", quick=True))
    profile = h100_profile.model_copy(update={"cached_prefill": fit, "loads_mp": {
        "disk": _loads(2**30, {1: 1.0, 2: 2.0}), "pinned": _loads(2**30, {1: 40.0, 2: 45.0})}})
    moved = transfer_profile(profile, get_gpu("h100-80gb"), get_gpu("a100-80gb"), LLAMA)
    pcie = get_gpu("h100-80gb").pcie_gbps / get_gpu("a100-80gb").pcie_gbps
    assert moved.loads_mp["disk"].aggregate_gbps == profile.loads_mp["disk"].aggregate_gbps
    assert moved.loads_mp["pinned"].aggregate_gbps[2] == pytest.approx(45.0 / pcie)
    src, dst = ProfileCostModel(profile, LLAMA), ProfileCostModel(moved, LLAMA)
    assert dst.prefill_s(128, 16, 1024) > src.prefill_s(128, 16, 1024)  # slower compute
    assert np.isfinite(dst.prefill_s(16, 1, 122))
