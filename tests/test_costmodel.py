"""The cost-model seam: roofline floors, transfer by datasheet ratios, profile evaluation and its
out-of-range flags, profile files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from djinnsim.errors import DjinnsimError
from djinnsim.sim.costmodel import ProfileCostModel, RooflineCostModel, evaluate_fit, feature_value, transfer_profile
from djinnsim.sim.profile import LinearFit, PiecewiseFit, load_profile, save_profile
from djinnsim.sim.run import simulate_scenario
from djinnsim.sim.scenario import parse_scenario
from djinnsim.sim.specs import get_gpu, get_model

LLAMA = get_model("llama-2-7b")
H100, A100 = get_gpu("h100-80gb"), get_gpu("a100-80gb")


# --- roofline -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu_key", ["a100-80gb", "h100-80gb", "h200"])
def test_roofline_decode_step_is_at_least_the_hbm_floor(gpu_key):
    gpu = get_gpu(gpu_key)
    cost = RooflineCostModel(gpu, LLAMA)
    floor_s = LLAMA.weight_bytes / (gpu.hbm_gbps * 1e9)
    for batch, sum_context in [(1, 0), (1, 72), (1, 4000), (8, 8 * 500)]:
        assert cost.decode_step_s(batch, sum_context) >= floor_s
    assert floor_s == pytest.approx(13.48e9 / (gpu.hbm_gbps * 1e9), rel=0.001)


def test_roofline_h100_decode_floor_value():
    cost = RooflineCostModel(H100, LLAMA)
    assert LLAMA.weight_bytes / (H100.hbm_gbps * 1e9) == pytest.approx(4.02e-3, rel=0.01)
    assert cost.decode_step_s(1, 72) > 4.02e-3


def test_roofline_costs_grow_with_work():
    cost = RooflineCostModel(H100, LLAMA)
    assert cost.decode_step_s(1, 100) < cost.decode_step_s(1, 100_000)
    assert cost.prefill_s(16) <= cost.prefill_s(512) < cost.prefill_s(4096)
    assert cost.prefill_s(512, batch=4) > cost.prefill_s(512, batch=1)
    # A big prefill is compute-bound: its time grows about linearly with tokens.
    assert cost.prefill_s(8192) / cost.prefill_s(4096) > 1.8


def test_roofline_jitter_has_median_one_and_is_drawn_from_samples():
    cost = RooflineCostModel(H100, LLAMA)
    samples = cost.jitter_samples("decode")
    assert np.median(samples) == pytest.approx(1.0, abs=0.01)
    draws = cost.jitter(np.random.default_rng(0), "decode", 1000)
    assert set(draws) <= set(samples)


def test_roofline_memory_figures():
    cost = RooflineCostModel(H100, LLAMA)
    assert cost.capacity_bytes == H100.memory_bytes
    assert cost.weight_bytes == 6738415616 * 2
    assert cost.kv_bytes_per_token == 512 * 1024
    assert cost.workspace_bytes(100) < cost.workspace_bytes(1000)


# --- transfer by datasheet ratios ---------------------------------------------------------------


def test_transfer_h100_to_a100_scales_by_spec_ratios(h100_profile):
    moved = transfer_profile(h100_profile, H100, A100, LLAMA)
    memory_ratio = 3350 / 2039
    compute_ratio = 989 / 312
    # decode_step: ["1" (mixed), "sum_context" (memory), "batch" (host)]
    intercept, per_context, per_batch = h100_profile.decode_step.coef
    new_intercept, new_per_context, new_per_batch = moved.decode_step.coef
    assert new_per_context == pytest.approx(per_context * memory_ratio, rel=1e-12)
    assert new_per_batch == per_batch
    weight_read_s = LLAMA.weight_bytes / (3350 * 1e9)
    assert new_intercept == pytest.approx(intercept - weight_read_s + weight_read_s * memory_ratio, rel=1e-12)
    # prefill: ["1" (host), "tokens" (compute), "tokens_sq" (compute)]
    assert moved.prefill.coef[0] == h100_profile.prefill.coef[0]
    assert moved.prefill.coef[1:] == pytest.approx([k * compute_ratio for k in h100_profile.prefill.coef[1:]])
    # PCIe bandwidths by the PCIe ratio (50 -> 25 GB/s), latencies kept.
    assert moved.h2d_pinned.gbps == pytest.approx(h100_profile.h2d_pinned.gbps * 25 / 50)
    assert moved.h2d_pinned.latency_s == h100_profile.h2d_pinned.latency_s
    # Host-side terms stay.
    assert moved.serialize == h100_profile.serialize
    assert moved.network == h100_profile.network
    assert moved.jitter_decode == h100_profile.jitter_decode
    assert moved.weight_load["disk"] == h100_profile.weight_load["disk"]
    assert moved.weight_load["pinned"].gbps == pytest.approx(h100_profile.weight_load["pinned"].gbps / 2)
    # Memory and metadata follow the target GPU.
    assert moved.memory.total_bytes == A100.memory_bytes
    assert (moved.metadata.source, moved.metadata.gpu_key) == ("transferred", "a100-80gb")
    # The source profile is untouched.
    assert h100_profile.decode_step.coef == [intercept, per_context, per_batch]


def test_transfer_to_the_same_gpu_is_identity_on_costs(h100_profile):
    moved = ProfileCostModel(transfer_profile(h100_profile, H100, H100, LLAMA), LLAMA)
    original = ProfileCostModel(h100_profile, LLAMA)
    for batch, ctx in [(1, 72), (2, 300), (4, 4000)]:
        assert moved.decode_step_s(batch, ctx) == pytest.approx(original.decode_step_s(batch, ctx), rel=1e-12)
    assert moved.prefill_s(128) == pytest.approx(original.prefill_s(128), rel=1e-12)


def test_transferred_decode_is_faster_on_faster_hbm(h100_profile):
    on_h100 = ProfileCostModel(h100_profile, LLAMA)
    on_a100 = ProfileCostModel(transfer_profile(h100_profile, H100, A100, LLAMA), LLAMA)
    on_h200 = ProfileCostModel(transfer_profile(h100_profile, H100, get_gpu("h200"), LLAMA), LLAMA)
    step = [c.decode_step_s(1, 500) for c in (on_a100, on_h100, on_h200)]
    assert step[0] > step[1] > step[2]


# --- profile evaluation ---------------------------------------------------------------------------


def test_profile_cost_model_evaluates_the_fits(h100_profile):
    cost = ProfileCostModel(h100_profile, LLAMA)
    assert cost.decode_step_s(2, 1000) == pytest.approx(0.012 + 2.0e-7 * 1000 + 1.0e-4 * 2, rel=1e-12)
    assert cost.prefill_s(400, batch=2) == pytest.approx(0.002 + 3.0e-5 * 800 + 1.0e-9 * 2 * 400**2, rel=1e-12)
    assert cost.copy_s(12e9, "h2d", pinned=False) == pytest.approx(2e-5 + 1.0, rel=1e-12)
    assert cost.copy_s(0) == 0.0
    assert cost.out_of_range == set()


def test_a_prefill_never_costs_less_than_a_decode_step_at_its_batch_and_context(h100_profile):
    cost = ProfileCostModel(h100_profile, LLAMA)
    # The fit gives 0.002 + 3e-5 * 200 + 2e-9 * 100**2 = 8.02 ms; a decode step at batch 2 costs 12.2 ms.
    assert cost.prefill_s(100, batch=2) == pytest.approx(0.012 + 1.0e-4 * 2, rel=1e-12)
    assert cost.prefill_s(16, batch=1, context_tokens=1000) == pytest.approx(0.012 + 2.0e-7 * 1000 + 1.0e-4, rel=1e-12)


def test_profile_cost_model_flags_out_of_range_queries(h100_profile):
    cost = ProfileCostModel(h100_profile, LLAMA)
    cost.decode_step_s(1, 100)
    cost.prefill_s(64)
    assert cost.out_of_range == set()
    cost.decode_step_s(1, 10_000)  # sum_context domain is 0..4096
    cost.prefill_s(2048)  # prompt_tokens domain is 1..512
    flagged = sorted(cost.out_of_range)
    assert len(flagged) == 2
    assert flagged[0].startswith("decode_step") and "10000" in flagged[0]
    assert flagged[1].startswith("prefill") and "2048" in flagged[1]


def test_out_of_range_reaches_the_run_warnings(h100_profile, tmp_path):
    path = save_profile(h100_profile, tmp_path / "h100.json")
    scenario = parse_scenario({
        "name": "oor", "backends": ["full_djinn"], "gpu": "h100-80gb", "model": "llama-2-7b",
        "workload": {"kind": "decode", "prompt_tokens": 700, "new_tokens": 2, "runs": 1, "warmup_runs": 0},
    })
    result = simulate_scenario(scenario, calibration=path)
    assert result.points[0].out_of_range
    # in plain words (never a dict) and saying what it means for the result
    assert any("never measured a prefill at 700 prompt tokens" in w and "extrapolated" in w for w in result.warnings)
    assert not any("{" in w or "'" in w for w in result.warnings)
    inside = simulate_scenario(scenario.model_copy(update={"workload": scenario.workload.model_copy(
        update={"prompt_tokens": 100})}), calibration=path)
    assert inside.points[0].out_of_range == [] and inside.warnings == []


def test_profile_jitter_is_drawn_from_the_measured_samples(h100_profile):
    cost = ProfileCostModel(h100_profile, LLAMA)
    draws = cost.jitter(np.random.default_rng(3), "decode", 4000)
    assert set(draws) == set(h100_profile.jitter_decode)


def test_load_contention_interpolates_the_aggregate(h100_profile):
    cost = ProfileCostModel(h100_profile, LLAMA)
    # disk: 1.8 GB/s alone, 2.4 total with 2 loads, 2.6 with 4
    assert cost.load_aggregate_gbps("disk", 1) == 1.8
    assert cost.load_aggregate_gbps("disk", 2) == pytest.approx(2.4)
    assert cost.load_aggregate_gbps("disk", 3) == pytest.approx(2.5)
    assert cost.load_aggregate_gbps("disk", 16) == pytest.approx(2.6)
    assert cost.load_aggregate_gbps("pinned", 4) == 40.0  # no contention data: the lone rate


def test_piecewise_fit_picks_the_first_piece_whose_domain_holds():
    small = LinearFit(features=["1"], coef=[1.0], scale=["host"], domain={"batch": (1, 4)})
    large = LinearFit(features=["batch"], coef=[2.0], scale=["host"], domain={"batch": (5, 64)})
    fit = PiecewiseFit(pieces=[small, large])
    assert evaluate_fit(fit, {"batch": 3}) == (1.0, True)
    assert evaluate_fit(fit, {"batch": 10}) == (20.0, True)
    assert evaluate_fit(fit, {"batch": 100}) == (200.0, False)  # the nearest piece extrapolates
    assert evaluate_fit(fit, {"batch": 0}) == (1.0, False)


def test_off_grid_in_one_variable_keeps_the_piece_of_the_others():
    """Prefill pieces were measured with an empty cache (context 0..0): one cached token must not
    move a batch-1, 2000-token prefill onto the batch-16..32 piece."""
    short = LinearFit(features=["1"], coef=[1.0], scale=["host"],
                      domain={"prompt_tokens": (16, 256), "batch": (1, 16), "context": (0, 0)})
    long = LinearFit(features=["1"], coef=[2.0], scale=["host"],
                     domain={"prompt_tokens": (256, 4096), "batch": (1, 16), "context": (0, 0)})
    batched = LinearFit(features=["1"], coef=[3.0], scale=["host"],
                        domain={"prompt_tokens": (16, 1024), "batch": (16, 32), "context": (0, 0)})
    fit = PiecewiseFit(pieces=[short, long, batched])
    assert evaluate_fit(fit, {"prompt_tokens": 2000, "batch": 1, "context": 0}) == (2.0, True)
    assert evaluate_fit(fit, {"prompt_tokens": 2000, "batch": 1, "context": 1}) == (2.0, False)
    assert evaluate_fit(fit, {"prompt_tokens": 100, "batch": 1, "context": 122}) == (1.0, False)


def test_feature_values():
    inputs = {"batch": 2, "prompt_tokens": 10, "context": 5}
    assert [feature_value(f, inputs) for f in ("1", "batch", "tokens", "tokens_sq", "tokens_ctx", "sum_context")] == \
        [1.0, 2, 20, 200, 100, 10]
    with pytest.raises(ValueError, match="unknown fit feature 'cubic'"):
        feature_value("cubic", inputs)


# --- profile files --------------------------------------------------------------------------------


def test_profile_round_trips_through_a_file(h100_profile, tmp_path):
    path = save_profile(h100_profile, tmp_path / "p.json")
    assert load_profile(path) == h100_profile


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not a readable JSON profile"),
    ('{"schema_version": 99}', "unknown profile schema_version 99"),
    ("[1, 2]", "schema_version"),
])
def test_bad_profile_file_is_a_one_line_error(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DjinnsimError) as info:
        load_profile(path)
    assert needle in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_profile_with_an_invalid_field_names_it(h100_profile, tmp_path):
    raw = h100_profile.model_dump(mode="json")
    raw["network"]["connect_s"] = -1
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DjinnsimError, match=r"invalid profile field network\.connect_s"):
        load_profile(path)


def test_missing_profile(tmp_path):
    with pytest.raises(DjinnsimError, match="calibration profile not found"):
        load_profile(tmp_path / "none.json")


def test_out_of_range_queries_belong_to_the_point_that_asked_them():
    """One cost model serves every point of a (model, GPU): a query outside the calibrated range
    (a 1-token prefill, below the grid) is reported for the point that made it, not the next one."""
    from djinnsim.sim.run import simulate_scenario
    from djinnsim.sim.scenario import parse_scenario

    scenario = parse_scenario({
        "name": "oor", "backends": ["partially_aware_1c1e018", "full_djinn"],
        "workload": {"kind": "decode", "prompt_tokens": 72, "new_tokens": 3, "runs": 2, "warmup_runs": 0},
    })
    result = simulate_scenario(scenario)
    asked, clean = result.points
    assert any("prefill" in item for item in asked.out_of_range)
    assert clean.out_of_range == []


def test_decode_jitter_draws_runs_of_consecutive_measured_steps():
    """With a measured step sequence, factors come in blocks of consecutive steps (a slow spell
    stays slow for a whole block), each block from a random start, wrapping at the end."""
    import numpy as np
    from conftest import FakeCostModel

    sequence = np.arange(1.0, 1001.0)
    cost = FakeCostModel()
    cost.jitter_sequence = lambda: sequence
    draws = cost.jitter(np.random.default_rng(3), "decode", 300)
    block = cost.jitter_block_steps
    assert len(draws) == 300
    for start in range(0, 300, block):
        run = draws[start:start + block]
        steps = np.diff(run)
        assert np.all((steps == 1) | (steps == -999)), run  # consecutive, or wrapped to the start
    assert len({draws[0], draws[block], draws[2 * block]}) == 3  # blocks start at different places
    iid = FakeCostModel().jitter(np.random.default_rng(3), "decode", 5)
    assert np.all(iid == 1.0)  # no sequence: the i.i.d. distribution (constant for the fake)
