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
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

from djinnsim.errors import DjinnsimError

T = TypeVar("T")
R = TypeVar("R")
Progress = Callable[[int, int, int], None]  # (done, total, index of the item just done)
LOCAL_RAY = "local"


def map_points(fn: Callable[[T], R], items: Sequence[T], *, jobs: int = 1, ray_address: str | None = None,
               progress: Progress | None = None) -> list[R]:
    """`[fn(item) for item in items]`, run as `jobs` local processes or as Ray tasks (`ray_address`:
    a cluster's address, or "local"); `progress(done, total, index)` after each item finishes."""
    if jobs < 1:
        raise DjinnsimError(f"--jobs must be at least 1, got {jobs}")
    if ray_address is not None:
        return _on_ray(fn, items, jobs, ray_address, progress)
    if jobs == 1 or len(items) <= 1:
        results = []
        for index, item in enumerate(items):
            results.append(fn(item))
            if progress is not None:
                progress(index + 1, len(items), index)
        return results
    return _in_processes(fn, items, jobs, progress)


def _in_processes(fn, items, jobs, progress) -> list:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["djinnsim.sim.simulate"])
    results: list = [None] * len(items)
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=context,
                             initializer=_leave_interrupts_to_the_parent) as pool:
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


def _leave_interrupts_to_the_parent() -> None:
    """A Ctrl-C reaches every process of the terminal's group: the parent cancels the pool and
    cleans up (one `interrupted` line); a worker that also raised would print its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _on_ray(fn, items, jobs, address, progress) -> list:
    try:
        import ray
    except ModuleNotFoundError:
        raise DjinnsimError("--ray needs Ray: pip install 'djinnsim[ray]'") from None
    started = not ray.is_initialized()
    if started:
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
    try:
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
    finally:
        if started:
            ray.shutdown()


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at HOST:PORT."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise DjinnsimError(f"--ray: nothing answers at {address} ({exc.strerror or exc})") from None


def _ray_get(ray, ref):
    """A task's result; a DjinnsimError raised in the task comes back as itself, one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, DjinnsimError):
            raise DjinnsimError(str(cause)) from None
        raise
