"""Properties that hold for every scenario: drawn at random (any backend preset, decode or agents
workloads, small sizes, random link and scheduler), simulated, then checked record by record."""

from __future__ import annotations

import math
import os

import numpy as np
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from djinnsim.sim.backends import preset_names
from djinnsim.sim.costmodel import RooflineCostModel
from djinnsim.sim.records import DURATION_FIELDS
from djinnsim.sim.run import simulate_scenario
from djinnsim.sim.scenario import Scenario, expand_points, parse_scenario
from djinnsim.sim.simulate import World

MODELS = ["tiny-llama", "gpt2", "llama-2-7b", "llama-2-13b", "mistral-7b"]
GPUS = ["a100-80gb", "h100-80gb", "h200"]
# DJINNSIM_PROPERTY_EXAMPLES raises the example count for a longer bug hunt.
EXAMPLES = int(os.environ.get("DJINNSIM_PROPERTY_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


class SizedRoofline(RooflineCostModel):
    """The roofline model with the GPU's capacity scaled, so small scenarios reach OOM too."""

    def __init__(self, gpu, model, capacity_fraction: float) -> None:
        super().__init__(gpu, model)
        self._capacity = math.inf if capacity_fraction == math.inf else int(gpu.memory_bytes * capacity_fraction)

    @property
    def capacity_bytes(self):
        return self._capacity


@st.composite
def phases(draw, max_input: int = 48):
    return {"input_tokens": draw(st.integers(0, max_input)), "new_tokens": draw(st.integers(1, 6))}


@st.composite
def workloads(draw):
    if draw(st.booleans()):
        runs = draw(st.integers(1, 3))
        return {
            "kind": "decode",
            "prompt_tokens": draw(st.integers(1, 48)),
            "new_tokens": draw(st.integers(1, 6)),
            "batch": draw(st.integers(1, 3)),
            "runs": runs,
            "warmup_runs": draw(st.integers(0, runs - 1)),
        }
    act = draw(st.sampled_from([
        {"kind": "fixed", "seconds": draw(st.floats(0, 2))},
        {"kind": "uniform", "low_s": 0.0, "high_s": draw(st.floats(0, 2))},
        {"kind": "exponential", "mean_s": draw(st.floats(0.01, 2))},
    ]))
    arrival = draw(st.sampled_from([{"kind": "simultaneous"}, {"kind": "poisson", "rate_per_s": 5.0}]))
    reason = draw(phases())
    reason["input_tokens"] = max(reason["input_tokens"], 1)
    return {
        "kind": "agents",
        "agents": draw(st.lists(st.integers(1, 8), min_size=1, max_size=2, unique=True)),
        "reason": reason,
        "act": act,
        "reflect": draw(phases(24)),
        "iterations": draw(st.integers(1, 2)),
        "arrival": arrival,
    }


@st.composite
def scenarios(draw) -> Scenario:
    raw = {
        "name": "prop",
        "seed": draw(st.integers(0, 2**16)),
        "cost_model": "roofline",
        "model": draw(st.sampled_from(MODELS)),
        "gpu": draw(st.sampled_from(GPUS)),
        "backends": draw(st.lists(st.sampled_from(preset_names()), min_size=1, max_size=2, unique=True)),
        "link": {
            "gbps": draw(st.floats(0.1, 100)),
            "rtt_ms": draw(st.floats(0, 5)),
            "framing_bytes": draw(st.integers(0, 300)),
        },
        "server": {
            "scheduler": draw(st.sampled_from([None, "serial_fcfs", "time_sliced", "continuous_batching"])),
            "max_batch": draw(st.integers(1, 4)),
            "kv_swap": draw(st.sampled_from(["none", "idle"])),
        },
        "workload": draw(workloads()),
    }
    return parse_scenario(raw)


# Found by this suite: five agents under continuous batching, REFLECTs arriving while others decode.
CONTINUOUS_BATCHING_STALL = parse_scenario({
    "name": "cb-stall", "cost_model": "roofline", "model": "tiny-llama", "gpu": "a100-80gb",
    "backends": ["native_pytorch"], "link": {"gbps": 1.0, "rtt_ms": 0.0, "framing_bytes": 0},
    "server": {"scheduler": "continuous_batching", "max_batch": 2},
    "workload": {"kind": "agents", "agents": [5], "reason": {"input_tokens": 1, "new_tokens": 1},
                 "act": {"kind": "fixed", "seconds": 0.0}, "reflect": {"input_tokens": 0, "new_tokens": 2}},
})

# Found by this suite: one agent under continuous batching; queue_s derived by subtraction came out -3e-17.
CONTINUOUS_BATCHING_ROUNDOFF = parse_scenario({
    **{k: v for k, v in CONTINUOUS_BATCHING_STALL.model_dump(mode="json").items() if k != "workload"},
    "server": {"scheduler": "continuous_batching", "max_batch": 1},
    "workload": {"kind": "agents", "agents": [1], "reason": {"input_tokens": 1, "new_tokens": 1},
                 "act": {"kind": "fixed", "seconds": 1.0}, "reflect": {"input_tokens": 0, "new_tokens": 1}},
})

# Found by this suite: a per-agent backend (one process per client) in a decode workload.
KEEPALIVE_DECODE = parse_scenario({
    "name": "keepalive-decode", "cost_model": "roofline", "backends": ["ray_keepalive"],
    "workload": {"kind": "decode", "prompt_tokens": 8, "new_tokens": 2, "runs": 1, "warmup_runs": 0},
})

capacities = st.sampled_from([1.0, 0.6, 0.35, 0.2, 0.12])


def _simulate(scenario: Scenario, capacity_fraction: float):
    """Every point simulated directly, so the link and memory state can be read afterwards."""
    out = []
    seeds = np.random.SeedSequence(scenario.seed).spawn(len(expand_points(scenario)))
    for point, seed in zip(expand_points(scenario), seeds):
        cost = SizedRoofline(point.gpu, point.model, capacity_fraction)
        sim = World(scenario, point, cost, seed)
        out.append((point, sim.run(), sim))
    return out


@SETTINGS
@given(scenarios(), capacities)
@example(CONTINUOUS_BATCHING_ROUNDOFF, 1.0)
def test_timestamps_ordered_and_durations_non_negative(scenario, capacity_fraction):
    for _, records, _ in _simulate(scenario, capacity_fraction):
        assert records, "every point records at least one request"
        for r in records:
            assert r.issued_at >= 0
            assert r.finished_at >= r.issued_at
            if r.status == "ok":
                assert r.issued_at <= r.started_at <= r.finished_at, r
            for name in DURATION_FIELDS:
                assert getattr(r, name) >= 0, (name, r)


@SETTINGS
@given(scenarios(), capacities)
@example(CONTINUOUS_BATCHING_STALL, 1.0)
def test_duration_fields_add_up_to_latency(scenario, capacity_fraction):
    for _, records, _ in _simulate(scenario, capacity_fraction):
        for r in records:
            parts = sum(getattr(r, name) for name in DURATION_FIELDS)
            assert math.isclose(parts, r.finished_at - r.issued_at, rel_tol=1e-9, abs_tol=1e-12), (
                r.backend, r.phase, r.step, parts, r.finished_at - r.issued_at
            )


@SETTINGS
@given(scenarios(), capacities)
@example(KEEPALIVE_DECODE, 1.0)
def test_computing_needs_the_weights_on_the_gpu(scenario, capacity_fraction):
    """No backend computes a token without its weights in GPU memory: any point with a finished
    request peaked at or above the weight bytes."""
    for point, records, sim in _simulate(scenario, capacity_fraction):
        if any(r.status == "ok" for r in records):
            assert sim.server.memory.peak_bytes >= sim.cost.weight_bytes, (point.label, sim.server.memory.peak_bytes)


@SETTINGS
@given(scenarios(), capacities)
def test_memory_never_exceeds_capacity_and_excess_demand_is_an_oom(scenario, capacity_fraction):
    """With unlimited memory a point runs identically until its first OOM, so its peak there is the
    point's demand: an oom-policy backend has an OOM record exactly when that demand exceeds capacity."""
    limited = _simulate(scenario, capacity_fraction)
    unlimited = _simulate(scenario, math.inf)
    for (point, records, sim), (_, free_records, free_sim) in zip(limited, unlimited):
        capacity = sim.cost.capacity_bytes
        assert sim.server.memory.peak_bytes <= capacity
        for r in records:
            assert 0 <= r.gpu_mem_bytes <= capacity
            assert r.gpu_mem_peak_bytes <= capacity
        peaks = [r.gpu_mem_peak_bytes for r in records]
        assert peaks == sorted(peaks), "the running peak never decreases"
        # Everything a point allocated is freed by its end, except a shared server's resident weights.
        shared = point.backend.weights == "shared" and sim.server.ok
        resident = sim.cost.weight_bytes + sim.cost.context_bytes_per_process if shared else 0
        assert sim.server.memory.used_bytes == resident and not sim.server.memory._waiting
        assert not any(r.status == "oom" for r in free_records)
        demand = free_sim.server.memory.peak_bytes
        has_oom = any(r.status == "oom" for r in records)
        event(f"memory_full={point.backend.memory_full} oom={has_oom}")
        if point.backend.memory_full == "oom":
            assert has_oom == (demand > capacity), (point.label, demand, capacity)
        elif demand <= capacity:
            assert not has_oom, point.label


@SETTINGS
@given(scenarios(), capacities)
def test_bytes_sent_equal_bytes_received(scenario, capacity_fraction):
    for point, records, sim in _simulate(scenario, capacity_fraction):
        assert sum(r.wire_bytes_up for r in records) == sim.link.up.bytes_carried
        assert sum(r.wire_bytes_down for r in records) == sim.link.down.bytes_carried
        for r in records:
            framing_up = r.wire_bytes_up - r.bytes_up
            framing_down = r.wire_bytes_down - r.bytes_down
            assert framing_up >= 0 and framing_down >= 0
        if point.backend.location == "local":
            assert sim.link.up.bytes_carried == sim.link.down.bytes_carried == 0
        # Every flow drained: nothing left in flight when the simulation ends.
        assert not sim.link.up.in_flight and not sim.link.down.in_flight


@settings(max_examples=10, deadline=None, derandomize=True)
@given(scenarios())
def test_same_scenario_same_records(scenario):
    first = simulate_scenario(scenario)
    second = simulate_scenario(scenario)
    assert first.records == second.records
    assert [p.events for p in first.points] == [p.events for p in second.points]


def test_records_do_not_depend_on_the_hash_seed():
    """Same scenario and seed in two processes with different string hashing: identical records."""
    import subprocess
    import sys

    program = (
        "import hashlib\n"
        "from djinnsim.sim.backends import preset_names\n"
        "from djinnsim.sim.run import simulate_scenario\n"
        "from djinnsim.sim.scenario import parse_scenario\n"
        "s = parse_scenario({'name': 'h', 'seed': 5, 'cost_model': 'roofline', 'backends': preset_names(),\n"
        "    'workload': {'kind': 'agents', 'agents': [1, 3], 'reason': {'input_tokens': 8, 'new_tokens': 3},\n"
        "                 'act': {'kind': 'exponential', 'mean_s': 0.5}, 'reflect': {'input_tokens': 4, 'new_tokens': 3},\n"
        "                 'arrival': {'kind': 'poisson', 'rate_per_s': 4.0}}})\n"
        "print(hashlib.sha256(repr(simulate_scenario(s).records).encode()).hexdigest())\n"
    )
    digests = {
        subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1 and len(digests.pop()) == 64
