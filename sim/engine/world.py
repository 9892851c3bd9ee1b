"""One point wired together: the environment, a pool of GPU servers with a link per node, the
clients; and its one run."""

from __future__ import annotations

import functools
import gc
import heapq
import itertools
import math
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import simpy

from djinnsim.errors import DjinnsimError

from ..costmodel import CostModel
from ..records import RecordBuilder, RecordTable
from ..scenario import AgentsWorkload, DecodeWorkload, Exponential, Fixed, Point, Scenario, Uniform
from ..scenario import Link as LinkSpec
from . import guard
from .client import agent, decode_client
from .link import Link
from .pipe import Recurring
from .plan import Planner
from .pool import GpuPool
from .server import GpuServer


@contextmanager
def _rare_gc():
    """Python's cyclic garbage collector run rarely while the events run: a run allocates millions
    of short-lived events and generator frames (freed by their reference counts) while thousands of
    clients stay alive, and the default thresholds (700, 10, 10) had the collector traverse those
    clients over and over (a fifth of the time of 16,384 serverless agents). Results do not depend on
    when it runs; cyclic garbage waits at most 100,000 allocations."""
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


# read by the scheduling methods below once per event: module globals, not attribute look-ups
_NORMAL = simpy.core.NORMAL
_INF = math.inf
_heappush = heapq.heappush


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it schedules (for the speed benchmark) and
    guards the clock (sim/engine/guard.py): no step that is negative, NaN or infinite, and the
    clock moves at least once every `window` events.

    `schedule` and `run` are SimPy's own, inlined (the same queue, the same order of events): on a
    run of millions of events the method calls and the exception set-up of `step` per event were
    a tenth of the simulation's time. The count is the queue's own: every scheduled event takes
    the next id of SimPy's counter (`_eid`, its place among events at one instant), so the ids
    handed out are the events scheduled, and `run` checks the clock when it takes the event whose
    id ends a window (where `schedule` would have counted each event and checked there)."""

    # The clock as a plain attribute: SimPy's `now` is a property over `_now`, and a run reads the
    # clock a few dozen times per agent phase. `now` shadows that property (an instance attribute
    # from __init__ on); `_now`, which SimPy's own methods set and read, is a property over it.
    now = 0.0

    @property
    def _now(self) -> float:
        return self.now

    @_now.setter
    def _now(self, value: float) -> None:
        self.now = value

    def __init__(self, window: int = guard.PROGRESS_WINDOW) -> None:
        super().__init__()
        # SimPy binds `timeout`, `event`, `process`... to the instance (BoundClass.bind_early) only
        # for those defined on the instance's own class, not on simpy.Environment above a subclass:
        # without this, every env.timeout() builds a bound method first
        for name, attribute in simpy.Environment.__dict__.items():
            if type(attribute) is simpy.core.BoundClass:
                setattr(self, name, getattr(self, name))
        self.window = window
        self._check_at = window
        self._checked_now = -math.inf

    @property
    def events_scheduled(self) -> int:
        """The events scheduled so far: the ids handed out (the next one read, then handed out again)."""
        issued = next(self._eid)
        self._eid = itertools.count(issued)
        return issued

    def schedule(self, event, priority=_NORMAL, delay=0):
        if not 0.0 <= delay < _INF:  # NaN fails both comparisons (a float literal: see pipe.transfer)
            guard.check_delay(delay)
        _heappush(self._queue, (self.now + delay, priority, next(self._eid), event))

    def _check_progress(self) -> None:
        if not self.now > self._checked_now:
            raise guard.ClockStalled(f"the simulated clock stayed at {self.now!r} s for {self.window:,} events")
        self._checked_now, self._check_at = self.now, self._check_at + self.window

    def run(self, until=None):
        """`Environment.run()` to the end of the events, as `step` processes them; with `until`, SimPy's own
        (each delay guarded, the clock's progress not checked)."""
        if until is not None:
            return super().run(until)
        queue, pop = self._queue, heapq.heappop
        check_at = self._check_at
        while queue:
            self.now, _, eid, event = pop(queue)
            if eid >= check_at:  # the event that ends a window of ids: has the clock moved?
                self._check_progress()
                check_at = self._check_at
            callbacks, event.callbacks = event.callbacks, None
            for callback in callbacks:
                callback(event)
            if not event._ok and not hasattr(event, "_defused"):
                exc = type(event._value)(*event._value.args)  # as `step`: a failed event nobody handled
                exc.__cause__ = event._value
                raise exc
        return None


class Driven:
    """A generator run as a SimPy process that nobody waits for (an agent): resumed by the events
    it yields as `env.process` does, without the process's own event at its end (nothing waits for
    it) nor SimPy's bookkeeping per resumption (the active process, a bound method per wait).
    Started from an urgent event at the current instant, as SimPy starts a process, or with
    `at_once` now, within the event under way (where nothing else would run before that urgent
    event: the same order, one event fewer)."""

    __slots__ = ("_send", "_throw", "_resume")

    def __init__(self, env: simpy.Environment, generator, at_once: bool = False) -> None:
        self._send, self._throw = generator.send, generator.throw
        self._resume = self._step  # bound once: appended to each event it waits for
        if at_once:
            self._step(_STARTED)
            return
        start = simpy.Event(env)
        start._ok, start._value, start.callbacks = True, None, [self._resume]
        env.schedule(start, simpy.core.URGENT)

    def _step(self, event) -> None:
        send = self._send
        while True:
            try:
                if event._ok:
                    event = send(event._value)
                else:  # as SimPy's process: the failed event is handled here, a copy of its exception thrown in
                    event._defused = True
                    exc = type(event._value)(*event._value.args)
                    exc.__cause__ = event._value
                    event = self._throw(exc)
            except StopIteration:
                # its bound `_resume` refers to it: without this, every agent that ends would
                # be cyclic garbage, left for the collector (a run's objects churn through memory)
                self._resume = None
                return
            if event.callbacks is not None:
                event.callbacks.append(self._resume)
                return


class _Started:
    """What a process started at once is resumed with (the start event SimPy would have processed)."""

    _ok = True
    _value = None


_STARTED = _Started()


def stream_cap_Bps(link: LinkSpec, cost: CostModel) -> float | None:
    """What one connection's host stack moves at most: the scenario's explicit cap, else the
    profile's loopback TCP throughput when the link says it runs over loopback; a NIC: no cap."""
    if link.stream_cap_gbps is not None:
        return link.stream_cap_gbps * 1e9 / 8
    if link.host_stack == "loopback":
        loopback_GBps = cost.stream_gbps()  # GB/s (the profile's loopback_gbps is in GB/s)
        return loopback_GBps * 1e9 if loopback_GBps else None
    return None


def stream_serial(link: LinkSpec) -> bool:
    """Whether a send also pays the profile's loopback host time in series with the wire: over
    loopback with the profile's cap, which that time was measured beside (an explicit cap: no)."""
    return link.host_stack == "loopback" and link.stream_cap_gbps is None


def _delay_to(now: float, at: float) -> float:
    """The delay after which the clock (now + delay, as SimPy adds it) reads exactly `at`."""
    delay = at - now
    while now + delay < at:
        delay = math.nextafter(delay, math.inf)
    while now + delay > at:
        delay = math.nextafter(delay, -math.inf)
    return delay


def drawn_in_blocks(draw: Callable[[int], np.ndarray], block: int = 4096) -> Iterator[float]:
    """One distribution's draws, one at a time, drawn `block` at once: the same floats in the same
    order as one scalar draw each (numpy draws an array as its scalar draws in turn), without a
    numpy call per draw. For a stream that nothing else draws from."""
    while True:
        yield from draw(block).tolist()


def act_sampler(workload: AgentsWorkload, rng: np.random.Generator):
    """A function drawing one ACT duration (seconds) from the point's own stream."""
    act = workload.act
    if isinstance(act, Fixed):
        return lambda: act.seconds
    if isinstance(act, Uniform):
        return functools.partial(next, drawn_in_blocks(lambda n: rng.uniform(act.low_s, act.high_s, n)))
    assert isinstance(act, Exponential)
    return functools.partial(next, drawn_in_blocks(lambda n: rng.exponential(act.mean_s, n)))


def act_mean_s(workload: AgentsWorkload) -> float:
    """The mean of the workload's ACT distribution (what the min_waste KV policy expects an ACT to last)."""
    act = workload.act
    if isinstance(act, Fixed):
        return act.seconds
    if isinstance(act, Uniform):
        return (act.low_s + act.high_s) / 2
    return act.mean_s


class World:
    """The entities of one point. `run()` starts the clients, runs the environment to the end and
    returns the point's records."""

    def __init__(self, scenario: Scenario, point: Point, cost: CostModel, seed: np.random.SeedSequence,
                 shapes_seen: dict[object, set] | None = None,
                 on_flush: Callable[[RecordBuilder], None] | None = None) -> None:
        self.scenario = scenario
        self.point = point
        self.cost = cost
        jitter_seed, act_seed, arrival_seed = seed.spawn(3)
        self.act_rng = np.random.default_rng(act_seed)
        self.arrival_rng = np.random.default_rng(arrival_seed)
        clients = (point.n_agents or 1) if isinstance(scenario.workload, AgentsWorkload) else scenario.workload.batch
        self.env = CountingEnvironment(guard.progress_window(clients))
        self.planner = Planner(point.backend, point.model, scenario.server.scheduler, scenario.server.kv_policy)
        cluster = point.cluster
        links = [Link(self.env, point.link.gbps, point.link.rtt_ms / 1e3, stream_cap_Bps(point.link, cost),
                      point.link.framing_bytes, cost, stream_serial(point.link))
                 for _ in range(cluster.nodes)]  # a node's NIC
        config = scenario.server
        workload = scenario.workload
        # GPU 0 draws from the point's jitter stream itself (one GPU: as before the pool); the
        # others from streams spawned off it
        jitter_seeds = [jitter_seed, *jitter_seed.spawn(cluster.gpus - 1)]
        servers = []
        for gpu, gpu_seed in enumerate(jitter_seeds):
            # a process on another GPU is another process: its attention shapes are its own
            seen = shapes_seen if gpu == 0 or shapes_seen is None else shapes_seen.setdefault(("gpu", gpu), {})
            servers.append(GpuServer(
                self.env, cost, self.planner.serving, max_batch=config.max_batch, rules=config.rules,
                pinned_host_kv=config.pinned_host_kv,
                expected_act_s=act_mean_s(workload) if isinstance(workload, AgentsWorkload) else 0.0,
                cold_shapes=config.shapes == "cold", jitter_rng=np.random.default_rng(gpu_seed), shapes_seen=seen,
                node=gpu // cluster.gpus_per_node, index=gpu % cluster.gpus_per_node))
        self.pool = GpuPool(servers, links, cluster.gpus_per_node, cluster.router)
        self.server, self.link = servers[0], links[0]  # the GPU and link of a single-GPU point
        self.log = RecordBuilder(point.index, point.backend.name, point.model.key, point.gpu.key, point.link.gbps,
                                 point.n_agents or 1, on_flush)

    def start_clients(self) -> None:
        env, pool, planner, log = self.env, self.pool, self.planner, self.log
        workload = self.scenario.workload
        if isinstance(workload, DecodeWorkload):
            env.process(decode_client(env, pool, planner, log, workload))
            return
        act_s = act_sampler(workload, self.act_rng)
        if workload.arrival.kind == "poisson":
            self._start_poisson_arrivals(act_s)
            return
        for agent_id in range(self.point.n_agents or 1):
            Driven(env, agent(env, pool, planner, log, agent_id, workload, 0.0, act_s))

    def _start_poisson_arrivals(self, act_s) -> None:
        """Agents arriving as a Poisson process, each started at its arrival: only the agents that
        have arrived exist (a million agents are not a million processes waiting from t = 0). A
        chain of timeouts: an arrival schedules the next one, then starts its agent within its own
        event (as an arrival process would start it: from an urgent event right after, in the same
        order). The next arrival is one `pipe.Recurring` scheduled again and again (nothing waits
        for it: no Timeout per agent)."""
        env, workload = self.env, self.scenario.workload
        mean_gap_s = 1.0 / workload.arrival.rate_per_s
        gaps = drawn_in_blocks(lambda n: self.arrival_rng.exponential(mean_gap_s, n))
        agents = self.point.n_agents or 1
        next_agent, start_at = 0, 0.0

        def arrive(_event) -> None:
            nonlocal next_agent, start_at
            arrived = [next_agent]
            next_agent += 1
            while next_agent < agents:
                start_at += next(gaps)
                if start_at > env.now:
                    next_arrival.after(env, _delay_to(env.now, start_at))
                    break
                arrived.append(next_agent)  # due now too (a gap the clock cannot show)
                next_agent += 1
            for agent_id in arrived:
                Driven(env, agent(env, self.pool, self.planner, self.log, agent_id, workload, 0.0, act_s), at_once=True)

        next_arrival = Recurring(arrive)
        first = simpy.Event(env)
        first._ok, first._value, first.callbacks = True, None, [arrive]
        env.schedule(first, simpy.core.URGENT)

    def run(self) -> RecordTable:
        self.start_clients()
        try:
            with _rare_gc():
                self.env.run()
        except (guard.ClockStalled, ValueError) as exc:
            if isinstance(exc, ValueError) and not str(exc).startswith("Negative delay"):  # SimPy's own check
                raise
            workload = self.scenario.workload
            prompt = workload.reason.input_tokens if isinstance(workload, AgentsWorkload) else workload.prompt_tokens
            raise DjinnsimError(f"point {self.point.label}: the run cannot progress: {exc}; "
                                f"{guard.diagnose(self.cost, self.point, prompt)}") from None
        if self.pool.waiting:
            raise DjinnsimError(
                f"point {self.point.label}: the simulation stalled with {self.pool.waiting} requests waiting "
                "for GPU memory that only waiting work holds (memory_full: wait cannot progress); "
                "use memory_full: oom or fewer agents"
            )
        return self.log.table()
