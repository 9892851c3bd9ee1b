"""The client side of the real runs: requests over the emulated link, one Record per request.

Only numpy and sockets here (no torch): the client is the validation process itself, and it never
touches the GPU. Times are time.perf_counter() (CLOCK_MONOTONIC on Linux), which every process on
the machine shares, so the server's timestamps in a reply line up with the client's.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from djinnsim.calibrate import wire
from djinnsim.sim.records import Record
from djinnsim.sim.scenario import AgentsWorkload, DecodeWorkload, Exponential, Fixed, Point, Uniform

from djinnsim.common import linkemu
from .protocol import Op

NO_LINK = linkemu.LinkParams(gbps=1e6, rtt_s=0.0)  # control requests: no emulated link


class ServerError(RuntimeError):
    """A server answered a request with an error that is not an out-of-memory."""


@dataclass
class Exchange:
    """One request and its reply, as the client saw them."""

    issued_at: float
    finished_at: float
    connect_s: float
    status: str
    header: dict
    tensors: dict
    bytes_up: int
    bytes_down: int
    wire_bytes_up: int
    wire_bytes_down: int


class Client:
    """Sends requests over one emulated link; its uplink pacer is shared by the client's threads."""

    def __init__(self, link: linkemu.LinkParams, timeout_s: float) -> None:
        self.link = link
        self.uplink = linkemu.Pacer(link)
        self.timeout_s = timeout_s

    def connect(self, port: int) -> socket.socket:
        return linkemu.connect(port, self.link, self.timeout_s)

    def request(self, port: int, op: Op, header: dict, tensors: dict[str, np.ndarray],
                conn: socket.socket | None = None) -> Exchange:
        """One request; with no `conn`, a new connection is opened for it and closed after."""
        issued_at = time.perf_counter()
        sock = conn if conn is not None else self.connect(port)
        connect_s = time.perf_counter() - issued_at
        try:
            message = wire.pack(op, header, tensors)
            sent = self.uplink.send(sock, [message])
            reply_op, reply_header, reply_tensors, received = linkemu.recv_message(sock)
        finally:
            if conn is None:
                sock.close()
        finished_at = time.perf_counter()
        status = "ok"
        if reply_op == Op.ERROR:
            if not reply_header.get("oom"):
                raise ServerError(f"server on port {port}: {reply_header.get('error', 'unknown error')}")
            status = "oom"
        return Exchange(
            issued_at=issued_at, finished_at=finished_at, connect_s=connect_s, status=status,
            header=reply_header, tensors=reply_tensors,
            bytes_up=sum(a.nbytes for a in tensors.values()),
            bytes_down=sum(a.nbytes for a in reply_tensors.values()),
            wire_bytes_up=sent, wire_bytes_down=received,
        )


def control(port: int, op: Op, header: dict | None = None, timeout_s: float = 60.0) -> dict:
    """A bookkeeping request (reset, save weights, shutdown) outside the emulated link."""
    exchange = Client(NO_LINK, timeout_s).request(port, op, header or {}, {})
    return exchange.header


@dataclass
class RecordContext:
    """What a record says about where it comes from."""

    point: Point
    gpu_key: str
    repeat: int

    def record(self, ex: Exchange | None, *, agent: int, run: int, phase: str, step: int, warmup: bool,
               context: int, input_tokens: int, new_tokens: int, at: float | None = None) -> Record:
        p = self.point
        head = ex.header if ex is not None else {}
        issued_at = ex.issued_at if ex is not None else at
        finished_at = ex.finished_at if ex is not None else at
        started_at = head.get("start_at", finished_at)
        received_at = head.get("recv_at", issued_at)
        done_at = head.get("done_at", finished_at)
        connect_s = ex.connect_s if ex is not None else 0.0
        return Record(
            point=p.index, backend=p.backend.name, model=p.model.key, gpu=self.gpu_key, link_gbps=p.link.gbps,
            n_agents=p.n_agents or 1, agent=agent, run=run, phase=phase, step=step,
            status=ex.status if ex is not None else "oom", warmup=warmup,
            issued_at=issued_at, started_at=started_at, finished_at=finished_at,
            connect_s=connect_s,
            uplink_s=max(received_at - issued_at - connect_s, 0.0),
            queue_s=head.get("queue_s", 0.0) + head.get("mem_wait_s", 0.0),
            load_s=head.get("load_s", 0.0), copy_s=head.get("copy_s", 0.0), compute_s=head.get("compute_s", 0.0),
            downlink_s=max(finished_at - done_at, 0.0),
            context_tokens=context, input_tokens=input_tokens, new_tokens=new_tokens,
            bytes_up=ex.bytes_up if ex else 0, bytes_down=ex.bytes_down if ex else 0,
            wire_bytes_up=ex.wire_bytes_up if ex else 0, wire_bytes_down=ex.wire_bytes_down if ex else 0,
            h2d_bytes=head.get("h2d", 0), d2h_bytes=head.get("d2h", 0),
            gpu_mem_bytes=head.get("gpu_mem_bytes", 0), gpu_mem_peak_bytes=head.get("gpu_mem_peak_bytes", 0),
        )


def _prompt(rng: np.random.Generator, vocab: int, batch: int, tokens: int) -> np.ndarray:
    return rng.integers(0, vocab, size=(batch, tokens), dtype=np.int64)


# --- Exp 2.1: per-token remote backends and the local baseline ---------------------------------
def step_header(backend, session: str, end: bool) -> dict:
    """A per-token STEP request's header: the backend's toggles, its session, whether it is the last."""
    return {"s": session, "kv": backend.kv, "compute": backend.step_compute, "logits": backend.return_logits, "end": end}


def decode_remote(client: Client, port: int, ctx: RecordContext, workload: DecodeWorkload,
                  rng: np.random.Generator, deadline: float) -> list[Record]:
    """`runs` greedy decodes, one request per generated token, with the backend's toggles."""
    backend, model = ctx.point.backend, ctx.point.model
    records: list[Record] = []
    conn = None
    try:
        for run in range(workload.runs):
            if time.perf_counter() > deadline:
                raise TimeoutError("time budget spent")
            prompt = _prompt(rng, model.vocab_size, workload.batch, workload.prompt_tokens)
            seq, kv = prompt, None
            for t in range(workload.new_tokens):
                if backend.send_ids == "all":
                    ids = seq
                elif t == 0:
                    ids = prompt  # nothing is cached anywhere yet: the prompt goes up whole
                else:
                    ids = seq[:, -1:]
                tensors = {"ids": ids} if kv is None else {"ids": ids, "kv": kv}
                header = step_header(backend, f"{ctx.repeat}.{run}", t == workload.new_tokens - 1)
                if backend.connection == "persistent" and conn is None:
                    conn = client.connect(port)
                ex = client.request(port, Op.STEP, header, tensors, conn=conn)
                records.append(ctx.record(
                    ex, agent=0, run=run, phase="decode", step=t, warmup=run < workload.warmup_runs,
                    context=workload.prompt_tokens + t - 1 if t else 0,
                    input_tokens=workload.prompt_tokens if t == 0 else 1, new_tokens=1,
                ))
                if ex.status != "ok":
                    return records
                if backend.kv == "client":
                    kv = ex.tensors["kv"]
                logits = ex.tensors.get("logits")
                nxt = logits[:, -1].argmax(-1) if logits is not None else seq[:, -1]
                seq = np.concatenate([seq, nxt.reshape(-1, 1).astype(np.int64)], axis=1)
    finally:
        if conn is not None:
            conn.close()
    return records


def decode_local(port: int, ctx: RecordContext, workload: DecodeWorkload, rng: np.random.Generator,
                 deadline: float, timeout_s: float) -> list[Record]:
    """native_pytorch: the server decodes on its own GPU and reports each step's time."""
    records: list[Record] = []
    control_client = Client(NO_LINK, timeout_s)
    for run in range(workload.runs):
        if time.perf_counter() > deadline:
            raise TimeoutError("time budget spent")
        prompt = _prompt(rng, ctx.point.model.vocab_size, workload.batch, workload.prompt_tokens)
        ex = control_client.request(port, Op.LOCAL_DECODE, {"new": workload.new_tokens}, {"ids": prompt})
        at = ex.header["decode_at"]
        durations = [ex.header["prefill_s"], *ex.header["step_s"]]
        for t, duration_s in enumerate(durations):
            local = Exchange(issued_at=at, finished_at=at + duration_s, connect_s=0.0, status="ok",
                             header={"start_at": at, "recv_at": at, "done_at": at + duration_s,
                                     "compute_s": duration_s, "gpu_mem_bytes": ex.header.get("gpu_mem_bytes", 0),
                                     "gpu_mem_peak_bytes": ex.header.get("gpu_mem_peak_bytes", 0)},
                             tensors={}, bytes_up=0, bytes_down=0, wire_bytes_up=0, wire_bytes_down=0)
            records.append(ctx.record(
                local, agent=0, run=run, phase="decode", step=t, warmup=run < workload.warmup_runs,
                context=workload.prompt_tokens + t - 1 if t else 0,
                input_tokens=workload.prompt_tokens if t == 0 else 1, new_tokens=1,
            ))
            at += duration_s
    return records


# --- the level probe: a short native decode on a resident process, outside the scored runs -------
PROBE_PROMPT_TOKENS = 32
PROBE_NEW_TOKENS = 40


def level_probe(port: int, vocab_size: int, timeout_s: float) -> dict:
    """The launch-bound level the process at `port` steps at now (its own model, no link): a batch-1
    greedy decode of PROBE_NEW_TOKENS tokens after a PROBE_PROMPT_TOKENS prompt, twice; the second
    is the probe. The first pays each context length's first use by this process (cold shapes: in
    H200 runs 9 and 10 a probe on a fresh process stepped at 52 ms where the same probe after the
    point's runs stepped at 19-23 ms), and is kept apart (`cold_at`, `cold_step_s`).
    Returns the probe's start time (perf_counter), the prompt length and each decode step's seconds."""
    rng = np.random.default_rng(0)  # the same prompt every time: only the machine's level varies
    prompt = _prompt(rng, vocab_size, 1, PROBE_PROMPT_TOKENS)
    client = Client(NO_LINK, timeout_s)
    cold = client.request(port, Op.LOCAL_DECODE, {"new": PROBE_NEW_TOKENS}, {"ids": prompt})
    ex = client.request(port, Op.LOCAL_DECODE, {"new": PROBE_NEW_TOKENS}, {"ids": prompt})
    return {"at": float(ex.header["decode_at"]), "prompt_tokens": PROBE_PROMPT_TOKENS,
            "step_s": [float(s) for s in ex.header["step_s"]],
            "cold_at": float(cold.header["decode_at"]), "cold_step_s": [float(s) for s in cold.header["step_s"]]}

# --- Exp 2.2: agents, one generate request per phase --------------------------------------------
@dataclass
class AgentOutcome:
    records: list[Record] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    error: str | None = None


def act_seconds(workload: AgentsWorkload, rng: np.random.Generator) -> float:
    act = workload.act
    if isinstance(act, Fixed):
        return act.seconds
    if isinstance(act, Uniform):
        return float(rng.uniform(act.low_s, act.high_s))
    assert isinstance(act, Exponential)
    return float(rng.exponential(act.mean_s))


def run_agent(client: Client, port: int | None, ctx: RecordContext, workload: AgentsWorkload, agent: int,
              start_at: float, rng: np.random.Generator, deadline: float, outcome: AgentOutcome) -> None:
    """REASON -> ACT -> REFLECT, `iterations` times, over one persistent connection."""
    backend, model = ctx.point.backend, ctx.point.model
    delay_s = start_at - time.perf_counter()
    if delay_s > 0:
        time.sleep(delay_s)
    if port is None:  # its worker never fit in GPU memory
        outcome.records.append(ctx.record(None, agent=agent, run=0, phase="reason", step=-1, warmup=False,
                                          context=0, input_tokens=workload.reason.input_tokens,
                                          new_tokens=workload.reason.new_tokens, at=time.perf_counter()))
        return
    conn = None
    history = np.zeros((1, 0), dtype=np.int64)
    phases = [(i, name, spec) for i in range(workload.iterations)
              for name, spec in (("reason", workload.reason), ("reflect", workload.reflect))]
    try:
        for k, (iteration, name, spec) in enumerate(phases):
            if time.perf_counter() > deadline:
                raise TimeoutError("time budget spent")
            new_ids = _prompt(rng, model.vocab_size, 1, spec.input_tokens)
            keeps_session = backend.kv == "session"
            send = new_ids if keeps_session and backend.send_ids != "all" else np.concatenate([history, new_ids], axis=1)
            header = {"s": f"{ctx.repeat}.{agent}", "kv": "session" if keeps_session else "request",
                      "new": spec.new_tokens, "end": k == len(phases) - 1}
            if conn is None:
                # The first request of a persistent connection pays its setup, as in the simulator.
                issued_at = time.perf_counter()
                conn = client.connect(port)
                ex = client.request(port, Op.GENERATE, header, {"ids": send}, conn=conn)
                ex.connect_s += ex.issued_at - issued_at
                ex.issued_at = issued_at
            else:
                ex = client.request(port, Op.GENERATE, header, {"ids": send}, conn=conn)
            outcome.records.append(ctx.record(ex, agent=agent, run=iteration, phase=name, step=-1, warmup=False,
                                              context=history.shape[1], input_tokens=spec.input_tokens,
                                              new_tokens=spec.new_tokens))
            if ex.status != "ok":
                return
            if "first_token_at" in ex.header:
                outcome.first_token_s.append(ex.header["first_token_at"] - ex.issued_at)
            history = np.concatenate([history, new_ids, ex.tensors["ids"].astype(np.int64)], axis=1)
            if name == "reason":
                time.sleep(act_seconds(workload, rng))
    except Exception as exc:  # reported by the caller; the other agents go on
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        if conn is not None:
            conn.close()


def run_agents(client: Client, ports: list[int | None], ctx: RecordContext, workload: AgentsWorkload,
               seed: np.random.SeedSequence, deadline: float) -> list[AgentOutcome]:
    """N agents at once, one thread each; agent i talks to ports[i] (one shared server or its own)."""
    n = len(ports)
    arrival_seed, *agent_seeds = seed.spawn(n + 1)
    arrival_rng = np.random.default_rng(arrival_seed)
    t0 = time.perf_counter() + 0.05
    starts, offset = [], 0.0
    for i in range(n):
        if workload.arrival.kind == "poisson" and i:
            offset += float(arrival_rng.exponential(1.0 / workload.arrival.rate_per_s))
        starts.append(t0 + offset)
    outcomes = [AgentOutcome() for _ in range(n)]
    threads = [
        threading.Thread(target=run_agent, daemon=True,
                         args=(client, ports[i], ctx, workload, i, starts[i], np.random.default_rng(agent_seeds[i]),
                               deadline, outcomes[i]))
        for i in range(n)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(deadline - time.perf_counter(), 0.0) + client.timeout_s)
    if any(t.is_alive() for t in threads):
        raise TimeoutError("agents did not finish within the time budget")
    return outcomes
