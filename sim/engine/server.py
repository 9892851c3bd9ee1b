"""A GPU server: one GPU with its memory, PCIe, executor, and the server side of every session.

`GpuServer.serve` runs one planned request from the moment its payload has arrived: memory
admission (the KV the request adds or holds, a swapped-out session's KV, the pass's workspace, the
weights of a per-request task), weight load, host->device copy, queue + compute, device->host copy.
The client (client.py) does the connection and the link on either side of it.

A server is self-contained (its own resources, sessions keyed by agent), so a cluster can later hold
several behind a router; PCIe is one pipe per direction (full duplex).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from ..costmodel import CostModel
from .executors import GpuWork, PassTimer, make_executor
from .memory import GpuMemory
from .outcome import Outcome
from .pipe import SharedPipe
from .plan import RequestPlan, ServingPlan


@dataclass(slots=True)
class ServerSession:
    """Per-agent server state: its KV on the GPU (or swapped to host), its own process's memory."""

    agent: int
    kv_tokens: int = 0
    kv_on_gpu: bool = True
    swap_out: simpy.Process | None = None  # the KV's move to host memory, while in flight
    process_bytes: int = 0  # a per-agent process's own weights + CUDA context
    dead: bool = False


class GpuServer:
    def __init__(self, env: simpy.Environment, cost: CostModel, serving: ServingPlan, *, max_batch: int,
                 kv_swap: str = "none", pinned_host_kv: bool = True, cold_shapes: bool = False,
                 jitter_rng: np.random.Generator | None = None,
                 shapes_seen: dict[object, set] | None = None) -> None:
        self.env = env
        self.cost = cost
        self.serving = serving
        self.swap_idle_kv = kv_swap == "idle" and serving.session_kv
        self.memory = GpuMemory(env, cost.capacity_bytes)
        # Session KV swapped to host and back (kv_swap: idle); PCIe is full duplex.
        self.pcie_h2d = SharedPipe(env, lambda k: cost.copy_bandwidth("h2d", pinned_host_kv).gbps * 1e9)
        self.pcie_d2h = SharedPipe(env, lambda k: cost.copy_bandwidth("d2h", pinned_host_kv).gbps * 1e9)
        tier = serving.weight_tier
        self.load_pipe = SharedPipe(env, lambda k: cost.load_aggregate_gbps(tier, k) * 1e9)
        rng = jitter_rng if jitter_rng is not None else np.random.default_rng(0)
        self.executor = make_executor(serving.scheduler, env, PassTimer(cost, rng, cold_shapes, shapes_seen), max_batch)
        self.kv_bytes_per_token = cost.kv_bytes_per_token
        self.process_bytes = cost.weight_bytes + cost.context_bytes_per_process
        self.ok = True  # False: the shared weights never fit, every request is an OOM
        if serving.shared_weights:
            self.ok = self.memory.try_alloc(self.process_bytes)

    # --- sessions ---------------------------------------------------------------------------------
    def open_session(self, agent: int):
        """A new session; a per-agent backend first starts its own process (weights + CUDA context),
        which fails with an OOM or waits for memory as the backend says."""
        session = ServerSession(agent=agent)
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
        return session

    def idle(self, session: ServerSession) -> None:
        """The session's agent went idle (ACT): with kv_swap idle, its KV moves to host memory over PCIe."""
        if not self.swap_idle_kv or not session.kv_tokens:
            return
        nbytes = session.kv_tokens * self.kv_bytes_per_token

        def swap_out():
            yield self.pcie_d2h.transfer(nbytes)
            self.memory.free(nbytes)

        session.kv_on_gpu = False
        session.swap_out = self.env.process(swap_out())

    def release(self, session: ServerSession) -> None:
        if session.kv_on_gpu and session.kv_tokens:
            self.memory.free(session.kv_tokens * self.kv_bytes_per_token)
        session.kv_tokens = 0
        if session.process_bytes:
            self.memory.free(session.process_bytes)
            session.process_bytes = 0

    def gpu_process(self, session: ServerSession) -> object:
        """The GPU process that serves `session`: the agent's own worker, or the one shared server."""
        return session.agent if self.serving.process_per_agent or self.serving.load_per_request else "server"

    # --- one request --------------------------------------------------------------------------------
    def serve(self, session: ServerSession, plan: RequestPlan, out: Outcome):
        """Admit, load, copy in, execute and copy out one request whose payload has arrived; fills
        `out` (status "oom" when it cannot get memory, and the session is dead from then on)."""
        env, cost, serving = self.env, self.cost, self.serving
        kv_bytes = self.kv_bytes_per_token
        t0 = env.now
        if session.swap_out is not None and not session.swap_out.processed:
            yield session.swap_out  # its KV is still leaving the GPU: it must be gone to come back
        out.queue_s += env.now - t0
        restore = 0 if session.kv_on_gpu else session.kv_tokens * kv_bytes
        request_bytes = ((plan.kv_transient_tokens + plan.kv_grow_tokens) * kv_bytes
                         + cost.workspace_bytes(plan.workspace_tokens, plan.batch))
        if serving.load_per_request:
            request_bytes += self.process_bytes
        need = request_bytes + restore
        t0 = env.now
        if not self.ok or session.dead or not self.memory.fits_ever(need):
            granted = False
        elif serving.wait_for_memory:
            yield self.memory.alloc_wait(need)
            granted = True
        else:
            granted = self.memory.try_alloc(need)
        out.queue_s += env.now - t0
        if not granted:
            out.status = "oom"
            out.started_at = out.finished_at = env.now
            session.dead = True
            return
        if serving.load_per_request:
            spec = cost.weight_load(serving.weight_tier)
            t0 = env.now
            yield env.timeout(spec.fixed_s)
            yield self.load_pipe.transfer(cost.weight_bytes)
            out.load_s = env.now - t0
        up = plan.bytes_up if serving.remote else 0
        h2d = up + restore
        out.h2d_bytes = h2d
        if h2d:
            t0 = env.now
            if up:
                yield env.timeout(cost.copy_s(up, "h2d", pinned=False))
            if restore:
                yield self.pcie_h2d.transfer(restore)
            out.copy_s += env.now - t0
            session.kv_on_gpu = True
        execution = yield from self.executor.execute(GpuWork(plan.passes, plan.batch, self.gpu_process(session)))
        out.queue_s += execution.queued_s
        out.compute_s = execution.compute_s
        out.started_at = execution.started_at
        session.kv_tokens += plan.kv_grow_tokens
        out.gpu_mem_bytes = self.memory.used_bytes
        down = plan.bytes_down if serving.remote else 0
        if down:
            t0 = env.now
            yield env.timeout(cost.copy_s(down, "d2h", pinned=False))
            out.copy_s += env.now - t0
            out.d2h_bytes = down
        self.memory.free(request_bytes - plan.kv_grow_tokens * kv_bytes)
