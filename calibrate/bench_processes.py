"""Stages with k separate processes at once, as Ray runs tasks and actors (each a process with its own
CUDA context): whole-model weight loads (`loads_mp`) and decoding on a shared GPU (`timeslice_mp`).

Workers are spawned (calibrate/workers.py); threads of one process would share its CUDA context and
its interpreter's lock, which is not what separate processes meet. Each run starts every worker at
one agreed time on the system-wide monotonic clock, and each worker reports its own start and
finish, so the spread between processes is kept beside the aggregate.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from djinnsim.common.gpu_busy import sampled_busy_share
from djinnsim.errors import DjinnsimError
from djinnsim.sim.profile import ProcessLoads, ProcessRun, Timeslice, TimeslicePoint, fit_gpu_step_s

from .session import Session
from .workers import WorkerOOM, WorkerPool

WORKER = "djinnsim.calibrate.bench_processes:ProcessWorker"
START_DELAY_S = 0.5  # from sending a run's start time to the start: every worker is waiting by then
HOST_MEMORY_SHARE = 0.7  # of MemAvailable, for the per-process host copies of the pageable / pinned tiers
GPU_MARGIN_BYTES = 2 * 2**30
DECODE_PROMPT_TOKENS = 72
DECODE_CYCLE_STEPS = 32  # the cache is cut back to the prompt every this many steps: contexts 72-103 at every k


def _wait_until(at: float) -> None:
    while True:
        left = at - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.002) if left < 0.02 else left - 0.01)


class ProcessWorker:
    """What one worker process does (built in the child by calibrate/workers.py)."""

    def __init__(self, *, index: int, device: str, threads: int = 1) -> None:
        import torch

        self.index = index
        self.device = device
        self.host: dict = {}
        self.host_buffer = None
        self.model = None
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)  # this process's own CUDA context, created before any timing
        else:
            torch.set_num_threads(threads)
        self.info = {"pid": os.getpid()}

    def build(self, model_id: str, dtype: str, weights: str = "random") -> int:
        """This process's own copy of the model (random weights unless `weights` is a folder); its bytes."""
        import torch

        from djinnsim.sim.specs import get_model

        from .modeling import TORCH_DTYPES, build_model

        self.model = None
        self._free()
        torch.manual_seed(self.index)
        self.spec = get_model(model_id)
        self.model = build_model(self.spec, self.device, TORCH_DTYPES[dtype], weights)
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def drop_model(self) -> None:
        self.model = None
        self._free()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def _free(self) -> None:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # --- loads_mp ------------------------------------------------------------------------
    def prepare(self, tier: str, weight_file: str | None = None) -> int:
        """Hold this worker's own host copy of the weights for `tier` (pageable or pinned); 0 bytes otherwise."""
        import torch
        from safetensors import safe_open

        self.host, self.host_buffer = {}, None
        self._free()
        if tier not in ("pageable", "pinned"):
            return 0
        with safe_open(str(weight_file), framework="pt", device="cpu") as fh:
            names = list(fh.keys())
            if tier == "pageable":  # private anonymous memory, not pages mapped from the file
                self.host = {k: fh.get_tensor(k).clone() for k in names}
            else:  # one pinned buffer (one allocation, not one per tensor), the tensors views into it
                tensors = {k: fh.get_tensor(k) for k in names}
                sizes = {k: -(-t.numel() * t.element_size() // 64) * 64 for k, t in tensors.items()}
                self.host_buffer = torch.empty(sum(sizes.values()), dtype=torch.uint8, pin_memory=True)
                offset = 0
                for k, t in tensors.items():
                    n = t.numel() * t.element_size()
                    view = self.host_buffer[offset:offset + n].view(t.dtype).view(t.shape)
                    view.copy_(t)
                    self.host[k] = view
                    offset += sizes[k]
                del tensors
        return sum(t.numel() * t.element_size() for t in self.host.values())

    def load(self, tier: str, start_at: float, weight_file: str | None = None) -> tuple[float, float, int]:
        """The whole model onto the device from `tier`, starting at `start_at`: (start, finish, bytes)."""
        from .bench_weights import load_from_file, load_from_host

        if tier not in ("disk", "disk_cold", "pageable", "pinned"):
            raise ValueError(f"unknown load tier {tier!r}")
        if tier in ("pageable", "pinned") and not self.host:
            raise ValueError(f"load from {tier}: no host copy prepared")
        self._free()
        _wait_until(start_at)
        started_at = time.monotonic()
        if tier in ("disk", "disk_cold"):
            from safetensors import safe_open

            with safe_open(str(weight_file), framework="pt", device="cpu") as fh:
                names = list(fh.keys())
            out = load_from_file(Path(weight_file), names, self.device)
        else:
            out = load_from_host(self.host, list(self.host), self.device, non_blocking=tier == "pinned")
        self._sync()
        finished_at = time.monotonic()
        nbytes = sum(t.numel() * t.element_size() for t in out.values())
        del out
        self._free()
        return started_at, finished_at, nbytes

    # --- timeslice_mp --------------------------------------------------------------------
    def _prompt_cache(self):
        from .modeling import forward, random_ids

        ids = random_ids(self.spec, 1, DECODE_PROMPT_TOKENS, "cpu", seed=self.index).to(self.device)
        logits, cache = forward(self.model, ids)
        return logits[:, -1:].argmax(-1), cache

    def _cut(self, cache):
        """The cache back to the prompt (a new prefill where the cache class cannot crop)."""
        from .modeling import cut_cache

        cut = cut_cache(cache, DECODE_PROMPT_TOKENS)
        return cut if cut is not None else self._prompt_cache()[1]

    def decode(self, start_at: float, duration_s: float, min_steps: int = 0) -> list[tuple[float, float]]:
        """Greedy decode steps (batch 1) from `start_at` for `duration_s` (and at least `min_steps`):
        each step's (start, finish)."""
        import torch

        from .modeling import forward

        spans = []
        with torch.inference_mode():
            token, cache = self._prompt_cache()
            self._sync()
            _wait_until(start_at)
            end_at = start_at + duration_s
            step = 0
            while time.monotonic() < end_at or step < min_steps:
                if step and step % DECODE_CYCLE_STEPS == 0:
                    cache = self._cut(cache)
                t0 = time.monotonic()
                logits, cache = forward(self.model, token, cache)
                token = logits[:, -1:].argmax(-1)
                self._sync()
                spans.append((t0, time.monotonic()))
                step += 1
        return spans


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mincore on a mapping of it); None if unknown."""
    import ctypes
    import ctypes.util
    import mmap

    size = path.stat().st_size
    if size == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            return float(np.mean(np.frombuffer(vec, dtype=np.uint8) & 1))
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def drop_page_cache(path: Path) -> tuple[str | None, float | None]:
    """Evict the file from the page cache: the whole cache through /proc (needs root and a writable
    /proc/sys), else this file's pages through posix_fadvise. (method that worked or None, share of
    the file still resident after it)."""
    os.sync()
    method = None
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        method = "drop_caches"
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                method = "posix_fadvise"
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass
    resident = resident_fraction(path)
    if resident is not None and resident > 0.5:
        method = None  # the call returned, but the pages stayed
    return method, resident


def _read_through(path: Path) -> None:
    """Bring the file into the page cache (the cached-disk tier's starting state)."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(64 * 2**20):
            pass


def _pool(s: Session, n: int) -> WorkerPool:
    """The session's worker processes (the two stages share them: spawning costs seconds), at least n."""
    pool = s.workers
    if pool is not None and pool.open and len(pool.alive) >= n:
        return pool
    if pool is not None:
        pool.close()
    s.workers = None
    pool = WorkerPool(n, WORKER, {"device": s.device}, start_timeout_s=s.plan.workers_start_timeout_s)
    pool.__enter__()
    s.workers = pool
    if pool.start_errors:
        s.notes.append(f"{len(pool.start_errors)} worker process(es) did not start: {pool.start_errors[0]}")
    return pool


def _per_process_bytes(s: Session) -> int:
    """Device memory one worker process holds: its weights and its CUDA context."""
    ctx = int(s.results.get("memory_start", {}).get("context_bytes") or 0)
    return int(s.results.get("weight_bytes") or s.spec.weight_bytes) + ctx


def _gpu_fit(s: Session, per_process: int) -> int:
    """How many worker processes of `per_process` device bytes fit beside this one; unbounded on the CPU."""
    if not s.is_cuda:
        return 1 << 30
    import torch

    s.free()
    free, _ = torch.cuda.mem_get_info(s.device)
    return max(int((free - GPU_MARGIN_BYTES) // per_process), 0)


def run_loads_mp(s: Session) -> dict[str, ProcessLoads]:
    """Whole-model loads by k worker processes at once, per tier, for each k of the plan that fits."""
    plan = s.plan
    path = s.weight_file
    if path is None or not path.is_file():
        raise DjinnsimError("stage loads_mp needs the weight file the weights stage writes; it is missing")
    nbytes_file = path.stat().st_size
    fits_gpu = _gpu_fit(s, _per_process_bytes(s))
    ks = [k for k in plan.loads_mp_k if k <= fits_gpu]
    if not ks:
        raise DjinnsimError(f"stage loads_mp: not even one more model copy fits in device memory ({fits_gpu})")
    gpu_limit = f"k={min(k for k in plan.loads_mp_k if k > fits_gpu)} needs more device memory than is free" \
        if len(ks) < len(plan.loads_mp_k) else "the plan's largest k"
    tiers = ["disk", "pinned", "disk_cold", "pageable"] if s.is_cuda else ["disk", "disk_cold", "pageable"]
    if not plan.loads_mp_cold:
        tiers.remove("disk_cold")
    started = time.monotonic()
    results: dict[str, ProcessLoads] = {}
    pool = _pool(s, max(ks))
    workers = pool.alive
    ks = [k for k in ks if k <= len(workers)]
    for tier in tiers:
        if time.monotonic() - started > plan.loads_mp_budget_s:
            s.notes.append(f"loads_mp: time budget {plan.loads_mp_budget_s:.0f} s spent before tier {tier}")
            s.say(f"loads_mp: time budget spent, tier {tier} not measured")
            break
        tier_ks, limit = list(ks), gpu_limit
        if tier in ("pageable", "pinned"):
            host = _mem_available_bytes()
            per = nbytes_file if tier == "pageable" else 1 << (nbytes_file - 1).bit_length()
            if host is not None:
                fits_host = int(HOST_MEMORY_SHARE * host // per)
                if fits_host < max(tier_ks):
                    tier_ks = [k for k in tier_ks if k <= fits_host]
                    limit = f"k={min(k for k in ks if k > fits_host)} host copies need more host memory than {HOST_MEMORY_SHARE:.0%} of what is available"
            if not tier_ks:
                s.notes.append(f"loads_mp {tier}: not even one host copy fits in host memory")
                continue
            pool.call(workers[:max(tier_ks)], "prepare", 600.0, tier=tier, weight_file=str(path))
        elif tier == "disk":
            _read_through(path)
        measured = _measure_tier(s, pool, workers, tier, tier_ks, path)
        pool.call(workers[:max(tier_ks)], "prepare", 60.0, tier="none")
        if measured is None:
            continue
        aggregate, runs, oom_limit, note = measured
        results[tier] = ProcessLoads(nbytes=nbytes_file, aggregate_gbps=aggregate, runs=runs,
                                     limit=oom_limit or limit, note=note)
        s.advance(1)
        s.log.flush()
    return results


def _measure_tier(s: Session, pool: WorkerPool, workers: list[int], tier: str, ks: list[int], path: Path):
    plan = s.plan
    aggregate: dict[int, float] = {}
    runs: dict[int, list[ProcessRun]] = {}
    oom_limit, drops = None, []
    for k in ks:
        walls = []
        repeats = plan.loads_mp_disk_repeat if tier == "disk" and plan.loads_mp_disk_repeat else plan.loads_mp_repeat
        for rep in range(repeats):
            if tier == "disk_cold":
                method, resident = drop_page_cache(path)
                drops.append((method, resident))
                if method is None:
                    s.notes.append(f"loads_mp disk_cold: the page cache could not be dropped ({resident=}); tier not measured")
                    s.say("loads_mp: page cache not dropped (no root, no fadvise effect); disk_cold skipped")
                    return None
            timeout_s = 60.0 + k * path.stat().st_size / 0.25e9
            try:
                replies = pool.call(workers[:k], "load", timeout_s, tier=tier, weight_file=str(path),
                                    start_at=time.monotonic() + START_DELAY_S)
            except WorkerOOM as exc:
                oom_limit = f"k={k}: out of memory ({exc})"
                s.log.add(f"loads_mp_{tier}", f"k{k}", float("nan"), "oom", rep, concurrent=k)
                s.say(f"loads_mp {tier:9} x{k}: out of memory, larger k skipped")
                break
            first = min(r[0] for r in replies)
            run = ProcessRun(started_s=[r[0] - first for r in replies], finished_s=[r[1] - first for r in replies])
            runs.setdefault(k, []).append(run)
            walls.append(run.wall_s)
            for i, (t0, t1, nbytes) in enumerate(replies):
                s.log.add(f"loads_mp_{tier}", f"k{k}", t1 - t0, "s", rep * 100 + i, nbytes=nbytes, concurrent=k)
            s.log.add(f"loads_mp_{tier}", f"k{k}_wall", run.wall_s, "s", rep, nbytes=k * replies[0][2], concurrent=k)
        if oom_limit is not None:
            break
        total = k * path.stat().st_size
        aggregate[k] = total / float(np.median(walls)) / 1e9
        last = runs[k][-1]
        s.say(f"loads_mp {tier:9} x{k}: aggregate {aggregate[k]:7.2f} GB/s, wall {np.median(walls):.3f} s, "
              f"starts spread {max(last.started_s):.3f} s, finishes {min(last.finished_s):.3f}-{max(last.finished_s):.3f} s")
    if not aggregate:
        return None
    note = ""
    if drops:
        methods = sorted({m for m, _ in drops if m})
        worst = max((r for _, r in drops if r is not None), default=None)
        note = f"page cache dropped before each run by {', '.join(methods)}" + (
            f"; at most {worst:.1%} of the file resident after" if worst is not None else "; residency not checked")
    return aggregate, runs, oom_limit, note


def fit_busy_fraction(points: list[TimeslicePoint]) -> tuple[float, float | None]:
    """f of the time-sliced model, slowdown(k) = max(1, k f), on relative error over the k > 1
    points (a grid over f: ties go to the largest f, the most contention the data allow)."""
    pts = [(p.processes, p.slowdown_p50) for p in points if p.processes > 1]
    if not pts:
        return 1.0, None
    grid = np.linspace(0.01, 1.0, 991)
    errors = np.array([max(abs(max(1.0, k * f) - y) / y for k, y in pts) for f in grid])
    best = grid[np.flatnonzero(errors <= errors.min() + 1e-12)[-1]]
    return float(best), float(errors.min())


def timeslice_budget_s(plan) -> float:
    """What the stage should take: building the copies (half a minute), the warm-up, each k's run."""
    return 30.0 + plan.timeslice_warmup_s + len(plan.timeslice_k) * (plan.timeslice_duration_s + 2 * START_DELAY_S)


def run_timeslice_mp(s: Session) -> Timeslice:
    """k processes decoding at once, each with its own model copy, for each k of the plan that fits."""
    plan = s.plan
    per_process = _per_process_bytes(s) + (2**30 if s.is_cuda else 0)  # + KV and scratch
    fits = _gpu_fit(s, per_process)
    ks = [k for k in plan.timeslice_k if k <= fits]
    if not ks:
        raise DjinnsimError(f"stage timeslice_mp: not even one model copy fits in device memory beside this process")
    limit = f"k={min(k for k in plan.timeslice_k if k > fits)} copies need more device memory than is free" \
        if len(ks) < len(plan.timeslice_k) else "the plan's largest k"
    from .telemetry import NvmlSampler, nvml_handle

    nvml, handle = nvml_handle(int(s.device.split(":")[1])) if s.is_cuda else (None, None)
    points: list[TimeslicePoint] = []
    baseline = None
    pool = _pool(s, max(ks))
    built = pool.call(pool.alive[:max(ks)], "build", plan.workers_start_timeout_s, oom_ok=True, model_id=s.spec.model_id,
                      dtype=str(s.dtype).removeprefix("torch."), weights=s.weights)
    workers = [i for i, b in zip(pool.alive, built) if not isinstance(b, WorkerOOM)]
    if len(workers) < len(built):
        oom = next(b for b in built if isinstance(b, WorkerOOM))
        limit = f"only {len(workers)} of {len(built)} model copies could be built ({oom})"
        s.notes.append(f"timeslice_mp: {limit}")
    ks = [k for k in ks if k <= len(workers)]
    if not ks:
        raise DjinnsimError("stage timeslice_mp: no worker could build its model copy (out of memory)")
    # Every shape of the run, once per process: the first steps at a new length are slow (cold_shapes).
    pool.call(workers, "decode", 600.0, start_at=time.monotonic() + START_DELAY_S, duration_s=plan.timeslice_warmup_s,
              min_steps=DECODE_CYCLE_STEPS + 1)
    for k in ks:
        sampler = NvmlSampler(nvml, handle, period_s=0.05) if handle is not None else None
        start_at = time.monotonic() + START_DELAY_S
        try:
            with sampler or nullcontext():
                if sampler is not None:
                    sampler.phase = f"k{k}"
                replies = pool.call(workers[:k], "decode", 120.0 + 4 * plan.timeslice_duration_s,
                                    start_at=start_at, duration_s=plan.timeslice_duration_s)
        except WorkerOOM as exc:
            limit = f"k={k}: out of memory while decoding ({exc})"
            s.log.add("timeslice_mp", f"k{k}", float("nan"), "oom", concurrent=k)
            break
        kept_from, kept_to = start_at + plan.timeslice_settle_s, start_at + plan.timeslice_duration_s
        per_process = [[t1 - t0 for t0, t1 in spans if t0 >= kept_from and t1 <= kept_to] for spans in replies]
        steps = np.array([v for proc in per_process for v in proc])
        if not all(per_process):
            raise DjinnsimError(f"stage timeslice_mp: at k={k} a process ran no step inside the kept window "
                                f"({plan.timeslice_settle_s}-{plan.timeslice_duration_s} s): the plan's window is too short")
        for i, proc in enumerate(per_process):
            for rep, value in enumerate(proc):
                s.log.add("timeslice_mp", f"k{k}", value, "s", i * 100000 + rep, concurrent=k, batch=1)
        if baseline is None:
            baseline = float(np.median(steps))
        busy = None
        if sampler is not None:
            busy = sampled_busy_share([(at, v["sm_util_pct"]) for _, at, v in sampler.rows], 0.0, float("inf"))
        if busy is not None:
            s.log.add("timeslice_mp_gpu_busy", f"k{k}", busy, "share", concurrent=k)
        p10, p50, p90 = (float(np.percentile(steps, q)) for q in (10, 50, 90))
        points.append(TimeslicePoint(
            processes=k, step_s_p10=p10, step_s_p50=p50, step_s_p90=p90,
            slowdown_p10=p10 / baseline, slowdown_p50=p50 / baseline, slowdown_p90=p90 / baseline,
            per_process_step_s_p50=[float(np.median(proc)) for proc in per_process],
            n_steps=int(len(steps)), gpu_busy_share=busy))
        s.say(f"timeslice_mp x{k}: step p50 {p50 * 1e3:.2f} ms (p10 {p10 * 1e3:.2f}, p90 {p90 * 1e3:.2f}), "
              f"slowdown x{p50 / baseline:.2f}, {len(steps)} steps" + (f", GPU busy {busy:.0%}" if busy is not None else ""))
        s.advance(1)
    s.log.flush()
    pool.call(workers, "drop_model", 60.0)  # the device memory back for whatever runs next
    if not points:
        raise DjinnsimError("stage timeslice_mp: no k measured")
    f, err = fit_busy_fraction(points)
    g, saturated = fit_gpu_step_s([(p.processes, p.step_s_p50) for p in points])
    s.say(f"timeslice_mp: time-sliced model step = max(lone step, k x {g * 1e3:.2f} ms), fitted on k = "
          f"{', '.join(map(str, saturated)) or 'none (no k >= 2: the lone step)'}; relative model max(1, k x {f:.3f}) "
          f"worst relative error {100 * (err or 0):.1f}%")
    return Timeslice(points=points, context_tokens=(DECODE_PROMPT_TOKENS, DECODE_PROMPT_TOKENS + DECODE_CYCLE_STEPS - 1),
                     gpu_busy_fraction=f, fit_max_rel_err=err, limit=limit, gpu_step_s=g, saturated_k=saturated)


