"""A GPU's PCIe link: one full-duplex resource shared by request copies, weight loads and KV swaps.

Each direction (h2d, d2h) is one SharedPipe at the profile's pinned bandwidth in that direction:
the most the bus moved from page-locked host memory (one copy, or a whole KV swap of queued
copies), the closest measured figure to what the link itself carries. Every transfer crossing the bus is a flow of that pipe,
and its class says what else holds it back (max-min fair shares, see pipe.py):

- pinned copies (a KV swap to or from the pinned host pool): nothing but the bus;
- pageable copies (a request's tensors, staged by the driver through a bounce buffer; KV swaps
  when the host pool is not pinned): the profile's pageable rate (for a swap, the kv_swaps stage's,
  freshly allocated host memory included; a swap-out, per tensor at the warm or fresh-page regime
  of its size where the copies stage saw two, or, when no other session's KV is on the host, the
  stage's timing of validate.kv_costs's own loop where the profile has it:
  ProfileCostModel.kv_swap_bandwidth), shared by the pageable copies in flight. Sharing, not a rate per copy: the measured aggregate of concurrent loads from pageable
  memory stays flat with k (7.3, 6.5, 7.1 GB/s at k = 1, 2, 4 on the H100);
- weight loads from a tier (disk cache, pageable, pinned host memory): the measured aggregate of k
  concurrent loads from that tier, `load_aggregate_gbps(tier, k)`, split among them.

So two equal copies at once each take twice as long; a load and a swap-in at once split the bus
when both could use more than half of it, and a load slower than half the bus (from disk) takes
its own rate while the swap takes the rest. A copy's fixed latency (the profile's `latency_s`) is
paid before it joins the pipe and does not hold the bus: once per buffer for synchronous copies
(a pageable KV swap moves one K and one V tensor per layer, each on its own), once for a pinned
swap, whose non_blocking copies queue on one stream (CostModel.kv_swap_bandwidth).
"""

from __future__ import annotations

import functools
from typing import Literal

import simpy

from ..costmodel import CostModel
from .pipe import FlowClass, SharedPipe

Direction = Literal["h2d", "d2h"]


class Pcie:
    """One GPU's PCIe link: `h2d` and `d2h` pipes; `copy` and `swap` return the event to wait for,
    `load` is a process to `yield from`."""

    def __init__(self, env: simpy.Environment, cost: CostModel) -> None:
        self.env = env
        self.cost = cost
        self.pipes = {d: SharedPipe(env, lambda k, rate=self.bus_gbps(cost, d) * 1e9: rate) for d in ("h2d", "d2h")}
        self._classes: dict[tuple, FlowClass] = {}
        self._moves: dict[tuple, tuple[float, FlowClass]] = {}  # (kind, direction, bytes, pinned[, pieces]) -> latency, class
        self._loads: dict[str, tuple[float, FlowClass]] = {}  # tier -> fixed time, class

    @staticmethod
    def bus_gbps(cost: CostModel, direction: Direction) -> float:
        """What the bus carries one way: the fastest pinned transfer measured that way (a single
        pinned copy, or a whole pinned KV swap, whose queued copies can run a little faster)."""
        return max(cost.copy_bandwidth(direction, True).gbps, cost.kv_swap_bandwidth(direction, True)[0].gbps)

    @property
    def h2d(self) -> SharedPipe:
        return self.pipes["h2d"]

    @property
    def d2h(self) -> SharedPipe:
        return self.pipes["d2h"]

    def _class(self, key: tuple, rate_Bps) -> FlowClass:
        flow_class = self._classes.get(key)
        if flow_class is None:
            flow_class = self._classes[key] = FlowClass(":".join(map(str, key)), rate_Bps)
        return flow_class

    def copy(self, direction: Direction, nbytes: float, pinned: bool, pieces: int = 1) -> simpy.Event:
        """An event that fires when a host<->device copy of `nbytes` (> 0) from pinned or pageable
        host memory is done, copied as `pieces` equal buffers one after another (Bandwidth.time_s:
        latency per buffer, rate by its size)."""
        pipe, latency_s, flow_class = self.copy_plan(direction, nbytes, pinned, pieces)
        return pipe.transfer(nbytes, flow_class, before_s=latency_s)

    def copy_plan(self, direction: Direction, nbytes: float, pinned: bool,
                  pieces: int = 1) -> tuple[SharedPipe, float, FlowClass]:
        """How `copy` moves `nbytes`: (its pipe, its fixed latency before it joins, its flow class)."""
        plan = self._moves.get(("copy", direction, nbytes, pinned, pieces))
        if plan is None:
            plan = self._plan_move(("copy", direction, nbytes, pinned, pieces), direction, nbytes, pinned,
                                   self.cost.copy_bandwidth(direction, pinned), pieces)
        return self.pipes[direction], plan[0], plan[1]

    def swap(self, direction: Direction, nbytes: float, pinned: bool, lone: bool = False) -> simpy.Event:
        """An event that fires when a session's KV cache of `nbytes` (> 0) is swapped out (d2h) or
        restored (h2d): `cost.kv_swap_bandwidth`, the measured swap of the whole set where the
        profile has it (pinned copies queue and pay their latency once; pageable ones pay it per K
        and V tensor); `lone`: no other session's KV is held in host memory (a pageable swap-out's
        host pages then depend on what the process did since its last set was freed)."""
        key = ("swap", direction, nbytes, pinned, lone)
        plan = self._moves.get(key)
        if plan is None:
            bandwidth, pieces = self.cost.kv_swap_bandwidth(direction, pinned, lone)
            plan = self._plan_move(key, direction, nbytes, pinned, bandwidth, pieces)
        return self.pipes[direction].transfer(nbytes, plan[1], before_s=plan[0])

    def _plan_move(self, key: tuple, direction: Direction, nbytes: float, pinned: bool, bandwidth,
                   pieces: int) -> tuple[float, FlowClass]:
        """A copy's fixed latency (paid before it joins the pipe) and flow class, memoized per `key`."""
        pieces = max(int(pieces), 1)
        rate_Bps = bandwidth.rate_gbps(nbytes / pieces) * 1e9
        flow_class = self._class(("copy", direction, pinned, rate_Bps), lambda k, r=rate_Bps: r)
        plan = self._moves[key] = (pieces * bandwidth.latency_s, flow_class)
        return plan

    def load(self, tier: str, nbytes: float):
        """A whole-model load from `tier`: its fixed overhead, then its bytes over h2d."""
        plan = self._loads.get(tier)
        if plan is None:
            cost = self.cost
            flow_class = self._class(("load", tier),
                                     functools.cache(lambda k: cost.load_aggregate_gbps(tier, k) * 1e9))
            plan = self._loads[tier] = (cost.weight_load(tier).fixed_s, flow_class)
        fixed_s, flow_class = plan
        if nbytes <= 0:
            if fixed_s > 0:
                yield self.env.timeout(fixed_s)
            return
        yield self.h2d.transfer(nbytes, flow_class, before_s=fixed_s)
