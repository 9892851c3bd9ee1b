"""Djinn's server rules (server.rules), each against a hand count: admission rejects with a
record, QoS orders by class and escalates, idle eviction re-prefills, the prefill cap, the swap
pool, arenas and the memory split (and the memory bound agrees with the engine's OOM)."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from djinnsim.errors import DjinnsimError
from djinnsim.sim.engine.executors import ContinuousBatching, GpuWork, PassTimer
from djinnsim.sim.run import simulate_scenario
from djinnsim.sim.scenario import expand_points, parse_scenario
from djinnsim.sim.server_rules import ServerRules
from djinnsim.sim.simulate import World, memory_bound_agents

from conftest import FakeCostModel

WORKLOAD = {"kind": "agents", "reason": {"input_tokens": 100, "new_tokens": 4},
            "reflect": {"input_tokens": 16, "new_tokens": 4}}


def _world(rules, agents: int = 4, act_s: float = 1.0, cost=None, backends=("djinn",), **server):
    scenario = parse_scenario({
        "name": "rules", "backends": list(backends), "cost_model": "roofline",
        "server": {"rules": rules, **server},
        "workload": {**WORKLOAD, "agents": [agents], "act": {"kind": "fixed", "seconds": act_s}},
    })
    return World(scenario, expand_points(scenario)[0], cost or FakeCostModel(), np.random.SeedSequence(0)), scenario


def _records(rules, **kw):
    world, _ = _world(rules, **kw)
    return list(world.run())


def test_rules_are_off_by_default_and_djinn_turns_all_on():
    rules = ServerRules()
    assert not (rules.memory_split.enabled or rules.admission.enabled or rules.qos.enabled or rules.swap_pool.enabled)
    assert rules.idle_eviction_s is None and rules.max_concurrent_prefills is None and rules.arena_bytes == 0
    djinn = ServerRules.model_validate("djinn")
    assert djinn.admission.max_concurrent == 64 and djinn.idle_eviction_s == 60
    assert djinn.max_concurrent_prefills == 4 and djinn.arena_bytes == 64 * 2**20
    assert (djinn.swap_pool.gib, djinn.swap_pool.sessions) == (32, 100)
    assert [djinn.qos.limit(c, 64) for c in ("realtime", "interactive", "batch")] == [19, 32, 13]


def test_admission_rejects_past_the_limit_with_a_record():
    records = _records({"admission": {"enabled": True, "max_concurrent": 3}}, agents=5)
    reasons = [r for r in records if r.phase == "reason"]
    assert sorted(r.status for r in reasons) == ["ok"] * 3 + ["rejected"] * 2
    rejected = {r.agent for r in reasons if r.status == "rejected"}
    assert not [r for r in records if r.phase == "reflect" and r.agent in rejected]  # those agents stopped
    assert all(r.compute_s == 0 for r in reasons if r.status == "rejected")


def test_rejected_records_are_counted_not_averaged():
    world, scenario = _world({"admission": {"enabled": True, "max_concurrent": 3}}, agents=5)
    from djinnsim.sim import metrics
    from djinnsim.sim.records import records_frame

    summary = metrics.agent_summary(records_frame(world.run()))
    assert summary["rejected_records"] == 2 and summary["phases"]["reason"]["n"] == 3


def test_qos_shares_limit_each_class():
    rules = {"qos": {"enabled": True, "agent_classes": ["batch", "realtime"]}, "admission": {"max_concurrent": 10}}
    records = _records(rules, agents=8)
    # batch's share of 10 is 2, realtime's 3: of 4 agents each, 2 and 3 are admitted
    statuses = {(r.agent % 2, r.status) for r in records if r.phase == "reason"}
    count = {k: sum(1 for r in records if r.phase == "reason" and (r.agent % 2, r.status) == k) for k in statuses}
    assert count == {(0, "ok"): 2, (0, "rejected"): 2, (1, "ok"): 3, (1, "rejected"): 1}


@pytest.mark.parametrize(("escalate_ms", "order"), [(1e6, [0, 1, 3, 2]), (1e-3, [0, 1, 2, 3])])
def test_qos_serves_by_class_and_escalates_the_waiting(escalate_ms, order):
    """Agents 0, 2 are batch, 1, 3 realtime, all at once: agent 0 finds the GPU free; then realtime
    first, unless waiting has escalated the batch one to realtime (then arrival order)."""
    rules = {"qos": {"enabled": True, "agent_classes": ["batch", "realtime"], "escalate_after_ms": escalate_ms}}
    records = _records(rules, agents=4)
    reasons = sorted((r for r in records if r.phase == "reason"), key=lambda r: r.started_at)
    assert [r.agent for r in reasons] == order


@pytest.mark.parametrize(("act_s", "state", "recomputed"), [(10.0, "evicted", 104), (3.0, "resident", 0)])
def test_idle_eviction_drops_the_kv_and_the_next_phase_reprefills(act_s, state, recomputed):
    records = _records({"idle_eviction_s": 5}, agents=1, act_s=act_s)
    (reflect,) = [r for r in records if r.phase == "reflect"]
    assert (reflect.kv_state, reflect.recomputed_tokens) == (state, recomputed)


def test_prefill_cap_bounds_prefills_per_batched_iteration():
    cost = FakeCostModel(prefill_const_s=1.0)
    done = {}
    for cap in (None, 1):
        env = simpy.Environment()
        batching = ContinuousBatching(env, PassTimer(cost, np.random.default_rng(0)), max_batch=8, max_prefills=cap)
        finished = []

        def job():
            yield from batching.execute(GpuWork([("prefill", 10, 0)]))
            finished.append(env.now)

        for _ in range(3):
            env.process(job())
        env.run()
        done[cap] = finished
    assert done == {None: [1.0, 1.0, 1.0], 1: [1.0, 2.0, 3.0]}


def test_swap_pool_full_keeps_the_kv_resident():
    records = _records({"swap_pool": {"enabled": True, "sessions": 1}}, agents=2, act_s=2.0, kv_policy="swap")
    states = sorted(r.kv_state for r in records if r.phase == "reflect")
    assert states == ["resident", "swapped"]


def test_arenas_and_the_split_bound_sessions_and_the_memory_bound_agrees():
    """Data share = 0.35 x (80 GB - 2 GiB); each session holds a 1 GiB arena and its KV."""
    cost = FakeCostModel()
    rules = {"memory_split": {"enabled": True}, "session_arena_mib": 1024}
    world, scenario = _world(rules, agents=1, cost=cost)
    session_kv = (100 + 4 + 16 + 4) * cost.kv_bytes_per_token
    data_cap = int(0.35 * (80 * 10**9 - 2 * 2**30))
    bound = memory_bound_agents(scenario, expand_points(scenario)[0].backend, cost)
    assert bound == data_cap // (session_kv + 2**30)
    ooms = {}
    for n in (bound, bound + 3):
        world, _ = _world(rules, agents=n, act_s=100.0, cost=cost)
        ooms[n] = sum(r.status == "oom" for r in world.run())
        assert world.server.memory_plan.used["data"] == 0  # every arena and KV given back
    # the bound holds every session's whole KV at once; the engine, whose REASONs hold less, fits
    # at least that many, and runs out a few sessions past it
    assert ooms[bound] == 0 and ooms[bound + 3] > 0


def test_memory_split_text_share_must_hold_the_weights():
    cost = FakeCostModel(weight_bytes=45 * 10**9)  # above half of the usable 80 GB - 2 GiB
    records = _records({"memory_split": {"enabled": True}}, agents=1, cost=cost)
    assert [r.status for r in records] == ["oom"]
    assert not [r for r in _records({}, agents=1, cost=cost) if r.status != "ok"]


def test_rules_leave_the_ray_baselines_alone():
    records = _records({"admission": {"enabled": True, "max_concurrent": 1}}, agents=3, backends=("ray_serverless",))
    assert all(r.status == "ok" for r in records)


@pytest.mark.parametrize("bad", [{"admission": {"max_concurrent": 0}}, {"idle_eviction_s": float("nan")},
                                 {"memory_split": {"text": 0.6, "data": 0.35, "stack": 0.15}},
                                 {"qos": {"shares": {"realtime": 0.3}}}, {"unknown_rule": 1}])
def test_bad_rules_are_named(bad):
    with pytest.raises(DjinnsimError, match="server.rules"):
        parse_scenario({"name": "a", "backends": ["djinn"], "workload": {"kind": "agents"}, "server": {"rules": bad}})


def test_shipped_scenarios_are_unchanged_with_rules_off():
    """Turning on a rule that never binds (admission 64 with 4 agents) changes no latency."""
    raw = {"name": "a", "backends": ["djinn"], "cost_model": "roofline",
           "workload": {**WORKLOAD, "agents": [4], "act": {"kind": "fixed", "seconds": 1}}}
    off = simulate_scenario(parse_scenario(raw)).records
    on = simulate_scenario(parse_scenario({**raw, "server": {"rules": {"admission": {"enabled": True}}}})).records
    assert [r.latency_s for r in off] == [r.latency_s for r in on]
