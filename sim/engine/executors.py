"""The GPU executor's scheduling policies, in a registry keyed by their YAML tag.

A unit of GPU work is a list of forward passes: ("prefill", tokens, cached_context) or
("decode", cached_context), run for `batch` sequences. Pass durations come from the cost model
times a jitter factor drawn from the calibrated step-time distribution.
"""

from __future__ import annotations

import functools
import heapq
from collections import deque
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, NamedTuple

import numpy as np
import simpy

from ..costmodel import CostModel
from .pipe import FlowClass, Recurring, SharedPipe, fire_all

Pass = tuple  # ("prefill", tokens, context) | ("decode", context)


@dataclass(slots=True)
class GpuWork:
    passes: list[Pass]
    batch: int = 1
    process: object = "server"  # the GPU process that runs it: its attention-shape cache is its own


class Execution(NamedTuple):
    """What a unit of work's execution took (what `execute` returns). A tuple: one is made per
    request, by `_new_execution` on the batching path, without the named constructor's Python frame."""

    queued_s: float
    compute_s: float
    started_at: float
    gpu_busy_s: float  # the part of compute_s the GPU ran kernels (its share of a batched step)


_new_execution = functools.partial(tuple.__new__, Execution)  # Execution from the tuple of its fields


class PassTimer:
    """Pass durations with jitter. Base costs are memoized; jitter factors are drawn in blocks
    from the point's own generator (the order of draws, hence the result, is deterministic)."""

    block = 4096

    def __init__(self, cost: CostModel, rng: np.random.Generator, cold_shapes: bool = False,
                 seen: dict[object, set[tuple]] | None = None) -> None:
        self.cost = cost
        self.rng = rng
        self.cold_shapes = cold_shapes
        self._memo: dict[tuple, float] = {}
        self._factors: dict[str, np.ndarray] = {"prefill": np.empty(0), "decode": np.empty(0)}
        self._used = {"prefill": 0, "decode": 0}  # factors of each block taken so far
        self._values: dict[str, list[float]] = {"prefill": [], "decode": []}  # each block as Python floats
        self._work_memo: dict[int, tuple] = {}  # id(passes), batch -> (passes, batch, runs, base, launch)
        self._seen = seen if seen is not None else {}  # process -> attention shapes it has run
        self.gpu_fraction = cost.gpu_busy_fraction()

    @staticmethod
    def shape(p: Pass, batch: int) -> tuple:
        """The attention shape of a pass: (batch, query length, key length)."""
        if p[0] == "prefill":
            return (batch, p[1], p[2] + p[1])
        return (batch, 1, p[1] + 1)

    def cold_s(self, p: Pass, batch: int, process: object) -> float:
        """The first-run cost of the pass's shape in `process` (then remembered as run), else 0."""
        if not self.cold_shapes:
            return 0.0
        seen = self._seen.setdefault(process, set())
        key = self.shape(p, batch)
        if key in seen:
            return 0.0
        seen.add(key)
        return self.cost.cold_shape_s(p[0], batch * p[1] if p[0] == "prefill" else batch)

    def base_s(self, p: Pass, batch: int) -> float:
        key = (p, batch)
        value = self._memo.get(key)
        if value is None:
            if p[0] == "prefill":
                value = self.cost.prefill_s(p[1], batch, p[2])
            else:
                value = self.cost.decode_step_s(batch, batch * p[1])
            self._memo[key] = value
        return value

    def factor(self, kind: str) -> float:
        """The next jitter factor of `kind` (as `factors(kind, 1)`, without an array per pass)."""
        used = self._used[kind]
        values = self._values[kind]
        if used == len(values):
            return float(self.factors(kind, 1)[0])
        self._used[kind] = used + 1
        return values[used]

    def factors(self, kind: str, count: int) -> np.ndarray:
        """The next `count` jitter factors of `kind`, in the order passes use them: a new block is
        drawn when the last one runs out, as `count` draws of one factor would."""
        taken = []
        while count:
            pool, used = self._factors[kind], self._used[kind]
            if used == len(pool):
                pool, used = self._factors[kind], self._used[kind] = self.cost.jitter(self.rng, kind, self.block), 0
                self._values[kind] = np.asarray(pool, dtype=float).tolist()
            step = min(count, len(pool) - used)
            taken.append(pool[used:used + step])
            self._used[kind] = used + step
            count -= step
        return taken[0] if len(taken) == 1 else np.concatenate(taken)

    def totals_s(self, work: GpuWork) -> tuple[float, float]:
        """(duration, GPU kernel time) of the work's passes, summed in pass order: what the
        per-pass `costs_s` and `host_s` add up to, without a Python step per pass (no new shapes:
        with cold shapes every pass goes through `costs_s`)."""
        if self.cold_shapes:
            costs = self.costs_s(work)
            return (sum(d for d, _ in costs),
                    sum(d - self.host_s(p, work.batch, d, cold) for p, (d, cold) in zip(work.passes, costs)))
        if not work.passes:
            return 0.0, 0.0
        _, _, runs, base, gpu, fallback = self._work_plan(work)
        if len(runs) == 1:
            factors = self.factors(runs[0][0], runs[0][1])
        else:
            factors = np.concatenate([self.factors(kind, count) for kind, count in runs])
        durations = base * factors
        # host time as host_s says: a pass less its GPU seconds where the cost model gives them;
        # else f of a decode pass, or a decode step's launches for a prefill (at most all of it)
        host = np.maximum(durations - gpu, 0.0)
        if fallback is not None:
            given, prefill, launch = fallback
            host = np.where(given, host, np.where(prefill, np.minimum(launch, durations),
                                                  (1.0 - self.gpu_fraction) * durations))
        busy = durations - host
        # cumsum adds left to right, as sum() over the passes does (same float rounding)
        return float(np.cumsum(durations)[-1]), float(np.cumsum(busy)[-1])

    def _work_plan(self, work: GpuWork) -> tuple:
        """Per (passes, batch), memoized: runs of consecutive passes of one kind (the order factors
        are drawn in), the base durations, each pass's GPU seconds (0 where the cost model gives
        none), and for those (None: every pass has them) masks of the passes that have them and of
        the prefills, and each such prefill's launch time (host_s's fallbacks)."""
        passes, batch = work.passes, work.batch
        plan = self._work_memo.get(id(passes))
        if plan is not None and plan[0] is passes and plan[1] == batch:
            return plan
        runs: list[list] = []
        for p in passes:
            if runs and runs[-1][0] == p[0]:
                runs[-1][1] += 1
            else:
                runs.append([p[0], 1])
        base = np.array([self.base_s(p, batch) for p in passes])
        gpu = [self._pass_gpu_s(p, batch) for p in passes]
        fallback = None
        if any(g is None for g in gpu):
            fallback = (np.array([g is not None for g in gpu]), np.array([p[0] == "prefill" for p in passes]),
                        np.array([self._launch_host_s(p[2] + p[1], batch) if p[0] == "prefill" and g is None else 0.0
                                  for p, g in zip(passes, gpu)]))
        gpu = np.array([0.0 if g is None else g for g in gpu])
        plan = (passes, batch, [tuple(r) for r in runs], base, gpu, fallback)
        self._work_memo[id(passes)] = plan  # holds `passes`, so its id is not reused meanwhile
        return plan

    def costs_s(self, work: GpuWork) -> list[tuple[float, float]]:
        """(duration, of which first-run host time of new shapes) per pass, in order."""
        out = []
        for p in work.passes:
            cold = self.cold_s(p, work.batch, work.process)
            out.append((self.base_s(p, work.batch) * self.factor(p[0]) + cold, cold))
        return out

    def host_s(self, p: Pass, batch: int, duration_s: float, cold_s: float = 0.0) -> float:
        """The host part of pass `p` taking `duration_s`, during which the GPU runs none of its
        kernels: a new shape's plan building (`cold_s`) plus the kernel launches, all of the pass
        but the GPU's time where the cost model gives it in seconds (`decode_gpu_s`, and for a
        prefill `prefill_gpu_s`, the GPU term of its max(floor, GPU work) fit: a slower
        launch-bound level lengthens the host part only; a short prompt is mostly host time, a
        long one mostly kernels). Where it does not: a share 1 - f of a decode pass, and for a
        prefill the launch time of a decode step over its batch and context (the same kernels)."""
        work_s = duration_s - cold_s
        gpu_s = self._pass_gpu_s(p, batch)
        if gpu_s is not None:
            return cold_s + max(work_s - gpu_s, 0.0)
        if p[0] == "decode":
            return cold_s + (1.0 - self.gpu_fraction) * work_s
        return cold_s + min(self._launch_host_s(p[2] + p[1], batch), work_s)

    def _pass_gpu_s(self, p: Pass, batch: int) -> float | None:
        """The cost model's GPU seconds of pass `p` (None: it gives none)."""
        if p[0] == "decode":
            return self._gpu_step_s(p[1], batch)
        key = ("prefill_gpu", p, batch)
        if key not in self._memo:
            self._memo[key] = self.cost.prefill_gpu_s(p[1], batch, p[2])
        return self._memo[key]

    def _gpu_step_s(self, context: int, batch: int) -> float | None:
        """The cost model's GPU seconds of a decode pass at `context` (None: it gives none)."""
        key = ("gpu", context, batch)
        if key not in self._memo:
            self._memo[key] = self.cost.decode_gpu_s(batch, batch * context)
        return self._memo[key]

    def _launch_host_s(self, context: int, batch: int) -> float:
        """The host part of a decode step at `context`: a prefill there launches as much (where the
        cost model gives no prefill_gpu_s)."""
        step_s = self._launch_step_s(context, batch)
        gpu_s = self._gpu_step_s(context, batch)
        return (1.0 - self.gpu_fraction) * step_s if gpu_s is None else max(step_s - gpu_s, 0.0)

    def _launch_step_s(self, context: int, batch: int) -> float:
        """A decode step's time at `context`, as an estimate of a prefill's launches: a bound, not a
        query, so never reported as outside the calibrated range (as the prefill floor in costmodel)."""
        key = ("launch", context, batch)
        value = self._memo.get(key)
        if value is None:
            flagged = set(self.cost.out_of_range)
            value = self._memo[key] = self.cost.decode_step_s(batch, batch * context)
            self.cost.out_of_range.intersection_update(flagged)
        return value

    def durations_s(self, work: GpuWork) -> list[float]:
        return [duration for duration, _ in self.costs_s(work)]


class SerialFCFS:
    """One request at a time, in arrival order, each to completion (how Djinn's server runs)."""

    def __init__(self, env: simpy.Environment, timer: PassTimer) -> None:
        self.env = env
        self.timer = timer
        self.gpu = simpy.Resource(env, capacity=1)

    def execute(self, work: GpuWork):
        arrived_at = self.env.now
        with self.gpu.request() as turn:
            yield turn
            started_at = self.env.now
            compute_s, busy_s = self.timer.totals_s(work)
            yield self.env.timeout(compute_s)
        return Execution(started_at - arrived_at, compute_s, started_at, busy_s)


class _Sharers:
    """The processes with work on a time-sliced GPU now: each new most at once is told to the cost
    model (`timeslice_processes`, which flags more than calibration measured)."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.active: dict[object, int] = {}  # process -> its units of work under way
        self.most = 0

    def enter(self, process: object) -> None:
        self.active[process] = self.active.get(process, 0) + 1
        if len(self.active) > self.most:
            self.most = len(self.active)
            self.cost.timeslice_processes(self.most)

    def leave(self, process: object) -> None:
        left = self.active[process] - 1
        if left:
            self.active[process] = left
        else:
            del self.active[process]


class TimeSliced:
    """Independent processes sharing the GPU, pass by pass (`time_sliced_per_pass`). A decode pass
    is host time (kernel launches, which processes run in parallel on their own CPU threads) then
    GPU time (which they take in turns): `PassTimer.host_s` says which part is the host's, for a
    prefill too. One GPU request per pass: exact, but its cost grows with every pass of every
    process; `FluidTimeSliced` is its fluid limit at a few events per request."""

    def __init__(self, env: simpy.Environment, timer: PassTimer) -> None:
        self.env = env
        self.timer = timer
        self.gpu = simpy.Resource(env, capacity=1)
        self.sharers = _Sharers(timer.cost)

    def execute(self, work: GpuWork):
        self.sharers.enter(work.process)
        costs = self.timer.costs_s(work)
        queued_s, started_at, busy_s = 0.0, None, 0.0
        for p, (duration, cold_s) in zip(work.passes, costs):
            host_s = self.timer.host_s(p, work.batch, duration, cold_s)
            busy_s += duration - host_s
            if started_at is None:
                started_at = self.env.now
            if host_s > 0:
                yield self.env.timeout(host_s)
            asked_at = self.env.now
            with self.gpu.request() as turn:
                yield turn
                queued_s += self.env.now - asked_at
                yield self.env.timeout(duration - host_s)
        self.sharers.leave(work.process)
        return Execution(queued_s, sum(d for d, _ in costs), started_at, busy_s)


class FluidTimeSliced:
    """Independent processes sharing the GPU as a fluid (`time_sliced`, the default): the per-pass
    model (`TimeSliced`) with its turns made infinitely fine.

    A unit of work needs G seconds of the GPU (its passes' kernel time: the cost model's
    `decode_gpu_s` per decode pass, absolute, or a share f of it) within D seconds of its own (its
    passes' durations; D - G is host time, launches and new shapes, which processes run in
    parallel). Alone it takes the GPU at the rate f = G / D and finishes in D, as pass by pass.
    With others, the GPU (rate 1) is split max-min fairly: each process takes at most its f, and
    those that want more than an equal share split what is left (a SharedPipe of GPU seconds).
    That is the per-pass model's steady state: k equal processes cycle in max(D, k G) instead
    of D. It differs within one round of turns: per pass, the first of k equal jobs finishes
    (k - 1) passes before the last; here they finish together (tests/test_closed_forms.py).
    One flow per unit of work: O(log k) per event in its class, classes sorted on each event.
    """

    def __init__(self, env: simpy.Environment, timer: PassTimer) -> None:
        self.env = env
        self.timer = timer
        self.gpu = SharedPipe(env, lambda k: 1.0)  # GPU seconds per second
        self.sharers = _Sharers(timer.cost)

    def execute(self, work: GpuWork):
        started_at = self.env.now
        compute_s, busy_s = self.timer.totals_s(work)
        self.sharers.enter(work.process)
        if busy_s > 0:
            share = busy_s / compute_s  # its rate alone: GPU seconds per second of its own
            yield self.gpu.transfer(busy_s, FlowClass("process", lambda k, share=share: k * share))
        elif compute_s > 0:
            yield self.env.timeout(compute_s)
        self.sharers.leave(work.process)
        queued_s = max(self.env.now - started_at - compute_s, 0.0)
        return Execution(queued_s, compute_s, started_at, busy_s)


@dataclass(slots=True)
class _Sequence:
    work: GpuWork
    arrived_at: float
    done: simpy.Event
    order: int  # arrival order: ties between sequences go to the earlier one
    segments: tuple = ()  # the work's passes as segments (ContinuousBatching._segments)
    started_at: float | None = None
    segment: int = 0  # the segment it runs next
    compute_s: float = 0.0
    gpu_busy_s: float = 0.0
    # in a decode segment: the decode clocks when it joined, and its context's share of the sum then
    joined_decode_s: float = 0.0
    joined_busy_s: float = 0.0
    context_weight: int = 0


_ORDER = attrgetter("order")  # a sequence's arrival order (a sort key without a Python frame per sequence)


class ContinuousBatching:
    """vLLM-style iteration-level batching: new sequences are prefilled, then all running ones decode
    together, one token per iteration, up to `max_batch` sequences. Such an engine brings its own
    attention kernels (paged, no per-shape plan), so no first-run cost of new shapes is charged.
    `max_prefills` (Djinn's cap on concurrent prefills) bounds the prompts one iteration prefills;
    the others wait for a later iteration, in arrival order.

    An iteration costs O(log running), not O(running): a work's passes are segments (one prefill,
    or a run of decode passes over consecutive contexts); a decoding sequence is touched only when
    its decode run ends (a heap on that iteration), the batch's summed context moves by the batch
    size per decode iteration, and a sequence's compute and kernel time in a run are differences of
    running sums of the decode iterations (the same figures up to float rounding)."""

    def __init__(self, env: simpy.Environment, timer: PassTimer, max_batch: int, max_prefills: int | None = None) -> None:
        self.env = env
        self.timer = timer
        self.max_batch = max_batch
        self.max_prefills = max_prefills
        self.waiting: deque[_Sequence] = deque()
        self.running = 0
        self._order = 0
        self._prefill: list[tuple[int, _Sequence]] = []  # (order, seq) whose next pass is a prefill
        self._decode_ends: list[tuple[int, int, _Sequence]] = []  # (decode iteration it ends at, order, seq)
        self._decoding_batch = 0  # sequences x batch decoding
        self._sum_context = 0  # their next passes' contexts, times batch
        self._decode_iterations = 0
        self._decode_s = 0.0  # running sums over decode iterations: duration, kernel time per sequence
        self._busy_s = 0.0
        self._segment_memo: dict[int, tuple] = {}
        self._busy = False  # an iteration, or the wake-up that starts one, is scheduled
        self._leaving: list[simpy.Event] = []  # the done events of those finished in this event, not yet fired
        self._prefilling: list[_Sequence] = []  # the sequences of the prefill iteration under way
        self._iteration: tuple = ()  # that iteration's pass, batch and duration
        self._decode_steps: dict[tuple[int, int], float] = {}  # (batch, sum of contexts) -> cost model's step
        # a prefill of one sequence (most prefill iterations), per (pass, batch): its step and base cost
        self._prefill_steps: dict[tuple, tuple[tuple, float]] = {}
        self._prefilled_call = Recurring(self._prefilled)  # the iteration under way's end
        self._decoded_call = Recurring(self._decoded)
        self._host_fraction = 1.0 - timer.gpu_fraction  # of a decode pass (PassTimer.host_s)

    def execute(self, work: GpuWork):
        memo = self._segment_memo.get(id(work.passes))  # _segments, its memo read inline
        segments = memo[1] if memo is not None and memo[0] is work.passes else self._segments(work.passes)
        seq = _Sequence(work, self.env.now, self.env.event(), self._order, segments)
        self._order += 1
        self.waiting.append(seq)
        if not self._busy:  # idle: an event now starts the next iteration (after what else happens now)
            self._busy = True
            wakeup = self.env.event()
            wakeup.callbacks.append(self._woken)
            wakeup.succeed()
        yield seq.done
        # Time stalled behind other sequences' prefills counts as waiting, like time before admission.
        return _new_execution((max(self.env.now - seq.arrived_at - seq.compute_s, 0.0), seq.compute_s,
                               seq.started_at, seq.gpu_busy_s))

    def _segments(self, passes) -> tuple:
        """("prefill", pass) or ("decode", first context, passes) per segment, memoized per plan."""
        memo = self._segment_memo.get(id(passes))
        if memo is not None and memo[0] is passes:
            return memo[1]
        segments: list = []
        for p in passes:
            last = segments[-1] if segments else None
            if p[0] == "decode" and last is not None and last[0] == "decode" and last[1] + last[2] == p[1]:
                segments[-1] = ("decode", last[1], last[2] + 1)
            elif p[0] == "decode":
                segments.append(("decode", p[1], 1))
            else:
                segments.append(("prefill", p))
        self._segment_memo[id(passes)] = (passes, tuple(segments))  # holds `passes`: its id stays its own
        return tuple(segments)

    def _next(self, seq: _Sequence, finished: list[_Sequence]) -> None:
        """`seq` starts its next segment (or is finished)."""
        if seq.segment >= len(seq.segments):
            finished.append(seq)
            return
        segment = seq.segments[seq.segment]
        if segment[0] == "prefill":
            heapq.heappush(self._prefill, (seq.order, seq))
            return
        batch = seq.work.batch
        seq.joined_decode_s, seq.joined_busy_s = self._decode_s, self._busy_s
        seq.context_weight = batch * segment[1]
        self._decoding_batch += batch
        self._sum_context += seq.context_weight
        heapq.heappush(self._decode_ends, (self._decode_iterations + segment[2], seq.order, seq))

    def _woken(self, _event) -> None:
        self._iterate()
        self._release()

    def _iterate(self) -> None:
        """The scheduler between iterations: admit what waits, then start the next iteration (its
        end is an event whose callback carries on), or go idle until work arrives. Callbacks rather
        than a process: one method call per iteration instead of a process resumption."""
        env, timer = self.env, self.timer
        while True:
            if not self.waiting:
                if self.running:
                    break  # nothing to admit (most iterations)
                self._busy = False
                return
            if 0 < self.max_batch <= self.running:
                break  # a full batch: nothing admitted, nobody finished by admission
            admitted: list[_Sequence] = []
            while self.waiting and self.running < self.max_batch:
                seq = self.waiting.popleft()
                seq.started_at = env.now
                self.running += 1
                admitted.append(seq)
            finished: list[_Sequence] = []
            for seq in admitted:
                segments = seq.segments
                if segments and segments[0][0] == "prefill":  # _next of a new sequence (most begin so)
                    heapq.heappush(self._prefill, (seq.order, seq))
                else:
                    self._next(seq, finished)
            if finished:
                self._finish(finished)
            if self.running:
                break
        # Prefill-priority iterations (vLLM's default): pending prefills run before the next decode.
        if self._prefill:
            count = len(self._prefill) if self.max_prefills is None else min(self.max_prefills, len(self._prefill))
            if count == 1:  # one prompt (most prefill iterations): the sums below over one sequence
                seq = heapq.heappop(self._prefill)[1]
                prefilling, p = [seq], seq.segments[seq.segment][1]
                batch = seq.work.batch
                memo = self._prefill_steps.get((p, batch))
                if memo is None:
                    prompt = max(round(batch * p[1] / batch), 1)
                    step = ("prefill", prompt, p[2])
                    memo = self._prefill_steps[(p, batch)] = (step, timer.base_s(step, batch))
                step, base_s = memo
            else:
                prefilling = [heapq.heappop(self._prefill)[1] for _ in range(count)]
                # One batched forward over the pending prompts (their mean length, their deepest
                # cache): their batches, tokens and contexts, summed in one loop
                batch = tokens = 0
                context = None
                for s in prefilling:
                    p = s.segments[s.segment][1]
                    batch += s.work.batch
                    tokens += s.work.batch * p[1]
                    context = p[2] if context is None or p[2] > context else context
                prompt = max(round(tokens / batch), 1)
                step = ("prefill", prompt, context)
                base_s = timer.base_s(step, batch)
            iteration_s = base_s * timer.factor("prefill")
            self._prefilling, self._iteration = prefilling, (step, batch, iteration_s)
            self._prefilled_call.after(env, iteration_s)
        else:
            batch, sum_context = self._decoding_batch, self._sum_context
            step_s = self._decode_steps.get((batch, sum_context))  # the cost model's decode step, memoized
            if step_s is None:
                step_s = self._decode_step_s(batch, sum_context)
            iteration_s = step_s * timer.factor("decode")  # batched_decode_s
            self._iteration = (sum_context, batch, iteration_s)
            self._decoded_call.after(env, iteration_s)

    def _decode_step_s(self, batch: int, sum_context: int) -> float:
        """The cost model's decode step of a batch over `sum_context` tokens, into the memo (most
        batches recur: a full batch moves by one sum between runs that end; cleared at a bound,
        every run's sums differ)."""
        if len(self._decode_steps) >= 1 << 16:
            self._decode_steps.clear()
        step_s = self._decode_steps[(batch, sum_context)] = self.timer.cost.decode_step_s(batch, sum_context)
        return step_s

    def _prefilled(self, _event) -> None:
        step, batch, iteration_s = self._iteration
        # The step's kernel time, split among its sequences by their batch (the sum is the step's).
        busy_per_sequence_s = (iteration_s - self.timer.host_s(step, batch, iteration_s)) / batch
        finished: list[_Sequence] = []
        for seq in self._prefilling:
            seq.compute_s += iteration_s
            seq.gpu_busy_s += busy_per_sequence_s * seq.work.batch
            seq.segment += 1
            self._next(seq, finished)
        self._prefilling = []
        if finished:
            self._finish(finished)
        self._iterate()
        self._release()

    def _decoded(self, _event) -> None:
        sum_context, batch, iteration_s = self._iteration
        self._decode_s += iteration_s
        # a decode pass's host time, as PassTimer.host_s has it: (1 - f) of the pass
        self._busy_s += (iteration_s - self._host_fraction * iteration_s) / batch
        self._decode_iterations += 1
        self._sum_context += batch  # every decoding sequence's context grows by one
        ends = self._decode_ends
        if not ends or ends[0][0] != self._decode_iterations:  # nobody's decode run ends here (most iterations)
            self._iterate()
            if self._leaving:  # finished by what _iterate admitted (else _release has nothing to do)
                self._release()
            return
        finished: list[_Sequence] = []
        while ends and ends[0][0] == self._decode_iterations:
            _, _, seq = heapq.heappop(ends)
            segment = seq.segments[seq.segment]
            self._decoding_batch -= seq.work.batch
            self._sum_context -= seq.work.batch * (segment[1] + segment[2])
            seq.compute_s += self._decode_s - seq.joined_decode_s
            seq.gpu_busy_s += (self._busy_s - seq.joined_busy_s) * seq.work.batch
            seq.segment += 1
            self._next(seq, finished)
        if finished:
            self._finish(finished)
        self._iterate()
        self._release()

    def _finish(self, finished: list[_Sequence]) -> None:
        """Done in arrival order, as they leave the batch (their requests go on in `_release`): the
        callers skip an empty list."""
        if len(finished) > 1:
            finished.sort(key=_ORDER)
        leaving = self._leaving
        for seq in finished:
            leaving.append(seq.done)
        self.running -= len(finished)
        finished.clear()

    def _release(self) -> None:
        """The requests of the sequences that finished go on, in arrival order, once the next
        iteration is planned: each within this event rather than from an event of its own scheduled
        behind it (as their events, triggered in that order, would have resumed them next)."""
        if not self._leaving:
            return
        leaving, self._leaving = self._leaving, []
        fire_all(self.env, leaving)


# The registry of scheduling policies, keyed by their YAML tag (`server.scheduler`, a backend's
# `scheduler`): each entry builds the executor from the environment, the pass timer and the server's
# settings (`max_batch`, `max_prefills`: the cap on concurrent prefills, which binds only batching:
# serial FCFS and time slicing run one prefill at a time anyway).
EXECUTORS: dict[str, Callable[..., object]] = {
    "serial_fcfs": lambda env, timer, max_batch, max_prefills: SerialFCFS(env, timer),
    "time_sliced": lambda env, timer, max_batch, max_prefills: FluidTimeSliced(env, timer),
    "time_sliced_per_pass": lambda env, timer, max_batch, max_prefills: TimeSliced(env, timer),
    "continuous_batching": lambda env, timer, max_batch, max_prefills: ContinuousBatching(env, timer, max_batch,
                                                                                          max_prefills),
}


def make_executor(policy: str, env: simpy.Environment, timer: PassTimer, max_batch: int,
                  max_prefills: int | None = None):
    try:
        build = EXECUTORS[policy]
    except KeyError:
        raise ValueError(f"unknown scheduler {policy!r}; known: {', '.join(EXECUTORS)}") from None
    return build(env, timer, max_batch, max_prefills)
