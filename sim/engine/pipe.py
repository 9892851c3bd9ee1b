"""A bandwidth shared by concurrent transfers (processor sharing)."""

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
