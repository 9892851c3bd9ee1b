"""Prediction bands, the profile's spread, held-out labels, provenance and the H200 plan."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import make_profile

from djinnsim.calibrate.refit import read_samples, refit
from djinnsim.calibrate.spread import spread_from_samples
from djinnsim.errors import DjinnsimError
from djinnsim.sim import bands
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.profile import Spread, load_profile
from djinnsim.sim.provenance import file_sha256
from djinnsim.sim.run import bundled_profiles, run_scenario_file
from djinnsim.sim.scenario import load_scenario
from djinnsim.sim.specs import get_model
from djinnsim.validate import heldout

REPO = Path(__file__).resolve().parents[1]
H100 = next(p for p in bundled_profiles() if p.name == "h100-80gb-llama-2-7b.json")
H200 = next(p for p in bundled_profiles() if p.name == "h200-llama-2-7b.json")
SMALL = """
name: small-agents
seed: 3
backends: [ray_keepalive, djinn]
workload: {kind: agents, agents: [1, 2], act: {kind: fixed, seconds: 1}}
"""


def test_scaled_profile_scales_each_category_by_its_factor():
    profile, spec = load_profile(H100), get_model("llama-2-7b")
    base = ProfileCostModel(profile, spec)
    f = bands.Factors(decode=1.3, prefill=0.8, load=1.5, copy=2.0)
    scaled = bands.banded_cost(base, f)
    assert scaled.decode_step_s(1, 100) == pytest.approx(1.3 * base.decode_step_s(1, 100))
    assert scaled.prefill_s(2048, 4) == pytest.approx(0.8 * base.prefill_s(2048, 4))
    assert scaled.copy_s(1e9) == pytest.approx(2.0 * base.copy_s(1e9))
    one, fast = base.weight_load("disk"), scaled.weight_load("disk")
    assert fast.fixed_s + 13e9 / (fast.gbps * 1e9) == pytest.approx(1.5 * (one.fixed_s + 13e9 / (one.gbps * 1e9)))


def test_a_launch_level_moves_a_prefill_floor_not_the_gpu_work():
    """level_scaled: a prefill fit of the form max(host floor, GPU work) has its floor scaled by the
    level and its GPU polynomial left as measured; the decode step scales whole."""
    from djinnsim.sim.profile import LinearFit

    profile, spec = load_profile(H100), get_model("llama-2-7b")
    floored = LinearFit(features=["1", "tokens", "tokens_sq"], coef=[0.002, 3e-5, 5e-10], scale=["mixed", "compute", "compute"],
                        domain={"prompt_tokens": (16.0, 4096.0), "batch": (1.0, 32.0), "context": (0.0, 0.0)}, floor_s=0.03)
    profile = profile.model_copy(update={"prefill": floored, "cached_prefill": floored.model_copy(update={"domain": {}})})
    base, moved = ProfileCostModel(profile, spec), ProfileCostModel(bands.level_scaled(profile, 1.5), spec)
    assert moved.prefill_s(16, 1) == pytest.approx(1.5 * base.prefill_s(16, 1))  # at the floor
    assert moved.prefill_s(4096, 4) == pytest.approx(base.prefill_s(4096, 4))  # GPU bound: as measured
    assert moved.prefill_s(16, 1, 512) == pytest.approx(1.5 * base.prefill_s(16, 1, 512))
    assert moved.decode_step_s(1, 100) == pytest.approx(1.5 * base.decode_step_s(1, 100))
    # a residual draw (bands.Factors.prefill) scales the whole pass, floor and GPU work alike
    drawn = bands.banded_cost(base, bands.Factors(prefill=0.8))
    assert drawn.prefill_s(4096, 4) == pytest.approx(0.8 * base.prefill_s(4096, 4))


def test_factor_draws_are_seeded_and_backend_free():
    spread = Spread(decode_level=[0.8, 1.2], decode_residual=[1.0], prefill_residual=[0.9, 1.1])
    point = load_scenario_points()[0]
    a = bands.draw_factors(spread, bands.factor_rng(3, point, 5))
    assert a == bands.draw_factors(spread, bands.factor_rng(3, point, 5))
    assert a.decode in (0.8, 1.2) and a.load == 1.0 and a.copy == 1.0  # empty lists: unscaled
    other_backend = load_scenario_points()[2]  # djinn at the same N as point 0
    assert other_backend.n_agents == point.n_agents and other_backend.backend.name != point.backend.name
    assert bands.draw_factors(spread, bands.factor_rng(3, other_backend, 5)) == a


def test_the_decode_draw_is_a_spell_level_and_residuals_only_without_spells():
    point = load_scenario_points()[0]
    levels = Spread(decode_level=[0.8, 1.4], decode_residual=[1.0] * 50)
    drawn = {bands.draw_factors(levels, bands.factor_rng(3, point, d)).decode for d in range(40)}
    assert drawn == {0.8, 1.4}  # 50 residuals near 1 must not dilute the spells' spread
    no_spells = Spread(decode_residual=[0.9, 1.1])
    assert {bands.draw_factors(no_spells, bands.factor_rng(3, point, d)).decode for d in range(40)} == {0.9, 1.1}


def test_decode_levels_come_from_every_batch1_spell_and_outlive_a_held_out_stage():
    from djinnsim.sim.profile import Timeslice, TimeslicePoint

    point = TimeslicePoint(processes=1, step_s_p10=0.02, step_s_p50=0.02, step_s_p90=0.02,
                           slowdown_p10=1.0, slowdown_p50=1.0, slowdown_p90=1.0)
    profile = make_profile().model_copy(update={"timeslice_mp": Timeslice(
        points=[point], context_tokens=(72, 103), gpu_busy_fraction=0.5)})

    def fitted(context):
        return 0.012 + 2.0e-7 * context + 1.0e-4

    def spell(stage, name, step_s, context, **extra):
        return [{"stage": stage, "point": name, "batch": "1", "context": str(context), "value": str(step_s * f),
                 "unit": "s", **extra} for f in (0.9, 1.0, 1.2)]

    rows = (spell("decode", "b1_c64", 0.010, 64) + spell("warm_decode", "c333", 0.020, 333)
            + spell("exp21_step", "run2", 0.030, 96) + spell("timeslice_mp", "k1", 0.025, "", concurrent="1"))
    rows += [{**r, "batch": "2", "point": "b2_c64"} for r in spell("decode", "b2_c64", 0.5, 64)]
    want = {"decode": 0.010 / fitted(64), "warm": 0.020 / fitted(333), "exp21": 0.030 / fitted(96),
            "lone": 0.025 / fitted(87.5)}
    assert spread_from_samples(profile, rows).decode_level == pytest.approx(sorted(want.values()))
    held = spread_from_samples(profile, rows, left_out=("exp21_step",))
    assert held.decode_level == pytest.approx(sorted(v for k, v in want.items() if k != "exp21"))


def load_scenario_points():
    from djinnsim.sim.scenario import expand_points, parse_scenario
    import yaml

    return expand_points(parse_scenario(yaml.safe_load(SMALL)))


def test_run_bands_are_reproducible_and_bracket_the_spread(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(SMALL)
    first = run_scenario_file(scenario, out=tmp_path / "a", quiet=True, bands=6)
    second = run_scenario_file(scenario, out=tmp_path / "b", quiet=True, bands=6)
    assert (first / "summary.json").read_bytes() == (second / "summary.json").read_bytes()
    doc = json.loads((first / "summary.json").read_text())
    for point in doc["points"]:
        lo, hi = point["bands_p10_p90"]["agents.pooled.mean_ms"]
        assert 0 < lo < hi  # the spread moves the mean
        assert point["bands_p10_p90"]["agents.mean_bytes_up"][0] == point["bands_p10_p90"]["agents.mean_bytes_up"][1]
    assert "P10-P90 over 6 draws" in (first / "bands.md").read_text()
    plain = run_scenario_file(scenario, out=tmp_path / "c", quiet=True)
    assert "bands_p10_p90" not in (plain / "summary.json").read_text() and not (plain / "bands.md").exists()
    prov = json.loads((first / "provenance.json").read_text())
    assert prov["profiles"] == [{"path": str(H100), "sha256": file_sha256(H100)}]
    assert prov["simulator"]["package"]


def test_bands_need_a_spread(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(SMALL)
    with pytest.raises(DjinnsimError, match="at least 2 draws"):
        run_scenario_file(scenario, out=tmp_path / "a", quiet=True, bands=1)
    profile = make_profile()
    assert profile.spread is None
    with pytest.raises(DjinnsimError, match="spread section"):
        bands.spread_of(ProfileCostModel(profile, get_model("llama-2-7b")))


def test_spread_from_the_bundled_samples_and_a_held_out_refit():
    profile = load_profile(H200)  # refitted by this code (the H100 profile keeps its older spread)
    rows = read_samples(H200.parent / profile.samples_file)
    spread = spread_from_samples(profile, rows)
    # what --refit wrote is what the samples give, but for the categories added after the bundled
    # profile was refitted (its k-process loads, loopback path repeats and g), which it does not carry
    assert profile.spread.loads_mp is None and profile.spread.loopback_path is None and profile.spread.timeslice_gpu is None
    assert spread.model_copy(update={"loads_mp": None, "loopback_path": None, "timeslice_gpu": None}) == profile.spread
    assert set(spread.loads_mp) == set(profile.loads_mp) and spread.loopback_path and spread.timeslice_gpu
    spells = {(r["stage"], r["point"]) for r in rows if r["stage"] in ("exp21_step", "warm_decode")
              or (r["stage"] == "decode" and r["batch"] == "1") or (r["stage"] == "timeslice_mp" and r["point"] == "k1")}
    assert len(spread.decode_level) == len(spells) and spread.decode_residual and spread.copies and spread.weight_load
    assert 0.5 < float(np.median(spread.decode_residual)) < 1.5
    assert heldout.decode_fit_holds_exp21(profile, H200)
    held = refit(profile, rows, "test", left_out=("exp21_step",))
    grid = {r["point"] for r in rows if r["stage"] == "decode"}
    warm = {r["point"] for r in rows if r["stage"] == "warm_decode"}
    pieces = held.decode_step.pieces if hasattr(held.decode_step, "pieces") else [held.decode_step]
    assert sum(p.n_samples for p in pieces) == len(grid) + len(warm)
    assert held.spread.left_out == ["exp21_step"]
    assert len(held.spread.decode_level) == len({s for s in spells if s[0] != "exp21_step"})  # the other spells stay
    assert held.jitter_decode_sequence == profile.jitter_decode_sequence  # the shape stays


def test_held_out_reasons(tmp_path):
    profile = load_profile(H100)
    exp21 = load_scenario(REPO / "docs" / "validation" / "h200" / "exp21.yaml")
    agents = load_scenario(REPO / "docs" / "validation" / "h200" / "agents.yaml")
    sha = file_sha256(H100)
    assert heldout.reasons(agents, profile, H100, sha, sha, "2026-01-01T00:00:00+00:00", None) == []
    why = heldout.reasons(exp21, profile, H100, sha, sha, "2026-01-01T00:00:00+00:00", None)
    assert [w.split(":")[0] for w in why] == ["workload"]
    assert heldout.reasons(agents, profile, H100, sha, None, None, None)[0].startswith("profile: no hash")
    assert heldout.reasons(agents, profile, H100, sha, "0" * 64, None, None)[0].startswith("profile: not the profile")
    newer = {"model_commit": "abc", "model_commit_at": "2026-02-01T00:00:00+00:00", "dirty": False}
    older = {**newer, "model_commit_at": "2025-12-01T00:00:00+00:00"}
    assert heldout.reasons(agents, profile, H100, sha, sha, "2026-01-01T00:00:00+00:00", newer)[0].startswith("simulator")
    assert heldout.reasons(agents, profile, H100, sha, sha, "2026-01-01T00:00:00+00:00", older) == []
    assert heldout.label([]) == "held-out" and heldout.label(["x"]) == "in-sample"


def test_h200_plan_estimates_and_commands_the_validate_cli_accepts():
    from typer.main import get_command

    from djinnsim.cli import app
    from djinnsim.validate import plan

    doc = plan.load_plan(REPO / "docs" / "validation" / "h200" / "plan.yaml")
    base = REPO / "docs" / "validation" / "h200"
    validate = get_command(app).commands["validate"]
    for item in doc["items"][:3]:
        row = plan.estimate_item(item, base, None)
        assert row["estimate_s"] > 0 and row["points"]
        args = shlex.split(plan.command(doc, item, base, None, 500).replace('"$OUT/', '"out/'))
        assert args[:2] == ["djinnsim", "validate"]
        validate.make_context("validate", args[2:])  # every option exists and parses


def test_a_refit_puts_the_loopback_host_time_of_the_kept_composition_rows_into_the_profile():
    from djinnsim.calibrate.composition import loopback_path, loopback_serial_gbps, rows_from_end_to_end

    profile = load_profile(H200)
    rows = read_samples(H200.parent / profile.samples_file)
    assert profile.network.loopback_serial_gbps is None
    assert refit(profile, rows, "test").network.loopback_serial_gbps is None  # no server times kept: none
    e = dict(profile.end_to_end)
    for seq_len, measured_s in ((128, 0.4), (512, 1.2)):  # well above what the primitives charge
        key = f"composition.partially_aware.L{seq_len}"
        e.update({f"{key}.measured_s": measured_s, f"{key}.server_h2d_s": 0.01, f"{key}.server_compute_s": 0.03,
                  f"{key}.server_d2h_s": 0.02})
    new = refit(profile.model_copy(update={"end_to_end": e}), rows, "test")
    spec = get_model(profile.metadata.model_id)
    kept = rows_from_end_to_end(new.end_to_end, ProfileCostModel(new, spec), new.network.loopback_gbps, spec)
    assert len(kept) == 2
    assert new.network.loopback_serial_gbps == pytest.approx(loopback_serial_gbps(kept), rel=1e-12)
    assert new.network.loopback_serial_gbps > 0
    assert new.network.loopback_path is None  # an earlier calibration's refit keeps its link model
    pathed = refit(profile.model_copy(update={"end_to_end": e}), rows, "test", with_path=True)
    assert pathed.network.loopback_path == loopback_path(kept) and len(pathed.network.loopback_path) == 2
    again = refit(pathed, rows, "test")  # a profile that has one: recomputed
    assert again.network.loopback_path == pathed.network.loopback_path


def test_a_prefill_draw_scales_prefill_on_a_cached_context_too():
    """cached_prefill (new tokens on a kept context: REFLECT) is a prefill: a band draw scales it by
    the prefill factor, floor and GPU work alike, as it does the prefill fit."""
    from djinnsim.sim.costmodel import evaluate_fit

    base = ProfileCostModel(load_profile(H200), get_model("llama-2-7b"))
    assert base.profile.cached_prefill is not None
    scaled = bands.banded_cost(base, bands.Factors(prefill=2.0))
    for prompt, context in ((16, 122), (128, 1024), (512, 1024)):
        at = {"prompt_tokens": prompt, "batch": 1, "context": context, "tokens": prompt}
        assert evaluate_fit(scaled.profile.cached_prefill, at)[0] == pytest.approx(
            2.0 * evaluate_fit(base.profile.cached_prefill, at)[0], rel=1e-12)
    # GPU bound, above the decode-step floor (which the decode factor scales)
    assert scaled.prefill_s(512, 1, 1024) == pytest.approx(2.0 * base.prefill_s(512, 1, 1024), rel=1e-12)


def test_bands_scale_kv_swaps_by_the_copy_factor_and_draw_the_pageable_regime():
    """The copy factor scales the kv_swaps stage's fits (pinned swap-out twice as long at copy = 2);
    a draw with kv_fresh charges a pageable swap-out of warm-sized tensors at the fresh rate; over
    40 draws both regimes come up, and kv_fresh leaves the other factors as they were drawn."""
    from djinnsim.sim.profile import Bandwidth, KvSwaps

    profile, spec = load_profile(H100), get_model("llama-2-7b")
    tensors = ProfileCostModel(profile, spec).kv_tensors
    fits = {k: Bandwidth(latency_s=1e-3, gbps=4.0) for k in ("d2h_pinned", "h2d_pinned", "d2h_pageable", "h2d_pageable")}
    base = ProfileCostModel(profile.model_copy(update={"kv_swaps": KvSwaps(tensors=tensors, fits=fits)}), spec)
    nbytes = tensors * 2**20  # 1 MiB a tensor: below the profile's 16 MiB regime boundary
    doubled = bands.banded_cost(base, bands.Factors(copy=2.0))
    assert doubled.kv_swap_s(nbytes, "d2h", True) == pytest.approx(2 * base.kv_swap_s(nbytes, "d2h", True))
    assert doubled.kv_swap_s(nbytes, "d2h", False) == pytest.approx(2 * base.kv_swap_s(nbytes, "d2h", False))
    warm, fresh = base.kv_swap_out_range_s(nbytes)
    assert fresh > 5 * warm
    assert bands.banded_cost(base, bands.Factors(kv_fresh=True)).kv_swap_s(nbytes, "d2h", False) == pytest.approx(fresh)
    point = load_scenario_point()
    drawn = [bands.draw_factors(profile.spread, bands.factor_rng(3, point, d)) for d in range(40)]
    assert {f.kv_fresh for f in drawn} == {True, False}
    spread, rng = profile.spread, bands.factor_rng(3, point, 7)
    lists = (spread.decode_level or spread.decode_residual, spread.prefill_residual, spread.weight_load, spread.copies)
    picked = tuple(float(rng.choice(np.asarray(v, dtype=float))) if v else 1.0 for v in lists)
    assert (drawn[7].decode, drawn[7].prefill, drawn[7].load, drawn[7].copy) == picked


def load_scenario_point():
    from djinnsim.sim.scenario import expand_points, parse_scenario

    return expand_points(parse_scenario({"name": "p", "backends": ["djinn"],
                                         "workload": {"kind": "agents", "agents": [1]}}))[0]


def test_a_load_draw_scales_loads_by_k_processes_too():
    """The weight-load factor scales every load: the lone fit and the loads_mp stage's aggregates
    the cost model reads for k processes at once (each k-process transfer rate exactly 1/factor)."""
    profile = load_profile(H200)
    assert profile.loads_mp, "the bundled H200 profile measured loads by k processes"
    spec = get_model(profile.metadata.model_id)
    base = ProfileCostModel(profile, spec)
    drawn = ProfileCostModel(bands.scale_profile(profile, bands.Factors(load=2.0)), spec)
    tiers = [tier for tier in profile.loads_mp if tier in profile.weight_load]
    assert tiers
    for tier in tiers:
        before, after = base.weight_load(tier), drawn.weight_load(tier)
        assert after.fixed_s == pytest.approx(2 * before.fixed_s, rel=1e-12)
        assert before.aggregate_gbps and set(after.aggregate_gbps) == set(before.aggregate_gbps)
        for k, gbps in before.aggregate_gbps.items():
            assert after.aggregate_gbps[k] == pytest.approx(gbps / 2, rel=1e-9)


def test_k_process_loads_take_their_tiers_own_factor_and_the_path_its_own():
    """A spread with k-process load factors per tier scales that tier's aggregates by its drawn
    factor (not the lone load's); the loopback path's factor scales its seconds per byte and nothing
    else on the link."""
    profile = load_profile(H200)
    spec = get_model(profile.metadata.model_id)
    with_path = profile.model_copy(update={"network": profile.network.model_copy(
        update={"loopback_path": [(8 << 20, 1.4e-9), (64 << 20, 1.5e-9)], "paced_path": [(2.0, 0.6e-9), (4.0, 0.7e-9)]})})
    base = ProfileCostModel(with_path, spec)
    scaled = bands.scale_profile(with_path, bands.Factors(load=2.0, path=1.25, loads_mp=(("disk", 0.5),)))
    drawn = ProfileCostModel(scaled, spec)
    assert drawn.weight_load("disk").fixed_s == pytest.approx(2 * base.weight_load("disk").fixed_s)
    # the k-process walls (k B / aggregate) take the tier's factor; the lone load's fixed part the lone factor
    for k, gbps in with_path.loads_mp["disk"].aggregate_gbps.items():
        assert scaled.loads_mp["disk"].aggregate_gbps[k] == pytest.approx(gbps / 0.5, rel=1e-12)
    for k, gbps in with_path.loads_mp["pinned"].aggregate_gbps.items():  # no factor of its own: the lone load's
        assert scaled.loads_mp["pinned"].aggregate_gbps[k] == pytest.approx(gbps / 2.0, rel=1e-12)
    assert drawn.load_aggregate_gbps("disk", 8) > base.load_aggregate_gbps("disk", 8)
    for nbytes in (1e6, 3e7, 2e8):
        assert drawn.stream_path_s(nbytes) == pytest.approx(1.25 * base.stream_path_s(nbytes), rel=1e-12)
        for gbps in (2.0, 4.0):  # the paced path too, at its measured rates
            assert drawn.stream_path_s(nbytes, gbps) == pytest.approx(1.25 * base.stream_path_s(nbytes, gbps), rel=1e-12)
    assert drawn.stream_gbps() == pytest.approx(base.stream_gbps() / 1.25)  # the loopback cap too
    assert drawn.connect_s() == base.connect_s() and drawn.per_message_s() == base.per_message_s()
    serial = ProfileCostModel(bands.scale_profile(profile, bands.Factors(path=2.0)), spec)
    assert serial.stream_serial_s(1e8) == pytest.approx(2.0 * ProfileCostModel(profile, spec).stream_serial_s(1e8))


def test_the_later_spread_categories_leave_earlier_draws_alone():
    """A spread without k-process load or path factors draws exactly what it drew before they
    existed (no rng consumed for them); with them, the earlier categories' draws do not move."""
    old = Spread(decode_level=[0.8, 1.2, 1.5], prefill_residual=[0.9, 1.1], weight_load=[0.7, 1.3], copies=[1.0, 2.0])
    new = old.model_copy(update={"loads_mp": {"disk": [0.5, 0.75], "pinned": [1.0]}, "loopback_path": [0.9, 1.1]})
    for d in range(30):
        a = bands.draw_factors(old, np.random.default_rng(d))
        b = bands.draw_factors(new, np.random.default_rng(d))
        assert (a.path, a.loads_mp) == (1.0, ())
        assert (a.decode, a.prefill, a.load, a.copy, a.kv_fresh) == (b.decode, b.prefill, b.load, b.copy, b.kv_fresh)
        assert b.path in (0.9, 1.1) and dict(b.loads_mp)["disk"] in (0.5, 0.75) and dict(b.loads_mp)["pinned"] == 1.0
    assert "loads_mp" not in old.model_dump() and "loopback_path" not in old.model_dump()  # profiles stay byte-identical
    with pytest.raises(ValueError, match="not a tier"):
        Spread(loads_mp={"floppy": [1.0]})
    with pytest.raises(ValueError, match="spread factors"):
        Spread(loopback_path=[0.0])


def test_k_process_load_factors_pool_other_calibrations_and_path_factors_its_repeats():
    """loads_mp_factors: each run's wall over the median at its k, then each pooled calibration's
    aggregate at the same tier and k over this one's; path_factors: each composition repeat's time
    beyond the server's compute and copies over the median repeat's, then each pooled calibration's
    over this one's at the same message size."""
    from djinnsim.calibrate.spread import loads_mp_factors, path_factors

    profile = load_profile(H200)
    disk = profile.loads_mp["disk"]
    mine = profile.model_copy(update={"loads_mp": {"disk": disk.model_copy(update={"aggregate_gbps": {1: 5.0, 2: 10.0, 8: 20.0}})}})
    other = profile.model_copy(update={"loads_mp": {"disk": disk.model_copy(update={"aggregate_gbps": {1: 5.0, 8: 25.0}})}})
    rows = [{"stage": "loads_mp_disk", "point": "k8_wall", "value": v, "unit": "s"} for v in (4.0, 5.0, 6.0)]
    got = loads_mp_factors(rows, mine, [other])
    assert sorted(got) == ["disk"]
    assert sorted(got["disk"]) == pytest.approx(sorted([1.0, 0.8, 1.0, 1.2, 20.0 / 25.0]))  # k=2: its one run; k=1 not a k-process load
    assert loads_mp_factors(rows, profile.model_copy(update={"loads_mp": {}})) is None
    e = {"composition.partially_aware.L64.server_compute_s": 0.02, "composition.partially_aware.L64.server_h2d_s": 0.005,
         "composition.partially_aware.L64.server_d2h_s": 0.005}
    rows = [{"stage": "composition", "point": p, "value": v, "unit": "s"}
            for p, v in (("partially_aware_L64", 0.13), ("partially_aware_L64", 0.23), ("partially_aware_L64", 0.33),
                         ("full_djinn_L64", 9.0))]
    e["composition.partially_aware.L64.measured_s"] = 0.23  # the median, as calibrate keeps it
    mine = profile.model_copy(update={"end_to_end": e})
    factors = path_factors(rows, mine)
    assert sorted(factors) == pytest.approx([0.5, 1.0, 1.5])
    slower = profile.model_copy(update={"end_to_end": {**e, "composition.partially_aware.L64.measured_s": 0.43}})
    no_compute = profile.model_copy(update={"end_to_end": {"composition.partially_aware.L64.measured_s": 0.5}})
    assert sorted(path_factors(rows, mine, [slower, no_compute])) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert path_factors(rows, profile.model_copy(update={"end_to_end": {}})) is None


def test_the_gpu_step_spread_pools_calibrations_and_scales_g_alone():
    """timeslice_factors: each process's median step at a saturated k over k g, then each pooled
    calibration's g over this one's; a drawn factor scales g (what k processes step at once the GPU
    is saturated) and leaves the lone step alone; a spread without it draws what it drew before."""
    from djinnsim.calibrate.spread import timeslice_factors

    profile = load_profile(H200)
    ts = profile.timeslice_mp
    g = ts.gpu_step_s
    expected = [step / (p.processes * g) for p in ts.points if p.processes >= 2 and p.processes in ts.saturated_k
                for step in p.per_process_step_s_p50]
    assert expected  # the bundled H200 profile measured saturated k with each process's median
    other = profile.model_copy(update={"timeslice_mp": ts.model_copy(update={"gpu_step_s": 1.02 * g})})
    got = timeslice_factors(profile, [other, profile.model_copy(update={"timeslice_mp": None})])
    assert sorted(got) == pytest.approx(sorted(expected + [1.02]))
    assert timeslice_factors(profile.model_copy(update={"timeslice_mp": None})) is None
    spec = get_model(profile.metadata.model_id)
    base, drawn = ProfileCostModel(profile, spec), ProfileCostModel(bands.scale_profile(profile, bands.Factors(timeslice=1.5)), spec)
    assert drawn.profile.timeslice_mp.gpu_step_s == pytest.approx(1.5 * g, rel=1e-12)
    context = int(np.mean(ts.context_tokens))
    assert drawn.timeslice_step_s(16, context) == pytest.approx(1.5 * base.timeslice_step_s(16, context), rel=1e-9)
    assert drawn.timeslice_step_s(1, context) == pytest.approx(base.timeslice_step_s(1, context), rel=1e-12)
    old = Spread(decode_level=[0.8, 1.2], loopback_path=[0.9, 1.1])
    new = old.model_copy(update={"timeslice_gpu": [0.99, 1.01]})
    for d in range(20):
        a, b = bands.draw_factors(old, np.random.default_rng(d)), bands.draw_factors(new, np.random.default_rng(d))
        assert a.timeslice == 1.0 and b.timeslice in (0.99, 1.01) and (a.decode, a.path) == (b.decode, b.path)
    assert "timeslice_gpu" not in old.model_dump()
