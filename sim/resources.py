"""Things that own capacity: a bandwidth shared by concurrent transfers, a full-duplex link, GPU memory."""

from __future__ import annotations

from typing import Callable

import simpy

_DONE_WITHIN_S = 1e-9  # a flow less than this from done is done (float round-off on GB-sized flows)


class SharedPipe:
    """A bandwidth split equally among the transfers in flight (processor sharing).

    `rate_Bps(k)` is the total rate with k transfers in flight, so contention that lowers the
    aggregate (k weight loads fighting over PCIe) is data, not code.
    """

    def __init__(self, env: simpy.Environment, rate_Bps: Callable[[int], float],
                 flow_cap_Bps: float | None = None) -> None:
        self.env = env
        self.rate_Bps = rate_Bps
        self.flow_cap_Bps = flow_cap_Bps
        self._flows: dict[int, list] = {}  # id -> [bytes_left, done_event]
        self._next_id = 0
        self._updated_at = env.now
        self._version = 0
        self.bytes_carried = 0.0

    def transfer(self, nbytes: float) -> simpy.Event:
        """An event that fires when `nbytes` have gone through."""
        done = self.env.event()
        if nbytes <= 0:
            done.succeed()
            return done
        self._advance()
        self._flows[self._next_id] = [float(nbytes), done]
        self._next_id += 1
        self.bytes_carried += nbytes
        self._reschedule()
        return done

    def _per_flow_Bps(self) -> float:
        k = len(self._flows)
        share = self.rate_Bps(k) / k
        return share if self.flow_cap_Bps is None else min(share, self.flow_cap_Bps)

    def _advance(self) -> None:
        elapsed = self.env.now - self._updated_at
        self._updated_at = self.env.now
        if elapsed > 0 and self._flows:
            moved = elapsed * self._per_flow_Bps()
            for flow in self._flows.values():
                flow[0] -= moved

    def _reschedule(self) -> None:
        self._version += 1
        if not self._flows:
            return
        version = self._version
        delay = max(min(f[0] for f in self._flows.values()), 0.0) / self._per_flow_Bps()
        wake = self.env.timeout(delay)
        wake.callbacks.append(lambda _event: self._wake(version))

    def _wake(self, version: int) -> None:
        if version != self._version:
            return  # a transfer started or ended since this wake-up was planned
        self._advance()
        done_bytes = self._per_flow_Bps() * _DONE_WITHIN_S
        for key in [k for k, f in self._flows.items() if f[0] <= done_bytes]:
            self._flows.pop(key)[1].succeed()
        self._reschedule()


class Link:
    """A full-duplex link: each direction is a SharedPipe at line rate; one-way delay is RTT/2.

    `stream_cap_Bps` caps each transfer at what one connection's host socket stack can move,
    whatever the line rate (calibrated on loopback TCP)."""

    def __init__(self, env: simpy.Environment, gbps: float, rtt_s: float, stream_cap_Bps: float | None = None) -> None:
        rate = gbps * 1e9 / 8
        self.up = SharedPipe(env, lambda k: rate, stream_cap_Bps)
        self.down = SharedPipe(env, lambda k: rate, stream_cap_Bps)
        self.rtt_s = rtt_s


class GpuMemory:
    """GPU memory accounting. `try_alloc` fails at once (an OOM); `alloc_wait` queues until it fits.

    Waiting requests are served in order of (priority, arrival), strictly: the first in that order
    blocks those behind it, so a large request is never starved. Work already holding memory (a
    running session's next request, priority 0) goes before starting a new process (priority 1),
    which could otherwise wait at the head for memory that only the work behind it would free.
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
        if nbytes > self.free_bytes or self._waiting:
            return False
        self._take(nbytes)
        return True

    def alloc_wait(self, nbytes: int, priority: int = 0) -> simpy.Event:
        """Fires once `nbytes` are allocated; a request larger than the GPU never fires."""
        granted = self.env.event()
        self._waiting.append((priority, self._seq, nbytes, granted))
        self._seq += 1
        self._waiting.sort(key=lambda w: (w[0], w[1]))
        self._grant()
        return granted

    def fits_ever(self, nbytes: int) -> bool:
        return nbytes <= self.capacity_bytes

    def free(self, nbytes: int) -> None:
        self.used_bytes -= nbytes
        assert self.used_bytes >= 0, "freed more GPU memory than was allocated"
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][2] <= self.free_bytes:
            _, _, nbytes, granted = self._waiting.pop(0)
            self._take(nbytes)
            granted.succeed()
