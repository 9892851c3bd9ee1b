"""Host-side costs of the remote backends: wire-format (de)serialization and TCP on loopback.

The TCP peer is a separate process (calibrate/loopback_server.py), so the numbers include two
processes' socket work, as a client and a server on one host would pay.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
from djinnsim.sim.profile import Bandwidth, Network

from . import wire
from .fitting import fit_bandwidth
from .loopback_server import ECHO, SINK, STOP
from .session import Session
from .timer import Timing, measure


def run_serde(s: Session) -> dict[str, Bandwidth]:
    """serialize: frame a tensor into one send buffer (wire.pack); deserialize: parse it back (zero-copy)."""
    sizes, ser_s, de_s = [], [], []
    noop = lambda: None
    for nbytes in s.plan.serde_sizes:
        array = np.random.default_rng(nbytes).integers(0, 255, size=nbytes // 2, dtype=np.uint16).view(np.float16)
        packed = wire.pack(3, {"op": "bench"}, {"x": array})
        ser = measure(lambda: wire.pack(3, {"op": "bench"}, {"x": array}), noop, warmup=1, repeat=s.plan.repeat)
        de = measure(lambda: wire.unpack(packed), noop, warmup=1, repeat=s.plan.repeat)
        s.log.add_timing("serialize", f"{nbytes}", ser.samples_s, nbytes=nbytes)
        s.log.add_timing("deserialize", f"{nbytes}", de.samples_s, nbytes=nbytes)
        s.say(
            f"serde {nbytes / 2**20:10.3f} MiB: serialize {ser.describe()} {nbytes / ser.p50 / 1e9:6.2f} GB/s | "
            f"deserialize {de.describe()} {nbytes / de.p50 / 1e9:8.2f} GB/s"
        )
        sizes.append(nbytes)
        ser_s.append(ser.p50)
        de_s.append(de.p50)
        s.advance(1)
    out = {}
    for name, times in (("serialize", ser_s), ("deserialize", de_s)):
        bw, stats = fit_bandwidth(sizes, times)
        out[name] = bw
        s.say(f"fit {name}: {bw.latency_s * 1e6:.1f} us + bytes / {bw.gbps:.2f} GB/s (max rel err {100 * stats['max_rel_err']:.1f}%)")
    s.log.flush()
    return out


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def run_loopback(s: Session) -> Network:
    plan = s.plan
    proc = subprocess.Popen(
        [sys.executable, "-m", "djinnsim.calibrate.loopback_server"], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())
        connect = Timing()
        for _ in range(plan.net_connect_repeat):
            t0 = time.perf_counter()
            sock = _connect(port)
            connect.samples_s.append(time.perf_counter() - t0)
            sock.close()
        s.log.add_timing("tcp_connect", "loopback", connect.samples_s)
        s.advance(1)
        with _connect(port) as sock:
            small = wire.encode(ECHO, {"op": "ping"})
            for _ in range(20):  # warm-up
                wire.send_message(sock, small)
                wire.recv_message(sock)
            rtt = Timing()
            for _ in range(plan.net_rtt_repeat):
                t0 = time.perf_counter()
                wire.send_message(sock, small)
                wire.recv_message(sock)
                rtt.samples_s.append(time.perf_counter() - t0)
            s.log.add_timing("tcp_rtt", "loopback", rtt.samples_s, nbytes=wire.message_bytes(small))
            s.advance(1)
            sizes, times = [], []
            for nbytes in plan.net_sizes:
                payload = np.ones(nbytes, dtype=np.uint8)
                parts = wire.encode(SINK, {}, {"x": payload})
                timing = Timing()
                for rep in range(4):
                    t0 = time.perf_counter()
                    wire.send_message(sock, parts)
                    wire.recv_message(sock)
                    if rep > 0:  # the first message is the warm-up
                        timing.samples_s.append(time.perf_counter() - t0)
                s.log.add_timing("tcp_send", "loopback", timing.samples_s, nbytes=nbytes)
                s.say(f"tcp loopback {nbytes / 2**20:9.3f} MiB: {timing.describe()} {nbytes / timing.p50 / 1e9:6.2f} GB/s")
                sizes.append(nbytes)
                times.append(timing.p50)
                s.advance(1)
            wire.send_message(sock, wire.encode(STOP, {}))
        bw, stats = fit_bandwidth(sizes, times)
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    s.say(
        f"tcp loopback: connect {connect.describe()}; small-message RTT {rtt.describe()}; "
        f"{bw.gbps:.2f} GB/s (fit max rel err {100 * stats['max_rel_err']:.1f}%)"
    )
    s.log.flush()
    return Network(
        connect_s=connect.p50,
        per_message_s=rtt.p50 / 2,  # an RTT is two framed messages, one each way
        loopback_rtt_s=rtt.p50,
        loopback_gbps=bw.gbps,
    )
