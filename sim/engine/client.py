"""Clients and agents: plain generator processes (`env` first) that drive a GpuServer over a Link.

A client asks the backend's `Planner` for the plan of each generate call and sends its requests
one after another: connection (when the plan says so), uplink, the server's part
(`GpuServer.serve`), downlink. Its session lives on the GPU of a `GpuPool` that the pool's router
chose (a serverless task is routed anew per request), over that GPU's node link. Each finished
request, or each agent phase, becomes one record, naming the GPU that served it.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Callable

import simpy

from ..records import KV_STATES, PHASES, STATUSES, RecordBuilder
from ..scenario import AgentsWorkload, DecodeWorkload
from .outcome import Outcome, merge
from .plan import GeneratePlan, Planner, RequestPlan
from .pool import Channel, GpuPool

_PHASE = {name: code for code, name in enumerate(PHASES)}
_STATUS = {name: code for code, name in enumerate(STATUSES)}
_KV_STATE = {name: code for code, name in enumerate(KV_STATES)}


# an Outcome's fields in the order of the record's columns (ROW_COLUMNS), read by one C call each
_OUTCOME_TIMES = attrgetter("issued_at", "started_at", "finished_at", "connect_s", "uplink_s", "queue_s", "load_s",
                            "copy_s", "compute_s", "downlink_s")
_OUTCOME_BYTES = attrgetter("bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down", "h2d_bytes", "d2h_bytes",
                            "gpu_mem_bytes")


def record(log: RecordBuilder, channel: Channel, out: Outcome, agent: int, run: int, phase: str, step: int,
           warmup: bool, context: int, input_tokens: int, new_tokens: int, kv_state: str = "none",
           recomputed_tokens: int = 0) -> None:
    server = channel.server
    log.add(agent, run, _PHASE[phase], step, _STATUS[out.status], warmup, *_OUTCOME_TIMES(out),
            context, input_tokens, new_tokens, *_OUTCOME_BYTES(out), server.memory.peak_bytes,
            _KV_STATE[kv_state], recomputed_tokens, out.gpu_busy_s, server.node, server.index)


def request(env: simpy.Environment, pool: GpuPool, channel: Channel, plan: RequestPlan):
    """One request through the backend's path; returns its Outcome."""
    if pool.per_task:  # a serverless task is routed anew (GpuPool.route)
        pool.route(channel, plan)
    server, link = channel.server, channel.link
    serving = server.serving
    out = Outcome(env.now)  # issued_at
    server.routed += 1  # routed here and not yet answered (what least_loaded counts)
    if serving.remote:
        if serving.connect_per_request or not channel.connected:
            out.connect_s = link.rtt_s + server.cost.connect_s()  # waited as the send's lead
            if not out.connect_s > 0.0:  # zero, or a bad cost the clock's guard reports
                yield env.timeout(out.connect_s)
            channel.connected = serving.keep_connection
        lead_s = out.connect_s if out.connect_s > 0.0 else 0.0
        sent_at = env.now + lead_s if lead_s > 0.0 else env.now  # as the clock reads after a timeout of lead_s
        # link.send's wire bytes and costs, memoized with the plan (nothing on the wire: link.send
        # itself); Link.request_costs' memo read inline
        costs = link._requests.get(id(plan))
        if costs is None or costs[0] is not plan:
            costs = link.request_costs(plan)
        _, wire_up, before_s, after_s, wire_down, down_before_s, down_after_s = costs
        if wire_up > 0:
            yield link.up.transfer(wire_up, lead_s=lead_s, before_s=before_s, after_s=after_s)
        else:
            yield link.send(link.up, plan.bytes_up, plan.messages, lead_s)
        out.uplink_s, out.wire_bytes_up = env.now - sent_at, wire_up
        out.bytes_up = plan.bytes_up
    yield from server.serve(channel.session, plan, out)
    if out.status != "ok":
        server.routed -= 1
        return out
    if serving.remote:
        sent_at = env.now
        if wire_down > 0:
            yield link.down.transfer(wire_down, before_s=down_before_s, after_s=down_after_s)
        else:
            yield link.send(link.down, plan.bytes_down, plan.messages)
        out.downlink_s, out.wire_bytes_down = env.now - sent_at, wire_down
        out.bytes_down = plan.bytes_down
    out.finished_at = env.now
    server.routed -= 1
    return out


def generate(env: simpy.Environment, pool: GpuPool, channel: Channel, plan: GeneratePlan,
             on_request: Callable[[int, Outcome], None] | None = None):
    """A generate call's requests in turn (reported through `on_request` as each one finishes),
    stopping at the first that fails. Returns the Outcomes."""
    outcomes = []
    for t, step in enumerate(plan.requests):
        out = yield from request(env, pool, channel, step)
        outcomes.append(out)
        if on_request is not None:
            on_request(t, out)
        if out.status != "ok":
            break
    return outcomes


def decode_client(env: simpy.Environment, pool: GpuPool, planner: Planner, log: RecordBuilder,
                  workload: DecodeWorkload):
    """Exp 2.1: one client, `runs` greedy decodes, one after another, each in a new session."""
    prompt = workload.prompt_tokens
    plan = planner.generate(0, prompt, workload.new_tokens, workload.batch)
    for run in range(workload.runs):
        channel = yield from pool.open(0)
        warmup = run < workload.warmup_runs

        def on_token(t: int, out: Outcome, run=run, warmup=warmup) -> None:
            record(log, channel, out, 0, run, "decode", t, warmup, prompt + t - 1 if t else 0,
                   prompt if t == 0 else 1, 1)

        outcomes = yield from generate(env, pool, channel, plan, on_token if plan.per_token else None)
        if not plan.per_token:
            record(log, channel, outcomes[0], 0, run, "decode", -1, warmup, 0, prompt, workload.new_tokens)
        pool.release(channel)
        if outcomes[-1].status != "ok":
            return


def agent(env: simpy.Environment, pool: GpuPool, planner: Planner, log: RecordBuilder,
          agent_id: int, workload: AgentsWorkload, start_at: float, act_s: Callable[[], float]):
    """Exp 2.2: REASON -> ACT -> REFLECT, `iterations` times; `act_s` draws an ACT duration.

    During ACT the server does what the session's KV policy says with its KV; a phase after it is
    planned with the context the session still holds, and re-prefills the rest (`recomputed_tokens`)."""
    if start_at > 0:
        yield env.timeout(start_at)
    channel = yield from pool.open(agent_id)
    session = channel.session
    context = 0
    kv_state = "none"
    # the workload's numbers read once: a pydantic model's attribute is a slow read (its class
    # defines __getattr__, so CPython cannot specialize the lookup), and these are read per phase
    phases = (("reason", workload.reason.input_tokens, workload.reason.new_tokens),
              ("reflect", workload.reflect.input_tokens, workload.reflect.new_tokens))
    reflect_input_tokens = workload.reflect.input_tokens
    for iteration in range(workload.iterations):
        for phase, input_tokens, new_tokens in phases:
            # a session with KV on the GPU stays there (only a serverless task moves between GPUs)
            # GpuServer.resident_tokens, inlined: all of the context, or none once its KV was dropped
            resident = (context if session.kv_tokens else 0) if planner.serving.session_kv else context
            plan = planner.generate(context, input_tokens, new_tokens, resident=resident)
            if len(plan.requests) == 1:  # a whole phase in one request: no generate() frame between
                out = yield from request(env, pool, channel, plan.requests[0])
            else:  # merged, its status the last request's
                out = merge((yield from generate(env, pool, channel, plan)))
            record(log, channel, out, agent_id, iteration, phase, -1, False, context,
                   input_tokens, new_tokens, kv_state, context - resident)
            if out.status != "ok":
                pool.release(channel)
                log.finished(agent_id)
                return
            context += input_tokens + new_tokens
            kv_state = "resident" if planner.serving.session_kv else "none"
            if phase == "reason":
                channel.server.idle(session, reflect_input_tokens)
                yield env.timeout(act_s())
                kv_state = channel.server.wake(session)
    pool.release(channel)
    log.finished(agent_id)
