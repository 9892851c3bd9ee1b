"""A bandwidth shared by concurrent transfers (processor sharing), with optional classes of flows.

Each transfer is a flow of bytes. With k flows in flight the pipe moves `rate_Bps(k)` in total;
a flow may also be held below its equal share by a cap of its own (a per-connection socket stack,
a host-side staging copy, a disk read). The shares are max-min fair (water-filling): flows whose
cap lies below the equal share get their cap, the rest split what is left equally.

A `FlowClass` names flows that share one cap: `rate_Bps(k)` is the most k flows of that class move
together, split equally between them (a constant per-flow cap c is `lambda k: k * c`; weight loads
from one tier, whose measured aggregate flattens with k, are another). All flows of a class move at
one rate at any moment, so each class keeps a virtual clock (bytes served per flow so far) and a
heap of its flows' finishing marks: a start or an end costs O(log k + classes).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable

import simpy

_DONE_WITHIN_S = 1e-9  # a flow less than this from done is done (float round-off on GB-sized flows)


@dataclass(frozen=True, eq=False)
class FlowClass:
    """Flows that share one cap: `rate_Bps(k)` is the most k flows of the class move together."""

    name: str
    rate_Bps: Callable[[int], float]


@dataclass(eq=False)
class _ClassFlows:
    cap_of: Callable[[int], float]  # k -> per-flow cap of this class with k flows in flight
    served: float = 0.0  # bytes each flow of the class has moved since the class last emptied
    rate: float = 0.0  # current rate of every flow of the class, bytes/s
    heap: list = field(default_factory=list)  # (finishing mark, seq, done event)


class SharedPipe:
    """A bandwidth split among the transfers in flight (processor sharing).

    `rate_Bps(k)` is the total rate with k transfers in flight, so contention that lowers the
    aggregate is data, not code. `flow_cap_Bps` caps every transfer that names no class;
    `transfer(nbytes, flow_class)` puts a transfer under its class's cap instead.
    """

    def __init__(self, env: simpy.Environment, rate_Bps: Callable[[int], float],
                 flow_cap_Bps: float | None = None) -> None:
        self.env = env
        self.rate_Bps = rate_Bps
        self.flow_cap_Bps = flow_cap_Bps
        default_cap = math.inf if flow_cap_Bps is None else flow_cap_Bps
        self._default = _ClassFlows(lambda k: default_cap)
        self._classes: dict[FlowClass | None, _ClassFlows] = {}
        self._seq = 0
        self._updated_at = env.now
        self._version = 0
        self.bytes_carried = 0.0

    @property
    def in_flight(self) -> int:
        return sum(len(c.heap) for c in self._classes.values())

    def transfer(self, nbytes: float, flow_class: FlowClass | None = None) -> simpy.Event:
        """An event that fires when `nbytes` have gone through, as one flow of `flow_class`."""
        done = self.env.event()
        if nbytes <= 0:
            done.succeed()
            return done
        self._advance()
        flows = self._classes.get(flow_class)
        if flows is None:
            flows = self._default if flow_class is None else _ClassFlows(
                lambda k, rate=flow_class.rate_Bps: rate(k) / k)
            self._classes[flow_class] = flows
        heapq.heappush(flows.heap, (flows.served + float(nbytes), self._seq, done))
        self._seq += 1
        self.bytes_carried += nbytes
        self._allocate()
        self._reschedule()
        return done

    def _allocate(self) -> None:
        """Max-min fair rates: classes in order of their per-flow cap, each taking its cap or an
        equal share of what the classes before it left."""
        if len(self._classes) == 1:  # the same arithmetic, without the sort
            for flows in self._classes.values():
                k = len(flows.heap)
                flows.rate = min(flows.cap_of(k), self.rate_Bps(k) / k)
            return
        active = [(c.cap_of(len(c.heap)), i, c) for i, c in enumerate(self._classes.values())]
        left_flows = sum(len(c.heap) for _, _, c in active)
        left_Bps = self.rate_Bps(left_flows) if left_flows else 0.0
        for cap, _, flows in sorted(active, key=lambda a: (a[0], a[1])):
            share = left_Bps / left_flows
            flows.rate = min(cap, share)
            left_Bps -= flows.rate * len(flows.heap)
            left_flows -= len(flows.heap)

    def _advance(self) -> None:
        elapsed = self.env.now - self._updated_at
        self._updated_at = self.env.now
        if elapsed > 0:
            for flows in self._classes.values():
                flows.served += elapsed * flows.rate

    def _reschedule(self) -> None:
        self._version += 1
        if not self._classes:
            return
        delay = min(max(c.heap[0][0] - c.served, 0.0) / c.rate for c in self._classes.values())
        version = self._version
        wake = self.env.timeout(delay)
        wake.callbacks.append(lambda _event: self._wake(version))

    def _wake(self, version: int) -> None:
        if version != self._version:
            return  # a transfer started or ended since this wake-up was planned
        self._advance()
        finished = []
        for key, flows in list(self._classes.items()):
            done_mark = flows.served + flows.rate * _DONE_WITHIN_S
            while flows.heap and flows.heap[0][0] <= done_mark:
                finished.append(heapq.heappop(flows.heap)[1:])
            if not flows.heap:
                del self._classes[key]  # its virtual clock restarts from 0 with its next flow
                flows.served = 0.0
        if len(finished) > 1:
            finished.sort(key=lambda f: f[0])
        for _, done in finished:
            done.succeed()
        self._allocate()
        self._reschedule()
