"""The link emulator: line rate, propagation delay, bytes counted on the socket; and the
validation scenario (overrides, point selection) and the profile check."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from conftest import make_profile

from djinnsim.calibrate import wire
from djinnsim.common import linkemu
from djinnsim.errors import DjinnsimError
from djinnsim.sim.scenario import expand_points, parse_scenario
from djinnsim.sim.specs import get_model
from djinnsim.validate.pipeline import Machine, check_profile
from djinnsim.validate.points import Shortening, parse_agents, select_points, validation_scenario


def _send_through(params: linkemu.LinkParams, payload_bytes: int) -> tuple[float, int, int, dict]:
    a, b = socket.socketpair()
    got = {}

    def reader():
        got["msg"] = wire.recv_message(b)

    thread = threading.Thread(target=reader)
    thread.start()
    message = wire.pack(1, {"k": 1}, {"x": np.zeros(payload_bytes, dtype=np.uint8)})
    t0 = time.perf_counter()
    sent = linkemu.Pacer(params).send(a, [message])
    thread.join(10)
    elapsed = time.perf_counter() - t0
    a.close()
    b.close()
    return elapsed, sent, len(message), got


@pytest.mark.parametrize("delay_s", [0.0, 1e-4, linkemu.SPIN_S, 3 * linkemu.SPIN_S])
def test_hold_never_ends_before_its_delay(delay_s):
    """The emulated propagation delay: sleeping, then watching the clock for its last SPIN_S."""
    for _ in range(5):
        t0 = time.perf_counter()
        linkemu.hold(delay_s)
        assert time.perf_counter() - t0 >= delay_s


def test_pacer_holds_the_line_rate_and_counts_bytes():
    # 2 MB at 0.16 Gbps (20 MB/s) must take at least 0.1 s; loopback alone takes far less
    elapsed, sent, length, got = _send_through(linkemu.LinkParams(gbps=0.16, rtt_s=0.0), 2_000_000)
    assert sent == length
    assert got["msg"][3] == length  # the receiver read exactly what was sent
    assert elapsed >= 0.1 * 0.98
    assert elapsed < 1.0


def test_pacer_adds_half_the_rtt_per_message():
    elapsed, _, _, _ = _send_through(linkemu.LinkParams(gbps=1e6, rtt_s=0.2), 10)
    assert 0.1 * 0.98 <= elapsed < 0.5


def test_pacer_queues_messages_of_one_direction():
    params = linkemu.LinkParams(gbps=0.08, rtt_s=0.0)  # 10 MB/s
    pacer = linkemu.Pacer(params)
    pairs = [socket.socketpair() for _ in range(2)]
    readers = [threading.Thread(target=wire.recv_message, args=(b,)) for _, b in pairs]
    for r in readers:
        r.start()
    message = wire.pack(1, {}, {"x": np.zeros(500_000, dtype=np.uint8)})
    t0 = time.perf_counter()
    senders = [threading.Thread(target=pacer.send, args=(a, [message])) for a, _ in pairs]
    for s in senders:
        s.start()
    for t in senders + readers:
        t.join(10)
    assert time.perf_counter() - t0 >= 0.1 * 0.98  # two 0.05 s messages share one line
    for a, b in pairs:
        a.close()
        b.close()


DECODE = {"name": "d", "backends": ["full_djinn", "native_pytorch"], "workload": {"kind": "decode", "runs": 30,
          "warmup_runs": 5}, "sweep": {"gpu": ["a100-80gb", "h100-80gb"], "link_gbps": [10, 25]},
          "cost_model": "transfer"}
AGENTS = {"name": "a", "backends": ["djinn", "ray_keepalive"], "workload": {"kind": "agents", "agents": [1, 2, 4, 8]}}


def test_validation_scenario_shortens_and_pins_the_gpu():
    s = validation_scenario(parse_scenario(DECODE), Shortening(runs=4, warmup_runs=1, new_tokens=7),
                            "tiny-llama", "h200")
    assert (s.workload.runs, s.workload.warmup_runs, s.workload.new_tokens) == (4, 1, 7)
    assert s.model == "tiny-llama" and s.gpu == "h200" and s.cost_model == "profile"
    assert s.sweep.gpu is None and s.sweep.link_gbps == [10, 25]
    assert len(expand_points(s)) == 4
    a = validation_scenario(parse_scenario(AGENTS), Shortening(agents=(1, 2), act_s=0.5), None, None)
    assert a.workload.agents == [1, 2] and a.workload.act.seconds == 0.5


def test_validation_scenario_reports_a_clash_in_one_line():
    with pytest.raises(DjinnsimError, match="warmup_runs"):
        validation_scenario(parse_scenario(DECODE), Shortening(runs=2, warmup_runs=2), None, None)


def test_select_points_by_index_and_glob():
    points = expand_points(validation_scenario(parse_scenario(AGENTS), Shortening(agents=(1, 2)), None, None))
    assert [p.index for p in select_points(points, ["ray_keepalive*"])] == [2, 3]
    assert [p.index for p in select_points(points, ["0", "*n2"])] == [0, 1, 3]
    assert select_points(points, None) == points
    with pytest.raises(DjinnsimError, match="matches no point"):
        select_points(points, ["nothing*"])


def test_parse_agents():
    assert parse_agents("1,2,4") == (1, 2, 4)
    for bad in ("1,x", "0,2"):
        with pytest.raises(DjinnsimError, match="--agents"):
            parse_agents(bad)


def _machine(**changes) -> Machine:
    fields = dict(device="cuda", name="NVIDIA H100 80GB HBM3", gpu_index=0, memory_bytes=85520809984,
                  driver="580", torch="2.11.0", transformers="5.17.0", host_cpu="x")
    fields.update(changes)
    return Machine(**fields)


def test_check_profile_accepts_this_machine_and_refuses_others(tmp_path):
    profile = make_profile()
    profile = profile.model_copy(update={"metadata": profile.metadata.model_copy(
        update={"torch": "2.11.0", "transformers": "5.17.0", "device": "cuda"})})
    spec = get_model("llama-2-7b")
    check_profile(profile, tmp_path / "p.json", _machine(), spec, "float16")
    for machine, dtype, model, what in (
        (_machine(name="NVIDIA H200"), "float16", "llama-2-7b", "GPU"),
        (_machine(torch="2.13.0"), "float16", "llama-2-7b", "torch"),
        (_machine(transformers="5.24.0"), "float16", "llama-2-7b", "transformers"),
        (_machine(), "bfloat16", "llama-2-7b", "dtype"),
        (_machine(), "float16", "mistral-7b", "model"),
        (_machine(device="cpu"), "float16", "llama-2-7b", "device"),
    ):
        with pytest.raises(DjinnsimError, match=what) as info:
            check_profile(profile, tmp_path / "p.json", machine, get_model(model), dtype)
        assert "\n" not in str(info.value)


class _FakeWorker:
    """Stands in for a keep-alive worker process: it fits, or its copy runs out of memory."""

    def __init__(self, port: int, fits: bool) -> None:
        self.port, self.fits, self.started, self.stopped = port, fits, False, False

    def wait_imported(self, timeout_s: float) -> bool:
        return True

    def start(self, timeout_s: float):
        self.started = True
        return ("ready", "") if self.fits else ("oom", "CUDA out of memory")

    def stop(self) -> None:
        self.stopped = True


def test_keepalive_probe_loads_copies_in_order_until_the_first_oom():
    from djinnsim.validate.realrun import RealOptions, RealRunner

    s = validation_scenario(parse_scenario(AGENTS), Shortening(agents=(1, 2)), None, None)
    points = [p for p in expand_points(s) if p.backend.name == "ray_keepalive"]
    runner = RealRunner(s, points, RealOptions(device="cuda:0", gpu_index=0, repeats=1, seed=0,
                                               deadline=time.perf_counter() + 60), say=lambda m: None)
    ran = []
    runner._run_point = lambda point, ports, reset, probe_port: ran.append((point.n_agents, list(ports), probe_port))
    workers = [_FakeWorker(1000 + i, fits=i < 3) for i in range(6)]
    probe = runner._run_per_agent("ray_keepalive", points, workers)
    # each point with exactly N copies resident; --level-probe would probe the first copy
    assert ran == [(1, [1000], 1000), (2, [1000, 1001], 1000)]
    assert (probe.loaded, probe.oom_n, probe.max_n) == (3, 4, 6)
    assert [w.started for w in workers] == [True, True, True, True, False, False]  # stops at the first OOM
    assert all(w.stopped for w in workers)
