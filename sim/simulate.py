"""The SimPy model of one point: client(s), link, server, GPU executor, memory and agents.

Every request (a decode step in Exp 2.1, a generate call in an agent phase) goes through one
path, `_request`, whose toggles come from the backend preset: connection, uplink, memory
admission, weight load, host->device copy, queue + compute, device->host copy, downlink. It returns
the durations of each stage, which add up to the request's latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from djinnsim.errors import DjinnsimError

from .backends import Backend
from .costmodel import CostModel
from .executor import GpuWork, PassTimer, make_executor
from .records import Record
from .resources import GpuMemory, Link, SharedPipe
from .scenario import AgentsWorkload, DecodeWorkload, Exponential, Fixed, Point, Scenario, Uniform


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it schedules (for the speed benchmark)."""

    events_scheduled = 0

    def schedule(self, event, priority=simpy.core.NORMAL, delay=0):
        self.events_scheduled += 1
        super().schedule(event, priority, delay)


@dataclass
class Outcome:
    """What one request cost, stage by stage (seconds), and what it moved (bytes)."""

    issued_at: float
    started_at: float = 0.0
    finished_at: float = 0.0
    status: str = "ok"
    connect_s: float = 0.0
    uplink_s: float = 0.0
    queue_s: float = 0.0
    load_s: float = 0.0
    copy_s: float = 0.0
    compute_s: float = 0.0
    downlink_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    wire_bytes_up: int = 0
    wire_bytes_down: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    gpu_mem_bytes: int = 0


@dataclass
class Session:
    """Per-agent server state: its KV on the GPU (or swapped to host), its connection."""

    agent: int
    connected: bool = False
    kv_tokens: int = 0
    kv_on_gpu: bool = True
    swap_out: simpy.Process | None = None  # the KV's move to host memory, while in flight
    process_bytes: int = 0  # a per-agent process's own weights + CUDA context
    dead: bool = False


@dataclass
class PointResult:
    point: Point
    records: list[Record]
    cost_model: str
    events: int
    peak_mem_bytes: int
    capacity_bytes: int
    memory_bound_agents: int | None
    out_of_range: list[str] = field(default_factory=list)


def phase_passes(backend: Backend, context: int, input_tokens: int, new_tokens: int) -> list[tuple]:
    """Forward passes of one generate call of `new_tokens` after `context` + `input_tokens`."""
    cached = context if backend.kv == "session" else 0
    fed = input_tokens if backend.kv == "session" else context + input_tokens
    if backend.step_compute == "full_context":
        return [("prefill", cached + fed + t, 0) for t in range(new_tokens)]
    if backend.step_compute == "last_token":
        return [("prefill", fed, 0)] + [("prefill", 1, 0)] * (new_tokens - 1)
    return [("prefill", fed, cached)] + [("decode", cached + fed + t) for t in range(new_tokens - 1)]


def token_pass(backend: Backend, prompt_tokens: int, t: int, cached_tokens: int = 0) -> tuple:
    """The forward pass of generated token t in a per-token decode (L_t = prompt + t), where
    `cached_tokens` of the prompt already have a KV cache (session or client) from earlier phases."""
    seq_len = prompt_tokens + t
    if backend.step_compute == "full_context":
        return ("prefill", seq_len, 0)
    if backend.step_compute == "last_token":
        return ("prefill", 1, 0)
    if t == 0:
        return ("prefill", prompt_tokens - cached_tokens, cached_tokens)
    return ("decode", seq_len - 1)  # kv=client: the client sent the cache of L_t - 1 tokens


class PointSimulation:
    def __init__(self, scenario: Scenario, point: Point, cost: CostModel, seed: np.random.SeedSequence,
                 shapes_seen: dict[object, set] | None = None) -> None:
        self.scenario = scenario
        self.point = point
        self.backend = point.backend
        self.model = point.model
        self.cost = cost
        jitter_seed, act_seed, arrival_seed = seed.spawn(3)
        self.act_rng = np.random.default_rng(act_seed)
        self.arrival_rng = np.random.default_rng(arrival_seed)
        self.env = CountingEnvironment()
        stream_gbps = cost.stream_gbps()
        self.link = Link(self.env, point.link.gbps, point.link.rtt_ms / 1e3,
                         stream_gbps * 1e9 if stream_gbps else None)
        self.memory = GpuMemory(self.env, cost.capacity_bytes)
        # Session KV swapped to host and back (kv_swap: idle); PCIe is full duplex.
        pinned = scenario.server.pinned_host_kv
        self.pcie_h2d = SharedPipe(self.env, lambda k: cost.copy_bandwidth("h2d", pinned).gbps * 1e9)
        self.pcie_d2h = SharedPipe(self.env, lambda k: cost.copy_bandwidth("d2h", pinned).gbps * 1e9)
        tier = self.backend.weight_tier
        self.load_pipe = SharedPipe(self.env, lambda k: cost.load_aggregate_gbps(tier, k) * 1e9)
        policy = scenario.server.scheduler or self.backend.scheduler
        self.executor = make_executor(policy, self.env, PassTimer(cost, np.random.default_rng(jitter_seed), scenario.server.shapes == "cold", shapes_seen), scenario.server.max_batch)
        self.records: list[Record] = []
        self.server_ok = True
        if self.backend.weights == "shared":
            self.server_ok = self.memory.try_alloc(cost.weight_bytes + cost.context_bytes_per_process)

    # --- the request path ---------------------------------------------------------------------
    def _send(self, pipe: SharedPipe, payload: int, messages: int = 1):
        """Sender software + serialization, the wire, propagation, receiver deserialization."""
        framing = self.point.link.framing_bytes * messages
        start = self.env.now
        before_s = messages * self.cost.per_message_s() + self.cost.serialize_s(payload)
        if before_s > 0:
            yield self.env.timeout(before_s)
        yield pipe.transfer(payload + framing)
        after_s = messages * self.link.rtt_s / 2 + self.cost.deserialize_s(payload)
        if after_s > 0:
            yield self.env.timeout(after_s)
        return self.env.now - start, payload + framing

    def _request(self, session: Session, work: GpuWork, up: int, down: int, grow_kv: int, transient_kv: int, messages: int = 1):
        """One request through the backend's path; returns its Outcome."""
        env, cost, backend = self.env, self.cost, self.backend
        out = Outcome(issued_at=env.now)
        remote = backend.location == "remote"
        if remote and (backend.connection == "per_request" or not session.connected):
            out.connect_s = self.link.rtt_s + cost.connect_s()
            yield env.timeout(out.connect_s)
            session.connected = backend.connection == "persistent"
        if remote:
            out.uplink_s, out.wire_bytes_up = yield from self._send(self.link.up, up, messages)
            out.bytes_up = up
        # Memory admission: weights of a per-request task, the KV this request adds or holds,
        # the KV of a swapped-out session, and the pass's workspace.
        tokens = max((p[1] for p in work.passes if p[0] == "prefill"), default=1)
        t0 = env.now
        if session.swap_out is not None and not session.swap_out.processed:
            yield session.swap_out  # its KV is still leaving the GPU: it must be gone to come back
        out.queue_s += env.now - t0
        restore = 0 if session.kv_on_gpu else session.kv_tokens * cost.kv_bytes_per_token
        request_bytes = (transient_kv + grow_kv) * cost.kv_bytes_per_token + cost.workspace_bytes(tokens, work.batch)
        if backend.weights == "per_request":
            request_bytes += cost.weight_bytes + cost.context_bytes_per_process
        need = request_bytes + restore
        t0 = env.now
        if not self.server_ok or session.dead or not self.memory.fits_ever(need):
            granted = False
        elif backend.memory_full == "wait":
            yield self.memory.alloc_wait(need)
            granted = True
        else:
            granted = self.memory.try_alloc(need)
        out.queue_s += env.now - t0
        if not granted:
            out.status = "oom"
            out.started_at = out.finished_at = env.now
            session.dead = True
            return out
        if backend.weights == "per_request":
            spec = cost.weight_load(backend.weight_tier)
            t0 = env.now
            yield env.timeout(spec.fixed_s)
            yield self.load_pipe.transfer(cost.weight_bytes)
            out.load_s = env.now - t0
        h2d = (up if remote else 0) + restore
        out.h2d_bytes = h2d
        if h2d:
            t0 = env.now
            if remote and up:
                yield env.timeout(cost.copy_s(up, "h2d", pinned=False))
            if restore:
                yield self.pcie_h2d.transfer(restore)
            out.copy_s += env.now - t0
            session.kv_on_gpu = True
        execution = yield from self.executor.execute(work)
        out.queue_s += execution.queued_s
        out.compute_s = execution.compute_s
        out.started_at = execution.started_at
        session.kv_tokens += grow_kv
        out.gpu_mem_bytes = self.memory.used_bytes
        if remote and down:
            t0 = env.now
            yield env.timeout(cost.copy_s(down, "d2h", pinned=False))
            out.copy_s += env.now - t0
            out.d2h_bytes = down
        self.memory.free(request_bytes - grow_kv * cost.kv_bytes_per_token)
        if remote:
            out.downlink_s, out.wire_bytes_down = yield from self._send(self.link.down, down, messages)
            out.bytes_down = down
        out.finished_at = env.now
        return out

    def _record(self, out: Outcome, session: Session, run: int, phase: str, step: int, warmup: bool,
                context: int, input_tokens: int, new_tokens: int) -> None:
        p = self.point
        self.records.append(
            Record(
                point=p.index, backend=p.backend.name, model=p.model.key, gpu=p.gpu.key, link_gbps=p.link.gbps,
                n_agents=p.n_agents or 1, agent=session.agent, run=run, phase=phase, step=step,
                status=out.status, warmup=warmup, issued_at=out.issued_at, started_at=out.started_at,
                finished_at=out.finished_at, connect_s=out.connect_s, uplink_s=out.uplink_s,
                queue_s=out.queue_s, load_s=out.load_s, copy_s=out.copy_s, compute_s=out.compute_s,
                downlink_s=out.downlink_s, context_tokens=context, input_tokens=input_tokens,
                new_tokens=new_tokens, bytes_up=out.bytes_up, bytes_down=out.bytes_down,
                wire_bytes_up=out.wire_bytes_up, wire_bytes_down=out.wire_bytes_down,
                h2d_bytes=out.h2d_bytes, d2h_bytes=out.d2h_bytes, gpu_mem_bytes=out.gpu_mem_bytes,
                gpu_mem_peak_bytes=self.memory.peak_bytes,
            )
        )

    def _process(self, session: Session) -> object:
        """The GPU process that serves `session`: the agent's own worker, or the one shared server."""
        return session.agent if self.backend.weights in ("per_agent", "per_request") else "server"

    def _messages_per_token(self) -> int:
        return self.backend.ops_per_layer * self.model.num_layers if self.backend.round_trip == "op" else 1

    # --- one generate call, by token or as a whole ----------------------------------------------
    def _generate(self, session: Session, context: int, input_tokens: int, new_tokens: int, batch: int,
                  on_token=None):
        """Generate `new_tokens`; per-token backends make one request per token (reported through
        `on_token`), per-phase backends one request. Returns the Outcomes."""
        backend = self.backend
        if backend.round_trip == "phase":
            up, down = backend.phase_bytes(self.model, context, input_tokens, new_tokens)
            grow = (input_tokens + new_tokens) if backend.kv == "session" else 0
            transient = (context + input_tokens + new_tokens) if backend.kv == "request" else 0
            work = GpuWork(phase_passes(backend, context, input_tokens, new_tokens), batch, self._process(session))
            out = yield from self._request(session, work, up * batch, down * batch, grow * batch, transient * batch)
            return [out]
        outcomes = []
        prompt = context + input_tokens
        cached = context if backend.kv in ("session", "client") and backend.step_compute == "incremental" else 0
        for t in range(new_tokens):
            up, down = backend.step_bytes(self.model, t, prompt, cached)
            if backend.kv == "session":
                grow = (prompt - cached) if t == 0 else 1
            else:
                grow = 0
            transient = (prompt + t) if backend.kv == "client" else 0
            work = GpuWork([token_pass(backend, prompt, t, cached)], batch, self._process(session))
            out = yield from self._request(
                session, work, up * batch, down * batch, grow * batch, transient * batch, self._messages_per_token()
            )
            outcomes.append(out)
            if on_token is not None:
                on_token(t, out)
            if out.status != "ok":
                break
        return outcomes

    # --- workloads ------------------------------------------------------------------------------
    def decode_client(self, workload: DecodeWorkload):
        """Exp 2.1: one client, `runs` greedy decodes, one after another."""
        for run in range(workload.runs):
            session = yield from self._open_session(0)
            warmup = run < workload.warmup_runs

            def on_token(t: int, out: Outcome, run=run, session=session, warmup=warmup) -> None:
                ctx = workload.prompt_tokens + t - 1 if t else 0
                self._record(out, session, run, "decode", t, warmup, ctx, workload.prompt_tokens if t == 0 else 1, 1)

            outcomes = yield from self._generate(session, 0, workload.prompt_tokens, workload.new_tokens, workload.batch, on_token)
            if self.backend.round_trip == "phase":
                self._record(outcomes[0], session, run, "decode", -1, warmup, 0, workload.prompt_tokens, workload.new_tokens)
            self._release_session(session)
            if outcomes[-1].status != "ok":
                return

    def agent(self, agent_id: int, workload: AgentsWorkload, start_at: float):
        """Exp 2.2: REASON -> ACT -> REFLECT, `iterations` times."""
        env = self.env
        yield env.timeout(start_at)
        session = yield from self._open_session(agent_id)
        context = 0
        for iteration in range(workload.iterations):
            for phase, spec in (("reason", workload.reason), ("reflect", workload.reflect)):
                outcomes = yield from self._generate(session, context, spec.input_tokens, spec.new_tokens, 1)
                self._record(self._merge(outcomes), session, iteration, phase, -1, False, context,
                             spec.input_tokens, spec.new_tokens)
                if outcomes[-1].status != "ok":
                    self._release_session(session)
                    return
                context += spec.input_tokens + spec.new_tokens
                if phase == "reason":
                    self._maybe_swap_out(session)
                    yield env.timeout(self._act_s(workload))
        self._release_session(session)

    def _open_session(self, agent_id: int):
        """A new session; a per-agent backend first starts its own process (weights + CUDA context),
        which fails with an OOM or waits for memory as the backend says."""
        session = Session(agent=agent_id)
        if self.backend.weights == "per_agent":
            need = self.cost.weight_bytes + self.cost.context_bytes_per_process
            if not self.memory.fits_ever(need):
                session.dead = True
            elif self.backend.memory_full == "wait":
                yield self.memory.alloc_wait(need, priority=1)
                session.process_bytes = need
            elif self.memory.try_alloc(need):
                session.process_bytes = need
            else:
                session.dead = True
        return session

    @staticmethod
    def _merge(outcomes: list[Outcome]) -> Outcome:
        if len(outcomes) == 1:
            return outcomes[0]
        merged = Outcome(issued_at=outcomes[0].issued_at, started_at=outcomes[0].started_at,
                         finished_at=outcomes[-1].finished_at, status=outcomes[-1].status)
        for name in ("connect_s", "uplink_s", "queue_s", "load_s", "copy_s", "compute_s", "downlink_s",
                     "bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down", "h2d_bytes", "d2h_bytes"):
            setattr(merged, name, sum(getattr(o, name) for o in outcomes))
        merged.gpu_mem_bytes = max(o.gpu_mem_bytes for o in outcomes)
        return merged

    def _act_s(self, workload: AgentsWorkload) -> float:
        act = workload.act
        if isinstance(act, Fixed):
            return act.seconds
        if isinstance(act, Uniform):
            return float(self.act_rng.uniform(act.low_s, act.high_s))
        assert isinstance(act, Exponential)
        return float(self.act_rng.exponential(act.mean_s))

    def _maybe_swap_out(self, session: Session) -> None:
        """kv_swap=idle: move an idle session's KV to host memory during ACT (over PCIe)."""
        if self.scenario.server.kv_swap != "idle" or self.backend.kv != "session" or not session.kv_tokens:
            return
        nbytes = session.kv_tokens * self.cost.kv_bytes_per_token

        def swap_out():
            yield self.pcie_d2h.transfer(nbytes)
            self.memory.free(nbytes)

        session.kv_on_gpu = False
        session.swap_out = self.env.process(swap_out())

    def _release_session(self, session: Session) -> None:
        if session.kv_on_gpu and session.kv_tokens:
            self.memory.free(session.kv_tokens * self.cost.kv_bytes_per_token)
        session.kv_tokens = 0
        if session.process_bytes:
            self.memory.free(session.process_bytes)
            session.process_bytes = 0

    # --- driving it ---------------------------------------------------------------------------
    def run(self) -> list[Record]:
        workload = self.scenario.workload
        if isinstance(workload, DecodeWorkload):
            self.env.process(self.decode_client(workload))
        else:
            start_at = 0.0
            for agent_id in range(self.point.n_agents or 1):
                if workload.arrival.kind == "poisson" and agent_id:
                    start_at += float(self.arrival_rng.exponential(1.0 / workload.arrival.rate_per_s))
                self.env.process(self.agent(agent_id, workload, start_at))
        self.env.run()
        if self.memory.waiting:
            raise DjinnsimError(
                f"point {self.point.label}: the simulation stalled with {self.memory.waiting} requests waiting for "
                "GPU memory that only waiting work holds (memory_full: wait cannot progress); "
                "use memory_full: oom or fewer agents"
            )
        return self.records


def memory_bound_agents(scenario: Scenario, backend: Backend, cost: CostModel) -> int | None:
    """How many agents fit in GPU memory at once (agents workloads); None when they queue instead."""
    workload = scenario.workload
    if not isinstance(workload, AgentsWorkload):
        return None
    per_iteration = sum(p.input_tokens + p.new_tokens for p in (workload.reason, workload.reflect))
    session_kv = workload.iterations * per_iteration * cost.kv_bytes_per_token
    process = cost.weight_bytes + cost.context_bytes_per_process
    capacity = cost.capacity_bytes
    if backend.weights == "shared":
        workspace = cost.workspace_bytes(max(workload.reason.input_tokens, per_iteration * workload.iterations))
        per_agent = session_kv if backend.kv == "session" else 0
        if per_agent == 0:
            return None
        return max((capacity - process - workspace) // per_agent, 0)
    if backend.weights == "per_agent":
        return capacity // (process + (session_kv if backend.kv != "none" else 0))
    return None


def simulate_point(scenario: Scenario, point: Point, cost: CostModel, seed: np.random.SeedSequence,
                   shapes_seen: dict[object, set] | None = None) -> PointResult:
    """`shapes_seen`: the attention shapes each GPU process ("server", or an agent's index for a
    per-agent backend) has already run, carried in from earlier runs of the same processes and
    updated in place; None: every process starts cold."""
    cost.out_of_range.clear()  # one cost model serves many points: keep only this point's queries
    sim = PointSimulation(scenario, point, cost, seed, shapes_seen)
    records = sim.run()
    return PointResult(
        point=point,
        records=records,
        cost_model=cost.describe(),
        events=sim.env.events_scheduled,
        peak_mem_bytes=sim.memory.peak_bytes,
        capacity_bytes=cost.capacity_bytes,
        memory_bound_agents=memory_bound_agents(scenario, point.backend, cost),
        out_of_range=sorted(cost.out_of_range),
    )
