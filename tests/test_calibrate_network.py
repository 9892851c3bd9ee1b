"""calibrate's loopback stage measures the link the way validate's real runs move bytes.

The simulator caps a loopback link (validate's real runs) at the profile's `network.loopback_gbps`,
so that figure must come from validate's own send and receive path (linkemu.Pacer, a receive
thread handing each message to an executor thread), each way, at the largest size measured.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest

from djinnsim.calibrate import bench_network, wire
from djinnsim.calibrate.fitting import loopback_cap_gbps
from djinnsim.calibrate.loopback_server import ECHO, MIRROR, STOP, UNPACED
from djinnsim.calibrate.plan import KIB, MIB, plan_for
from djinnsim.calibrate.refit import medians_by_size
from djinnsim.calibrate.samples import SampleLog
from djinnsim.calibrate.session import Session
from djinnsim.common import linkemu
from djinnsim.sim.specs import get_model

SLOW_SEND_BPS = 20e6  # what the slowed send path below moves: far under any loopback's GB/s


def _session(sizes: tuple[int, ...], repeat: int) -> Session:
    plan = dataclasses.replace(plan_for("cpu", quick=True), net_sizes=sizes, net_repeat=repeat,
                               net_rtt_repeat=5, net_connect_repeat=2)
    return Session(spec=get_model("tiny-llama"), device="cpu", dtype=None, plan=plan, log=SampleLog(None),
                   say=lambda m: None)


def test_the_loopback_cap_is_measured_through_validates_send_path(monkeypatch):
    """Slowing linkemu.Pacer.send (validate's way of sending) must slow the calibrated cap: a stage
    that times some other path (one sendall, as it did before) would not see it."""
    real_send = linkemu.Pacer.send

    def slow_send(self, sock, parts):
        time.sleep(sum(memoryview(p).nbytes for p in parts) / SLOW_SEND_BPS)
        return real_send(self, sock, parts)

    monkeypatch.setattr(linkemu.Pacer, "send", slow_send)
    s = _session((64 * KIB, MIB), repeat=2)
    network = bench_network.run_loopback(s)
    # Up at 20 MB/s, down at loopback speed: the median of the two ways' times is at least half the
    # slow one's, so the rate is at most twice the slow rate (4x leaves room; loopback runs ~1 GB/s).
    assert network.loopback_gbps < 4 * SLOW_SEND_BPS / 1e9
    labels = {row["point"] for row in s.log.rows if row["stage"] == "tcp_send"}
    assert labels == {"loopback_up", "loopback_down"}


def test_the_peer_mirrors_a_message_with_the_stamps_of_each_direction():
    proc = subprocess.Popen([sys.executable, "-m", "djinnsim.calibrate.loopback_server"], stdout=subprocess.PIPE, text=True)
    try:
        sock = linkemu.connect(int(proc.stdout.readline()), UNPACED, timeout_s=30)
        with sock:
            payload = np.arange(3 * MIB // 8, dtype=np.int64)
            pacer = linkemu.Pacer(UNPACED)
            sent_at = time.perf_counter()
            pacer.send(sock, [wire.pack(MIRROR, {}, {"x": payload})])
            _, _, tensors, _ = linkemu.recv_message(sock)
            received_at = time.perf_counter()
            msg_type, stamps, _, _ = linkemu.recv_message(sock)
            assert np.array_equal(tensors["x"], payload)
            assert msg_type == ECHO and sent_at < stamps["recv_at"] < stamps["packed_at"] < received_at
            up_s, down_s = bench_network.mirror_transport_s(sock, pacer, payload, repeats=2)
            assert len(up_s) == len(down_s) == 2 and min(up_s + down_s) > 0
            pacer.send(sock, wire.encode(STOP, {}))
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_cap_is_the_rate_of_the_largest_size_not_a_fitted_line():
    # 64 KiB latency-bound, 4 MiB at 2 GB/s, 64 MiB at 1 GB/s: a line through all three runs near
    # 2 GB/s and would charge a 64 MiB message half its measured time.
    sizes = [64 * KIB, 4 * MIB, 64 * MIB]
    seconds = [1e-4, 4 * MIB / 2e9, 64 * MIB / 1e9]
    assert loopback_cap_gbps(sizes, seconds) == pytest.approx(1.0)
    rows = [{"stage": "tcp_send", "unit": "s", "nbytes": str(n), "value": str(t * f)}
            for n, t in zip(sizes, seconds) for f in (0.9, 1.0, 1.1)]
    assert loopback_cap_gbps(*zip(*medians_by_size(rows, "tcp_send"))) == pytest.approx(1.0)
