"""A link emulator for real sockets on loopback: line rate and propagation delay, bytes counted.

Loopback is far faster than the scenario's link, so each end paces what it sends: a message may
leave no faster than `gbps`, one direction's messages queue behind each other (one `Pacer` per
direction per process, shared by its threads), and each message is held back half the RTT first
(propagation). Opening a connection costs one RTT (the TCP handshake). Every byte handed to the
kernel and every byte read back is counted, so the bytes reported are the bytes on the socket.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from djinnsim.calibrate import wire

CHUNK_BYTES = 1 << 20  # pacing granularity: big enough for loopback speed, small enough to pace smoothly
SPIN_S = 0.5e-3  # a delay's last SPIN_S is waited out on the clock: time.sleep overshoots by ~0.1 ms
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LinkParams:
    gbps: float
    rtt_s: float

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9 / 8


def hold(delay_s: float) -> None:
    """Wait `delay_s`, neither less nor, by the sleep's wake-up lateness, much more: sleep until
    SPIN_S before the deadline, then watch the clock (time.sleep(0.1 ms) alone takes ~0.2 ms, which
    would add to every emulated propagation delay what the simulator never charges)."""
    deadline = time.perf_counter() + delay_s
    if delay_s > SPIN_S:
        time.sleep(delay_s - SPIN_S)
    while time.perf_counter() < deadline:
        pass


class Pacer:
    """One direction of the emulated link: messages leave one at a time, never faster than the line rate."""

    def __init__(self, params: LinkParams) -> None:
        self.params = params
        self._lock = threading.Lock()

    def send(self, sock: socket.socket, parts: list[memoryview | bytes]) -> int:
        """Send one framed message; returns the bytes written to the socket."""
        if self.params.rtt_s > 0:
            hold(self.params.rtt_s / 2)
        rate = self.params.bytes_per_s
        sent = 0
        with self._lock:
            started_at = time.perf_counter()
            for part in parts:
                view = memoryview(part).cast("B")
                for offset in range(0, view.nbytes, CHUNK_BYTES):
                    chunk = view[offset : offset + CHUNK_BYTES]
                    sock.sendall(chunk)
                    sent += chunk.nbytes
                    # Send as fast as loopback allows, but never ahead of the line rate.
                    ahead_s = started_at + sent / rate - time.perf_counter()
                    if ahead_s > 0:
                        time.sleep(ahead_s)
        return sent


def connect(port: int, params: LinkParams, timeout_s: float) -> socket.socket:
    """Open a TCP connection on loopback, paying the handshake's round trip."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if params.rtt_s > 0:
        hold(params.rtt_s)
    return sock


def recv_message(sock: socket.socket):
    """(type, header, tensors, bytes read from the socket)."""
    return wire.recv_message(sock)


def framing_bytes(parts: list[memoryview | bytes]) -> int:
    """Bytes of a message that are not tensor payload: the fixed prefix and the JSON header."""
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts[:2])
