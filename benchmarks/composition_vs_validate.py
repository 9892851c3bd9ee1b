"""The host path beyond the wire of one partially_aware step, as calibrate's paced composition rows
time it against validate's real client and server, on this machine's CPU.

    python benchmarks/composition_vs_validate.py [--model gpt2] [--context 730] [--gbps 25] [--steps 6] [--rounds 5]

composition: calibrate/composition.py's run_composition, paced rows only (validate's server process
  spawned with its own model on the CPU, composition_client its own process), as `djinnsim
  calibrate` runs them; host
  path = the step's time (the median) - the server's h2d, compute and d2h - the paced wire, as
  paced_path takes it (the connection left in).
validate: validate/server.py's server process and validate/clients.py's client stepping
  partially_aware; host path = uplink + the server's queue (its handoff to the executor, which
  the simulator does not charge) + downlink - the paced wire (copy, compute and the connection
  left out, as the simulator charges them apart).
The two run round by round, one after the other, so a busy shared machine slows them alike. Then
the pieces of the client's per-step work that the two paths did differently before the paced rows
went through validate's client and server, timed alone. Per MB is over the bytes both ways.
Figures: median over rounds (each round's figure the median over its steps). Not a test: it prints.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import numpy as np

from djinnsim.calibrate import wire
from djinnsim.common import linkemu


def cpu_session(model: str, context: int, gbps: float, steps: int):
    """A calibrate Session on the CPU whose plan has the composition stage's paced rows only."""
    import dataclasses

    import torch

    from djinnsim.calibrate.modeling import build_model
    from djinnsim.calibrate.plan import plan_for
    from djinnsim.calibrate.samples import SampleLog
    from djinnsim.calibrate.session import Session
    from djinnsim.sim.specs import get_model

    torch.set_num_threads(1)
    spec = get_model(model)
    plan = dataclasses.replace(plan_for("cpu", quick=True), composition_contexts=(), composition_repeat=steps,
                               composition_paced_gbps=(gbps,), composition_paced_contexts=(context,))
    return Session(spec, "cpu", torch.float32, plan, SampleLog(None), say=lambda line: None,
                   model=build_model(spec, "cpu", torch.float32))


def composition_round(session, gbps: float) -> tuple[float, int]:
    """(host seconds beyond the paced wire of the median step, bytes both ways) of one run of the stage."""
    from djinnsim.calibrate.composition import run_composition

    (row,) = run_composition(session, cost=None, link_gbps=gbps)
    both = row["up_bytes"] + row["down_bytes"]
    return row["measured_s"] - sum(row["server"].values()) - both / (gbps * 1e9 / 8), both


class ValidatePath:
    """validate's server process (CPU, one torch thread) and client, stepping partially_aware."""

    def __init__(self, model: str, gbps: float) -> None:
        from djinnsim.validate import clients
        from djinnsim.validate.realrun import ServerProcess
        from djinnsim.validate.server import ServerConfig

        self.model, self.gbps = model, gbps
        self.server = ServerProcess(multiprocessing.get_context("spawn"),
                                    ServerConfig(model=model, device="cpu", dtype=None, link_gbps=gbps, rtt_s=0.0, threads=1))
        status, message = self.server.start(timeout_s=300)
        if status != "ready":
            raise SystemExit(f"validate server did not start: {message}")
        self.client = clients.Client(linkemu.LinkParams(gbps, 0.0), timeout_s=300)
        self.queue_s: list[float] = []  # the server's handoff of each timed request to its executor

    def round(self, context: int, steps: int) -> tuple[list[float], int]:
        """A decode from a (context - 1)-token prompt: (host seconds beyond the paced wire of each
        of `steps` steps after the first KV round trip, bytes both ways of the first of them)."""
        from djinnsim.sim.backends import get_backend
        from djinnsim.sim.specs import get_model
        from djinnsim.validate.clients import step_header
        from djinnsim.validate.protocol import Op

        backend = get_backend("partially_aware")
        ids = np.random.default_rng(context).integers(0, get_model(self.model).vocab_size, (1, context - 1), dtype=np.int64)
        host, both, kv = [], 0, None
        for t in range(steps + 2):
            tensors = {"ids": ids} if kv is None else {"ids": ids[:, -1:], "kv": kv}
            ex = self.client.request(self.server.port, Op.STEP, step_header(backend, "0", t == steps + 1), tensors)
            kv = ex.tensors["kv"]
            ids = np.concatenate([ids, ex.tensors["logits"][:, -1].argmax(-1).reshape(1, 1).astype(np.int64)], axis=1)
            if t >= 2:  # step 0 is the prefill, step 1 the first KV round trip (warm-up); the KV grows a token a step
                head = ex.header
                nbytes = ex.bytes_up + ex.bytes_down
                both = both or nbytes
                up_s, down_s = head["recv_at"] - ex.issued_at - ex.connect_s, ex.finished_at - head["done_at"]
                host.append(up_s + head["queue_s"] + down_s - nbytes / (self.gbps * 1e9 / 8))
                self.queue_s.append(head["queue_s"])
        return host, both

    def close(self) -> None:
        from djinnsim.validate import clients
        from djinnsim.validate.protocol import Op

        clients.control(self.server.port, Op.SHUTDOWN)
        self.server.process.join(timeout=10)


def client_pieces(model: str, context: int, repeats: int) -> dict[str, float]:
    """The client's per-step work that differs, alone: framing (pack) of the KV as composition_client
    lays it out (one tensor per layer and K/V) and as validate's client does (one stacked tensor
    that is a view into the previous reply's receive buffer), and a fresh receive buffer."""
    from djinnsim.calibrate.composition_client import random_kv
    from djinnsim.sim.specs import get_model

    spec = get_model(model)
    per_layer = random_kv(model, context - 1, "float32")
    stacked = np.stack([np.stack([per_layer[f"k{i}"], per_layer[f"v{i}"]]) for i in range(spec.num_layers)])
    received = wire.pack(5, {}, {"kv": stacked})  # a reply's buffer, as the client received it
    _, _, tensors = wire.unpack(received)
    out: dict[str, list[float]] = {"pack, one tensor per layer and K/V": [], "pack, validate's stacked view": [],
                                   "fresh receive buffer": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        wire.pack(4, {}, {"ids": np.zeros((1, 1), np.int64), **per_layer})
        out["pack, one tensor per layer and K/V"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        wire.pack(1, {}, {"ids": np.zeros((1, 1), np.int64), "kv": tensors["kv"]})
        out["pack, validate's stacked view"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bytearray(stacked.nbytes)
        out["fresh receive buffer"].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in out.items()} | {"bytes": stacked.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--context", type=int, default=730, help="the step's sequence length L")
    parser.add_argument("--gbps", type=float, default=25.0)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round of each path")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each path once a round, one after the other")
    args = parser.parse_args()
    session = cpu_session(args.model, args.context, args.gbps, args.steps)
    validate = ValidatePath(args.model, args.gbps)
    got: dict[str, list[float]] = {"composition": [], "validate": []}
    try:
        for _ in range(args.rounds):
            host_s, both = composition_round(session, args.gbps)
            got["composition"].append(host_s / both)
            host_s, both = validate.round(args.context, args.steps)
            got["validate"].append(statistics.median(host_s) / both)
    finally:
        validate.close()
    print(f"{args.model} partially_aware at L={args.context}, {args.gbps:g} Gbps, {args.rounds} rounds of {args.steps} steps")
    for name, per_byte in got.items():
        p10, p50, p90 = np.percentile(per_byte, [10, 50, 90]) * 1e9
        print(f"{name:12s} host beyond the wire {p50:.3f} ms/MB both ways (rounds P10 {p10:.3f}, P90 {p90:.3f})")
    print(f"validate's server: the handoff to the executor (queue_s) p50 {statistics.median(validate.queue_s) * 1e3:.2f} ms")
    pieces = client_pieces(args.model, args.context, args.steps)
    nbytes = pieces.pop("bytes")
    for name, seconds in pieces.items():
        print(f"client piece: {name:38s} {seconds * 1e3:8.2f} ms for {nbytes / 1e6:.1f} MB: "
              f"{seconds / nbytes * 1e9:.3f} ms/MB")


if __name__ == "__main__":
    main()
