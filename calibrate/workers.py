"""Worker processes for the multi-process stages: spawned (never forked, never threads), each with its
own interpreter and, on a GPU, its own CUDA context, driven by the parent over one pipe each.

Every call has a deadline; a worker that errs answers with one line; one that does not answer in
time, or dies, is killed with all the others and the stage fails with one line (never a hang).
A worker whose parent goes away finds its pipe closed and exits.
"""

from __future__ import annotations

import importlib
import multiprocessing
import time
from typing import Any

from djinnsim.errors import DjinnsimError


class WorkerOOM(DjinnsimError):
    """A worker ran out of (device or host) memory: what the stage is looking for, not a fault."""


def _worker_main(conn, handler_path: str, index: int, kwargs: dict[str, Any]) -> None:
    """The child's loop: build the handler, then answer ("ok", value) / ("oom" | "error", line) per call."""
    def fail(exc: BaseException) -> tuple[str, str]:
        line = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        kind = "oom" if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() else "error"
        return kind, line

    try:
        module, name = handler_path.split(":")
        handler = getattr(importlib.import_module(module), name)(index=index, **kwargs)
        conn.send(("ok", getattr(handler, "info", None)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(fail(exc))
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            conn.send(("ok", None))
            return
        method, call_kwargs = message
        try:
            conn.send(("ok", getattr(handler, method)(**call_kwargs)))
        except Exception as exc:  # reported to the parent as one line; it decides what follows
            conn.send(fail(exc))


class WorkerPool:
    """`n` spawned processes, each running `handler_path` ("module:Class", built with index= and
    `kwargs`). Use as a context manager: leaving it stops (then kills) every worker."""

    def __init__(self, n: int, handler_path: str, kwargs: dict[str, Any], *, start_timeout_s: float = 180.0) -> None:
        self.n = n
        self.handler_path = handler_path
        self.kwargs = kwargs
        self.start_timeout_s = start_timeout_s
        self.procs: list = []
        self.conns: list = []
        self.info: list[Any] = []
        self.alive: list[int] = []  # workers that started (the others ran out of memory starting)
        self.start_errors: list[str] = []

    def __enter__(self) -> WorkerPool:
        ctx = multiprocessing.get_context("spawn")
        try:
            for i in range(self.n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(child, self.handler_path, i, self.kwargs),
                                   name=f"djinnsim-worker-{i}", daemon=True)
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            replies = self._gather(list(range(self.n)), "start", self.start_timeout_s, raise_oom=False)
        except BaseException:
            self.close()
            raise
        for i, (kind, value) in zip(range(self.n), replies):
            if kind == "ok":
                self.alive.append(i)
                self.info.append(value)
            else:
                self.start_errors.append(f"worker {i}: {value}")
                self._stop(i)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gather(self, workers: list[int], what: str, timeout_s: float, raise_oom: bool = True) -> list[tuple[str, Any]]:
        """Every worker's reply (all read, so no answer is left in a pipe), then the first failure
        raised: an error or a timeout stops every worker; an out-of-memory leaves them running."""
        deadline = time.monotonic() + timeout_s
        replies = []
        for i in workers:
            conn = self.conns[i]
            try:
                ready = conn.poll(max(deadline - time.monotonic(), 0.0))
                reply = conn.recv() if ready else None
            except (EOFError, OSError):
                reply = ("error", f"exited with code {self.procs[i].exitcode}")
            if reply is None:
                self.close(grace_s=1.0)  # it is busy or stuck: it will not read a request to quit
                raise DjinnsimError(f"worker {i} did not answer {what!r} within {timeout_s:.0f} s; all workers stopped")
            replies.append(reply)
        failed = [(i, kind, value) for i, (kind, value) in zip(workers, replies) if kind == "error"]
        if failed:
            self.close()
            i, _, value = failed[0]
            raise DjinnsimError(f"worker {i} failed in {what!r}: {value}; all workers stopped")
        oom = [(i, value) for i, (kind, value) in zip(workers, replies) if kind == "oom"]
        if oom and raise_oom:
            raise WorkerOOM(f"worker {oom[0][0]} ran out of memory in {what!r}: {oom[0][1]}")
        return replies

    def call(self, workers: list[int], method: str, timeout_s: float, *, oom_ok: bool = False, **kwargs: Any) -> list[Any]:
        """Send `method(**kwargs)` to each of `workers` at once; their answers in the same order
        (with `oom_ok`, a WorkerOOM in place of the answer of a worker that ran out of memory)."""
        for i in workers:
            try:
                self.conns[i].send((method, kwargs))
            except (BrokenPipeError, OSError):
                code = self.procs[i].exitcode
                self.close()
                raise DjinnsimError(f"worker {i} is gone (exit code {code}); all workers stopped") from None
        replies = self._gather(workers, method, timeout_s, raise_oom=not oom_ok)
        return [WorkerOOM(value) if kind == "oom" else value for kind, value in replies]

    @property
    def open(self) -> bool:
        return bool(self.procs)

    def _stop(self, i: int, grace_s: float = 5.0) -> None:
        self._ask_to_quit(i)
        self._reap(i, time.monotonic() + grace_s)

    def _ask_to_quit(self, i: int) -> None:
        try:
            if self.procs[i].is_alive():
                self.conns[i].send(None)
        except (BrokenPipeError, OSError):
            pass

    def _reap(self, i: int, deadline: float) -> None:
        """Wait for worker i until `deadline`, then terminate it, then kill it."""
        proc = self.procs[i]
        proc.join(max(deadline - time.monotonic(), 0.0))
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
        self.conns[i].close()

    def close(self, grace_s: float = 5.0) -> None:
        """Ask every worker to quit, give them `grace_s` together, then terminate and kill what is left."""
        for i in range(len(self.procs)):
            self._ask_to_quit(i)
        deadline = time.monotonic() + grace_s
        for i in range(len(self.procs)):
            self._reap(i, deadline)
        self.procs, self.conns = [], []
