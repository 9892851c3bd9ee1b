"""A GPU server: one GPU with its memory, PCIe, executor, and the server side of every session.

`GpuServer.serve` runs one planned request from the moment its payload has arrived: memory
admission (the KV the request adds or holds, a swapped-out session's KV, the pass's workspace, the
weights of a per-request task), weight load, host->device copy, queue + compute, device->host copy.
The client (client.py) does the connection and the link on either side of it.

A server is self-contained (its own resources, sessions keyed by agent); a pool (pool.py) holds
several behind a router. Its PCIe link (pcie.py) is one full-duplex resource that request copies,
weight loads and KV swaps share.

It consults Djinn's server rules (sim/server_rules.py: memory split, arenas, admission, QoS, idle
eviction, prefill cap, swap pool) and, at each ACT, the session's KV policy (sim/engine/kvpolicy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from ..costmodel import CostModel
from ..server_rules import QOS_CLASSES, ServerRules
from .executors import GpuWork, PassTimer, make_executor
from .kvpolicy import IdleKv, decide, recompute_s
from .memory import GpuMemory
from .outcome import Outcome
from .pcie import Pcie
from .plan import RequestPlan, ServingPlan


class MemoryPlan:
    """Where a server's allocations are charged under Djinn's memory rules (sim/server_rules.py).

    Without the memory split every allocation only has to fit the GPU; with it, weights (and the
    CUDA context) go to the text share, session arenas and KV to the data share, a pass's workspace
    to the stack share, each a share of usable = min(total - reserve, free - margin) taken when the
    server starts (free = total: nothing else is on the simulated GPU). The engine and the memory
    bound (`memory_bound_sessions`) both read it.
    """

    def __init__(self, capacity_bytes: int, rules: ServerRules) -> None:
        self.arena_bytes = rules.arena_bytes
        split = rules.memory_split
        self.caps: dict[str, int] | None = None
        if split.enabled:
            usable = split.usable_bytes(capacity_bytes, capacity_bytes)
            self.caps = {"text": int(split.text * usable), "data": int(split.data * usable),
                         "stack": int(split.stack * usable)}
        self.used = {"text": 0, "data": 0, "stack": 0}

    def fits(self, text: int = 0, data: int = 0, stack: int = 0) -> bool:
        if self.caps is None:
            return True
        used, caps = self.used, self.caps
        return (used["text"] + text <= caps["text"] and used["data"] + data <= caps["data"]
                and used["stack"] + stack <= caps["stack"])

    def take(self, text: int = 0, data: int = 0, stack: int = 0) -> None:
        if self.caps is None:  # without the split nothing is bounded: no book to keep (used stays 0)
            return
        self.used["text"] += text
        self.used["data"] += data
        self.used["stack"] += stack

    def give(self, text: int = 0, data: int = 0, stack: int = 0) -> None:
        self.take(-text, -data, -stack)


def memory_bound_sessions(cost: CostModel, serving: ServingPlan, rules: ServerRules, session_kv_tokens: int,
                          workspace_tokens: int) -> int | None:
    """How many sessions of `session_kv_tokens` each fit in GPU memory at once, by the engine's own
    memory model (arenas, split); None when they queue instead (no per-session memory)."""
    kv = session_kv_tokens * cost.kv_bytes_per_token
    process = cost.weight_bytes + cost.context_bytes_per_process
    if serving.shared_weights:
        plan = MemoryPlan(cost.capacity_bytes, rules)
        workspace = cost.workspace_bytes(workspace_tokens)
        per_session = (kv if serving.session_kv else 0) + plan.arena_bytes
        if per_session == 0:
            return None
        fit = max((cost.capacity_bytes - process - workspace) // per_session, 0)
        if plan.caps is not None:
            if process > plan.caps["text"] or workspace > plan.caps["stack"]:
                return 0
            fit = min(fit, plan.caps["data"] // per_session)
        return fit
    if serving.process_per_agent:
        return cost.capacity_bytes // (process + (kv if serving.session_kv or serving.hold_request_kv else 0))
    return None


@dataclass(slots=True)
class ServerSession:
    """Per-agent server state: its KV on the GPU (or swapped to host), its own process's memory."""

    agent: int
    qos_class: str = "interactive"
    kv_tokens: int = 0  # the session's KV, on the GPU or (kv_on_gpu False) in host memory
    kv_on_gpu: bool = True
    kv_note: str | None = None  # the KV was dropped during ACT: "discarded" or "evicted"
    swap_out: simpy.Process | None = None  # the KV's move to host memory, while in flight
    idle: bool = False  # its agent is in ACT
    idle_epoch: int = 0  # bumps at each ACT's start and end: a timer of another ACT does nothing
    process_bytes: int = 0  # a per-agent process's own weights + CUDA context
    arena_bytes: int = 0  # its arena (server rule session_arena_mib)
    held_kv_bytes: int = 0  # the last request's KV, held until the next one (kv_between_phases: keep)
    dead: bool = False


class QosGate:
    """GPU turns one at a time by strict priority: the waiting request of the best class goes first,
    a request moving up one class per `escalate_s` waited, ties in arrival order (Djinn's QoS)."""

    def __init__(self, env: simpy.Environment, escalate_s: float) -> None:
        self.env = env
        self.escalate_s = escalate_s
        self.busy = False
        self._waiting: list[tuple[int, int, float, simpy.Event]] = []  # (class rank, seq, arrived_at, event)
        self._seq = 0

    def acquire(self, rank: int) -> simpy.Event:
        turn = self.env.event()
        if not self.busy:
            self.busy = True
            turn.succeed()
        else:
            self._waiting.append((rank, self._seq, self.env.now, turn))
            self._seq += 1
        return turn

    def release(self) -> None:
        if not self._waiting:
            self.busy = False
            return
        now = self.env.now
        best = min(self._waiting, key=lambda w: (max(w[0] - int((now - w[2]) / self.escalate_s), 0), w[1]))
        self._waiting.remove(best)
        best[3].succeed()


class GpuServer:
    def __init__(self, env: simpy.Environment, cost: CostModel, serving: ServingPlan, *, max_batch: int,
                 rules: ServerRules | None = None, expected_act_s: float = 0.0, pinned_host_kv: bool = True,
                 cold_shapes: bool = False, jitter_rng: np.random.Generator | None = None,
                 shapes_seen: dict[object, set] | None = None, node: int = 0, index: int = 0) -> None:
        """`rules` bind only a shared-weight server (Djinn's); `expected_act_s` is the mean ACT the
        min_waste KV policy weighs; `node`, `index`: where it sits in its pool."""
        self.env = env
        self.node, self.index = node, index
        self.sessions = 0  # sessions placed here that hold GPU state (what a router reads)
        self.routed = 0  # requests routed here and not yet answered (the client counts them)
        self.cost = cost
        self.serving = serving
        self.rules = rules if rules is not None and serving.shared_weights else ServerRules()
        self.expected_act_s = expected_act_s
        self.memory = GpuMemory(env, cost.capacity_bytes)
        self.memory_plan = MemoryPlan(cost.capacity_bytes, self.rules)
        # Session KV swapped to host and back (the KV policy) crosses the shared PCIe link; the swap pool is pinned.
        self.pinned_host_kv = pinned_host_kv or self.rules.swap_pool.enabled
        self.pcie = Pcie(env, cost)
        rng = jitter_rng if jitter_rng is not None else np.random.default_rng(0)
        self.executor = make_executor(serving.scheduler, env, PassTimer(cost, rng, cold_shapes, shapes_seen), max_batch,
                                      max_prefills=self.rules.max_concurrent_prefills)
        self.kv_bytes_per_token = cost.kv_bytes_per_token
        self._workspace: dict[tuple[int, int], int] = {}
        self._requests: dict[int, tuple] = {}  # id(plan) -> _request_costs(plan)
        self.process_bytes = cost.weight_bytes + cost.context_bytes_per_process
        qos = self.rules.qos
        self.qos_gate = QosGate(env, qos.escalate_after_ms / 1e3) if qos.enabled and serving.scheduler == "serial_fcfs" else None
        self.in_flight = {name: 0 for name in QOS_CLASSES}  # requests inside, per class (only with a limit)
        self._limited = self.rules.admission.enabled or self.rules.qos.enabled  # _admit has a limit to check
        self.host_kv_bytes = 0  # swapped-out KV in host memory (the swap pool, when that rule is on)
        self.host_kv_sessions = 0
        self.resident_kv_bytes = 0  # session KV on the GPU, every session
        self.ok = True  # False: the shared weights never fit, every request is an OOM
        if serving.shared_weights:
            self.ok = self.memory_plan.fits(text=self.process_bytes) and self.memory.try_alloc(self.process_bytes)
            if self.ok:
                self.memory_plan.take(text=self.process_bytes)

    # --- sessions ---------------------------------------------------------------------------------
    def open_session(self, agent: int):
        """A new session; a per-agent backend first starts its own process (weights + CUDA context),
        which fails with an OOM or waits for memory as the backend says. With the arena rule the
        session reserves its arena (when it cannot, its first request is an OOM)."""
        session = ServerSession(agent=agent)
        qos = self.rules.qos
        if qos.enabled:
            session.qos_class = qos.agent_classes[agent % len(qos.agent_classes)]
        if self.serving.process_per_agent:
            need = self.process_bytes
            if not self.memory.fits_ever(need):
                session.dead = True
            elif self.serving.wait_for_memory:
                yield self.memory.alloc_wait(need, priority=1)
                session.process_bytes = need
            elif self.memory.try_alloc(need):
                session.process_bytes = need
            else:
                session.dead = True
        elif self.memory_plan.arena_bytes:
            arena = self.memory_plan.arena_bytes
            if not self.memory.fits_ever(arena) or not self.memory_plan.fits(data=arena):
                session.dead = True
            elif self.serving.wait_for_memory:
                yield self.memory.alloc_wait(arena, priority=1)
            elif not self.memory.try_alloc(arena):
                session.dead = True
            if not session.dead:
                session.arena_bytes = arena
                self.memory_plan.take(data=arena)
        return session

    def resident_tokens(self, session: ServerSession, context: int) -> int:
        """Of `context` tokens, those whose KV the session still holds (on the GPU or in host
        memory): all, or none once its KV was dropped (a KV is kept or dropped whole)."""
        return context if session.kv_tokens else 0

    def idle(self, session: ServerSession, next_input_tokens: int = 0) -> None:
        """The session's agent went into ACT: its KV policy decides now (and maybe after a while) what
        its KV does; with idle eviction a timer drops it if the agent stays away that long.
        `next_input_tokens`: the input of the phase after ACT (what a re-prefill is fed beside the context)."""
        session.idle = True
        session.idle_epoch += 1
        epoch = session.idle_epoch
        if self.serving.session_kv and session.kv_tokens and session.kv_on_gpu:
            policy = self.serving.kv_policy
            decision = decide(policy, self.idle_facts(session, next_input_tokens) if policy.kind == "min_waste" else None)
            if decision.now != "preserve":
                self._act(session, decision.now)
            if decision.after_s is not None:
                self.env.process(self._later(session, epoch, decision.after_s, decision.then))
        eviction_s = self.rules.idle_eviction_s
        if eviction_s is not None and self.serving.session_kv:
            self.env.process(self._later(session, epoch, eviction_s, "evict"))

    def wake(self, session: ServerSession) -> str:
        """The session's agent is back from ACT: cancels its timers; returns what its KV is now
        (a records.KV_STATES value)."""
        session.idle = False
        session.idle_epoch += 1
        note, session.kv_note = session.kv_note, None
        if note is not None:
            return note
        if not session.kv_tokens:
            return "none"
        return "resident" if session.kv_on_gpu else "swapped"

    def idle_facts(self, session: ServerSession, next_input_tokens: int = 0) -> IdleKv:
        """What the KV policy weighs for `session`'s KV now (sim/engine/kvpolicy.py)."""
        nbytes = session.kv_tokens * self.kv_bytes_per_token
        cost, pinned = self.cost, self.pinned_host_kv
        return IdleKv(
            kv_bytes=nbytes,
            expected_act_s=self.expected_act_s,
            swap_out_s=cost.kv_swap_s(nbytes, "d2h", pinned, lone=self.host_kv_sessions == 0),
            swap_in_s=cost.kv_swap_s(nbytes, "h2d", pinned),
            recompute_s=recompute_s(cost, session.kv_tokens, next_input_tokens),
            others_resident_bytes=self.resident_kv_bytes - nbytes,
        )

    def _act(self, session: ServerSession, action: str) -> None:
        if action == "swap":
            self._swap_out(session)
        elif action == "discard":
            self._drop(session, "discarded")

    def _later(self, session: ServerSession, epoch: int, after_s: float, action: str):
        """After `after_s`, if the same ACT still goes on: `action` (swap, discard, or evict)."""
        yield self.env.timeout(after_s)
        if session.idle_epoch != epoch or not session.kv_tokens:
            return
        if action == "evict":
            if session.swap_out is not None and not session.swap_out.processed:
                yield session.swap_out
                if session.idle_epoch != epoch:
                    return
            self._drop(session, "evicted")
        elif session.kv_on_gpu:
            self._act(session, action)

    def _swap_out(self, session: ServerSession) -> None:
        """The session's KV moves to host memory over PCIe (freed on the GPU once it has left); with
        the swap-pool rule a KV that does not fit the pool stays resident."""
        nbytes = session.kv_tokens * self.kv_bytes_per_token
        pool = self.rules.swap_pool
        if pool.enabled and (self.host_kv_bytes + nbytes > pool.gib * 2**30 or self.host_kv_sessions >= pool.sessions):
            return
        lone = self.host_kv_sessions == 0  # no other session's KV on the host (kv_swap_bandwidth)
        self.host_kv_bytes += nbytes
        self.host_kv_sessions += 1
        self.resident_kv_bytes -= nbytes

        def swap_out():
            if nbytes > 0:
                yield self.pcie.swap("d2h", nbytes, self.pinned_host_kv, lone)
            self.memory.free(nbytes)
            self.memory_plan.give(data=nbytes)

        session.kv_on_gpu = False
        session.swap_out = self.env.process(swap_out())

    def _host_release(self, nbytes: int) -> None:
        self.host_kv_bytes -= nbytes
        self.host_kv_sessions -= 1

    def _drop(self, session: ServerSession, note: str) -> None:
        """The session's KV is freed wherever it is (no swap-out in flight); its next phase re-prefills."""
        nbytes = session.kv_tokens * self.kv_bytes_per_token
        if session.kv_on_gpu:
            self.memory.free(nbytes)
            self.memory_plan.give(data=nbytes)
            self.resident_kv_bytes -= nbytes
        else:
            self._host_release(nbytes)
        session.kv_tokens = 0
        session.kv_on_gpu = True
        session.kv_note = note

    def drop_held_kv(self, session: ServerSession) -> None:
        """Free the KV a keep-alive process held since its last request (kv_between_phases: keep)."""
        if session.held_kv_bytes:
            self.memory.free(session.held_kv_bytes)
            self.memory_plan.give(data=session.held_kv_bytes)
            session.held_kv_bytes = 0

    def release(self, session: ServerSession) -> None:
        self.drop_held_kv(session)
        session.idle_epoch += 1
        if session.kv_tokens:
            if session.kv_on_gpu:
                self._drop(session, "discarded")
            else:
                # still in host memory (a swap-out in flight frees its GPU copy when it lands)
                self._host_release(session.kv_tokens * self.kv_bytes_per_token)
                session.kv_tokens = 0
        session.kv_note = None
        if session.process_bytes:
            self.memory.free(session.process_bytes)
            session.process_bytes = 0
        if session.arena_bytes:
            self.memory.free(session.arena_bytes)
            self.memory_plan.give(data=session.arena_bytes)
            session.arena_bytes = 0

    def gpu_process(self, session: ServerSession) -> object:
        """The GPU process that serves `session`: the agent's own worker, or the one shared server."""
        return session.agent if self.serving.process_per_agent or self.serving.load_per_request else "server"

    def workspace_bytes(self, tokens: int, batch: int) -> int:
        """The cost model's workspace of a pass over `tokens` x `batch`, memoized (every request asks the same few)."""
        key = (tokens, batch)
        nbytes = self._workspace.get(key)
        if nbytes is None:
            nbytes = self._workspace[key] = self.cost.workspace_bytes(tokens, batch)
        return nbytes

    def _request_costs(self, plan: RequestPlan) -> tuple:
        """What a request of `plan` takes here, memoized per plan (holding `plan`, so its id stays its
        own): (plan, its work in the shared process (None where each session has its own), the KV
        it allocates, its pass's workspace, the bytes it allocates (the weights of a per-request
        load too), the bytes it copies in and out, the KV it keeps and holds only while it runs, and
        how its copies in and out move (`Pcie.copy_plan`))."""
        kv_bytes, serving = self.kv_bytes_per_token, self.serving
        kv_request = (plan.kv_transient_tokens + plan.kv_grow_tokens) * kv_bytes
        workspace = self.workspace_bytes(plan.workspace_tokens, plan.batch)
        request_bytes = kv_request + workspace
        if serving.load_per_request:
            request_bytes += self.process_bytes
        # the one shared process: one GpuWork per plan (the executors only read it)
        work = None if serving.process_per_agent or serving.load_per_request else GpuWork(plan.passes, plan.batch,
                                                                                          "server")
        up = plan.bytes_up if serving.remote else 0
        down = plan.bytes_down if serving.remote else 0
        costs = (plan, work, kv_request, workspace, request_bytes, up, down, plan.kv_grow_tokens * kv_bytes,
                 plan.kv_transient_tokens * kv_bytes, self.pcie.copy_plan("h2d", up, False) if up else None,
                 self.pcie.copy_plan("d2h", down, False) if down else None)
        self._requests[id(plan)] = costs
        return costs

    # --- what a router reads ---------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self.memory.used_bytes

    def task_bytes(self, plan: RequestPlan) -> int:
        """The memory a request of a session that keeps nothing on the GPU (a serverless task) holds."""
        kv_request = (plan.kv_transient_tokens + plan.kv_grow_tokens) * self.kv_bytes_per_token
        weights = self.process_bytes if self.serving.load_per_request else 0
        return kv_request + self.workspace_bytes(plan.workspace_tokens, plan.batch) + weights

    def fits_now(self, nbytes: int) -> bool:
        """Whether `nbytes` could be allocated at once (free, nobody waiting before it)."""
        return self.ok and nbytes <= self.memory.free_bytes and not self.memory.waiting

    # --- one request --------------------------------------------------------------------------------
    def _admit(self, session: ServerSession) -> bool:
        """The admission rule: at most max_concurrent requests inside the server (with QoS, a class's
        share of it); one past the limit is rejected, not queued."""
        rules = self.rules
        if self._limited:
            limit = rules.admission.max_concurrent
            if rules.qos.enabled:
                full = self.in_flight[session.qos_class] >= rules.qos.limit(session.qos_class, limit)
            else:
                full = sum(self.in_flight.values()) >= limit
            if full:
                return False
        self.in_flight[session.qos_class] += 1
        return True

    def serve(self, session: ServerSession, plan: RequestPlan, out: Outcome):
        """Admit, load, copy in, execute and copy out one request whose payload has arrived; fills
        `out` (status "rejected" over the admission limit; "oom" when it cannot get memory, and the
        session is dead from then on). A wait that takes no time adds nothing to `out.queue_s`
        (adding 0.0 leaves it as it is: it is never -0.0)."""
        env, serving = self.env, self.serving
        limited = self._limited  # without a limit nothing reads in_flight: not kept
        if limited and not self._admit(session):
            out.status = "rejected"
            out.started_at = out.finished_at = env.now
            return
        costs = self._requests.get(id(plan))
        if costs is None or costs[0] is not plan:
            costs = self._request_costs(plan)
        _, work, kv_request, workspace, request_bytes, up, down, grow_bytes, transient_bytes, copy_in, copy_out = costs
        swap_out = session.swap_out
        if swap_out is not None and not swap_out.processed:
            t0 = env.now
            yield swap_out  # its KV is still leaving the GPU: it must be gone to come back
            out.queue_s += env.now - t0
        if session.held_kv_bytes:
            self.drop_held_kv(session)  # this request re-prefills the context into a KV of its own
        restore = 0 if session.kv_on_gpu else session.kv_tokens * self.kv_bytes_per_token
        need = request_bytes + restore
        memory, memory_plan = self.memory, self.memory_plan
        if (not self.ok or session.dead or need > memory.capacity_bytes  # GpuMemory.fits_ever
                or (memory_plan.caps is not None and not memory_plan.fits(data=kv_request + restore, stack=workspace))):
            granted = False
        elif serving.wait_for_memory:
            if not memory.try_alloc(need):  # at once when it fits and nobody waits: no event
                t0 = env.now
                yield memory.alloc_wait(need)
                out.queue_s += env.now - t0
            granted = True
        else:
            granted = memory.try_alloc(need)
        if not granted:
            out.status = "oom"
            out.started_at = out.finished_at = env.now
            session.dead = True
            if limited:
                self.in_flight[session.qos_class] -= 1
            return
        if memory_plan.caps is not None:  # without the memory split there is no book to keep
            memory_plan.take(data=kv_request + restore, stack=workspace)
        if serving.load_per_request:
            t0 = env.now
            yield from self.pcie.load(serving.weight_tier, self.cost.weight_bytes)
            out.load_s = env.now - t0
        h2d = up + restore
        out.h2d_bytes = h2d
        if h2d:
            t0 = env.now
            if up:  # self.pcie.copy("h2d", up, pinned=False), its plan memoized with the request's
                yield copy_in[0].transfer(up, copy_in[2], before_s=copy_in[1])
            if restore:
                yield self.pcie.swap("h2d", restore, self.pinned_host_kv)
                self._host_release(restore)
                self.resident_kv_bytes += restore
            session.kv_on_gpu = True
            out.copy_s += env.now - t0
        if work is None:  # self.gpu_process(session), inlined: the agent's own process
            work = GpuWork(plan.passes, plan.batch, session.agent)
        if self.qos_gate is not None:
            t0 = env.now
            yield self.qos_gate.acquire(QOS_CLASSES.index(session.qos_class))
            out.queue_s += env.now - t0
            execution = yield from self.executor.execute(work)
            self.qos_gate.release()
        else:
            execution = yield from self.executor.execute(work)
        out.queue_s += execution.queued_s
        out.compute_s = execution.compute_s
        out.gpu_busy_s = execution.gpu_busy_s
        out.started_at = execution.started_at
        session.kv_tokens += plan.kv_grow_tokens
        if serving.session_kv:
            self.resident_kv_bytes += grow_bytes
        out.gpu_mem_bytes = memory.used_bytes
        if down:
            t0 = env.now
            yield copy_out[0].transfer(down, copy_out[2], before_s=copy_out[1])  # self.pcie.copy("d2h", down, pinned=False)
            out.copy_s += env.now - t0
            out.d2h_bytes = down
        if serving.hold_request_kv:
            session.held_kv_bytes = transient_bytes
        memory.free(request_bytes - grow_bytes - session.held_kv_bytes)
        if memory_plan.caps is not None:
            memory_plan.give(data=transient_bytes - session.held_kv_bytes, stack=workspace)
        if limited:
            self.in_flight[session.qos_class] -= 1
