"""Why `validate`'s large messages cross loopback slower than calibrate's old loopback stage said:
the ways of moving one message between two processes on this host, interleaved round by round.

    python benchmarks/loopback_paths.py [--mib 47] [--rounds 12] [--validate-model gpt2 --context 600]

Each round times, one after the other (so a busy shared machine slows them alike):
  old stage  calibrate's loopback stage before this change: an already-built tensor (touched pages)
             goes out in one wire.send_message sendall; the peer reads it into a fresh buffer on
             its main thread and answers a few bytes. Time: send start -> the small reply is in.
  pack       wire.pack of the payload: the serialization copy (the profile's `serialize`).
  fresh buffer  bytearray(n): the zero-filled, page-faulting buffer a receiver allocates before
             reading a message (wire._recv_exact), part of every transport time below.
  half-RTT sleep  what time.sleep(RTT / 2), linkemu.Pacer's propagation delay before this change,
             takes (the simulator charges RTT / 2); half-RTT hold: linkemu.hold(RTT / 2), its delay now.
  rig up     validate's path one way, pack not included: linkemu.Pacer (1 MiB chunks), the peer's
             connection thread reads it (linkemu.recv_message) and hands it through a queue to its
             executor thread (calibrate/loopback_server.py, MIRROR: what the loopback stage now times).
  rig down   the same bytes coming back: the executor frames them (not timed), the connection thread
             sends them through its Pacer, this end reads them.
With --validate-model, validate's own server process (validate/server.py, CPU, one torch thread)
and client (validate/clients.py) run partially_aware steps at --context tokens after the rounds,
and the records' uplink_s / downlink_s (which include the sender's pack) are printed with the
server's copy_s and compute_s; then full_djinn steps (one id up, last-token logits down: small
messages) give `small uplink` / `small downlink`, beside `small RTT / 2` of the rounds (an ECHO
through the same path: the profile's per_message_s). Figures: median and P10-P90 over rounds. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

from djinnsim.calibrate import wire
from djinnsim.calibrate.bench_network import mirror_transport_s
from djinnsim.calibrate.loopback_server import ECHO, SINK, STOP, UNPACED
from djinnsim.common import linkemu


def _old_peer(conn_out) -> None:
    """calibrate/loopback_server.py as it was: one thread reads a message, answers a few bytes."""
    listener = socket.create_server(("127.0.0.1", 0))
    conn_out.send(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            msg_type, _, _, nbytes = wire.recv_message(conn)
            if msg_type == STOP:
                return
            wire.send_message(conn, wire.encode(msg_type, {"n": nbytes}))


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def interleaved(nbytes: int, rounds: int, rtt_s: float) -> dict[str, list[float]]:
    mp = multiprocessing.get_context("spawn")
    here, there = mp.Pipe()
    old = mp.Process(target=_old_peer, args=(there,), daemon=True)
    old.start()
    new = subprocess.Popen([sys.executable, "-m", "djinnsim.calibrate.loopback_server"], stdout=subprocess.PIPE, text=True)
    times: dict[str, list[float]] = {"old stage": [], "pack": [], "fresh buffer": [], "half-RTT sleep": [], "half-RTT hold": [],
                                     "rig up": [], "rig down": [], "small RTT / 2": []}
    payload = np.ones(nbytes, dtype=np.uint8)
    old_parts = wire.encode(SINK, {}, {"x": payload})
    uplink = linkemu.Pacer(UNPACED)
    with _connect(here.recv()) as old_sock, _connect(int(new.stdout.readline())) as new_sock:
        for rnd in range(rounds + 1):
            t0 = time.perf_counter()
            wire.send_message(old_sock, old_parts)
            wire.recv_message(old_sock)
            old_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            wire.pack(SINK, {}, {"x": payload})
            pack_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            bytearray(nbytes)
            fresh_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            time.sleep(rtt_s / 2)
            sleep_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            linkemu.hold(rtt_s / 2)
            hold_s = time.perf_counter() - t0
            (up_s,), (down_s,) = mirror_transport_s(new_sock, uplink, payload, repeats=1) if rnd else ([0.0], [0.0])
            if rnd:  # round 0 warms both peers up
                for name, value in (("old stage", old_s), ("pack", pack_s), ("fresh buffer", fresh_s),
                                    ("half-RTT sleep", sleep_s), ("half-RTT hold", hold_s), ("rig up", up_s), ("rig down", down_s)):
                    times[name].append(value)
        for _ in range(20 * rounds):  # as the stage does, apart from the large messages (whose buffers
            t0 = time.perf_counter()  # the peer frees inside the next message's interval)
            uplink.send(new_sock, wire.encode(ECHO, {"op": "ping"}))
            linkemu.recv_message(new_sock)
            times["small RTT / 2"].append((time.perf_counter() - t0) / 2)
        wire.send_message(old_sock, wire.encode(STOP, {}))
        uplink.send(new_sock, wire.encode(STOP, {}))
    old.join(timeout=10)
    new.wait(timeout=10)
    return times


def validate_server_path(model: str, context: int, steps: int, gbps: float, rtt_s: float) -> dict[str, list[float]]:
    """validate's own server process (CPU) and client decoding as partially_aware does."""
    from djinnsim.sim.specs import get_model
    from djinnsim.validate import clients
    from djinnsim.validate.protocol import Op
    from djinnsim.validate.realrun import ServerProcess
    from djinnsim.validate.server import ServerConfig

    mp = multiprocessing.get_context("spawn")
    config = ServerConfig(model=model, device="cpu", dtype=None, link_gbps=gbps, rtt_s=rtt_s, threads=1)
    server = ServerProcess(mp, config)
    status, message = server.start(timeout_s=300)
    if status != "ready":
        raise SystemExit(f"validate server did not start: {message}")
    client = clients.Client(linkemu.LinkParams(gbps, rtt_s), timeout_s=300)
    ids = np.random.default_rng(0).integers(0, get_model(model).vocab_size, size=(1, context), dtype=np.int64)
    parts: dict[str, list[float]] = {k: [] for k in ("uplink", "downlink", "copy", "compute", "mbytes",
                                                     "small uplink", "small downlink")}
    kv = None
    try:
        for t in range(steps + 2):
            tensors = {"ids": ids} if kv is None else {"ids": ids[:, -1:], "kv": kv}
            header = {"s": "0.0", "kv": "client", "compute": "incremental", "logits": "last", "end": t == steps + 1}
            ex = client.request(server.port, Op.STEP, header, tensors)
            kv = ex.tensors["kv"]
            ids = np.concatenate([ids, ex.tensors["logits"][:, -1].argmax(-1).reshape(1, 1).astype(np.int64)], axis=1)
            if t >= 2:  # step 0 is the prefill, step 1 the first KV round trip (warm-up)
                head = ex.header
                parts["uplink"].append(head["recv_at"] - ex.issued_at - ex.connect_s)
                parts["downlink"].append(ex.finished_at - head["done_at"])
                parts["copy"].append(head["copy_s"])
                parts["compute"].append(head["compute_s"])
                parts["mbytes"].append(ex.bytes_up / 1e6)
        ids = ids[:, :context]
        for t in range(steps + 2):  # full_djinn: the KV stays on the server, one id up, logits down
            header = {"s": "1.0", "kv": "session", "compute": "incremental", "logits": "last", "end": t == steps + 1}
            ex = client.request(server.port, Op.STEP, header, {"ids": ids if t == 0 else ids[:, -1:]})
            ids = np.concatenate([ids, ex.tensors["logits"][:, -1].argmax(-1).reshape(1, 1).astype(np.int64)], axis=1)
            if t >= 2:
                parts["small uplink"].append(ex.header["recv_at"] - ex.issued_at - ex.connect_s)
                parts["small downlink"].append(ex.finished_at - ex.header["done_at"])
    finally:
        clients.control(server.port, Op.SHUTDOWN)
        server.process.join(timeout=10)
    return parts


def _row(name: str, values: list[float], nbytes: float) -> str:
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return (f"{name:18s} p50 {1e3 * p50:8.2f} ms (P10 {1e3 * p10:7.2f}, P90 {1e3 * p90:7.2f})"
            f"  {nbytes / p50 / 1e9:5.2f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=47.0, help="payload per message in MiB")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--validate-model", default=None, help="also run validate's server (CPU) with this bundled model")
    parser.add_argument("--context", type=int, default=600, help="tokens of context for --validate-model")
    parser.add_argument("--gbps", type=float, default=25.0, help="emulated line rate for --validate-model")
    parser.add_argument("--rtt-ms", type=float, default=0.2, help="emulated RTT for --validate-model")
    args = parser.parse_args()
    nbytes = int(args.mib * 2**20)
    times = interleaved(nbytes, args.rounds, args.rtt_ms / 1e3)
    print(f"{nbytes / 2**20:.1f} MiB per message, {args.rounds} interleaved rounds after one warm-up")
    for name, values in times.items():
        print(_row(name, values, nbytes))
    if args.validate_model:
        real = validate_server_path(args.validate_model, args.context, args.rounds, args.gbps, args.rtt_ms / 1e3)
        mbytes = statistics.median(real.pop("mbytes"))
        print(f"validate's server + client, {args.validate_model} partially_aware at {args.context} tokens, "
              f"{args.gbps:g} Gbps, RTT {args.rtt_ms:g} ms: {mbytes:.1f} MB of KV each way")
        for name, values in real.items():
            print(_row(f"validate {name}", values, mbytes * 1e6 if "small" not in name else 1))


if __name__ == "__main__":
    main()
