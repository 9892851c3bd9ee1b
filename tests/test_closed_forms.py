"""Closed forms the engine must reproduce: transfers at line rate, the remote request path built
term by term, M/D/1 waiting (Pollaczek-Khinchine), serial FCFS and time-sliced finishing times,
the keep-alive OOM point from the memory specs, and FIFO memory grants."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from djinnsim.sim.costmodel import RooflineCostModel
from djinnsim.sim.executor import ContinuousBatching, FluidTimeSliced, GpuWork, PassTimer, SerialFCFS, TimeSliced
from djinnsim.sim.resources import GpuMemory, Link, SharedPipe
from djinnsim.sim.run import simulate_scenario
from djinnsim.sim.scenario import expand_points, parse_scenario
from djinnsim.sim.simulate import World, memory_bound_agents
from djinnsim.sim.specs import get_gpu, get_model

from conftest import FakeCostModel

REL = 1e-12


def _finish_times(env: simpy.Environment, starts: list[tuple[float, SharedPipe, float]]) -> list[float]:
    """Start transfer i of `nbytes` on `pipe` at `start_at`; return when each one ends."""
    done = [None] * len(starts)

    def flow(i, start_at, pipe, nbytes):
        yield env.timeout(start_at)
        yield pipe.transfer(nbytes)
        done[i] = env.now

    for i, (start_at, pipe, nbytes) in enumerate(starts):
        env.process(flow(i, start_at, pipe, nbytes))
    env.run()
    return done


# --- the link ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [1, 137, 64_000, 2.6e9])
def test_single_transfer_at_line_rate(nbytes):
    env = simpy.Environment()
    link = Link(env, gbps=25.0, rtt_s=0.004)
    rate = 25e9 / 8
    (t,) = _finish_times(env, [(0.0, link.up, nbytes)])
    assert t == pytest.approx(nbytes / rate, rel=REL)
    assert link.up.bytes_carried == nbytes


def test_one_way_message_is_bytes_over_rate_plus_half_rtt():
    env = simpy.Environment()
    link = Link(env, gbps=10.0, rtt_s=0.006)
    arrived = []

    def one_way(nbytes):
        yield link.down.transfer(nbytes)
        yield env.timeout(link.rtt_s / 2)
        arrived.append(env.now)

    env.process(one_way(5_000_000))
    env.run()
    assert arrived == [pytest.approx(5_000_000 / (10e9 / 8) + 0.003, rel=REL)]


def test_two_equal_concurrent_transfers_each_take_twice_as_long():
    env = simpy.Environment()
    pipe = SharedPipe(env, lambda k: 1e6)
    times = _finish_times(env, [(0.0, pipe, 3e6), (0.0, pipe, 3e6)])
    assert times == [pytest.approx(6.0, rel=REL)] * 2


def test_staggered_transfers_share_processor_style():
    # A: 2 MB from t=0 alone at 1 MB/s; B: 1 MB from t=0.5 at half rate each -> B ends at 2.5 s;
    # A has 0.5 MB left then, alone again -> ends at 3.0 s.
    env = simpy.Environment()
    pipe = SharedPipe(env, lambda k: 1e6)
    a, b = _finish_times(env, [(0.0, pipe, 2e6), (0.5, pipe, 1e6)])
    assert b == pytest.approx(2.5, rel=REL)
    assert a == pytest.approx(3.0, rel=REL)


def test_full_duplex_directions_do_not_share_bandwidth():
    env = simpy.Environment()
    link = Link(env, gbps=8.0, rtt_s=0.0)
    up, down = _finish_times(env, [(0.0, link.up, 1e9), (0.0, link.down, 1e9)])
    assert up == pytest.approx(1.0, rel=REL)
    assert down == pytest.approx(1.0, rel=REL)


def test_contention_curve_sets_the_aggregate_rate():
    # Two loads whose aggregate is 1.5x a lone load's rate: each gets 0.75x.
    env = simpy.Environment()
    pipe = SharedPipe(env, lambda k: 2e9 if k <= 1 else 3e9)
    times = _finish_times(env, [(0.0, pipe, 3e9), (0.0, pipe, 3e9)])
    assert times == [pytest.approx(2.0, rel=REL)] * 2


# --- the remote request path, term by term ----------------------------------------------------


def _scenario(raw: dict):
    base = {"name": "closed-form", "cost_model": "roofline"}
    return parse_scenario({**base, **raw})


def _run_point(scenario, cost, index: int = 0):
    point = expand_points(scenario)[index]
    sim = World(scenario, point, cost, np.random.SeedSequence(0))
    return sim.run(), sim


def _send_s(cost: FakeCostModel, payload: int, framing: int, rate_Bps: float, rtt_s: float) -> float:
    return (cost.per_message_s() + cost.serialize_s(payload) + (payload + framing) / rate_Bps
            + rtt_s / 2 + cost.deserialize_s(payload))


def test_full_djinn_token_request_matches_hand_formula(fake_cost):
    gbps, rtt_s, framing = 10.0, 0.002, 137
    scenario = _scenario({
        "backends": ["full_djinn"],
        "link": {"gbps": gbps, "rtt_ms": rtt_s * 1e3, "framing_bytes": framing},
        "workload": {"kind": "decode", "prompt_tokens": 72, "new_tokens": 3, "runs": 1, "warmup_runs": 0},
    })
    records, _ = _run_point(scenario, fake_cost)
    rate = gbps * 1e9 / 8
    c = fake_cost
    vocab_bytes = 32000 * 2
    assert [r.step for r in records] == [0, 1, 2]
    previous_end = 0.0
    for r in records:
        up = 72 * 8 if r.step == 0 else 8
        connect = rtt_s + c.connect_s()
        uplink = _send_s(c, up, framing, rate, rtt_s)
        h2d = c.copy_s(up, "h2d", pinned=False)
        compute = c.prefill_const_s if r.step == 0 else c.decode_const_s
        d2h = c.copy_s(vocab_bytes, "d2h", pinned=False)
        downlink = _send_s(c, vocab_bytes, framing, rate, rtt_s)
        assert r.status == "ok"
        assert (r.bytes_up, r.bytes_down) == (up, vocab_bytes)
        assert (r.wire_bytes_up, r.wire_bytes_down) == (up + framing, vocab_bytes + framing)
        assert r.connect_s == pytest.approx(connect, rel=1e-12)
        assert r.uplink_s == pytest.approx(uplink, rel=1e-12)
        assert r.queue_s == pytest.approx(0.0, abs=1e-15)
        assert r.copy_s == pytest.approx(h2d + d2h, rel=1e-12)
        assert r.compute_s == pytest.approx(compute, rel=1e-12)
        assert r.downlink_s == pytest.approx(downlink, rel=1e-12)
        assert r.issued_at == pytest.approx(previous_end, abs=1e-15)
        assert r.started_at == pytest.approx(r.issued_at + connect + uplink + h2d, rel=1e-12)
        latency = connect + uplink + h2d + compute + d2h + downlink
        assert r.finished_at - r.issued_at == pytest.approx(latency, rel=1e-12)
        previous_end = r.finished_at


def test_djinn_agent_phases_match_hand_formula(fake_cost):
    gbps, rtt_s, framing, act_s = 25.0, 0.0002, 137, 1.5
    scenario = _scenario({
        "backends": ["djinn"],
        "link": {"gbps": gbps, "rtt_ms": rtt_s * 1e3, "framing_bytes": framing},
        "workload": {"kind": "agents", "agents": [1], "reason": {"input_tokens": 72, "new_tokens": 50},
                     "act": {"kind": "fixed", "seconds": act_s}, "reflect": {"input_tokens": 16, "new_tokens": 50}},
    })
    records, _ = _run_point(scenario, fake_cost)
    reason, reflect = records
    c, rate = fake_cost, gbps * 1e9 / 8
    compute = c.prefill_const_s + 49 * c.decode_const_s

    def phase_s(up_ids: int, connect: bool) -> float:
        up, down = up_ids * 8, 50 * 8  # ids up; 50 generated ids (int64) down, no logits
        return ((rtt_s + c.connect_s() if connect else 0.0) + _send_s(c, up, framing, rate, rtt_s)
                + c.copy_s(up, "h2d", pinned=False) + compute + c.copy_s(down, "d2h", pinned=False)
                + _send_s(c, down, framing, rate, rtt_s))

    assert (reason.phase, reflect.phase) == ("reason", "reflect")
    assert reason.latency_s == pytest.approx(phase_s(72, connect=True), rel=1e-12)
    # Persistent connection: REFLECT opens none and sends only its 16 new ids.
    assert reflect.issued_at == pytest.approx(reason.finished_at + act_s, rel=1e-12)
    assert reflect.connect_s == 0.0
    assert reflect.bytes_up == 16 * 8
    assert reflect.latency_s == pytest.approx(phase_s(16, connect=False), rel=1e-12)


# --- queueing: M/D/1, serial FCFS, time slicing -------------------------------------------------


def _executor(kind, env, cost):
    return kind(env, PassTimer(cost, np.random.default_rng(0)))


def test_md1_mean_wait_matches_pollaczek_khinchine():
    """Poisson arrivals into SerialFCFS with deterministic service S: Wq = rho S / (2 (1 - rho)).

    50,000 customers at rho = 0.5: the estimate's standard error is about 1.5% of Wq (checked over
    200 seeds with the Lindley recursion), so 5% is a > 3-sigma bound. Each wait must also equal the
    Lindley recursion W[i] = max(0, W[i-1] + S - A[i]) on the same arrivals, to round-off.
    """
    rho, service_s = 0.5, 0.010
    cost = FakeCostModel(prefill_const_s=service_s)
    n_customers, n_discard = 50_000, 1_000
    env = simpy.Environment()
    server = _executor(SerialFCFS, env, cost)
    gaps = np.random.default_rng(7).exponential(service_s / rho, n_customers)
    waits = np.full(n_customers, np.nan)

    def customer(i):
        execution = yield from server.execute(GpuWork([("prefill", 8, 0)]))
        assert execution.compute_s == service_s
        waits[i] = execution.queued_s

    def source():
        for i, gap in enumerate(gaps):
            yield env.timeout(gap)
            env.process(customer(i))

    env.process(source())
    env.run()
    lindley = np.zeros(n_customers)
    for i in range(1, n_customers):
        lindley[i] = max(0.0, lindley[i - 1] + service_s - gaps[i])
    np.testing.assert_allclose(waits, lindley, rtol=0, atol=1e-9)
    expected = rho * service_s / (2 * (1 - rho))
    assert waits[n_discard:].mean() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_serial_fcfs_kth_of_n_simultaneous_waits_k_minus_1_services(n):
    service_s = 0.010 + 3 * 0.004  # one prefill and three decodes
    cost = FakeCostModel()
    env = simpy.Environment()
    server = _executor(SerialFCFS, env, cost)
    results = {}

    def request(k):
        work = GpuWork([("prefill", 16, 0), ("decode", 16), ("decode", 17), ("decode", 18)])
        results[k] = yield from server.execute(work)

    for k in range(n):
        env.process(request(k))
    env.run()
    for k in range(n):  # k is 0-based: the (k+1)-th waits k services
        assert results[k].queued_s == pytest.approx(k * service_s, rel=1e-12, abs=1e-15)
        assert results[k].compute_s == pytest.approx(service_s, rel=1e-12)


def test_serial_fcfs_through_the_engine_queues_simultaneous_reasons(fake_cost):
    """N agents start together; equal uplinks finish together; REASON k waits k generations."""
    n = 5
    scenario = _scenario({
        "backends": ["djinn"],
        "workload": {"kind": "agents", "agents": [n], "reason": {"input_tokens": 72, "new_tokens": 50},
                     "act": {"kind": "fixed", "seconds": 30}, "reflect": {"input_tokens": 16, "new_tokens": 50}},
    })
    records, _ = _run_point(scenario, fake_cost)
    generation_s = fake_cost.prefill_const_s + 49 * fake_cost.decode_const_s
    reasons = sorted((r for r in records if r.phase == "reason"), key=lambda r: r.agent)
    assert len(reasons) == n
    for k, r in enumerate(reasons):
        assert r.queue_s == pytest.approx(k * generation_s, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n,m", [(1, 5), (3, 4), (6, 10)])
def test_time_sliced_equal_jobs_interleave_round_robin(n, m):
    pass_s = 0.004
    cost = FakeCostModel(decode_const_s=pass_s)
    env = simpy.Environment()
    server = _executor(TimeSliced, env, cost)
    finished = {}

    def job(k):
        execution = yield from server.execute(GpuWork([("decode", 10 + i) for i in range(m)]))
        finished[k] = (env.now, execution)

    for k in range(n):
        env.process(job(k))
    env.run()
    for k in range(n):
        at, execution = finished[k]
        # Round robin: job k's last pass is slot n*(m-1) + k + 1.
        assert at == pytest.approx((n * (m - 1) + k + 1) * pass_s, rel=1e-9)
        assert execution.compute_s == pytest.approx(m * pass_s, rel=1e-12)
        assert execution.queued_s == pytest.approx(at - m * pass_s, rel=1e-9, abs=1e-12)
    assert max(at for at, _ in finished.values()) == pytest.approx(n * m * pass_s, rel=1e-9)


def _time_sliced_finishes(kind, jobs: list[tuple[float, int]], pass_s: float, gpu_fraction: float,
                          gpu_step_s: float | None = None):
    """Jobs of `m` decode passes of `pass_s` each, started at their `start_at`, on the executor
    `kind`: (finish time, Execution) per job. The GPU's part of a pass: `gpu_step_s` seconds when
    given (the cost model's absolute decode_gpu_s), else `gpu_fraction` of it."""
    cost = FakeCostModel(decode_const_s=pass_s)
    cost.gpu_busy_fraction = lambda: gpu_fraction
    cost.decode_gpu_s = lambda batch, sum_context: gpu_step_s
    env = simpy.Environment()
    server = _executor(kind, env, cost)
    finished = {}

    def job(k, start_at, m):
        yield env.timeout(start_at)
        execution = yield from server.execute(GpuWork([("decode", 10 + i) for i in range(m)]))
        finished[k] = (env.now, execution)

    for k, (start_at, m) in enumerate(jobs):
        env.process(job(k, start_at, m))
    env.run()
    return [finished[k] for k in range(len(jobs))]


@pytest.mark.parametrize("n,m", [(1, 5), (3, 4), (6, 10)])
def test_fluid_time_slicing_of_equal_gpu_bound_jobs_is_processor_sharing(n, m):
    """n equal jobs of m GPU-bound passes: under processor sharing all finish at n m S, the
    per-pass model's makespan; per pass, job k finishes (n - 1 - k) passes before that."""
    pass_s = 0.004
    fluid = _time_sliced_finishes(FluidTimeSliced, [(0.0, m)] * n, pass_s, 1.0)
    per_pass = _time_sliced_finishes(TimeSliced, [(0.0, m)] * n, pass_s, 1.0)
    for k, ((at, execution), (per_pass_at, _)) in enumerate(zip(fluid, per_pass)):
        assert at == pytest.approx(n * m * pass_s, rel=1e-9)
        assert execution.compute_s == pytest.approx(m * pass_s, rel=1e-12)
        assert execution.gpu_busy_s == pytest.approx(m * pass_s, rel=1e-12)
        assert execution.queued_s == pytest.approx(at - m * pass_s, rel=1e-9, abs=1e-12)
        assert at - per_pass_at == pytest.approx((n - 1 - k) * pass_s, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("gpu_fraction", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_fluid_time_slicing_matches_the_per_pass_steady_state(n, gpu_fraction):
    """n equal processes of m passes of D, G = f D of it on the GPU: in steady state a pass cycles
    in max(D, n G) (host time overlaps while the GPU is free, turns queue once it is full), so
    all finish at m max(D, n G). The fluid model says exactly that; the per-pass model agrees
    within the first round of turns (at most n passes of GPU time)."""
    pass_s, m = 0.01, 200
    fluid = _time_sliced_finishes(FluidTimeSliced, [(0.0, m)] * n, pass_s, gpu_fraction)
    per_pass = _time_sliced_finishes(TimeSliced, [(0.0, m)] * n, pass_s, gpu_fraction)
    cycle_s = max(pass_s, n * gpu_fraction * pass_s)
    for (at, execution), (per_pass_at, _) in zip(fluid, per_pass):
        assert at == pytest.approx(m * cycle_s, rel=1e-9)
        assert execution.queued_s == pytest.approx(m * cycle_s - m * pass_s, rel=1e-9, abs=1e-12)
        assert abs(at - per_pass_at) <= n * gpu_fraction * pass_s + 1e-12


@pytest.mark.parametrize("level", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_fluid_time_slicing_in_absolute_gpu_time_cycles_in_max_of_lone_step_and_n_g(n, level):
    """The same with the GPU's part of a pass given in seconds, g = 8 ms, and the lone step D at a
    launch-bound level of 10 ms x `level`: a pass cycles in max(D, n G), G = min(g, D) (a pass
    shorter than g is all GPU time), so once n g > D >= g the cycle is n g whatever the level (the
    relative model, f = g / D at one level, would scale with it)."""
    gpu_s, m = 0.008, 200
    pass_s = 0.010 * level
    fluid = _time_sliced_finishes(FluidTimeSliced, [(0.0, m)] * n, pass_s, 0.5, gpu_step_s=gpu_s)
    per_pass = _time_sliced_finishes(TimeSliced, [(0.0, m)] * n, pass_s, 0.5, gpu_step_s=gpu_s)
    busy_s = min(gpu_s, pass_s)
    cycle_s = max(pass_s, n * busy_s)
    for (at, execution), (per_pass_at, _) in zip(fluid, per_pass):
        assert at == pytest.approx(m * cycle_s, rel=1e-9)
        assert execution.gpu_busy_s == pytest.approx(m * busy_s, rel=1e-12)
        assert abs(at - per_pass_at) <= n * busy_s + 1e-12
    if n * gpu_s > pass_s >= gpu_s:  # saturated: n g, not a multiple of D
        assert fluid[0][0] == pytest.approx(m * n * gpu_s, rel=1e-9)


def test_fluid_time_slicing_of_a_late_job_shares_only_while_both_run():
    """A: 100 GPU-bound passes of 10 ms from t = 0 (1 s alone). B: 20 such passes from t = 0.5 s.
    Sharing equally from 0.5 s, B's 0.2 s of GPU time end at 0.9 s, A's last 0.3 s at 1.2 s.
    The per-pass model alternates turns: A ends at 1.2 s too, B within one pass of 0.9 s."""
    fluid = _time_sliced_finishes(FluidTimeSliced, [(0.0, 100), (0.5, 20)], 0.01, 1.0)
    per_pass = _time_sliced_finishes(TimeSliced, [(0.0, 100), (0.5, 20)], 0.01, 1.0)
    assert [at for at, _ in fluid] == [pytest.approx(1.2), pytest.approx(0.9)]
    assert [at for at, _ in per_pass] == [pytest.approx(1.2), pytest.approx(0.9, abs=0.01 + 1e-12)]
    assert fluid[1][1].queued_s == pytest.approx(0.2)


def test_continuous_batching_timeline_and_accounting():
    """P = 10 ms prefill, D = 4 ms decode. A (prefill + 3 decodes) at t=0; B (prefill + 1 decode)
    at 12 ms, during A's first decode. B's prefill runs alone 14-24 ms (prefill priority) while A
    waits; then both decode 24-28 ms (B done); A decodes alone 28-32 ms.

    Every sequence's wall time must be queue + compute: A's 10 ms stall behind B's prefill is
    waiting, not lost time."""
    prefill_s, decode_s = 0.010, 0.004
    cost = FakeCostModel(prefill_const_s=prefill_s, decode_const_s=decode_s)
    env = simpy.Environment()
    server = ContinuousBatching(env, PassTimer(cost, np.random.default_rng(0)), max_batch=4)
    done = {}

    def sequence(name, at, passes):
        yield env.timeout(at)
        arrived = env.now
        execution = yield from server.execute(GpuWork(passes))
        done[name] = (arrived, env.now, execution)

    env.process(sequence("A", 0.0, [("prefill", 8, 0), ("decode", 8), ("decode", 9), ("decode", 10)]))
    env.process(sequence("B", 0.012, [("prefill", 8, 0), ("decode", 8)]))
    env.run(until=1.0)
    a_arrived, a_end, a = done["A"]
    b_arrived, b_end, b = done["B"]
    assert a_end == pytest.approx(0.032, rel=1e-9)
    assert b_end == pytest.approx(0.028, rel=1e-9)
    assert b.started_at == pytest.approx(0.014, rel=1e-9)
    assert b.queued_s + b.compute_s == pytest.approx(b_end - b_arrived, rel=1e-9)
    assert a.queued_s + a.compute_s == pytest.approx(a_end - a_arrived, rel=1e-9)


# --- memory -------------------------------------------------------------------------------------


def test_keepalive_oom_n_from_memory_specs():
    """Each keep-alive actor holds fp16 weights + a CUDA context: N_max = capacity // that."""
    gpu, model = get_gpu("h100-80gb"), get_model("llama-2-7b")
    per_actor = model.parameters * 2 + RooflineCostModel.context_bytes
    n_max = gpu.memory_bytes // per_actor
    assert n_max == 6  # 85.52 GB // (13.48 GB + 0.54 GB); guards the spec data this test relies on

    scenario = _scenario({
        "backends": ["ray_keepalive"],
        "workload": {"kind": "agents", "agents": list(range(1, 10)), "act": {"kind": "fixed", "seconds": 1}},
    })
    result = simulate_scenario(scenario)
    oom_at = [p.point.n_agents for p in result.points if any(r.status == "oom" for r in p.records)]
    assert oom_at and oom_at[0] == n_max + 1
    assert oom_at == list(range(n_max + 1, 10))
    for p in result.points:
        assert p.memory_bound_agents == n_max
        ooms = sum(r.status == "oom" for r in p.records)
        assert ooms == max(p.point.n_agents - n_max, 0)  # the actors that did not fit, one record each
    cost = RooflineCostModel(gpu, model)
    assert memory_bound_agents(scenario, expand_points(scenario)[0].backend, cost) == n_max


def test_alloc_wait_grants_in_fifo_order():
    env = simpy.Environment()
    memory = GpuMemory(env, capacity_bytes=10)
    assert memory.try_alloc(8)
    granted = []

    def waiter(name, nbytes, at):
        yield env.timeout(at)
        yield memory.alloc_wait(nbytes)
        granted.append((name, env.now))

    def releaser():
        yield env.timeout(5)
        memory.free(8)

    env.process(waiter("big", 6, 1))
    env.process(waiter("small", 1, 2))  # fits at once, but must not overtake "big"
    env.process(waiter("third", 3, 3))
    env.process(releaser())
    env.run(until=4)
    assert granted == []
    assert not memory.try_alloc(1)  # no jumping the queue either
    env.run()
    assert granted == [("big", 5), ("small", 5), ("third", 5)]
    assert memory.used_bytes == 10 and memory.peak_bytes == 10


def test_alloc_wait_holds_a_request_until_memory_is_freed():
    env = simpy.Environment()
    memory = GpuMemory(env, capacity_bytes=100)
    assert memory.try_alloc(70)
    order = []

    def waiter(name, nbytes):
        yield memory.alloc_wait(nbytes)
        order.append((name, env.now))

    def releaser():
        yield env.timeout(2)
        memory.free(30)
        yield env.timeout(3)
        memory.free(40)

    env.process(waiter("a", 50))
    env.process(waiter("b", 40))
    env.process(releaser())
    env.run()
    # a (50) fits after the first free (free = 60); b (40) waits for the second (free 10 -> 50).
    assert order == [("a", 2), ("b", 5)]
    assert memory.used_bytes == 90


def test_time_sliced_overlaps_host_time_and_takes_gpu_time_in_turns():
    """Two processes, one pass of d = 1 s each, GPU busy half of it: both launch (host) 0-0.5 s in
    parallel; A's GPU half runs 0.5-1.0 s, B's waits for it and runs 1.0-1.5 s."""
    cost = FakeCostModel(decode_const_s=1.0)
    cost.gpu_busy_fraction = lambda: 0.5
    env = simpy.Environment()
    server = TimeSliced(env, PassTimer(cost, np.random.default_rng(0)))
    done = {}

    def job(name):
        execution = yield from server.execute(GpuWork([("decode", 10)]))
        done[name] = (env.now, execution)

    env.process(job("A"))
    env.process(job("B"))
    env.run()
    assert done["A"][0] == pytest.approx(1.0) and done["A"][1].queued_s == pytest.approx(0.0)
    assert done["B"][0] == pytest.approx(1.5) and done["B"][1].queued_s == pytest.approx(0.5)
    assert done["B"][1].compute_s == pytest.approx(1.0)


def test_a_stream_cap_below_line_rate_sets_the_transfer_time():
    """A 25 Gbps line (3.125 GB/s) but a host socket stack of 1.5 GB/s: 3 GB takes 2 s; two flows
    share the line (1.5625 GB/s each), so a 1.6 GB/s cap no longer binds."""
    env = simpy.Environment()
    link = Link(env, gbps=25, rtt_s=0.0, stream_cap_Bps=1.5e9)
    assert _finish_times(env, [(0.0, link.up, 3e9)]) == [pytest.approx(2.0, rel=1e-12)]
    env = simpy.Environment()
    link = Link(env, gbps=25, rtt_s=0.0, stream_cap_Bps=1.6e9)
    both = _finish_times(env, [(0.0, link.up, 3.125e9), (0.0, link.up, 3.125e9)])
    assert both == [pytest.approx(2.0, rel=1e-12)] * 2


class _SerialHost(FakeCostModel):
    """A fake host whose loopback stack also costs 1 ns a byte in series with the wire (1 GB/s)."""

    def stream_serial_s(self, nbytes: float) -> float:
        return nbytes * 1e-9

    def stream_gbps(self) -> float | None:
        return 2.0


def _partially_aware_uplinks(link: dict) -> list[tuple[int, float]]:
    scenario = _scenario({
        "backends": ["partially_aware"], "link": {"gbps": 4.0, "rtt_ms": 0.2, "framing_bytes": 137, **link},
        "workload": {"kind": "decode", "prompt_tokens": 72, "new_tokens": 3, "runs": 1, "warmup_runs": 0},
    })
    records, _ = _run_point(scenario, _SerialHost())
    return [(r.bytes_up, r.uplink_s) for r in records]


def test_over_loopback_a_send_pays_the_measured_host_time_in_series_with_the_wire():
    """Loopback with the profile's cap: per_message + serialize + host time (1 ns/B) + wire bytes at
    min(4 Gbps, 2 GB/s) + RTT/2 + deserialize; a NIC, or an explicit cap (the host time was measured
    beside the profile's cap, not that one): no host time."""
    c, rate = _SerialHost(), 4e9 / 8
    loopback = _partially_aware_uplinks({"host_stack": "loopback"})
    for up, uplink_s in loopback:
        assert uplink_s == pytest.approx(_send_s(c, up, 137, rate, 2e-4) + up * 1e-9, rel=1e-12)
    for link in ({"host_stack": "nic"}, {"host_stack": "loopback", "stream_cap_gbps": 16.0}):
        for up, uplink_s in _partially_aware_uplinks(link):
            assert uplink_s == pytest.approx(_send_s(c, up, 137, rate, 2e-4), rel=1e-12)
    assert loopback[-1][0] > 10**6  # the KV went up: the host time is more than rounding
