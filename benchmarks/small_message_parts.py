"""Where a small message's time goes in validate's real runs: full_djinn steps (one id up, the
last-token logits down) between validate's own server process (CPU) and client, the server's
steps stamped from inside it.

    python benchmarks/small_message_parts.py [--model tiny-llama] [--steps 40]

The server process runs validate/server.py's `serve` with wire.pack, linkemu.Pacer.send and
linkemu.recv_message wrapped to stamp each call (the stamps go to a file the client reads after the
server exits). downlink = done_at -> the client has the reply, split into: done_at -> pack starts,
the reply's pack, the hand-off to the connection thread (pack ends -> its Pacer.send starts), the
send (half-RTT hold + sendall), and send end -> the client has read it (receive, decode, closing a
per-request connection). uplink = issued_at -> recv_at less the client's connect time. Median of
the steps after the first three. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from djinnsim.calibrate import wire
from djinnsim.common import linkemu
from djinnsim.validate import clients
from djinnsim.validate import server as validate_server
from djinnsim.validate.protocol import Op
from djinnsim.validate.realrun import ServerProcess
from djinnsim.validate.server import ServerConfig


def _stamped_serve(config: ServerConfig, control, stamps_path: str) -> None:
    stamps: list[tuple[str, float, float]] = []

    def wrap(owner, name: str, label: str, method: bool = False) -> None:
        real = getattr(owner, name)

        def stamped(*args, **kwargs):
            t0 = time.perf_counter()
            result = real(*args, **kwargs)
            stamps.append((label, t0, time.perf_counter()))
            return result

        setattr(owner, name, stamped)

    wrap(wire, "pack", "pack")
    wrap(linkemu.Pacer, "send", "send")
    try:
        validate_server.serve(config, control, None)
    finally:
        Path(stamps_path).write_text(json.dumps(stamps))


class _StampedServer(ServerProcess):
    def __init__(self, mp, config: ServerConfig, stamps_path: str) -> None:
        self.parent_end, child_end = mp.Pipe()
        self.process = mp.Process(target=_stamped_serve, args=(config, child_end, stamps_path), daemon=True)
        self.process.start()
        child_end.close()
        self.port, self.info, self.imported = None, {}, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--gbps", type=float, default=25.0)
    parser.add_argument("--rtt-ms", type=float, default=0.2)
    args = parser.parse_args()
    rtt_s = args.rtt_ms / 1e3
    stamps_path = str(Path(tempfile.mkdtemp(prefix="djinnsim-stamps-")) / "stamps.json")
    config = ServerConfig(model=args.model, device="cpu", dtype=None, link_gbps=args.gbps, rtt_s=rtt_s, threads=1)
    server = _StampedServer(multiprocessing.get_context("spawn"), config, stamps_path)
    status, message = server.start(timeout_s=300)
    if status != "ready":
        raise SystemExit(f"validate server did not start: {message}")
    client = clients.Client(linkemu.LinkParams(args.gbps, rtt_s), timeout_s=300)
    ids = np.zeros((1, 64), dtype=np.int64)
    exchanges = []
    for t in range(args.steps):
        header = {"s": "0.0", "kv": "session", "compute": "incremental", "logits": "last", "end": t == args.steps - 1}
        exchanges.append(client.request(server.port, Op.STEP, header, {"ids": ids if t == 0 else ids[:, -1:]}))
        ids = np.concatenate([ids, np.zeros((1, 1), dtype=np.int64)], axis=1)
    clients.control(server.port, Op.SHUTDOWN)
    server.process.join(timeout=10)
    stamps = json.loads(Path(stamps_path).read_text())
    packs = [s for s in stamps if s[0] == "pack"]
    sends = [s for s in stamps if s[0] == "send"]
    parts: dict[str, list[float]] = {k: [] for k in ("done_at -> pack", "pack", "hand-off to the connection thread",
                                                     "send (hold + sendall)", "send end -> client has it", "downlink",
                                                     "uplink")}
    for ex in exchanges[3:]:
        done_at = ex.header["done_at"]
        pack = min((s for s in packs if s[1] >= done_at), key=lambda s: s[1])
        send = min((s for s in sends if s[1] >= pack[2]), key=lambda s: s[1])
        for name, value in zip(parts, (pack[1] - done_at, pack[2] - pack[1], send[1] - pack[2], send[2] - send[1],
                                       ex.finished_at - send[2], ex.finished_at - done_at,
                                       ex.header["recv_at"] - ex.issued_at - ex.connect_s)):
            parts[name].append(value)
    print(f"{args.model} full_djinn steps on validate's server (CPU), {args.gbps:g} Gbps, RTT {args.rtt_ms:g} ms, "
          f"{exchanges[-1].bytes_down} B down; median of {len(exchanges) - 3}")
    for name, values in parts.items():
        print(f"{name:36s} {1e3 * statistics.median(values):7.3f} ms")


if __name__ == "__main__":
    main()
