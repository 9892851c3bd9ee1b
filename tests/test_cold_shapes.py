"""First-run cost of new attention shapes: charged once per shape per GPU process, in closed form;
fitted from cold/warm sample pairs; carried across the validation's simulated repeats."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from djinnsim.calibrate.bench_shapes import fit_cold_shapes
from djinnsim.sim.executor import GpuWork, PassTimer, SerialFCFS
from djinnsim.sim.profile import ColdShapes, save_profile
from djinnsim.sim.scenario import expand_points, parse_scenario
from djinnsim.sim.simulate import World, phase_passes
from djinnsim.validate.pipeline import real_processes, simulate

from conftest import FakeCostModel, make_profile

DECODE_EXTRA = 0.050
PREFILL_FIXED = 0.070
PREFILL_PER_TOKEN = 0.0004


class ColdCost(FakeCostModel):
    def cold_shape_s(self, kind, tokens):
        return DECODE_EXTRA if kind == "decode" else PREFILL_FIXED + PREFILL_PER_TOKEN * tokens


def _cold_total(passes, batch=1) -> float:
    return sum(DECODE_EXTRA if p[0] == "decode" else PREFILL_FIXED + PREFILL_PER_TOKEN * batch * p[1] for p in passes)


def _run(executor, work):
    env = executor.env
    out = {}

    def job():
        out["e"] = yield from executor.execute(work)

    env.process(job())
    env.run()
    return out["e"]


def test_a_shape_costs_extra_once_per_process():
    cost = ColdCost()
    timer = PassTimer(cost, np.random.default_rng(0), cold_shapes=True)
    server = SerialFCFS(simpy.Environment(), timer)
    passes = [("prefill", 72, 0)] + [("decode", 72 + t) for t in range(49)]
    warm_s = cost.prefill_const_s + 49 * cost.decode_const_s
    first = _run(server, GpuWork(passes, process="a"))
    assert first.compute_s == pytest.approx(warm_s + PREFILL_FIXED + 72 * PREFILL_PER_TOKEN + 49 * DECODE_EXTRA, rel=1e-12)
    again = _run(SerialFCFS(simpy.Environment(), timer), GpuWork(passes, process="a"))
    assert again.compute_s == pytest.approx(warm_s, rel=1e-12)
    other = _run(SerialFCFS(simpy.Environment(), timer), GpuWork(passes, process="b"))
    assert other.compute_s == pytest.approx(first.compute_s, rel=1e-12)
    # Half of the lengths new: only those pay.
    longer = [("decode", 72 + t) for t in range(25, 75)]
    assert _run(SerialFCFS(simpy.Environment(), timer), GpuWork(longer, process="a")).compute_s == pytest.approx(
        50 * cost.decode_const_s + 26 * DECODE_EXTRA, rel=1e-12)


def test_warm_timer_charges_nothing():
    timer = PassTimer(ColdCost(), np.random.default_rng(0), cold_shapes=False)
    assert timer.costs_s(GpuWork([("prefill", 16, 0), ("decode", 16)])) == [(0.010, 0.0), (0.004, 0.0)]


def _agents(backend: str, n: int, shapes: str = "cold"):
    return parse_scenario({
        "name": "cold", "cost_model": "roofline", "backends": [backend],
        "server": {"shapes": shapes},
        "workload": {"kind": "agents", "agents": [n], "reason": {"input_tokens": 72, "new_tokens": 50},
                     "act": {"kind": "fixed", "seconds": 30}, "reflect": {"input_tokens": 16, "new_tokens": 50}},
    })


def _computes(scenario, cost):
    point = expand_points(scenario)[0]
    sim = World(scenario, point, cost, np.random.SeedSequence(0))
    records = sim.run()
    return point.backend, {(r.agent, r.phase): r.compute_s for r in records}


@pytest.mark.parametrize("backend", ["djinn", "ray_keepalive"])
def test_shared_server_warms_once_per_process_agents_each_their_own(backend):
    """Djinn's one server pays for REASON's shapes once; each keep-alive actor pays for its own."""
    cost = ColdCost()
    warm_backend, warm = _computes(_agents(backend, 2, shapes="warm"), cost)
    b, cold = _computes(_agents(backend, 2), cost)
    reason = phase_passes(b, 0, 72, 50)
    reflect_ctx = 72 + 50 if b.kv == "session" else 0
    reflect = phase_passes(b, reflect_ctx, 16 if b.kv == "session" else 72 + 50 + 16, 50)
    for agent in (0, 1):
        first_user = agent == 0 or b.weights != "shared"
        want_reason = _cold_total(reason) if first_user else 0.0
        want_reflect = _cold_total(reflect) if first_user else 0.0
        assert cold[(agent, "reason")] - warm[(agent, "reason")] == pytest.approx(want_reason, rel=1e-9, abs=1e-12)
        assert cold[(agent, "reflect")] - warm[(agent, "reflect")] == pytest.approx(want_reflect, rel=1e-9, abs=1e-12)


def test_fit_from_cold_and_warm_pairs():
    rows = []
    for tokens in (37, 211, 613):
        warm = 0.02 + 1e-5 * tokens
        rows.append({"stage": "cold_prefill", "point": f"p{tokens}", "value": warm + 0.07 + 4e-4 * tokens, "unit": "s", "prompt_tokens": tokens})
        rows += [{"stage": "warm_prefill", "point": f"p{tokens}", "value": warm, "unit": "s", "prompt_tokens": tokens}] * 3
    for ctx in range(333, 339):
        rows.append({"stage": "cold_decode", "point": "c333", "value": 0.080 + (ctx - 333) * 1e-3, "unit": "s", "context": ctx})
        rows.append({"stage": "warm_decode", "point": "c333", "value": 0.030, "unit": "s", "context": ctx})
    rows.append({"stage": "first_forward", "point": "p72", "value": 0.9, "unit": "s", "prompt_tokens": 72})
    rows.append({"stage": "first_forward_warm", "point": "p72", "value": 0.04, "unit": "s", "prompt_tokens": 72})
    cold = fit_cold_shapes(rows)
    assert cold.decode_extra_s == pytest.approx(0.0525, rel=1e-9)  # median of 50..55 ms
    assert cold.prefill_extra_s == pytest.approx(0.07, rel=1e-6)
    assert cold.prefill_extra_per_token_s == pytest.approx(4e-4, rel=1e-6)
    assert cold.first_forward_s == pytest.approx(0.86, rel=1e-9)


def test_fit_falls_back_to_the_decode_grids_first_pass():
    rows = [{"stage": "decode_warm_pass", "point": "b1_c64", "value": "0.065", "unit": "s", "context": "64"},
            {"stage": "decode", "point": "b1_c64", "value": "0.025", "unit": "s", "context": "64"},
            {"stage": "decode", "point": "b1_c64", "value": "0.027", "unit": "s", "context": "64"}]
    cold = fit_cold_shapes(rows)
    assert cold.decode_extra_s == pytest.approx(0.039, rel=1e-9)
    assert cold.prefill_extra_s == 0.0 and "first pass" in cold.source
    assert fit_cold_shapes([{"stage": "prefill", "point": "x", "value": "1", "unit": "s"}]) is None


def test_validation_carries_shapes_across_repeats_of_the_same_processes(tmp_path):
    """Repeat 1 of a point runs on the processes of repeat 0: the simulated repeat 1 pays nothing."""
    profile = make_profile().model_copy(update={
        "jitter_decode": [1.0], "cold_shapes": ColdShapes(decode_extra_s=DECODE_EXTRA, prefill_extra_s=PREFILL_FIXED)})
    path = save_profile(profile, tmp_path / "p.json")
    scenario = _agents("djinn", 1).model_copy(update={"cost_model": "profile"})
    point = expand_points(scenario)[0]
    assert real_processes(point) == {"server": ("shared", point.link.gbps)}
    carried = simulate(scenario, path, profile, 2, order=[(0, 0), (0, 1)])
    fresh = simulate(scenario, path, profile, 1)
    compute = [sum(r.compute_s for r in pr.records) for pr in carried[0]]
    passes = phase_passes(point.backend, 0, 72, 50) + phase_passes(point.backend, 122, 16, 50)
    cold_s = sum(DECODE_EXTRA if p[0] == "decode" else PREFILL_FIXED for p in passes)
    assert compute[0] - compute[1] == pytest.approx(cold_s, rel=1e-9)
    assert sum(r.compute_s for r in fresh[0][0].records) == pytest.approx(compute[0], rel=1e-12)


def test_run_defaults_to_warm_shapes_and_validation_to_cold():
    from djinnsim.validate.points import Shortening, validation_scenario

    scenario = parse_scenario({"name": "s", "backends": ["djinn"], "workload": {"kind": "agents", "agents": [1]}})
    assert scenario.server.shapes == "warm"
    assert validation_scenario(scenario, Shortening(), None, None).server.shapes == "cold"


def _profile_file(tmp_path):
    profile = make_profile().model_copy(update={
        "jitter_decode": [1.0], "cold_shapes": ColdShapes(decode_extra_s=DECODE_EXTRA, prefill_extra_s=PREFILL_FIXED)})
    return profile, save_profile(profile, tmp_path / "p.json")


def test_the_repeat_that_ran_first_for_real_is_the_cold_one(tmp_path):
    profile, path = _profile_file(tmp_path)
    scenario = _agents("djinn", 1).model_copy(update={"cost_model": "profile"})
    sims = simulate(scenario, path, profile, 2, order=[(0, 1), (0, 0)])
    compute = [sum(r.compute_s for r in pr.records) for pr in sims[0]]
    assert compute[1] > compute[0]  # repeat 1 ran first: it met the shapes
    warm = simulate(scenario.model_copy(update={"server": scenario.server.model_copy(update={"shapes": "warm"})}),
                    path, profile, 1)
    assert compute[0] == pytest.approx(sum(r.compute_s for r in warm[0][0].records), rel=1e-12)


def test_keepalive_workers_carry_their_shapes_from_n1_to_n2(tmp_path):
    """N = 1 ran on worker 0; at N = 2 worker 0 is warm and worker 1 (fresh) is cold, as for real."""
    profile, path = _profile_file(tmp_path)
    scenario = parse_scenario({
        "name": "ka", "backends": ["ray_keepalive"], "server": {"shapes": "cold"},
        "workload": {"kind": "agents", "agents": [1, 2], "reason": {"input_tokens": 72, "new_tokens": 50},
                     "act": {"kind": "fixed", "seconds": 30}, "reflect": {"input_tokens": 16, "new_tokens": 50}}})
    n1, n2 = expand_points(scenario)
    assert real_processes(n2) == {0: ("per_agent", "ray_keepalive", 0), 1: ("per_agent", "ray_keepalive", 1)}
    sims = simulate(scenario, path, profile, 1, order=[(n1.index, 0), (n2.index, 0)])
    by_agent = {a: sum(r.compute_s for r in sims[n2.index][0].records if r.agent == a) for a in (0, 1)}
    passes = phase_passes(n2.backend, 0, 72, 50) + phase_passes(n2.backend, 0, 72 + 50 + 16, 50)
    cold_s = sum(DECODE_EXTRA if p[0] == "decode" else PREFILL_FIXED for p in passes)
    assert by_agent[1] - by_agent[0] == pytest.approx(cold_s, rel=1e-9)
