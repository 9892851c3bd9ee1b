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

import functools
import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import simpy

from . import guard

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

    A transfer may carry fixed times around its flow: `lead_s` then `before_s` before it joins
    (a connection's set-up, a sender's software, a copy's latency) and `after_s` after it leaves
    (propagation, the receiver's software); its event fires when all of them are over, at the
    instants separate timeouts would give. The common case costs one event: a transfer that finds
    the pipe idle (nothing in flight, nothing about to join) is computed in closed form, its event
    scheduled at once for when it would end alone; if another transfer comes before that, the
    first is put back into the pipe as if it had been there all along (its event moved to a new
    one), and the pipe shares as before: one wake-up per change, the finishing flows' processes
    resumed from it. Transfers started by processes that `fire_all` resumes together are held until
    all have been resumed; alike ones that then join an idle pipe at one instant are one such
    closed form as a group (`_group`), put back the same way.
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
        self._joining = 0  # transfers waiting out their fixed time before they join
        self._pending_join: tuple[float, list] | None = None  # the last join event planned: its instant, its flows
        # transfers computed in closed form, one after another (each ends before the next joins),
        # while they may still matter
        self._lone: deque[_Alone] = deque()
        self.closed_form = True  # False: every transfer steps through the pipe (what the closed form must equal)
        self._lone_rates: dict[FlowClass | None, float] = {}  # a flow's rate alone in the pipe, per class
        self._group_rates: dict[tuple, float] = {}  # (class, k) -> each flow's rate in a group of k alone
        self._queue = env._queue  # the environment's event queue (`_push_at` inlined pushes there)
        self._holds = _holds_of(env)
        self._held: list[tuple] = []  # transfers started while the environment's pipes are held (fire_all)
        self.bytes_carried = 0.0

    @property
    def in_flight(self) -> int:
        now = self.env.now
        lone = sum(len(alone.group or (None,)) for alone in self._lone if alone.join_at <= now < alone.end_at)
        return sum(len(c.heap) for c in self._classes.values()) + lone

    def transfer(self, nbytes: float, flow_class: FlowClass | None = None, *, lead_s: float = 0.0,
                 before_s: float = 0.0, after_s: float = 0.0) -> simpy.Event:
        """An event that fires when `nbytes` have gone through, as one flow of `flow_class`, joining
        after `lead_s` + `before_s` and firing `after_s` after it has gone through."""
        env = self.env
        done = simpy.Event(env)
        if nbytes <= 0:
            if lead_s > 0 or before_s > 0 or after_s > 0:
                raise ValueError("an empty transfer takes no fixed times")
            done.succeed()
            return done
        self.bytes_carried += nbytes
        join_at = now = env.now
        if lead_s > 0.0:  # float literals: a float-to-float compare is specialized (3.11), not one to an int
            join_at = join_at + lead_s  # as chained timeouts add them
        if before_s > 0.0:
            join_at = join_at + before_s
        if self._holds.active:
            if not self._held:
                self._holds.pipes.append(self)
            self._held.append((join_at, float(nbytes), flow_class, done, after_s))
            return done
        if self._lone and join_at <= now:  # one joining later puts them back then (_joined)
            self._put_back(now)
        self._start(now, join_at, float(nbytes), flow_class, done, after_s)
        return done

    def _started(self, now: float, join_at: float, nbytes: float, flow_class, done: simpy.Event,
                 after_s: float) -> None:
        """A held transfer starts, as `transfer` starts one."""
        if self._lone and join_at <= now:
            self._put_back(now)
        self._start(now, join_at, nbytes, flow_class, done, after_s)

    def _flush(self) -> None:
        """The transfers started while the pipes were held, as if each had started then: those that
        join this idle pipe at one instant, alike (the d2h copies or downlink sends of the sequences
        a batched decode iteration finishes), in closed form as one group; else one by one."""
        held, self._held = self._held, []
        now = self.env.now
        if len(held) > 1 and not self._group(now, held):
            for transfer in held:
                self._started(now, *transfer)
        elif len(held) == 1:
            self._started(now, *held[0])

    def _group(self, now: float, held: list[tuple]) -> bool:
        """`held` in closed form as one group, when they join this idle pipe together, alike: their
        instants as the pipe computes them step by step (the first alone, the others joining it at
        their instant, all ending at one wake-up). False when that does not apply."""
        join_at, nbytes, flow_class, _, after_s = held[0]
        lone = self._lone
        if (not self.closed_form or join_at <= now or self._classes or self._joining
                or (lone and not lone[-1][1] < join_at)):
            return False
        dones = []
        for other in held:
            if other[0] != join_at or other[1] != nbytes or other[2] is not flow_class or other[4] != after_s:
                return False
            dones.append(other[3])
        k = len(held)
        rate = self._group_rates.get((flow_class, k))
        if rate is None:
            rate = self._group_rate(flow_class, k)
        end_at = join_at + nbytes / rate  # the wake-up _reschedule plans at the join
        if not nbytes <= (end_at - join_at) * rate + rate * _DONE_WITHIN_S:
            return False
        while lone and lone[0][1] <= now:
            lone.popleft()
        # its flows end together; a fixed time after the pipe (a downlink's propagation and
        # deserialization) brings them to one instant, as a lone transfer's (`_start`): one event
        # there fires them all, in order, where the step-by-step pipe scheduled one each there
        done_at = end_at + after_s if after_s > 0.0 else end_at
        ended = simpy.Event(self.env)
        ended.callbacks.append(lambda _event: fire_all(self.env, dones))
        lone.append(_new_alone((join_at, end_at, done_at, nbytes, flow_class, ended, after_s, rate, dones)))
        ended._ok = True  # schedule_at, inlined
        ended._value = None
        if not 0.0 <= done_at - now < _INF:
            guard.check_delay(done_at - now)
        _heappush(self._queue, (done_at, _NORMAL, next(self.env._eid), ended))
        return True

    def _start(self, now: float, join_at: float, nbytes: float, flow_class, done: simpy.Event, after_s: float) -> None:
        lone = self._lone
        if self.closed_form and not self._classes and not self._joining and (not lone or lone[-1][1] < join_at):
            # A lone transfer's instants, as the pipe would compute them step by step (unless its
            # wake-up would not find it done, which float round-off allows on very long runs).
            rate = self._lone_rates.get(flow_class)
            if rate is None:
                rate = self._lone_rate(flow_class)
            end_at = join_at + nbytes / rate
            if nbytes <= (end_at - join_at) * rate + rate * _DONE_WITHIN_S:
                done_at = end_at + after_s if after_s > 0.0 else end_at
                while lone and lone[0][1] <= now:
                    lone.popleft()
                lone.append(_new_alone((join_at, end_at, done_at, nbytes, flow_class, done, after_s, rate, None)))
                done._ok = True  # schedule_at, inlined: most transfers come here
                done._value = None
                if not 0.0 <= done_at - now < _INF:
                    guard.check_delay(done_at - now)
                _heappush(self._queue, (done_at, _NORMAL, next(self.env._eid), done))
                return
        if join_at > now:
            self._join_at(join_at, (nbytes, flow_class, done, after_s))
            return
        self._join(nbytes, flow_class, done, after_s)

    def _join_at(self, join_at: float, flow: tuple) -> None:
        """`flow` (nbytes, class, event, after_s) joins at the instant `join_at`: with the flows of
        the last join event planned, when that is for the same instant (the d2h copies of the
        sequences a batched decode iteration finishes together start together), else by a join
        event of its own. One event and one wake-up for them all, where each used to have both:
        they join in the same order, and the pipe's state after them is the same."""
        self._joining += 1
        pending = self._pending_join
        if pending is not None and pending[0] == join_at:
            pending[1].append(flow)
            return
        flows = [flow]
        self._pending_join = (join_at, flows)
        joined = self.env.event()
        joined.callbacks.append(lambda _event: self._joined(flows))
        schedule_at(self.env, joined, join_at)

    def _joined(self, batch: list[tuple]) -> None:
        if self._pending_join is not None and self._pending_join[1] is batch:
            self._pending_join = None
        self._joining -= len(batch)
        now = self.env.now
        if self._lone:
            self._put_back(now)
        if len(batch) == 1:
            self._start(now, now, *batch[0])
            return
        # several: the first finds the others still to join, so none is alone (no closed form)
        self._advance()
        for nbytes, flow_class, done, after_s in batch:
            flows = self._class_flows(flow_class)
            heapq.heappush(flows.heap, (flows.served + nbytes, self._seq, done, after_s))
            self._seq += 1
        self._allocate()
        self._reschedule()

    def _class_flows(self, flow_class) -> _ClassFlows:
        flows = self._classes.get(flow_class)
        if flows is None:
            flows = self._default if flow_class is None else _ClassFlows(
                lambda k, rate=flow_class.rate_Bps: rate(k) / k)
            self._classes[flow_class] = flows
        return flows

    def _join(self, nbytes: float, flow_class, done: simpy.Event, after_s: float) -> None:
        self._advance()
        flows = self._class_flows(flow_class)
        heapq.heappush(flows.heap, (flows.served + nbytes, self._seq, done, after_s))
        self._seq += 1
        self._allocate()
        self._reschedule()

    def _group_rate(self, flow_class, k: int) -> float:
        """Each flow's rate in a group of `k` of `flow_class` alone in the pipe, as `_allocate` gives
        it with one class (memoized per class and size: `_group` reads the memo first)."""
        cap_of = self._default.cap_of if flow_class is None else (lambda k, rate=flow_class.rate_Bps: rate(k) / k)
        rate = min(cap_of(k), self.rate_Bps(k) / k)
        if len(self._group_rates) >= 256:  # some classes live for one transfer (FluidTimeSliced's)
            self._group_rates.clear()
        self._group_rates[(flow_class, k)] = rate
        return rate

    def _lone_rate(self, flow_class) -> float:
        """A flow's rate alone in the pipe (memoized per class: `_start` reads the memo first)."""
        cap = self.flow_cap_Bps if flow_class is None else flow_class.rate_Bps(1)
        rate = min(math.inf if cap is None else cap, self.rate_Bps(1) / 1)
        if len(self._lone_rates) >= 64:  # some classes live for one transfer (FluidTimeSliced's)
            self._lone_rates.clear()
        self._lone_rates[flow_class] = rate
        return rate

    def _put_back(self, now: float) -> None:
        """Another transfer joins while transfers computed in closed form may still be in the pipe:
        one in flight is a flow since it joined; those still to join join at their instant (their
        events moved to new ones: the scheduled ones fire empty); those gone, nothing."""
        lone = self._lone
        while lone:
            alone = lone.popleft()
            if now >= alone.end_at:
                continue
            if alone.group is not None:
                self._put_back_group(now, alone)
                continue
            moved = self.env.event()
            moved.callbacks, alone.done.callbacks = alone.done.callbacks, []
            if now < alone.join_at:
                self._join_at(alone.join_at, (alone.nbytes, alone.flow_class, moved, alone.after_s))
                continue
            flows = self._class_flows(alone.flow_class)
            heapq.heappush(flows.heap, (flows.served + alone.nbytes, self._seq, moved, alone.after_s))
            self._seq += 1
            flows.rate = alone.rate
            self._updated_at = alone.join_at

    def _put_back_group(self, now: float, alone: "_Alone") -> None:
        """`_put_back` of a group: its flows as the step-by-step pipe holds them now (the first, alone
        until the others joined, and them; or all still to join), its own event firing empty."""
        alone.done.callbacks = []
        if now < alone.join_at:
            for done in alone.group:
                self._join_at(alone.join_at, (alone.nbytes, alone.flow_class, done, alone.after_s))
            return
        flows = self._class_flows(alone.flow_class)
        for done in alone.group:
            heapq.heappush(flows.heap, (flows.served + alone.nbytes, self._seq, done, alone.after_s))
            self._seq += 1
        flows.rate = alone.rate
        self._updated_at = alone.join_at

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
        self._allocate()
        self._reschedule()
        if finished and not any(after_s > 0 for _, _, after_s in finished):
            fire_all(self.env, [done for _, done, _ in finished])
            return
        for _, done, after_s in finished:
            if after_s > 0:
                done._ok = True
                done._value = None
                self.env.schedule(done, simpy.core.NORMAL, after_s)
            else:
                fire_now(done)


class _Alone(NamedTuple):
    """A transfer that found the pipe idle: its instants in closed form. A tuple: one is made for
    most transfers, by `_new_alone` without the named constructor's Python frame, and the hot paths
    read its `end_at` as `[1]`."""

    join_at: float
    end_at: float
    done_at: float
    nbytes: float
    flow_class: object
    done: simpy.Event
    after_s: float
    rate: float
    group: list | None = None  # a group's flows' events (done is then the group's own)


_new_alone = functools.partial(tuple.__new__, _Alone)  # _Alone from the tuple of all its fields


class _Holds:
    """An environment's pipes held while `fire_all` resumes several processes: what they start is
    started when all have been resumed, pipe by pipe (the pipes in the order they were first used)."""

    __slots__ = ("active", "pipes")

    def __init__(self) -> None:
        self.active = False
        self.pipes: list[SharedPipe] = []


def _holds_of(env: simpy.Environment) -> _Holds:
    holds = env.__dict__.get("_pipe_holds")
    if holds is None:
        holds = env._pipe_holds = _Holds()
    return holds


def fire_all(env: simpy.Environment, events: list[simpy.Event]) -> None:
    """`fire_now` each of `events` in turn, with the transfers the resumed processes start held until
    all have been resumed (then each pipe takes its own in their order: transfers that join an idle
    pipe together, alike, cost one event as a group)."""
    holds = env.__dict__.get("_pipe_holds")  # _holds_of, inlined
    if holds is None:
        holds = _holds_of(env)
    if holds.active:  # within another fire_all: its flush takes these too
        for event in events:
            fire_now(event)
        return
    holds.active = True
    try:
        for event in events:  # fire_now, inlined
            event._ok = True
            event._value = None
            callbacks, event.callbacks = event.callbacks, None
            for callback in callbacks:
                callback(event)
    finally:
        holds.active = False
    pipes, holds.pipes = holds.pipes, []
    for pipe in pipes:
        pipe._flush()


def schedule_at(env: simpy.Environment, event: simpy.Event, at: float) -> None:
    """Trigger `event` and schedule it at the instant `at` exactly, as chained timeouts reach it: a
    delay added to the clock cannot reach every instant to the bit (SimPy computes now + delay)."""
    event._ok = True
    event._value = None
    _push_at(env, event, at)


def _push_at(env: simpy.Environment, event: simpy.Event, at: float) -> None:
    """`event` into the environment's queue at `at`, as `env.schedule` puts it at now + delay (the
    next id: world.CountingEnvironment counts the events by their ids), the step guarded as there."""
    if not 0.0 <= at - env.now < _INF:
        guard.check_delay(at - env.now)
    _heappush(env._queue, (at, _NORMAL, next(env._eid), event))


_NORMAL = simpy.core.NORMAL
_INF = math.inf
_heappush = heapq.heappush


class Recurring:
    """`callback(event)` after a delay, again and again, one call at a time (the batching
    scheduler's next iteration), where `env.timeout(delay_s).callbacks.append(callback)` would run
    it (the same place in the queue, the same checks), without a Timeout, nor an object and a bound
    method per call: nothing waits for it. It has what the event loop needs of a succeeded event
    (`_ok`, `_value`, `callbacks`); the loop takes its callbacks when it fires (None until the next
    `after`), so it is never in the queue twice."""

    __slots__ = ("callbacks", "_once")
    _ok = True
    _value = None

    def __init__(self, callback: Callable[[object], None]) -> None:
        self._once = (callback,)  # the event loop only iterates over callbacks
        self.callbacks = None

    def after(self, env: simpy.Environment, delay_s: float) -> None:
        if not 0.0 <= delay_s < _INF:
            if delay_s < 0:
                raise ValueError(f"Negative delay {delay_s}")  # as SimPy's Timeout
            guard.check_delay(delay_s)  # NaN or infinite: as world.CountingEnvironment.schedule
        self.callbacks = self._once
        _heappush(env._queue, (env.now + delay_s, _NORMAL, next(env._eid), self))  # env.schedule, inlined


def fire_now(done: simpy.Event) -> None:
    """Trigger and process `done` within the event under way (a pipe's wake-up that found its flow
    finished, a batching iteration that finished a sequence): the waiting process resumes now
    instead of from an event of its own scheduled behind it (one event fewer). The caller's state
    is already updated, so a process that starts more work at once sees it as it is."""
    done._ok = True
    done._value = None
    callbacks, done.callbacks = done.callbacks, None
    for callback in callbacks:
        callback(done)


def in_turn(env: simpy.Environment, steps: list[Callable[[], simpy.Event]]) -> simpy.Event:
    """An event that fires when each of `steps` (functions that start something and return its
    event) has fired, each started when the one before it fired: the waiting process resumes
    within the last one's event, as after the same events yielded one after another."""
    done = env.event()
    remaining = iter(steps)

    def next_step(_event=None) -> None:
        step = next(remaining, None)
        if step is None:
            fire_now(done)
            return
        event = step()
        if event.callbacks is None:  # processed already
            next_step()
        else:
            event.callbacks.append(next_step)

    next_step()
    return done
