"""The client side of the composition check, run as its own process (`python -m ...`).

A separate process, as a real client is: with client and server as threads of one process, their
socket loops contend for one interpreter lock and the transfers ran about twice as slow. It frames
each backend's request with the wire format, opens a new connection per request, and prints one
JSON line per (backend, sequence length) with the timed samples and the server's own breakdown.
Only numpy, the wire format, the model specs and validate's client are imported: no torch.

The paced rows (partially_aware at each line rate, network.paced_path) go through validate's own
client (validate/clients.py: a message framed per step from the KV view the last reply left,
its uplink Pacer) against validate's own server process (validate/server.py, its downlink paced
at each rate in turn by Op.PACE), as validate's real runs do. Until H200 runs 12 and 13 they were a message framed
once, outside the timing, and resent from the same buffer, against the composition server's
single thread: a cheaper host path than validate's (run 13, L=104 at 25 Gbps: about 1.0 ms/MB
beyond the wire against validate's 1.3). The change came after those runs, so they are in-sample
for it; the next GPU run judges it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import numpy as np
from djinnsim.calibrate import wire
from djinnsim.sim.specs import get_model

BACKENDS = ("semantic_blind", "partially_aware", "full_djinn")
REQUEST, REPLY, SETUP, STOP = 4, 5, 6, 9
WIRE_DTYPES = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32}  # bf16 travels as its bits


def request(port: int, msg: bytearray) -> dict:
    """One request on a new connection."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(msg)
        _, header, _, _ = wire.recv_message(sock)
    return header


def random_kv(model: str, tokens: int, dtype: str) -> dict[str, np.ndarray]:
    spec = get_model(model)
    rng = np.random.default_rng(tokens)
    shape = (1, spec.num_kv_heads, tokens, spec.head_dim)
    base = rng.standard_normal(shape).astype(np.float16 if dtype == "bfloat16" else WIRE_DTYPES[dtype])
    base = base.view(np.int16) if dtype == "bfloat16" else base
    out = {}
    for i in range(spec.num_layers):
        out[f"k{i}"], out[f"v{i}"] = base, base  # same values, separate tensors on the wire
    return out


def timed(port: int, msg: bytearray, repeat: int) -> tuple[list[float], list[dict]]:
    """`repeat` timed requests after one warm-up: (seconds each, the server's marks each)."""
    samples, marks = [], []
    for rep in range(repeat + 1):
        t0 = time.perf_counter()
        header = request(port, msg)  # the message was framed before: its framing is not timed
        elapsed = time.perf_counter() - t0
        if rep > 0:  # the first is the warm-up
            samples.append(elapsed)
            marks.append(header)
    return samples, marks


PACED_TIMEOUT_S = 300.0  # one paced request's bound (a 2048-token KV at 2 Gbps takes seconds)


def paced_step(client, port: int, prompt: np.ndarray) -> tuple[float, dict]:
    """One partially_aware step at len(prompt) + 2 as validate's real decode takes it (its Client,
    validate/clients.py, against validate's own request handling on the server): a request for the
    prompt, whose KV comes down, and a step that sends the next id and that KV back up (neither
    timed), then the step that does the same with the KV the last reply left (a view into the
    buffer just received, framed again), timed from issue to the reply read: as in validate's
    decode, the timed request follows a step. Returns (its seconds, the server's h2d, compute and
    d2h seconds, and the minor page faults of its process during each copy where it counts them)."""
    from djinnsim.sim.backends import get_backend
    from djinnsim.validate.clients import step_header
    from djinnsim.validate.protocol import Op

    backend = get_backend("partially_aware")
    ex = client.request(port, Op.STEP, step_header(backend, "0", False), {"ids": prompt})
    for last in (False, True):
        nxt = ex.tensors["logits"][:, -1].argmax(-1).reshape(-1, 1).astype(np.int64)
        ex = client.request(port, Op.STEP, step_header(backend, "0", last), {"ids": nxt, "kv": ex.tensors["kv"]})
    marks = {k: float(ex.header[k]) for k in ("h2d_s", "compute_s", "d2h_s")}
    marks.update({k: float(ex.header[k]) for k in ("h2d_faults", "d2h_faults") if k in ex.header})
    return ex.finished_at - ex.issued_at, marks


def paced(port: int | None, model: str, paced_gbps: list[float], paced_contexts: list[int], repeat: int) -> None:
    """partially_aware paced by the link emulator both ways, rate by rate, against validate's server
    on `port` (its downlink set to each rate by a PACE request), then SHUTDOWN: its process and
    model are gone before the unpaced rows. `repeat` timed steps after one warm-up per (rate,
    context); one JSON line each."""
    from djinnsim.common.linkemu import LinkParams
    from djinnsim.validate.clients import Client, control
    from djinnsim.validate.protocol import Op

    if port is None:
        return
    spec = get_model(model)
    for gbps in paced_gbps:
        control(port, Op.PACE, {"link_gbps": gbps}, timeout_s=PACED_TIMEOUT_S)
        client = Client(LinkParams(gbps=gbps, rtt_s=0.0), PACED_TIMEOUT_S)
        for seq_len in sorted(set(paced_contexts)):
            prompt = np.random.default_rng(seq_len).integers(0, spec.vocab_size, (1, seq_len - 2), dtype=np.int64)
            samples, marks = [], []
            for rep in range(repeat + 1):
                elapsed, server = paced_step(client, port, prompt)
                if rep > 0:  # the first is the warm-up
                    samples.append(elapsed)
                    marks.append(server)
            print(json.dumps({"backend": "partially_aware", "seq_len": seq_len, "paced_gbps": gbps,
                              "samples_s": samples, "server": marks}), flush=True)
    control(port, Op.SHUTDOWN, timeout_s=PACED_TIMEOUT_S)


def run(port: int, model: str, dtype: str, contexts: list[int], repeat: int) -> None:
    spec = get_model(model)
    for seq_len in contexts:
        kv = random_kv(model, seq_len - 1, dtype)
        request(port, wire.pack(SETUP, {}, kv))  # full_djinn's resident session KV
        for backend in BACKENDS:
            if backend == "semantic_blind":
                tensors = {"ids": np.random.default_rng(seq_len).integers(0, spec.vocab_size, (1, seq_len), dtype=np.int64)}
            else:
                tensors = {"ids": np.array([[7]], dtype=np.int64), **(kv if backend == "partially_aware" else {})}
            samples, marks = timed(port, wire.pack(REQUEST, {"backend": backend}, tensors), repeat)
            print(json.dumps({"backend": backend, "seq_len": seq_len, "samples_s": samples, "server": marks}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True, choices=sorted(WIRE_DTYPES))
    parser.add_argument("--contexts", required=True, help="comma-separated sequence lengths")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paced-gbps", default="", help="comma-separated line rates for partially_aware paced")
    parser.add_argument("--paced-contexts", default="", help="comma-separated sequence lengths for the paced runs")
    parser.add_argument("--paced-port", default="", help="validate's server for the paced rows (empty: none)")
    args = parser.parse_args()
    paced_port = int(args.paced_port) if args.paced_port else None
    paced_gbps = [float(g) for g in args.paced_gbps.split(",") if g]
    if paced_gbps and paced_port is None:
        parser.error("--paced-gbps needs --paced-port")
    try:
        paced(paced_port, args.model, paced_gbps, [int(c) for c in args.paced_contexts.split(",") if c], args.repeat)
        paced_port = None  # shut down by paced()
        run(args.port, args.model, args.dtype, [int(c) for c in args.contexts.split(",") if c], args.repeat)
    finally:
        stop(paced_port, args.port)


def stop(paced_port: int | None, port: int) -> None:
    """Shut down the paced rows' server (validate's), then the composition server."""
    from djinnsim.validate.clients import control
    from djinnsim.validate.protocol import Op

    if paced_port is not None:
        try:
            control(paced_port, Op.SHUTDOWN, timeout_s=PACED_TIMEOUT_S)
        except (OSError, RuntimeError):
            print(f"composition client: could not shut down the paced server on port {paced_port}", file=sys.stderr)
    try:
        request(port, wire.pack(STOP, {}))
    except OSError:
        print("composition client: could not stop the server", file=sys.stderr)


if __name__ == "__main__":
    main()
