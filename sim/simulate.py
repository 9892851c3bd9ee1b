"""Simulate one point: the public entry points over the engine in sim/engine/.

The engine is split into its entities (see sim/engine/__init__.py): clients and agents are
generator processes, the link and the GPU server own their resources, and a backend reaches the
engine only as a typed plan of each request's passes, bytes and KV changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .backends import Backend
from .costmodel import CostModel
from .engine.plan import phase_passes, session_kv_tokens, token_pass
from .engine.server import memory_bound_sessions
from .engine.world import CountingEnvironment, World
from .records import RecordBuilder, RecordTable
from .scenario import AgentsWorkload, Point, Scenario

__all__ = ["CountingEnvironment", "PointResult", "World", "memory_bound_agents", "phase_passes",
           "simulate_point", "token_pass"]


@dataclass
class PointResult:
    point: Point
    records: RecordTable
    cost_model: str
    events: int
    peak_mem_bytes: int
    capacity_bytes: int
    memory_bound_agents: int | None
    out_of_range: list[str] = field(default_factory=list)


def memory_bound_agents(scenario: Scenario, backend: Backend, cost: CostModel, gpus: int = 1) -> int | None:
    """How many agents fit at once in the memory of `gpus` GPUs (each GPU its own agents; agents
    workloads), each holding what it holds
    between phases: every session's whole KV resident (the preserve policy's worst case) plus its
    arena; a per-agent process with its KV only when it keeps it (kv: session, or kv: request with
    kv_between_phases: keep). By the engine's own memory model (`server.memory_bound_sessions`,
    with the scenario's server rules); None when they queue instead."""
    workload = scenario.workload
    if not isinstance(workload, AgentsWorkload):
        return None
    session_tokens = session_kv_tokens(workload.iterations, (workload.reason, workload.reflect))
    bound = memory_bound_sessions(cost, backend.serving(), scenario.server.rules, session_tokens,
                                  max(workload.reason.input_tokens, session_tokens))
    return None if bound is None else bound * gpus


def simulate_point(scenario: Scenario, point: Point, cost: CostModel, seed: np.random.SeedSequence,
                   shapes_seen: dict[object, set] | None = None,
                   on_flush: Callable[[RecordBuilder], None] | None = None) -> PointResult:
    """`shapes_seen`: the attention shapes each GPU process ("server", or an agent's index for a
    per-agent backend) has already run, carried in from earlier runs of the same processes and
    updated in place; None: every process starts cold. `on_flush`: see RecordBuilder (records
    handed on while the run goes on)."""
    cost.out_of_range.clear()  # one cost model serves many points: keep only this point's queries
    world = World(scenario, point, cost, seed, shapes_seen, on_flush)
    records = world.run()
    return PointResult(
        point=point,
        records=records,
        cost_model=cost.describe(),
        events=world.env.events_scheduled,
        peak_mem_bytes=world.pool.peak_bytes,
        capacity_bytes=cost.capacity_bytes,
        memory_bound_agents=memory_bound_agents(scenario, point.backend, cost, point.cluster.gpus),
        out_of_range=sorted(cost.out_of_range),
    )
