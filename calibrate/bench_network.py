"""Host-side costs of the remote backends: wire-format (de)serialization and TCP on loopback.

The TCP peer is a separate process (calibrate/loopback_server.py) that receives and replies the way
validate's server does, so the numbers include two processes' socket work and validate's send and
receive path (pacer chunks, receive thread, hand-off to an executor thread), as its real link pays.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
from djinnsim.common import linkemu
from djinnsim.sim.profile import Bandwidth, Network

from . import wire
from .fitting import fit_bandwidth, loopback_cap_gbps
from .loopback_server import ECHO, MIRROR, STOP, UNPACED
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


def mirror_transport_s(sock: socket.socket, uplink: linkemu.Pacer, payload: np.ndarray, repeats: int
                       ) -> tuple[list[float], list[float]]:
    """Each direction's transport time of `payload`, sent the way validate's client and server move
    a per-token backend's KV: framed by wire.pack (not timed: the profile's serialize charges it),
    sent through a linkemu.Pacer, read by the peer's connection thread and handed to its executor
    thread, mirrored back the same way. Up: send start -> the peer has read it; down: the peer has
    framed the reply -> this end has read it (both clocks are CLOCK_MONOTONIC, shared by processes).
    The first round trip is a warm-up; what comes back is what goes up next, as with the KV."""
    up_s, down_s = [], []
    for rep in range(repeats + 1):
        message = wire.pack(MIRROR, {}, {"x": payload})
        sent_at = time.perf_counter()
        uplink.send(sock, [message])
        _, _, tensors, _ = linkemu.recv_message(sock)
        received_at = time.perf_counter()
        _, stamps, _, _ = linkemu.recv_message(sock)
        del message
        payload = tensors["x"]
        if rep:
            up_s.append(stamps["recv_at"] - sent_at)
            down_s.append(received_at - stamps["packed_at"])
    return up_s, down_s


def run_loopback(s: Session) -> Network:
    """Connect, small-message RTT and large-message throughput on loopback, between this process and
    a peer process that moves bytes the way validate's server does (calibrate/loopback_server.py).
    The throughput is what the simulator's loopback cap stands for: each direction of validate's
    real link, at the plan's sizes, transport only (serialization is its own profile entry)."""
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
        uplink = linkemu.Pacer(UNPACED)
        with _connect(port) as sock:
            small = wire.encode(ECHO, {"op": "ping"})
            for _ in range(20):  # warm-up
                uplink.send(sock, small)
                linkemu.recv_message(sock)
            rtt = Timing()
            for _ in range(plan.net_rtt_repeat):
                t0 = time.perf_counter()
                uplink.send(sock, small)
                linkemu.recv_message(sock)
                rtt.samples_s.append(time.perf_counter() - t0)
            s.log.add_timing("tcp_rtt", "loopback", rtt.samples_s, nbytes=wire.message_bytes(small))
            s.advance(1)
            sizes, times = [], []
            for nbytes in plan.net_sizes:
                payload = np.ones(nbytes, dtype=np.uint8)
                up_s, down_s = mirror_transport_s(sock, uplink, payload, plan.net_repeat)
                s.log.add_timing("tcp_send", "loopback_up", up_s, nbytes=nbytes)
                s.log.add_timing("tcp_send", "loopback_down", down_s, nbytes=nbytes)
                up, down = Timing(up_s), Timing(down_s)
                s.say(f"tcp loopback {nbytes / 2**20:9.3f} MiB: up {up.describe()} {nbytes / up.p50 / 1e9:6.2f} GB/s | "
                      f"down {down.describe()} {nbytes / down.p50 / 1e9:6.2f} GB/s")
                sizes.append(nbytes)
                times.append(float(np.median(up_s + down_s)))
                s.advance(1)
            uplink.send(sock, wire.encode(STOP, {}))
        bw, stats = fit_bandwidth(sizes, times)
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    cap_gbps = loopback_cap_gbps(sizes, times)
    s.say(
        f"tcp loopback: connect {connect.describe()}; small-message RTT {rtt.describe()}; "
        f"{cap_gbps:.2f} GB/s at {sizes[-1] / 2**20:.0f} MiB, the cap (fit over sizes: {bw.latency_s * 1e6:.0f} us + "
        f"bytes / {bw.gbps:.2f} GB/s" + (f", {bw.large_gbps:.2f} GB/s above {bw.large_from_bytes / 2**20:.0f} MiB" if bw.large_gbps else "")
        + f", max rel err {100 * stats['max_rel_err']:.1f}%)"
    )
    s.log.flush()
    return Network(
        connect_s=connect.p50,
        per_message_s=rtt.p50 / 2,  # an RTT is two framed messages, one each way
        loopback_rtt_s=rtt.p50,
        loopback_gbps=cap_gbps,
    )
