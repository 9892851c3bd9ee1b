"""The client side of the composition check, run as its own process (`python -m ...`).

A separate process, as a real client is: with client and server as threads of one process, their
socket loops contend for one interpreter lock and the transfers ran about twice as slow. It frames
each backend's request with the wire format, opens a new connection per request, and prints one
JSON line per (backend, sequence length) with the timed samples and the server's own breakdown.
Only numpy, the wire format and the model specs are imported: no torch.
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


def request(port: int, msg: bytearray, pacer=None) -> dict:
    """One request on a new connection; with `pacer` (linkemu.Pacer) it leaves at that line rate."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if pacer is None:
            sock.sendall(msg)
        else:
            pacer.send(sock, [msg])
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


def timed(port: int, msg: bytearray, repeat: int, pacer=None) -> tuple[list[float], list[dict]]:
    """`repeat` timed requests after one warm-up: (seconds each, the server's marks each)."""
    samples, marks = [], []
    for rep in range(repeat + 1):
        t0 = time.perf_counter()
        header = request(port, msg, pacer)  # framing is timed
        elapsed = time.perf_counter() - t0
        if rep > 0:  # the first is the warm-up
            samples.append(elapsed)
            marks.append(header)
    return samples, marks


def run(port: int, model: str, dtype: str, contexts: list[int], repeat: int,
        paced_gbps: list[float] = (), paced_contexts: list[int] = ()) -> None:
    from djinnsim.common.linkemu import LinkParams, Pacer

    spec = get_model(model)
    for seq_len in sorted(set(paced_contexts)):  # partially_aware paced by the link emulator, both ways
        kv = random_kv(model, seq_len - 1, dtype)
        tensors = {"ids": np.array([[7]], dtype=np.int64), **kv}
        for gbps in paced_gbps:
            msg = wire.pack(REQUEST, {"backend": "partially_aware", "pace_gbps": gbps}, tensors)
            samples, marks = timed(port, msg, repeat, Pacer(LinkParams(gbps=gbps, rtt_s=0.0)))
            print(json.dumps({"backend": "partially_aware", "seq_len": seq_len, "paced_gbps": gbps,
                              "samples_s": samples, "server": marks}), flush=True)
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
    args = parser.parse_args()
    try:
        run(args.port, args.model, args.dtype, [int(c) for c in args.contexts.split(",")], args.repeat,
            [float(g) for g in args.paced_gbps.split(",") if g], [int(c) for c in args.paced_contexts.split(",") if c])
    finally:
        try:
            request(args.port, wire.pack(STOP, {}))
        except OSError:
            print("composition client: could not stop the server", file=sys.stderr)


if __name__ == "__main__":
    main()
