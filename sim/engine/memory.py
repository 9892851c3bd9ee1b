"""GPU memory accounting."""

from __future__ import annotations

import heapq

import simpy


class GpuMemory:
    """GPU memory accounting. `try_alloc` fails at once (an OOM); `alloc_wait` queues until it fits.

    Waiting requests are served in order of (priority, arrival), strictly: the first in that order
    blocks those behind it, so a large request is never starved. Work already holding memory (a
    running session's next request, priority 0) goes before starting a new process (priority 1),
    which could otherwise wait at the head for memory that only the work behind it would free.
    The waiting requests are a heap on (priority, arrival): a wait or a grant costs O(log waiting).
    """

    def __init__(self, env: simpy.Environment, capacity_bytes: int) -> None:
        self.env = env
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        self._waiting: list[tuple[int, int, int, simpy.Event]] = []  # (priority, seq, bytes, event)
        self._seq = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _take(self, nbytes: int) -> None:
        self.used_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def try_alloc(self, nbytes: int) -> bool:
        # free_bytes and _take, inlined: every request allocates here
        if nbytes > self.capacity_bytes - self.used_bytes or self._waiting:
            return False
        self.used_bytes = used = self.used_bytes + nbytes
        if used > self.peak_bytes:
            self.peak_bytes = used
        return True

    def alloc_wait(self, nbytes: int, priority: int = 0) -> simpy.Event:
        """Fires once `nbytes` are allocated; a request larger than the GPU never fires."""
        granted = self.env.event()
        heapq.heappush(self._waiting, (priority, self._seq, nbytes, granted))
        self._seq += 1
        self._grant()
        return granted

    def fits_ever(self, nbytes: int) -> bool:
        return nbytes <= self.capacity_bytes

    def free(self, nbytes: int) -> None:
        self.used_bytes -= nbytes
        assert self.used_bytes >= 0, "freed more GPU memory than was allocated"
        if self._waiting:
            self._grant()

    def _grant(self) -> None:
        waiting = self._waiting
        while waiting and waiting[0][2] <= self.free_bytes:
            _, _, nbytes, granted = heapq.heappop(waiting)
            self._take(nbytes)
            granted.succeed()
