"""Regressions for engine bugs found in review: each test fails on the code before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from djinnsim.errors import DjinnsimError
from djinnsim.sim.backends import get_backend
from djinnsim.sim.executor import ContinuousBatching, GpuWork, PassTimer, TimeSliced
from djinnsim.sim.resources import GpuMemory
from djinnsim.sim.run import simulate_scenario
from djinnsim.sim.scenario import parse_scenario
from djinnsim.sim.simulate import token_pass

from conftest import FakeCostModel


def _agents(backends, n, custom=None, **workload):
    spec = {"kind": "agents", "agents": [n], "reason": {"input_tokens": 72, "new_tokens": 4},
            "act": {"kind": "fixed", "seconds": 1.0}, "reflect": {"input_tokens": 16, "new_tokens": 4}}
    spec.update(workload)
    return parse_scenario({"name": "r", "backends": backends, "custom_backends": custom or {},
                           "cost_model": "roofline", "workload": spec})


def test_processes_waiting_to_start_do_not_block_running_sessions():
    """keep-alive with memory_full: wait at N = 8 on 80 GB: the agents past the sixth wait for a
    process slot; the running agents' own requests must not queue behind them (it deadlocked)."""
    scenario = _agents(["patient"], 8, {"patient": {"base": "ray_keepalive", "memory_full": "wait"}})
    records = simulate_scenario(scenario).records
    assert len(records) == 16 and all(r.status == "ok" for r in records)


def test_memory_priority_serves_holders_before_new_processes():
    env = simpy.Environment()
    memory = GpuMemory(env, capacity_bytes=10)
    assert memory.try_alloc(9)
    order = []

    def ask(name, nbytes, priority):
        yield memory.alloc_wait(nbytes, priority)
        order.append(name)

    env.process(ask("new process", 5, 1))
    env.process(ask("running session", 1, 0))
    env.run()
    assert order == ["running session"] and memory.waiting == 1


def test_a_stalled_point_is_an_error_not_an_empty_result():
    """Every agent holds memory and waits for more that only the others hold: say so."""
    scenario = parse_scenario({
        "name": "stall", "backends": ["greedy"], "cost_model": "roofline", "gpu": "a100-80gb",
        "custom_backends": {"greedy": {"base": "djinn", "memory_full": "wait"}},
        "workload": {"kind": "agents", "agents": [64], "reason": {"input_tokens": 4000, "new_tokens": 4},
                     "act": {"kind": "fixed", "seconds": 1.0}, "reflect": {"input_tokens": 4000, "new_tokens": 4}},
    })
    with pytest.raises(DjinnsimError, match="stalled"):
        simulate_scenario(scenario)


def test_per_token_backends_reuse_the_session_cache_in_later_phases():
    full = get_backend("full_djinn")
    assert token_pass(full, 138, 0, cached_tokens=122) == ("prefill", 16, 122)
    up, _ = full.step_bytes(__import__("djinnsim.sim.specs", fromlist=["x"]).get_model("llama-2-7b"), 0, 138, 122)
    assert up == 16 * 8
    records = simulate_scenario(_agents(["full_djinn"], 1)).records
    reflect = next(r for r in records if r.phase == "reflect")
    assert reflect.bytes_up == (16 + 3) * 8  # 16 new ids, then one id per further token


def test_continuous_batching_prefills_pending_prompts_in_one_forward():
    cost = FakeCostModel()
    cost.prefill_s = lambda tokens, batch=1, context=0: 0.010 + 0.001 * batch * tokens
    env = simpy.Environment()
    server = ContinuousBatching(env, PassTimer(cost, np.random.default_rng(0)), max_batch=8)
    done = []

    def seq():
        yield from server.execute(GpuWork([("prefill", 10, 0)]))
        done.append(env.now)

    for _ in range(4):
        env.process(seq())
    env.run()
    assert done == [pytest.approx(0.010 + 0.001 * 4 * 10)] * 4  # one intercept, not four


def test_time_sliced_prefills_do_not_overlap():
    """A long prefill keeps the GPU busy but for a decode step's launches ((1 - f) x 4 ms = 3 ms):
    two at once overlap only by those launches."""
    cost = FakeCostModel(prefill_const_s=1.0)
    cost.gpu_busy_fraction = lambda: 0.25
    env = simpy.Environment()
    server = TimeSliced(env, PassTimer(cost, np.random.default_rng(0)))
    done = []

    def job():
        yield from server.execute(GpuWork([("prefill", 100, 0)]))
        done.append(env.now)

    env.process(job())
    env.process(job())
    env.run()
    assert done == [pytest.approx(1.0), pytest.approx(2.0 - 0.75 * 0.004)]


def test_kv_swap_uses_the_pinned_setting_and_waits_for_the_swap_out():
    def reflect_copy_s(pinned: bool, act_s: float):
        scenario = parse_scenario({
            "name": "swap", "backends": ["djinn"], "cost_model": "roofline",
            "server": {"kv_swap": "idle", "pinned_host_kv": pinned},
            "workload": {"kind": "agents", "agents": [1], "reason": {"input_tokens": 3000, "new_tokens": 4},
                         "act": {"kind": "fixed", "seconds": act_s}, "reflect": {"input_tokens": 16, "new_tokens": 4}},
        })
        result = simulate_scenario(scenario)
        reflect = next(r for r in result.records if r.phase == "reflect")
        return reflect, result.points[0].peak_mem_bytes

    pinned, _ = reflect_copy_s(True, 1.0)
    pageable, _ = reflect_copy_s(False, 1.0)
    assert pageable.copy_s > pinned.copy_s  # pageable host memory is slower
    quick, peak_quick = reflect_copy_s(True, 0.0)
    assert quick.queue_s > 0  # REFLECT waited for its KV to finish leaving the GPU
    _, peak_slow = reflect_copy_s(True, 1.0)
    assert peak_quick == peak_slow  # never counted on the GPU twice
