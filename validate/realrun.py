"""Run a scenario's points for real: server processes on the device, this process as the client.

Which processes serve a point is decided by the backend's toggles, not its name:
- weights: shared  -> one resident server for all such points (native_pytorch decodes inside it,
  the remote backends reach it over the emulated link), reset between points;
- weights: per_agent -> one resident worker process per agent (Ray keep-alive, emulated with
  processes: a Ray actor is exactly such a process, with its own CUDA context and model copy, and
  Ray's scheduler is outside every timed interval); copies are loaded one at a time, so
  the first that does not fit is a real CUDA out-of-memory, and the loading goes on after the
  points up to the first failure (the OOM probe);
- weights: per_request -> one non-resident worker per agent (Ray serverless, emulated likewise)
  that loads the weights for every phase from a safetensors file the shared server writes, or
  from host memory, and frees them after.
Processes use the 'spawn' start method (CUDA cannot be forked) and every wait is bounded.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from djinnsim.common import linkemu
from djinnsim.sim.records import Record
from djinnsim.sim.scenario import AgentsWorkload, DecodeWorkload, Point, Scenario

from . import clients
from .gpumon import GpuMonitor
from .protocol import Op
from .server import ServerConfig, serve


@dataclass
class RepeatResult:
    records: list[Record]
    started_at: float
    ended_at: float
    gpu_util: float | None = None
    peak_mem_bytes: int | None = None
    ttft_s: float | None = None  # agents: from the server's first-token stamps (the simulator has none)
    errors: list[str] = field(default_factory=list)
    part: int = 0  # which command ran it, when a validation's repeats were split over commands (--also-real)


@dataclass
class RealPointResult:
    point: Point
    repeats: list[RepeatResult] = field(default_factory=list)
    skipped: str | None = None
    # `--level-probe`: {"before": probe, "after": probe} of clients.level_probe on the point's resident
    # process, just before its first repeat and just after its last (an "error" key when one failed)
    level_probe: dict | None = None


@dataclass
class OomProbe:
    backend: str
    loaded: int  # copies that fit
    oom_n: int | None  # the first N that did not fit; None when max_n copies all fit
    max_n: int
    message: str = ""


@dataclass
class RealResult:
    points: list[RealPointResult]
    oom_probes: list[OomProbe]
    notes: list[str]
    wall_s: float


@dataclass(frozen=True)
class RealOptions:
    device: str  # "cpu" or "cuda:N"
    gpu_index: int
    repeats: int
    seed: int
    deadline: float  # time.perf_counter() after which no new work starts
    request_timeout_s: float = 120.0
    start_timeout_s: float = 300.0
    oom_probe_max: int = 8  # most keep-alive copies tried (GPU only)
    context_bytes_per_process: int = 0  # from the profile: sizes the serverless memory slots
    weight_bytes: int = 0
    dtype: str | None = None
    expected_s: dict[int, float] | None = None  # point index -> simulated wall time: shortest run first
    level_probe: bool = False  # a short native decode on the point's resident process before and after it


def unsupported(point: Point, scenario: Scenario) -> str | None:
    """Why a point has no real implementation here (it is then simulated only), or None."""
    b = point.backend
    if b.round_trip == "op":
        return "op-by-op remoting is simulated only (no real implementation)"
    if isinstance(scenario.workload, DecodeWorkload):
        if b.round_trip != "token":
            return "a per-phase backend in a decode workload is simulated only"
        if b.weights != "shared":
            return "per-agent/per-request weights in a decode workload are simulated only"
        return None
    if b.round_trip != "phase":
        return "a per-token backend in an agents workload is simulated only"
    if b.location != "remote":
        return "a local backend in an agents workload is simulated only"
    return None


class ServerProcess:
    """A spawned server, its control pipe and (once ready) its port."""

    def __init__(self, mp, config: ServerConfig, memory_slots=None) -> None:
        self.parent_end, child_end = mp.Pipe()
        self.process = mp.Process(target=serve, args=(config, child_end, memory_slots), daemon=True)
        self.process.start()
        child_end.close()
        self.port: int | None = None
        self.info: dict = {}
        self.imported = False

    def wait_imported(self, timeout_s: float) -> bool:
        """Block until the process has imported torch and the model code (no GPU touched yet)."""
        if not self.imported and self.parent_end.poll(timeout_s):
            try:
                self.imported = self.parent_end.recv()[0] == "imported"
            except EOFError:
                return False
        return self.imported

    def start(self, timeout_s: float) -> tuple[str, str]:
        """Tell it to build; returns ("ready", "") or ("oom"|"error", message)."""
        if not self.wait_imported(timeout_s):
            if not self.process.is_alive():
                return "error", f"server process exited before its imports finished (exit code {self.process.exitcode})"
            return "error", "server process did not finish its imports"
        self.parent_end.send("go")
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.parent_end.poll(0.2):
                try:
                    message = self.parent_end.recv()
                except EOFError:
                    return "error", "server process exited during start-up"
                if message[0] == "ready":
                    self.port, self.info = message[1], message[2]
                    return "ready", ""
                return message[0], message[1]
            if not self.process.is_alive():
                return "error", f"server process exited during start-up (exit code {self.process.exitcode})"
        return "error", f"server did not start within {timeout_s:.0f} s"

    def stop(self, timeout_s: float = 10.0) -> None:
        try:
            if self.port is not None and self.process.is_alive():
                clients.control(self.port, Op.SHUTDOWN, timeout_s=timeout_s)
            elif self.process.is_alive():
                self.parent_end.send("quit")
        except (OSError, clients.ServerError, BrokenPipeError):
            pass
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self.parent_end.close()


class RealRunner:
    def __init__(self, scenario: Scenario, points: list[Point], options: RealOptions,
                 say: Callable[[str], None] = print) -> None:
        self.scenario = scenario
        self.points = points
        self.opt = options
        self.say = say
        self.mp = multiprocessing.get_context("spawn")
        self.notes: list[str] = []
        self._semaphores: list = []
        link = scenario.link
        self.results = {p.index: RealPointResult(p) for p in points}
        seeds = np.random.SeedSequence(scenario.seed).spawn(max((p.index for p in points), default=0) + 1)
        self.seeds = {p.index: seeds[p.index].spawn(options.repeats) for p in points}
        self.gpu_key = points[0].gpu.key if points else scenario.gpu
        self._link_rtt_s = link.rtt_ms / 1e3

    # --- the whole run ---------------------------------------------------------------------------
    def run(self) -> RealResult:
        started = time.perf_counter()
        probes: list[OomProbe] = []
        runnable = []
        for point in self.points:
            reason = unsupported(point, self.scenario)
            if reason:
                self.results[point.index].skipped = reason
            else:
                runnable.append(point)
        if self.opt.expected_s:  # a time budget then cuts the longest points, not whichever came last
            runnable.sort(key=lambda p: self.opt.expected_s.get(p.index, 0.0))
        # One shared server per link rate (it paces at its rate): the rates one after another.
        runnable.sort(key=lambda p: p.link.gbps if p.backend.weights == "shared" else 0.0)
        shared = [p for p in runnable if p.backend.weights == "shared"]
        per_agent = _by_backend(p for p in runnable if p.backend.weights == "per_agent")
        per_request = _by_backend(p for p in runnable if p.backend.weights == "per_request")
        pools: dict[str, list[ServerProcess]] = {}
        with GpuMonitor(self.opt.gpu_index) if self.cuda else _NoMonitor() as monitor:
            self.monitor = monitor
            workdir = Path(tempfile.mkdtemp(prefix="djinnsim-validate-"))
            weights_file = workdir / "weights.safetensors" if per_request else None

            def spawn_pools() -> None:
                """Start the next groups' processes once the shared points are done: they import
                while the weights file is written, and wait (no GPU touched) until their turn."""
                if pools:
                    return
                for name, pts in per_agent.items():
                    pools[name] = self._spawn_per_agent(pts)
                for name, pts in per_request.items():
                    pools[name] = self._spawn_per_request(pts, weights_file)

            try:
                saved = self._run_shared(shared, weights_file, spawn_pools)
                spawn_pools()
                for name, pts in per_agent.items():
                    probes.append(self._run_per_agent(name, pts, pools[name]))
                for name, pts in per_request.items():
                    if not saved:
                        for p in pts:
                            self.results[p.index].skipped = "no weights file (the shared server did not start)"
                        continue
                    self._run_per_request(pts, pools[name])
            finally:
                for workers in pools.values():
                    for worker in workers:
                        worker.stop()
                shutil.rmtree(workdir, ignore_errors=True)
        return RealResult([self.results[p.index] for p in self.points], probes, self.notes,
                          time.perf_counter() - started)

    @property
    def cuda(self) -> bool:
        return self.opt.device.startswith("cuda")

    def _config(self, point: Point, **changes) -> ServerConfig:
        lifetime = max(self.opt.deadline - time.perf_counter(), 1.0) + self.opt.request_timeout_s
        return ServerConfig(model=point.model.key, device=self.opt.device, dtype=self.opt.dtype,
                            link_gbps=point.link.gbps, rtt_s=self._link_rtt_s, lifetime_s=lifetime,
                            idle_s=self.opt.request_timeout_s + 60.0, **changes)

    def _time_left(self) -> bool:
        return time.perf_counter() < self.opt.deadline

    # --- one repeat of one point -------------------------------------------------------------------
    def _repeat(self, point: Point, repeat: int, ports: list[int | None], reset_ports: list[int]) -> RepeatResult:
        for port in reset_ports:
            clients.control(port, Op.RESET, timeout_s=self.opt.request_timeout_s)
        ctx = clients.RecordContext(point, self.gpu_key, repeat)
        seed = self.seeds[point.index][repeat]
        client = clients.Client(linkemu.LinkParams(point.link.gbps, self._link_rtt_s), self.opt.request_timeout_s)
        workload = self.scenario.workload
        started_at = time.perf_counter()
        errors: list[str] = []
        ttft = None
        if isinstance(workload, DecodeWorkload):
            rng = np.random.default_rng(seed)
            if point.backend.location == "local":
                records = clients.decode_local(ports[0], ctx, workload, rng, self.opt.deadline, self.opt.request_timeout_s)
            else:
                records = clients.decode_remote(client, ports[0], ctx, workload, rng, self.opt.deadline)
        else:
            assert isinstance(workload, AgentsWorkload)
            outcomes = clients.run_agents(client, ports, ctx, workload, seed, self.opt.deadline)
            records = sorted((r for o in outcomes for r in o.records), key=lambda r: (r.issued_at, r.agent))
            errors = [f"agent {i}: {o.error}" for i, o in enumerate(outcomes) if o.error]
            firsts = [s for o in outcomes for s in o.first_token_s]
            ttft = float(np.mean(firsts)) if firsts else None
        ended_at = time.perf_counter()
        result = RepeatResult(records, started_at, ended_at, ttft_s=ttft, errors=errors)
        measured = [r for r in records if not r.warmup and r.status == "ok"]
        if measured:
            util, _ = self.monitor.window(min(r.issued_at for r in measured), max(r.finished_at for r in measured))
            result.gpu_util = util
        _, result.peak_mem_bytes = self.monitor.window(started_at, ended_at)
        return result

    def _run_point(self, point: Point, ports: list[int | None], reset_ports: list[int],
                   probe_port: int | None = None) -> None:
        result = self.results[point.index]
        self.say(f"real: {point.label} ({self.opt.repeats} repeats)")
        probe = self.opt.level_probe and probe_port is not None
        if probe:
            self._probe(result, "before", probe_port)
        for repeat in range(self.opt.repeats):
            if not self._time_left():
                result.skipped = result.skipped or f"time budget spent after {repeat} repeats"
                break
            try:
                result.repeats.append(self._repeat(point, repeat, ports, reset_ports))
            except (TimeoutError, OSError, clients.ServerError) as exc:
                result.skipped = f"repeat {repeat} failed: {type(exc).__name__}: {exc}"
                return  # no probe after: the process may be what failed
        if probe and result.repeats:
            self._probe(result, "after", probe_port)

    def _probe(self, result: RealPointResult, when: str, port: int) -> None:
        """`--level-probe`: the level the point's resident process steps at, outside the scored repeats.
        A failed probe leaves a note; the point's repeats are judged as usual."""
        result.level_probe = result.level_probe or {}
        try:
            result.level_probe[when] = clients.level_probe(port, result.point.model.vocab_size, self.opt.request_timeout_s)
        except (TimeoutError, OSError, clients.ServerError) as exc:
            result.level_probe.setdefault("error", f"{when}: {type(exc).__name__}: {exc}")

    # --- groups of points by where their weights live -----------------------------------------------
    def _run_shared(self, points: list[Point], weights_file: Path | None, when_done: Callable[[], None]) -> bool:
        """Shared-weight points on one resident server; then it writes the serverless weights file.
        Returns whether the weights file was written."""
        if not points and weights_file is None:
            return False
        template = points[0] if points else self.points[0]
        server = ServerProcess(self.mp, self._config(template))
        try:
            status, message = server.start(self.opt.start_timeout_s)
            if status != "ready":
                for p in points:
                    self.results[p.index].skipped = f"shared server did not start ({status}: {message})"
                return False
            for point in points:
                if not self._time_left():
                    self.results[point.index].skipped = "time budget spent"
                    continue
                # The server paces its replies at the point's link rate: a new rate, a new server.
                if point.link.gbps != template.link.gbps:
                    server.stop()
                    template = point
                    server = ServerProcess(self.mp, self._config(point))
                    status, message = server.start(self.opt.start_timeout_s)
                    if status != "ready":
                        self.results[point.index].skipped = f"server did not start ({status}: {message})"
                        continue
                self._run_point(point, [server.port] * (point.n_agents or 1), [server.port], server.port)
            when_done()
            if weights_file is None or server.port is None:
                return False
            self.say("real: writing the weights file the serverless workers load")
            clients.control(server.port, Op.SAVE_WEIGHTS, {"path": str(weights_file)}, timeout_s=self.opt.start_timeout_s)
            return True
        finally:
            server.stop()

    def _spawn_per_agent(self, points: list[Point]) -> list[ServerProcess]:
        need = max(p.n_agents or 1 for p in points)
        count = max(need, self.opt.oom_probe_max) if self.cuda else need
        return [ServerProcess(self.mp, self._config(points[0])) for _ in range(count)]

    def _spawn_per_request(self, points: list[Point], weights_file: Path) -> list[ServerProcess]:
        need = max(p.n_agents or 1 for p in points)
        slots = need
        if self.cuda and self.opt.weight_bytes and self.monitor.total_bytes:
            # memory_full: wait. Loads beyond what fits beside the idle baseline queue for a slot.
            room = self.monitor.total_bytes - self.monitor.baseline_bytes - 2**30
            per_task = self.opt.weight_bytes + self.opt.context_bytes_per_process
            slots = max(1, min(need, int(room // max(per_task, 1))))
            if slots < need:
                self.notes.append(f"serverless: {slots} weight loads fit at once; more wait (memory_full: wait)")
        memory_slots = self.mp.BoundedSemaphore(slots)
        self._semaphores.append(memory_slots)  # a semaphore must outlive its pickling into the children
        first = points[0]
        config = self._config(first, resident=False, weight_tier=first.backend.weight_tier,
                              weights_file=str(weights_file))
        return [ServerProcess(self.mp, config, memory_slots) for _ in range(need)]

    def _run_per_agent(self, backend: str, points: list[Point], workers: list[ServerProcess]) -> OomProbe:
        """Keep-alive: copies loaded one at a time; the points in order of N, then on to the first OOM."""
        points = sorted(points, key=lambda p: p.n_agents or 1)
        probe_max = len(workers)
        for worker in workers:  # no import may run beside a measured request
            worker.wait_imported(self.opt.start_timeout_s)
        ports: list[int | None] = []
        probe = OomProbe(backend, loaded=0, oom_n=None, max_n=probe_max)

        def load_up_to(n: int) -> None:
            while len(ports) < n and probe.oom_n is None:
                if not self._time_left():
                    raise TimeoutError("time budget spent while loading keep-alive copies")
                status, message = workers[len(ports)].start(self.opt.start_timeout_s)
                if status == "ready":
                    ports.append(workers[len(ports)].port)
                    probe.loaded = len(ports)
                elif status == "oom":
                    probe.oom_n, probe.message = len(ports) + 1, message
                    self.say(f"real: {backend}: copy {len(ports) + 1} ran out of GPU memory")
                else:
                    raise RuntimeError(f"keep-alive worker {len(ports) + 1}: {message}")

        try:
            for point in points:
                n = point.n_agents or 1
                try:
                    load_up_to(n)
                except (TimeoutError, RuntimeError) as exc:
                    self.results[point.index].skipped = str(exc)
                    continue
                agent_ports = [ports[i] if i < len(ports) else None for i in range(n)]
                self._run_point(point, agent_ports, [p for p in agent_ports if p is not None], agent_ports[0])
            if self.cuda:
                try:
                    load_up_to(probe_max)
                except (TimeoutError, RuntimeError) as exc:
                    probe.message = f"probe stopped: {exc}"
            else:
                probe.message = "no OOM probe on the CPU"
        finally:
            for worker in workers:
                worker.stop()
        return probe

    def _run_per_request(self, points: list[Point], workers: list[ServerProcess]) -> None:
        """Serverless: one non-resident worker per agent, weights loaded for every phase."""
        try:
            ports = []
            for worker in workers:
                status, message = worker.start(self.opt.start_timeout_s)
                if status != "ready":
                    for p in points:
                        self.results[p.index].skipped = f"serverless worker did not start ({status}: {message})"
                    return
                ports.append(worker.port)
            for point in sorted(points, key=lambda p: p.n_agents or 1):
                n = point.n_agents or 1
                self._run_point(point, ports[:n], ports[:n])
        finally:
            for worker in workers:
                worker.stop()


def _by_backend(points) -> dict[str, list[Point]]:
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.backend.name, []).append(p)
    return groups


class _NoMonitor:
    available = False
    baseline_bytes = 0
    total_bytes = None

    def __enter__(self) -> "_NoMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def window(self, start_at: float, end_at: float) -> tuple[None, None]:
        return None, None
