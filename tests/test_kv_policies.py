"""KV policies during ACT, against closed forms: discard's REFLECT pays a prefill of the whole
context, swap's pays the copies out and in at PCIe bandwidth, ttl below and above ACT, and
min_waste picks what its formula says."""

from __future__ import annotations

import numpy as np
import pytest

from djinnsim.errors import DjinnsimError
from djinnsim.sim.engine.kvpolicy import IdleKv, decide, wastes
from djinnsim.sim.profile import Bandwidth
from djinnsim.sim.scenario import expand_points, parse_scenario
from djinnsim.sim.server_rules import KvPolicySpec
from djinnsim.sim.simulate import World

from conftest import FakeCostModel

REASON_IN, REFLECT_IN, NEW = 200, 16, 5
CONTEXT = REASON_IN + NEW  # the tokens a REFLECT finds in its session's KV


class LinearPrefill(FakeCostModel):
    """A prefill that costs per token fed (its cached context aside), so a re-prefill shows."""

    per_token_s = 1e-4

    def prefill_s(self, prompt_tokens: int, batch: int = 1, context_tokens: int = 0) -> float:
        return self.prefill_const_s + self.per_token_s * prompt_tokens


def _run(policy, act_s: float = 1.0, cost: FakeCostModel | None = None, agents: int = 1, **server):
    scenario = parse_scenario({
        "name": "kv", "backends": ["djinn"], "cost_model": "roofline",
        "server": {"kv_policy": policy, **server},
        "workload": {"kind": "agents", "agents": [agents],
                     "reason": {"input_tokens": REASON_IN, "new_tokens": NEW},
                     "act": {"kind": "fixed", "seconds": act_s},
                     "reflect": {"input_tokens": REFLECT_IN, "new_tokens": NEW}},
    })
    world = World(scenario, expand_points(scenario)[0], cost or LinearPrefill(), np.random.SeedSequence(0))
    records = list(world.run())
    return [r for r in records if r.phase == "reflect"], world


def _kv_bytes(cost) -> int:
    return CONTEXT * cost.kv_bytes_per_token


def test_discard_reflect_pays_a_prefill_of_the_whole_context():
    cost = LinearPrefill()
    (kept,), _ = _run("preserve", cost=cost)
    (dropped,), world = _run("discard", cost=cost)
    assert (kept.kv_state, kept.recomputed_tokens) == ("resident", 0)
    assert (dropped.kv_state, dropped.recomputed_tokens) == ("discarded", CONTEXT)
    decodes_s = (NEW - 1) * cost.decode_const_s
    assert dropped.compute_s == pytest.approx(cost.prefill_s(CONTEXT + REFLECT_IN) + decodes_s, rel=1e-12)
    assert kept.compute_s == pytest.approx(cost.prefill_s(REFLECT_IN) + decodes_s, rel=1e-12)
    assert dropped.latency_s - kept.latency_s == pytest.approx(cost.per_token_s * CONTEXT, rel=1e-9)
    assert dropped.bytes_up == kept.bytes_up  # the server keeps the ids: only the new tokens go up


@pytest.mark.parametrize("act_s", [0.0, 2.0])
def test_swap_reflect_pays_out_and_in_at_pcie_bandwidth(act_s):
    """ACT 0: REFLECT, once its uplink is done, waits for the KV to finish leaving (out less the
    uplink, in queue_s), then brings it back (in, in copy_s); a long ACT hides the swap-out."""
    cost = LinearPrefill()
    (kept,), _ = _run("preserve", act_s, cost)
    (swapped,), _ = _run("swap", act_s, cost)
    # pinned: the K/V copies queue non_blocking, so their latency is paid once, then the bus
    bandwidth = cost.copy_bandwidth("h2d", True)
    one_way_s = bandwidth.latency_s + _kv_bytes(cost) / (bandwidth.gbps * 1e9)
    assert swapped.kv_state == "swapped"
    assert swapped.h2d_bytes - kept.h2d_bytes == _kv_bytes(cost)
    wait_s = max(one_way_s - swapped.uplink_s, 0.0) if act_s == 0 else 0.0
    assert 0 < swapped.uplink_s < one_way_s
    assert swapped.queue_s - kept.queue_s == pytest.approx(wait_s, rel=1e-9, abs=1e-15)
    expected = wait_s + one_way_s
    assert swapped.latency_s - kept.latency_s == pytest.approx(expected, rel=1e-9)


def test_pageable_swap_is_slower_than_pinned():
    (pinned,), _ = _run("swap", 2.0, pinned_host_kv=True)
    (pageable,), _ = _run("swap", 2.0, pinned_host_kv=False)
    assert pageable.copy_s > pinned.copy_s


def test_pageable_swap_pays_the_latency_per_tensor_by_hand():
    """Pageable copies are synchronous: every K and V tensor pays the copy latency, then the bytes
    go at the pageable rate (ACT long enough that the swap-out is off the REFLECT's path)."""
    cost = LinearPrefill()
    (kept,), _ = _run("preserve", 2.0, cost)
    (swapped,), _ = _run("swap", 2.0, cost, pinned_host_kv=False)
    bandwidth = cost.copy_bandwidth("h2d", False)
    by_hand = cost.kv_tensors * bandwidth.latency_s + _kv_bytes(cost) / (bandwidth.rate_gbps(_kv_bytes(cost) / cost.kv_tensors) * 1e9)
    assert swapped.copy_s - kept.copy_s == pytest.approx(by_hand, rel=1e-9)


def test_measured_kv_swaps_stage_is_what_a_swap_pays():
    """A profile with the kv_swaps stage: a swap of the session's whole KV pays that fit, once for the
    set (latency + bytes / rate), pinned and pageable alike; a profile of another KV layout falls back."""
    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.sim.profile import KvSwaps
    from djinnsim.sim.specs import get_model

    from djinnsim.sim.profile import load_profile
    from djinnsim.sim.run import bundled_profiles

    (path,) = [p for p in bundled_profiles() if p.name == "h100-80gb-llama-2-7b.json"]
    base = ProfileCostModel(load_profile(path), get_model("llama-2-7b"))
    fits = {"d2h_pinned": Bandwidth(latency_s=2e-4, gbps=40.0), "h2d_pinned": Bandwidth(latency_s=3e-4, gbps=45.0),
            "d2h_pageable": Bandwidth(latency_s=1e-3, gbps=4.0), "h2d_pageable": Bandwidth(latency_s=2e-3, gbps=5.0)}
    # the copies stage saw one pageable device-to-host regime: the stage's fit for every swap
    one_regime = Bandwidth(latency_s=base.profile.d2h_pageable.latency_s, gbps=base.profile.d2h_pageable.gbps)
    profile = base.profile.model_copy(update={"kv_swaps": KvSwaps(tensors=base.kv_tensors, fits=fits),
                                              "d2h_pageable": one_regime})
    cost = ProfileCostModel(profile, get_model("llama-2-7b"))
    nbytes = 1000 * cost.kv_bytes_per_token
    for key, bw in fits.items():
        direction, kind = key.split("_")
        assert cost.kv_swap_s(nbytes, direction, kind == "pinned") == pytest.approx(bw.latency_s + nbytes / (bw.gbps * 1e9), rel=1e-12)
    (kept,), _ = _run("preserve", 2.0, cost)
    (swapped,), _ = _run("swap", 2.0, cost, pinned_host_kv=False)
    assert swapped.kv_state == "swapped"
    assert swapped.copy_s - kept.copy_s == pytest.approx(cost.kv_swap_s(_kv_bytes(cost), "h2d", False), rel=1e-9)
    other = profile.model_copy(update={"kv_swaps": KvSwaps(tensors=base.kv_tensors + 2, fits=fits)})
    fallback = ProfileCostModel(other, get_model("llama-2-7b"))
    assert fallback.kv_swap_s(nbytes, "h2d", True) == pytest.approx(base.kv_swap_s(nbytes, "h2d", True), rel=1e-12)
    assert fallback.kv_swap_s(nbytes, "h2d", True) != pytest.approx(cost.kv_swap_s(nbytes, "h2d", True), rel=1e-3)


@pytest.mark.parametrize(("ttl_s", "then", "state"), [(0.5, "swap", "swapped"), (0.5, "discard", "discarded"),
                                                      (5.0, "swap", "resident"), (5.0, "discard", "resident")])
def test_ttl_below_act_then_acts_and_above_act_keeps(ttl_s, then, state):
    cost = LinearPrefill()
    (reflect,), _ = _run({"kind": "ttl", "ttl_s": ttl_s, "then": then}, act_s=2.0, cost=cost)
    (same,), _ = _run(then if state != "resident" else "preserve", 2.0, cost)
    assert reflect.kv_state == state
    assert reflect.latency_s == pytest.approx(same.latency_s, rel=1e-12)


def test_min_waste_formula_by_hand():
    idle = IdleKv(kv_bytes=1000, expected_act_s=2.0, swap_out_s=0.3, swap_in_s=0.2, recompute_s=0.1,
                  others_resident_bytes=4000)
    assert wastes(idle) == {"preserve": 2000.0, "swap": 500.0, "discard": pytest.approx(500.0)}
    spec = KvPolicySpec(kind="min_waste")
    assert decide(spec, idle).now == "swap"  # a tie with discard goes to swap (less disruptive)
    assert decide(spec, IdleKv(1000, 0.1, 0.3, 0.2, 0.1, 4000)).now == "preserve"
    assert decide(spec, IdleKv(1000, 2.0, 0.3, 0.2, 0.01, 4000)).now == "discard"


@pytest.mark.parametrize(("act_s", "pinned_gbps", "expected"), [
    (0.0, 20.0, "preserve"),  # no ACT: holding costs nothing
    (5.0, 20.0, "swap"),  # fast PCIe: out and in cost far less than holding 5 s
    (5.0, 1e-4, "discard"),  # PCIe slower than a re-prefill
])
def test_min_waste_in_the_engine_does_what_the_formula_says(act_s, pinned_gbps, expected):
    cost = LinearPrefill(pinned=Bandwidth(latency_s=1e-6, gbps=pinned_gbps))
    kv = _kv_bytes(cost)
    by_hand = {
        "preserve": kv * act_s,
        "swap": kv * 2 * (1e-6 + kv / (pinned_gbps * 1e9)),
        # one agent: no other session's KV resident; the re-prefill's extra over preserve's prefill
        "discard": (cost.prefill_s(CONTEXT + REFLECT_IN) - cost.prefill_s(REFLECT_IN, 1, CONTEXT)) * kv,
    }
    assert min(by_hand, key=by_hand.get) == expected
    (reflect,), world = _run("min_waste", act_s, cost)
    assert world.server.expected_act_s == act_s
    state = {"preserve": "resident", "swap": "swapped", "discard": "discarded"}[expected]
    assert reflect.kv_state == state


@pytest.mark.parametrize(("margin", "expected"), [(0.98, "resident"), (1.02, "discarded")])
def test_min_waste_weighs_the_recompute_the_engine_charges(margin, expected):
    """With swaps out of reach, one agent discards iff the expected ACT exceeds the re-prefill's
    cost; that cost is the extra compute a discarded REFLECT records over a preserved one (a
    prefill of context + input with no cache against one of the input after the context), not a
    prefill of the context alone (which here costs the prefill's constant more)."""
    cost = LinearPrefill(pinned=Bandwidth(latency_s=1e-6, gbps=1e-6))
    (kept,), _ = _run("preserve", cost=cost)
    (dropped,), _ = _run("discard", cost=cost)
    charged_s = dropped.compute_s - kept.compute_s
    assert charged_s == pytest.approx(cost.per_token_s * CONTEXT, rel=1e-9)
    assert charged_s < cost.prefill_s(CONTEXT)  # what the policy weighed before
    (reflect,), _ = _run("min_waste", charged_s * margin, cost)
    assert reflect.kv_state == expected


def test_min_waste_expects_the_act_distributions_mean():
    scenario = parse_scenario({
        "name": "kv", "backends": ["djinn"], "cost_model": "roofline", "server": {"kv_policy": "min_waste"},
        "workload": {"kind": "agents", "agents": [1], "act": {"kind": "uniform", "low_s": 10, "high_s": 20}},
    })
    world = World(scenario, expand_points(scenario)[0], LinearPrefill(), np.random.SeedSequence(0))
    assert world.server.expected_act_s == 15.0


def test_swap_and_discard_free_gpu_memory_during_act():
    cost = LinearPrefill()
    scenario = parse_scenario({"name": "kv", "backends": ["djinn"], "cost_model": "roofline",
                               "workload": {"kind": "agents", "agents": [1], "act": {"kind": "fixed", "seconds": 5},
                                            "reason": {"input_tokens": REASON_IN, "new_tokens": NEW}}})
    used = {}
    for policy in ("preserve", "swap", "discard"):
        spec = scenario.model_copy(update={"server": scenario.server.model_copy(update={"kv_policy": KvPolicySpec(kind=policy)})})
        world = World(spec, expand_points(spec)[0], cost, np.random.SeedSequence(0))
        world.start_clients()
        world.env.run(until=2.5)  # mid-ACT
        used[policy] = world.server.memory.used_bytes
    weights = cost.weight_bytes + cost.context_bytes_per_process
    assert used == {"preserve": weights + _kv_bytes(cost), "swap": weights, "discard": weights}


def test_kv_swap_idle_is_an_alias_of_swap():
    base = {"name": "a", "backends": ["djinn"], "workload": {"kind": "agents"}}
    assert parse_scenario({**base, "server": {"kv_swap": "idle"}}).server.kv_policy.kind == "swap"
    with pytest.raises(DjinnsimError, match="kv_swap"):
        parse_scenario({**base, "server": {"kv_swap": "idle", "kv_policy": "discard"}})


def test_a_backend_carries_its_own_kv_policy_and_the_server_setting_overrides_it():
    raw = {"name": "a", "backends": ["djinn", "djinn_swap"], "cost_model": "roofline",
           "custom_backends": {"djinn_swap": {"base": "djinn", "kv_policy": "swap"}},
           "workload": {"kind": "agents", "agents": [1], "act": {"kind": "fixed", "seconds": 1},
                        "reason": {"input_tokens": REASON_IN, "new_tokens": NEW}}}
    states = []
    for server in ({}, {"kv_policy": "discard"}):
        scenario = parse_scenario({**raw, "server": server})
        for point in expand_points(scenario):
            records = World(scenario, point, LinearPrefill(), np.random.SeedSequence(0)).run()
            states.append(next(r.kv_state for r in records if r.phase == "reflect"))
    assert states == ["resident", "swapped", "discarded", "discarded"]


@pytest.mark.parametrize("bad", [{"kind": "ttl", "ttl_s": float("inf")}, {"kind": "ttl", "ttl_s": -1}, "forget"])
def test_bad_kv_policies_are_named(bad):
    with pytest.raises(DjinnsimError, match="kv_policy"):
        parse_scenario({"name": "a", "backends": ["djinn"], "workload": {"kind": "agents"},
                        "server": {"kv_policy": bad}})


def _two_regimes(device: str = "cuda"):
    """The bundled H100 profile with a kv_swaps stage and a pageable device-to-host fit of two
    regimes: warm up to 16 MiB a buffer, fresh (page-faulting) pages above."""
    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.sim.profile import KvSwaps, load_profile
    from djinnsim.sim.run import bundled_profiles
    from djinnsim.sim.specs import get_model

    (path,) = [p for p in bundled_profiles() if p.name == "h100-80gb-llama-2-7b.json"]
    profile = load_profile(path)
    spec = get_model("llama-2-7b")
    tensors = ProfileCostModel(profile, spec).kv_tensors
    copy = Bandwidth(latency_s=2e-5, gbps=12.0, large_from_bytes=16 * 2**20, large_gbps=1.5)
    fits = {k: Bandwidth(latency_s=1e-3, gbps=4.0) for k in ("d2h_pinned", "h2d_pinned", "d2h_pageable", "h2d_pageable")}
    profile = profile.model_copy(update={
        "d2h_pageable": copy, "kv_swaps": KvSwaps(tensors=tensors, fits=fits),
        "metadata": profile.metadata.model_copy(update={"device": device})})
    return profile, spec, copy, tensors


@pytest.mark.parametrize("each_mib", [1, 4, 16, 17, 32])
def test_pageable_swap_out_is_charged_the_regime_of_its_tensor_size(each_mib):
    """Closed form: a pageable swap-out of T tensors of `each` bytes pays T x (latency + each / rate),
    the rate warm (gbps) up to large_from_bytes and fresh (large_gbps) above; its range runs from
    that to the all-fresh charge; a band draw of the fresh regime pays the fresh charge; the engine's
    link charges the same; swap-in and pinned swaps keep the kv_swaps stage's fit."""
    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.validate.kv_costs import engine_swap_out_s

    profile, spec, copy, tensors = _two_regimes()
    cost = ProfileCostModel(profile, spec)
    each = each_mib * 2**20
    nbytes = tensors * each
    warm = tensors * (2e-5 + each / 12e9)
    fresh = tensors * (2e-5 + each / 1.5e9)
    expected = warm if each <= 16 * 2**20 else fresh
    assert cost.kv_swap_s(nbytes, "d2h", False) == pytest.approx(expected, rel=1e-12)
    assert cost.kv_swap_out_range_s(nbytes) == pytest.approx((expected, fresh), rel=1e-12)
    assert engine_swap_out_s(cost, nbytes, False) == pytest.approx(expected, rel=1e-9)
    drawn = ProfileCostModel(profile, spec, pageable_swap_out="fresh")
    assert drawn.kv_swap_s(nbytes, "d2h", False) == pytest.approx(fresh, rel=1e-12)
    for direction, pinned in (("h2d", False), ("d2h", True), ("h2d", True)):
        assert cost.kv_swap_s(nbytes, direction, pinned) == pytest.approx(1e-3 + nbytes / 4e9, rel=1e-12)


def test_pageable_swap_out_without_two_regimes_is_charged_as_before():
    """A profile whose copies stage saw one pageable regime (older fits), or a CPU profile (memcpy):
    the kv_swaps stage's fit, once for the set, and a range of that charge twice."""
    from djinnsim.sim.costmodel import ProfileCostModel

    profile, spec, copy, tensors = _two_regimes()
    nbytes = tensors * 2**20
    one = profile.model_copy(update={"d2h_pageable": Bandwidth(latency_s=2e-5, gbps=12.0)})
    cpu, _, _, _ = _two_regimes("cpu")
    for old in (one, cpu):
        cost = ProfileCostModel(old, spec)
        assert cost.kv_swap_bandwidth("d2h", False) == (old.kv_swaps.fits["d2h_pageable"], 1)
        assert cost.kv_swap_out_range_s(nbytes) == pytest.approx((1e-3 + nbytes / 4e9,) * 2, rel=1e-12)
        assert ProfileCostModel(old, spec, pageable_swap_out="fresh").kv_swap_s(nbytes, "d2h", False) == \
            cost.kv_swap_s(nbytes, "d2h", False)


def test_a_lone_pageable_swap_out_pays_the_stage_s_cycle_fit():
    """Closed form: with the kv_swaps stage's `d2h_pageable_cycle` fit, a pageable swap-out with no
    other session's KV on the host (lone) pays it once for the set; with others held it pays the
    copies stage's warm regime per tensor, as without the fit; a band draw of the fresh regime pays
    fresh pages either way; the range holds the charge; swap-in and pinned swaps ignore `lone`."""
    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.sim.profile import KvSwaps
    from djinnsim.validate.kv_costs import engine_swap_out_s, swap_out_range_s

    profile, spec, copy, tensors = _two_regimes()
    each = 4 * 2**20
    nbytes = tensors * each
    warm = tensors * (2e-5 + each / 12e9)
    fresh = tensors * (2e-5 + each / 1.5e9)
    before = ProfileCostModel(profile, spec)
    for cycle_gbps in (3.0, 20.0, 0.5):  # between the regimes, faster than warm, slower than fresh
        cycle = Bandwidth(latency_s=2e-3, gbps=cycle_gbps)
        fits = {**profile.kv_swaps.fits, "d2h_pageable_cycle": cycle}
        cost = ProfileCostModel(profile.model_copy(update={"kv_swaps": KvSwaps(tensors=tensors, fits=fits)}), spec)
        lone = 2e-3 + nbytes / (cycle_gbps * 1e9)
        assert cost.kv_swap_s(nbytes, "d2h", False, lone=True) == pytest.approx(lone, rel=1e-12)
        assert cost.kv_swap_s(nbytes, "d2h", False) == pytest.approx(warm, rel=1e-12)
        assert cost.kv_swap_out_range_s(nbytes, lone=True) == pytest.approx((min(lone, warm), max(lone, fresh)), rel=1e-12)
        assert cost.kv_swap_out_range_s(nbytes) == pytest.approx((warm, fresh), rel=1e-12)
        assert engine_swap_out_s(cost, nbytes, False) == pytest.approx(lone, rel=1e-9)  # validate's one agent
        assert swap_out_range_s(cost, nbytes // cost.kv_bytes_per_token, "pageable") == cost.kv_swap_out_range_s(nbytes, lone=True)
        drawn = ProfileCostModel(cost.profile, spec, pageable_swap_out="fresh")
        assert drawn.kv_swap_s(nbytes, "d2h", False, lone=True) == pytest.approx(fresh, rel=1e-12)
        for direction, pinned in (("h2d", False), ("d2h", True), ("h2d", True)):
            assert cost.kv_swap_s(nbytes, direction, pinned, lone=True) == cost.kv_swap_s(nbytes, direction, pinned)
    # a profile from before the stage timed the cycle: lone or not, as before
    assert before.kv_swap_s(nbytes, "d2h", False, lone=True) == before.kv_swap_s(nbytes, "d2h", False)


def test_the_server_swaps_out_lone_only_with_no_other_session_s_kv_on_the_host(monkeypatch):
    """Two agents whose ACTs overlap: the first swap-out finds no other KV on the host (lone), the
    second finds the first's; each agent's later swap-outs follow the same rule."""
    from djinnsim.sim.engine.pcie import Pcie
    from djinnsim.sim.run import simulate_scenario

    seen = []
    swap = Pcie.swap

    def spy(self, direction, nbytes, pinned, lone=False):
        if direction == "d2h":
            seen.append(lone)
        return swap(self, direction, nbytes, pinned, lone)

    monkeypatch.setattr(Pcie, "swap", spy)
    scenario = parse_scenario({
        "name": "lone", "backends": ["djinn"], "cost_model": "roofline",
        "server": {"kv_policy": "swap", "pinned_host_kv": False},
        "workload": {"kind": "agents", "agents": [2], "reason": {"input_tokens": 500, "new_tokens": 4},
                     "act": {"kind": "fixed", "seconds": 5.0}, "reflect": {"input_tokens": 16, "new_tokens": 4}},
    })
    simulate_scenario(scenario)
    assert seen[:2] == [True, False]


@pytest.mark.parametrize(("field", "value", "says"), [
    ("large_gbps", None, "large_from_bytes and large_gbps go together"),
    ("large_gbps", -1.5, "d2h_pageable.large_gbps"),
    ("large_gbps", "fast", "d2h_pageable.large_gbps"),
    ("large_from_bytes", -4096, "d2h_pageable.large_from_bytes"),
])
def test_a_corrupt_pageable_regime_is_refused_in_one_line(tmp_path, field, value, says):
    import json

    from djinnsim.sim.profile import load_profile
    from djinnsim.sim.run import bundled_profiles

    (path,) = [p for p in bundled_profiles() if p.name == "h100-80gb-llama-2-7b.json"]
    raw = json.loads(path.read_text())
    raw["d2h_pageable"][field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(DjinnsimError) as err:
        load_profile(bad)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_an_old_profile_without_the_second_regime_loads():
    """Neither field (profiles before the split fit): loads, one regime."""
    import json

    from djinnsim.sim.profile import Profile
    from djinnsim.sim.run import bundled_profiles

    (path,) = [p for p in bundled_profiles() if p.name == "h100-80gb-llama-2-7b.json"]
    raw = json.loads(path.read_text())
    for field in ("large_from_bytes", "large_gbps"):
        raw["d2h_pageable"].pop(field)
    assert Profile.model_validate(raw).d2h_pageable.large_gbps is None
