"""Closed forms of the shared physical resources: PCIe as one full-duplex resource per GPU, a link
at its NIC's line rate (the loopback cap only when asked), GPU utilization from the executors'
kernel time, and what a keep-alive actor holds between phases."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from djinnsim.sim.engine.executors import GpuWork, PassTimer, SerialFCFS
from djinnsim.sim.engine.pcie import Pcie
from djinnsim.sim.engine.pipe import FlowClass, SharedPipe, fire_all
from djinnsim.sim.profile import Bandwidth, WeightLoad
from djinnsim.sim.run import simulate_scenario
from djinnsim.sim.scenario import expand_points, parse_scenario
from djinnsim.sim.simulate import World, memory_bound_agents
from djinnsim.sim import metrics

from conftest import FakeCostModel

REL = 1e-9
GB = 1e9


def _run(env: simpy.Environment, jobs: dict[str, tuple[float, object]]) -> dict[str, float]:
    """Start each job's process (a generator factory, or a function returning the event to wait
    for) at its time; return when each one ends."""
    ended = {}

    def job(name, start_at, body):
        yield env.timeout(start_at)
        started = body()
        if isinstance(started, simpy.Event):
            yield started
        else:
            yield from started
        ended[name] = env.now

    for name, (start_at, body) in jobs.items():
        env.process(job(name, start_at, body))
    env.run()
    return ended


# --- the pipe's flow classes -------------------------------------------------------------------


def test_a_capped_class_takes_its_cap_and_the_rest_share_what_is_left():
    """10 B/s in all; class A capped at 2 B/s in total: one A flow moves 2 B/s, the two plain flows
    8 / 2 = 4 B/s each. A: 4 B -> 2 s; plain: 8 B -> 2 s each. Then nothing else."""
    env = simpy.Environment()
    pipe = SharedPipe(env, lambda k: 10.0)
    capped = FlowClass("capped", lambda k: 2.0)
    ended = _run(env, {
        "a": (0.0, lambda: (yield pipe.transfer(4.0, capped))),
        "b": (0.0, lambda: (yield pipe.transfer(8.0))),
        "c": (0.0, lambda: (yield pipe.transfer(8.0))),
    })
    assert ended == {"a": pytest.approx(2.0, rel=REL), "b": pytest.approx(2.0, rel=REL), "c": pytest.approx(2.0, rel=REL)}
    assert pipe.in_flight == 0 and pipe.bytes_carried == 20.0


def test_a_class_cap_is_shared_by_its_flows_and_released_when_they_end():
    """10 B/s; class cap 4 B/s total. Two class flows (2 B/s each) and a plain one (6 B/s):
    class flows of 4 B end at 2 s; the plain flow has 12 B moved of 20, then alone at 10 B/s: 2.8 s."""
    env = simpy.Environment()
    pipe = SharedPipe(env, lambda k: 10.0)
    cls = FlowClass("cls", lambda k: 4.0)
    ended = _run(env, {
        "x": (0.0, lambda: (yield pipe.transfer(4.0, cls))),
        "y": (0.0, lambda: (yield pipe.transfer(4.0, cls))),
        "plain": (0.0, lambda: (yield pipe.transfer(20.0))),
    })
    assert ended["x"] == pytest.approx(2.0, rel=REL) and ended["y"] == pytest.approx(2.0, rel=REL)
    assert ended["plain"] == pytest.approx(2.8, rel=REL)


# --- PCIe ----------------------------------------------------------------------------------------


def _pcie_cost(**kwargs) -> FakeCostModel:
    # Latencies zero so every time is bytes over a rate.
    return FakeCostModel(
        h2d_pageable=Bandwidth(latency_s=0.0, gbps=5.0), d2h_pageable=Bandwidth(latency_s=0.0, gbps=6.0),
        pinned=Bandwidth(latency_s=0.0, gbps=20.0), **kwargs)


@pytest.mark.parametrize("pinned, rate_gbps", [(True, 20.0), (False, 5.0)])
def test_two_equal_copies_at_once_each_take_twice_as_long(pinned, rate_gbps):
    env = simpy.Environment()
    pcie = Pcie(env, _pcie_cost())
    nbytes = 2 * GB
    alone = nbytes / (rate_gbps * GB)
    ended = _run(env, {name: (0.0, lambda: pcie.copy("h2d", nbytes, pinned)) for name in ("a", "b")})
    assert ended == {"a": pytest.approx(2 * alone, rel=REL), "b": pytest.approx(2 * alone, rel=REL)}


def test_the_two_directions_do_not_slow_each_other():
    env = simpy.Environment()
    pcie = Pcie(env, _pcie_cost())
    ended = _run(env, {"in": (0.0, lambda: pcie.copy("h2d", 4 * GB, True)),
                       "out": (0.0, lambda: pcie.copy("d2h", 4 * GB, True))})
    assert ended == {"in": pytest.approx(0.2, rel=REL), "out": pytest.approx(0.2, rel=REL)}


def test_a_swap_in_during_a_weight_load_slows_both():
    """Bus 20 GB/s h2d; a load from pinned memory alone at 16 GB/s (its tier's measured rate), no
    fixed cost. A 10 GB load starts at 0; a 3 GB swap-in (pinned) at 0.25 s, when the load has
    moved 4 GB. Shared, each gets 10 GB/s (both can use more): the swap ends at 0.55 s; the load
    has then 3 GB left, alone again at 16 GB/s: it ends at 0.55 + 3/16 = 0.7375 s (alone: 0.625 s)."""
    cost = _pcie_cost(load=WeightLoad(fixed_s=0.0, gbps=16.0, aggregate_gbps={}))
    env = simpy.Environment()
    pcie = Pcie(env, cost)
    ended = _run(env, {"load": (0.0, lambda: pcie.load("pinned", 10 * GB)),
                       "swap": (0.25, lambda: pcie.copy("h2d", 3 * GB, True))})
    assert ended["swap"] == pytest.approx(0.55, rel=REL)
    assert ended["load"] == pytest.approx(0.7375, rel=REL)


def test_a_load_slower_than_half_the_bus_keeps_its_rate_and_the_swap_takes_the_rest():
    """A disk-cache load at 2 GB/s beside a pinned swap on a 20 GB/s bus: the load is held by its
    tier, not the bus (2 GB/s); the swap gets 18 GB/s. Two loads share their tier's aggregate."""
    cost = _pcie_cost(load=WeightLoad(fixed_s=0.1, gbps=2.0, aggregate_gbps={2: 3.0}))
    env = simpy.Environment()
    pcie = Pcie(env, cost)
    ended = _run(env, {"load": (0.0, lambda: pcie.load("disk", 2 * GB)),
                       "swap": (0.1, lambda: pcie.copy("h2d", 1.8 * GB, True))})
    assert ended["load"] == pytest.approx(0.1 + 1.0, rel=REL)
    assert ended["swap"] == pytest.approx(0.1 + 0.1, rel=REL)
    env = simpy.Environment()
    pcie = Pcie(env, cost)
    ended = _run(env, {name: (0.0, lambda: pcie.load("disk", 3 * GB)) for name in ("a", "b")})
    assert ended == {"a": pytest.approx(0.1 + 2.0, rel=REL), "b": pytest.approx(0.1 + 2.0, rel=REL)}


def test_concurrent_request_copies_on_the_server_share_the_bus(fake_cost):
    """Two serverless agents start at once: their weight loads run together through the load class
    (aggregate = the lone rate here), so each load takes twice its lone time."""
    scenario = parse_scenario({
        "name": "loads", "cost_model": "roofline", "backends": ["ray_serverless"],
        "workload": {"kind": "agents", "agents": [2], "reason": {"input_tokens": 8, "new_tokens": 2},
                     "reflect": {"input_tokens": 4, "new_tokens": 2}, "act": {"kind": "fixed", "seconds": 5}},
    })
    point = expand_points(scenario)[0]
    records = World(scenario, point, fake_cost, np.random.SeedSequence(0)).run()
    load = fake_cost.weight_load("disk")
    lone_s = load.fixed_s + fake_cost.weight_bytes / (load.gbps * GB)
    reasons = [r for r in records if r.phase == "reason"]
    assert [r.load_s for r in reasons] == [pytest.approx(load.fixed_s + 2 * (lone_s - load.fixed_s), rel=REL)] * 2


# --- links: a NIC at line rate, the loopback cap only when asked -------------------------------


def _link_sweep(host_stack: str = "nic"):
    scenario = parse_scenario({
        "name": "link-sweep", "backends": ["partially_aware"],
        "link": {"gbps": 25, "rtt_ms": 0.2, "host_stack": host_stack},
        "workload": {"kind": "decode", "prompt_tokens": 72, "new_tokens": 10, "runs": 2, "warmup_runs": 0},
        "sweep": {"link_gbps": [10, 25, 100, 400]},
    })
    result = simulate_scenario(scenario)  # the bundled H100 profile
    per_token_s, wire_bytes = {}, {}
    for p in result.points:
        frame = p.records.frame()
        runs = metrics.decode_runs(frame)
        per_token_s[p.point.link.gbps] = float(runs["per_token_ms"].mean()) / 1e3
        wire_bytes[p.point.link.gbps] = float((frame["wire_bytes_up"] + frame["wire_bytes_down"]).sum()
                                              / frame["new_tokens"].sum())
    return per_token_s, wire_bytes


def test_per_token_time_of_a_byte_heavy_backend_falls_with_the_nic_rate_as_bytes_over_rate_say():
    per_token_s, wire_bytes = _link_sweep()
    rates = [10.0, 25.0, 100.0, 400.0]
    assert all(per_token_s[a] > per_token_s[b] for a, b in zip(rates, rates[1:])), per_token_s
    assert wire_bytes[25.0] == wire_bytes[100.0]
    predicted_s = wire_bytes[25.0] * 8 * (1 / (25 * GB) - 1 / (100 * GB))
    assert per_token_s[25.0] - per_token_s[100.0] == pytest.approx(predicted_s, rel=0.10)


def test_over_loopback_every_connection_is_capped_whatever_the_line_rate():
    per_token_s, _ = _link_sweep("loopback")
    # The bundled profile's loopback TCP moves 1.44 GB/s (11.5 Gbps): 100 and 400 Gbps both sit above it.
    assert per_token_s[100.0] == pytest.approx(per_token_s[400.0], rel=1e-6)
    assert per_token_s[10.0] > per_token_s[25.0]


# --- GPU utilization ----------------------------------------------------------------------------


def test_gpu_utilization_is_kernel_time_over_the_measured_span():
    """native_pytorch on the local GPU, one run: prefill p, then n - 1 decode steps of d, of which
    the GPU runs kernels a share f; the prefill launches what a decode step does ((1 - f) d of host
    time) and the rest of it is kernels; nothing else takes time. Utilization =
    (p - (1 - f) d + f d (n - 1)) / (p + d (n - 1))."""
    cost = FakeCostModel(prefill_const_s=0.010, decode_const_s=0.004)
    cost.gpu_busy_fraction = lambda: 0.25
    scenario = parse_scenario({
        "name": "util", "cost_model": "roofline", "backends": ["native_pytorch"],
        "workload": {"kind": "decode", "prompt_tokens": 8, "new_tokens": 5, "runs": 2, "warmup_runs": 1},
    })
    records = World(scenario, expand_points(scenario)[0], cost, np.random.SeedSequence(0)).run()
    p, d, n, f = 0.010, 0.004, 5, 0.25
    kernel_s = p - (1 - f) * d + f * d * (n - 1)
    assert metrics.gpu_utilization(records.frame()) == pytest.approx(kernel_s / (p + d * (n - 1)), rel=REL)


def test_serial_busy_time_is_the_union_of_its_passes():
    cost = FakeCostModel(prefill_const_s=0.010, decode_const_s=0.004)
    cost.gpu_busy_fraction = lambda: 0.5
    env = simpy.Environment()
    executor = SerialFCFS(env, PassTimer(cost, np.random.default_rng(0)))
    executions = []

    def work():
        executions.append((yield from executor.execute(GpuWork([("prefill", 8, 0), ("decode", 8)]))))

    env.process(work())
    env.process(work())
    env.run()
    assert env.now == pytest.approx(0.028)
    # each: a prefill of 10 ms less a decode step's launches (half of 4 ms), a decode step's half
    assert sum(e.gpu_busy_s for e in executions) == pytest.approx(2 * (0.010 - 0.002 + 0.5 * 0.004))


def test_shipped_agents_scenarios_report_gpu_utilization_in_range():
    scenario = parse_scenario({
        "name": "util-agents", "backends": ["djinn", "djinn_batched", "ray_keepalive"],
        "custom_backends": {"djinn_batched": {"base": "djinn", "scheduler": "continuous_batching"}},
        "workload": {"kind": "agents", "agents": [4], "reason": {"input_tokens": 16, "new_tokens": 4},
                     "reflect": {"input_tokens": 4, "new_tokens": 4}, "act": {"kind": "fixed", "seconds": 0.5}},
    })
    for p in simulate_scenario(scenario).points:
        util = metrics.gpu_utilization(p.records.frame())
        busy = float(p.records.frame()["gpu_busy_s"].sum())
        assert 0.0 < util <= 1.0 and busy <= float(p.records.frame()["compute_s"].sum()) + 1e-12


# --- keep-alive's KV between phases -------------------------------------------------------------


@pytest.mark.parametrize("between", ["keep", "free"])
def test_what_a_keepalive_actor_holds_during_act_is_what_the_memory_bound_counts(fake_cost, between):
    scenario = parse_scenario({
        "name": "keepalive-kv", "cost_model": "roofline", "backends": ["actor"],
        "custom_backends": {"actor": {"base": "ray_keepalive", "kv_between_phases": between}},
        "workload": {"kind": "agents", "agents": [3], "reason": {"input_tokens": 72, "new_tokens": 50},
                     "reflect": {"input_tokens": 16, "new_tokens": 50}, "act": {"kind": "fixed", "seconds": 10}},
    })
    point = expand_points(scenario)[0]
    world = World(scenario, point, fake_cost, np.random.SeedSequence(0))
    held = []

    def probe():
        yield world.env.timeout(5.0)  # every agent is in ACT
        held.append(world.server.memory.used_bytes)

    world.env.process(probe())
    world.run()
    process = fake_cost.weight_bytes + fake_cost.context_bytes_per_process
    kv = (72 + 50) * fake_cost.kv_bytes_per_token if between == "keep" else 0
    assert held == [3 * (process + kv)]
    assert world.server.memory.used_bytes == 0  # all of it freed when the agents end
    session_kv = (72 + 50 + 16 + 50) * fake_cost.kv_bytes_per_token if between == "keep" else 0
    assert memory_bound_agents(scenario, point.backend, fake_cost) == fake_cost.capacity_bytes // (process + session_kv)


def test_a_per_request_task_cannot_keep_its_kv():
    from djinnsim.errors import DjinnsimError

    with pytest.raises(DjinnsimError, match="kv_between_phases"):
        parse_scenario({"name": "x", "backends": ["t"], "workload": {"kind": "agents"},
                        "custom_backends": {"t": {"base": "ray_serverless", "kv_between_phases": "keep"}}})


# --- the pipe's closed form for a lone transfer ---------------------------------------------------


def _fixed_time_transfers(closed_form: bool, starts: list[tuple[float, float, float, float, bool]]) -> list[float]:
    """Transfers (start, bytes, before_s, after_s, capped class) on one pipe: with the closed form,
    the fixed times ride on the transfer; without it, explicit timeouts around a stepped flow."""
    env = simpy.Environment()
    pipe = SharedPipe(env, lambda k: 100.0 * (1 + 0.5 * (k > 1)))  # the aggregate rises with a second flow
    pipe.closed_form = closed_form
    capped = FlowClass("capped", lambda k: 30.0 * k)
    ended = [None] * len(starts)

    def job(i, start_at, nbytes, before_s, after_s, in_class):
        yield env.timeout(start_at)
        flow_class = capped if in_class else None
        if closed_form:
            yield pipe.transfer(nbytes, flow_class, lead_s=before_s / 3, before_s=before_s, after_s=after_s)
        else:
            yield env.timeout(before_s / 3)
            yield env.timeout(before_s)
            yield pipe.transfer(nbytes, flow_class)
            yield env.timeout(after_s)
        ended[i] = env.now

    for i, start in enumerate(starts):
        env.process(job(i, *start))
    env.run()
    assert pipe.in_flight == 0
    return ended


@pytest.mark.parametrize("seed", range(6))
def test_transfers_with_fixed_times_end_exactly_when_stepped_ones_do(seed):
    """Lone transfers (closed form), ones that another overtakes before or while they move (put back
    into the pipe) and crowded ones: every end instant equals, to the bit, the one of the same
    transfers stepped through the pipe with their fixed times as separate timeouts."""
    rng = np.random.default_rng(seed)
    spread = [0.2, 2.0, 20.0][seed % 3]  # crowded, some overlap, mostly alone
    starts = [(float(rng.uniform(0, spread)), float(rng.uniform(1, 200)), float(rng.uniform(0, 0.5)),
               float(rng.uniform(0, 0.5)), bool(rng.integers(2))) for _ in range(40)]
    stepped = _fixed_time_transfers(False, starts)
    assert _fixed_time_transfers(True, starts) == stepped


def _bursts(closed_form: bool, bursts: list[tuple], singles: list[tuple]) -> dict:
    """Bursts (start, count, bytes, before_s, after_s, capped class) of alike transfers started by
    processes that `fire_all` resumes together (as a batched decode iteration's finished sequences
    copy their results out), and single transfers (start, bytes, before_s, after_s, capped class)
    that overtake them; the end instant of each. Without the closed form the fixed times are
    explicit timeouts around a stepped flow."""
    env = simpy.Environment()
    pipe = SharedPipe(env, lambda k: 100.0 * (1 + 0.5 * (k > 1)))  # the aggregate rises with a second flow
    pipe.closed_form = closed_form
    capped = FlowClass("capped", lambda k: 30.0 * k)
    ended = {}

    def job(key, nbytes, before_s, after_s, in_class):
        flow_class = capped if in_class else None
        if closed_form:
            yield pipe.transfer(nbytes, flow_class, before_s=before_s, after_s=after_s)
        else:
            yield env.timeout(before_s)
            yield pipe.transfer(nbytes, flow_class)
            yield env.timeout(after_s)
        ended[key] = env.now

    def waiter(gate, key, *transfer):
        yield gate
        yield from job(key, *transfer)

    def burst(b, start_at, count, *transfer):
        yield env.timeout(start_at)
        gates = [env.event() for _ in range(count)]
        for i, gate in enumerate(gates):
            env.process(waiter(gate, ("burst", b, i), *transfer))
        yield env.timeout(0)  # the waiters have started and wait on their gates
        fire_all(env, gates)

    def single(s, start_at, *transfer):
        yield env.timeout(start_at)
        yield from job(("single", s), *transfer)

    for b, spec in enumerate(bursts):
        env.process(burst(b, *spec))
    for s, spec in enumerate(singles):
        env.process(single(s, *spec))
    env.run()
    assert pipe.in_flight == 0
    assert len(ended) == sum(spec[1] for spec in bursts) + len(singles)
    return ended


@pytest.mark.parametrize("seed", range(6))
def test_bursts_of_alike_transfers_end_exactly_when_stepped_ones_do(seed):
    """Alike transfers started together that find the pipe idle (one closed-form group), groups that
    a single transfer overtakes before they join or while they move (put back into the pipe), and
    groups that find it busy: every end instant equals, to the bit, the one of the same transfers
    stepped through the pipe with their fixed times as separate timeouts, and they end in the same
    order (the order their processes resume in)."""
    rng = np.random.default_rng(seed)
    spread = [2.0, 20.0, 200.0][seed % 3]  # crowded, some overlap, mostly alone
    bursts = [(float(rng.uniform(0, spread)), int(rng.integers(1, 6)), float(rng.uniform(1, 200)),
               float(rng.uniform(0, 0.5)), float(rng.uniform(0, 0.5)), bool(rng.integers(2))) for _ in range(20)]
    singles = [(float(rng.uniform(0, spread)), float(rng.uniform(1, 200)), float(rng.uniform(0, 0.5)),
                float(rng.uniform(0, 0.5)), bool(rng.integers(2))) for _ in range(10)]
    stepped = _bursts(False, bursts, singles)
    assert list(_bursts(True, bursts, singles).items()) == list(stepped.items())  # in the order they ended
