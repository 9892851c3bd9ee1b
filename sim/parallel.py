"""Independent points in parallel: in this process, in local processes, or as Ray tasks.

`map_points(fn, items, jobs=..., ray_address=...)` returns `[fn(item) for item in items]` in the
items' order, whatever order they finish in. A point's result depends only on its item (its random
streams come from its own seed, `sim.run.point_seed`), so a sweep is byte-identical whichever way it
runs. `fn` must be a module-level function and items and results picklable.

- jobs = 1, no Ray: one after another, in this process.
- jobs = N > 1: a pool of N local processes (forkserver: the workers start from a clean process
  that has imported the simulator once, not from a copy of this one's threads).
- Ray: each item is a Ray task on the cluster at `ray_address`, or on a local Ray started for the
  call (`"local"`: `ray.init(num_cpus=max(jobs, 2))`). A cluster's workers need djinnsim installed.
  Ray is the optional extra `djinnsim[ray]`.

A command that maps several times (`djinnsim run`: the sweep, then the claims' searches; `djinnsim
search`: its groups) holds one executor for all of them with `held(jobs, ray_address)`: Ray is
started (or connected to) once and the local processes are started once. Inside it, `map_points`
called with neither `jobs` nor `ray_address` runs on the held executor (library code such as the
claims' searches does so, and runs sequentially outside any `held`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from djinnsim.errors import DjinnsimError

from . import grpc_probe

T = TypeVar("T")
R = TypeVar("R")
Progress = Callable[[int, int, int], None]  # (done, total, index of the item just done)
LOCAL_RAY = "local"


@dataclass
class Held:
    """An executor held across map_points calls: its settings, its local processes (started on
    first use), and the Ray module when Ray runs the points (`ray_started`: this Held started
    or connected it, and shuts it down at the end)."""

    jobs: int
    ray_address: str | None
    processes: ProcessPoolExecutor | None = None
    ray: Any = None
    ray_started: bool = False

    def process_pool(self) -> ProcessPoolExecutor:
        if self.processes is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["djinnsim.sim.simulate"])
            self.processes = ProcessPoolExecutor(max_workers=self.jobs, mp_context=context,
                                                 initializer=_leave_interrupts_to_the_parent)
        return self.processes


def _leave_interrupts_to_the_parent() -> None:
    """A Ctrl-C reaches every process of the terminal's group: the parent cancels the pool and
    cleans up (one `interrupted` line); a worker that also raised would print its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_HELD: list[Held] = []  # the executors held now, innermost last


@contextmanager
def held(jobs: int = 1, ray_address: str | None = None) -> Iterator[Held]:
    """Hold an executor for the block: Ray started or connected once, local processes started once
    (when first needed) and shut down at the end. Re-entering with the innermost held settings
    reuses it."""
    if jobs < 1:
        raise DjinnsimError(f"--jobs must be at least 1, got {jobs}")
    if _HELD and (_HELD[-1].jobs, _HELD[-1].ray_address) == (jobs, ray_address):
        yield _HELD[-1]
        return
    executor = Held(jobs, ray_address)
    if ray_address is not None:
        executor.ray, executor.ray_started = _connect_ray(jobs, ray_address)
    _HELD.append(executor)
    try:
        yield executor
    finally:
        _HELD.remove(executor)
        if executor.processes is not None:
            executor.processes.shutdown(wait=True, cancel_futures=True)
        if executor.ray_started:
            executor.ray.shutdown()


def map_points(fn: Callable[[T], R], items: Sequence[T], *, jobs: int | None = None, ray_address: str | None = None,
               progress: Progress | None = None) -> list[R]:
    """`[fn(item) for item in items]`, run as `jobs` local processes or as Ray tasks (`ray_address`:
    a cluster's address, or "local"); `progress(done, total, index)` after each item finishes.
    With neither `jobs` nor `ray_address`: on the executor held now (see `held`), else one by one."""
    if jobs is None and ray_address is None:
        if _HELD:
            jobs, ray_address = _HELD[-1].jobs, _HELD[-1].ray_address
        else:
            jobs = 1
    with held(1 if jobs is None else jobs, ray_address) as executor:
        if ray_address is not None:
            return _on_ray(executor.ray, fn, items, progress)
        if executor.jobs == 1 or len(items) <= 1:
            results = []
            for index, item in enumerate(items):
                results.append(fn(item))
                if progress is not None:
                    progress(index + 1, len(items), index)
            return results
        return _in_processes(executor.process_pool(), fn, items, progress)


def _in_processes(pool: ProcessPoolExecutor, fn, items, progress) -> list:
    results: list = [None] * len(items)
    pending = {pool.submit(fn, item): index for index, item in enumerate(items)}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=pending.get):
                index = pending.pop(future)
                results[index] = future.result()
                if progress is not None:
                    progress(len(items) - len(pending), len(items), index)
    except BaseException:
        for future in pending:
            future.cancel()
        raise
    return results


def _connect_ray(jobs: int, address: str):
    """(the ray module, whether this call started or connected it): a Ray already initialized in
    this process is used as it is and left running."""
    try:
        import ray
    except ModuleNotFoundError:
        raise DjinnsimError("--ray needs Ray: pip install 'djinnsim[ray]'") from None
    if ray.is_initialized():
        return ray, False
    try:
        if address == LOCAL_RAY:
            ray.init(num_cpus=max(jobs, 2), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            _reachable(address)
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except DjinnsimError:
        raise
    except Exception as exc:  # Ray raises ConnectionError, ValueError, RuntimeError... for a bad address
        raise DjinnsimError(f"--ray: cannot connect to Ray at {address}: {str(exc).splitlines()[0]}") from None
    return ray, True


def _on_ray(ray, fn, items, progress) -> list:
    remote = ray.remote(fn)
    refs = [remote.remote(item) for item in items]
    index_of = {ref: index for index, ref in enumerate(refs)}
    results: list = [None] * len(items)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            index = index_of[ref]
            results[index] = _ray_get(ray, ref)
            if progress is not None:
                progress(len(items) - len(pending), len(items), index)
    return results


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, before `ray.init` (which retries for about 20 s and prints Ray's own warnings
    meanwhile), when nothing listens at HOST:PORT or what listens is not a gRPC server, so not Ray
    (sim.grpc_probe). Other forms ("auto", no port) are Ray's to resolve. With RAY_USE_TLS the
    server expects TLS, which the probe does not speak: only the connection is checked."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [IPv6]:PORT
    if not host or not port.isdigit():
        return
    try:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
            return
        not_grpc = grpc_probe.probe(host, int(port), timeout_s)
    except OSError as exc:
        raise DjinnsimError(f"--ray: nothing answers at {address} ({exc.strerror or exc})") from None
    if not_grpc is not None:
        raise DjinnsimError(f"--ray: no Ray at {address}: {not_grpc}")


def _ray_get(ray, ref):
    """A task's result; a DjinnsimError raised in the task comes back as itself, one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, DjinnsimError):
            raise DjinnsimError(str(cause)) from None
        raise
