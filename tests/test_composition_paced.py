"""calibrate's paced composition rows (network.paced_path) take validate's own message path: its
client frames each step from the KV view the last reply left and paces it, the server is
validate's own server process (spawned with its own model, as validate's real runs start it; its
downlink paced at each rate by Op.PACE), and the timed request follows a step, as in validate's
decode. Before H200 runs 12 and 13 the rows resent a message framed once, outside the timing, to
the composition server's single thread; in run 14 validate's request handling ran inside
calibrate's own process, where the server's copies ran about 3x faster than in validate's."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from djinnsim.calibrate import composition, composition_client  # noqa: E402
from djinnsim.calibrate.modeling import build_model  # noqa: E402
from djinnsim.calibrate.plan import plan_for  # noqa: E402
from djinnsim.calibrate.samples import SampleLog  # noqa: E402
from djinnsim.calibrate.session import Session  # noqa: E402
from djinnsim.sim.specs import get_model  # noqa: E402
from djinnsim.validate import server  # noqa: E402
from djinnsim.common.linkemu import LinkParams  # noqa: E402
from djinnsim.validate.clients import Client, Exchange, ServerError, control  # noqa: E402
from djinnsim.validate.protocol import Op  # noqa: E402

CONTEXT = 24
RATES = (0.002, 100.0)  # the slow rate paces each step by tens of ms: its rows must show it
REPEAT = 2


@pytest.fixture(scope="module")
def tiny_session():
    torch.set_num_threads(1)
    spec = get_model("tiny-llama")
    plan = dataclasses.replace(plan_for("cpu", quick=True), composition_contexts=(), composition_repeat=REPEAT,
                               composition_paced_gbps=RATES, composition_paced_contexts=(CONTEXT,))
    return Session(spec, "cpu", torch.float32, plan, SampleLog(None), say=lambda line: None,
                   model=build_model(spec, "cpu", torch.float32))


def test_the_paced_rows_are_validate_steps_served_by_a_validate_server_process(tiny_session, monkeypatch):
    started = []
    real_start = composition.start_paced_server

    def spy(s, rates):
        server_process = real_start(s, rates)
        started.append((server_process.process.pid, server_process.process.is_alive(), server_process.info))
        return server_process

    def refuse(*args):
        raise AssertionError("the composition server stepped a paced row")

    monkeypatch.setattr(composition, "start_paced_server", spy)
    monkeypatch.setattr(composition.BackendServer, "_step", refuse)
    said = []
    monkeypatch.setattr(tiny_session, "say", said.append)
    rows = composition.run_composition(tiny_session, cost=None, link_gbps=100.0)
    paced_lines = [line for line in said if "paced at" in line]  # each row names its server's copies and page faults
    assert len(paced_lines) == len(RATES) and all("d2h" in line and "page faults h2d" in line for line in paced_lines)

    [(pid, alive, info)] = started  # one process of its own for every rate, up before the rows
    assert alive and pid != os.getpid() and info
    spec = tiny_session.spec
    assert [(row["paced_gbps"], row["seq_len"]) for row in rows] == [(g, CONTEXT) for g in RATES]
    shape = composition.step_shape("partially_aware", spec, CONTEXT)
    for row in rows:
        assert (row["up_bytes"], row["down_bytes"]) == (shape.up_bytes, shape.down_bytes)
        assert set(row["server"]) == {"h2d_s", "compute_s", "d2h_s"} and all(v > 0 for v in row["server"].values())
        assert row["measured_s"] > sum(row["server"].values())
    slow, fast = rows  # the downlink paced at each rate in turn: the slow rate paces the KV down tens of ms slower
    wire_gap = (shape.down_bytes + shape.up_bytes) * 8 / 1e9 * (1 / RATES[0] - 1 / RATES[1])
    assert slow["measured_s"] - fast["measured_s"] > 0.25 * wire_gap  # about 0.5 measured; 100 Gbps alone would read ~0
    assert fast["measured_s"] < 0.5 * shape.down_bytes * 8 / (RATES[0] * 1e9)  # its reply not paced at the first rate
    kept = {r["point"] for r in tiny_session.log.rows if r["stage"] == "composition_paced"}
    assert kept == {f"partially_aware_L{CONTEXT}_{g:g}gbps" for g in RATES}


def test_validates_server_steps_a_paced_row_as_it_steps_a_real_decode(tiny_session, monkeypatch):
    """What the spawned server runs for each paced sample (validate's _GpuState._step, spied on in
    a server run in this process): the prompt, then two steps sending the KV back up."""
    steps = []
    validate_step = server._GpuState._step

    def spy(self, header, tensors):
        reply, out = validate_step(self, header, tensors)
        steps.append((header["kv"], {k: v.shape for k, v in tensors.items()}, reply))
        return reply, out

    monkeypatch.setattr(server._GpuState, "_step", spy)
    spec = tiny_session.spec
    config = server.ServerConfig(model="tiny-llama", device="cpu", dtype="float32", link_gbps=RATES[0], rtt_s=0.0,
                                 lifetime_s=120.0, idle_s=60.0, threads=1)
    state = server._GpuState(config, None)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)  # as serve() sets it: the accept thread sees the stop
    before = set(threading.enumerate())
    runner = server._Server(config, state, listener, time.perf_counter() + 120.0, os.getppid())
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    assert control(port, Op.PACE, {"link_gbps": RATES[1]})["link_gbps"] == RATES[1]
    assert runner.downlink.params.gbps == RATES[1]
    prompt = np.random.default_rng(0).integers(0, spec.vocab_size, (1, CONTEXT - 2), dtype=np.int64)
    composition_client.paced_step(Client(LinkParams(gbps=RATES[1], rtt_s=0.0), 60.0), port, prompt)
    for bad in (0, -1.0, float("nan"), "fast", None):  # a bad rate answers with one line; the server lives on
        with pytest.raises(ServerError, match="link_gbps"):
            control(port, Op.PACE, {"link_gbps": bad})
    assert runner.downlink.params.gbps == RATES[1]
    control(port, Op.SHUTDOWN)
    thread.join(30)
    for extra in set(threading.enumerate()) - before:  # no thread of the server outlives it (a later fork needs one thread)
        extra.join(30)
        assert not extra.is_alive()

    def kv_shape(tokens):
        return (spec.num_layers, 2, 1, spec.num_kv_heads, tokens, spec.head_dim)

    assert [st[1] for st in steps] == [{"ids": (1, CONTEXT - 2)}, {"ids": (1, 1), "kv": kv_shape(CONTEXT - 2)},
                                       {"ids": (1, 1), "kv": kv_shape(CONTEXT - 1)}]
    assert {st[0] for st in steps} == {"client"}
    for *_, reply in steps:  # the server's copy time, split so the rows keep h2d and d2h apart
        assert reply["copy_s"] == pytest.approx(reply["h2d_s"] + reply["d2h_s"], abs=1e-12)
        assert all(isinstance(reply[k], int) and reply[k] >= 0 for k in ("h2d_faults", "d2h_faults"))


def test_a_paced_step_frames_again_the_kv_view_the_last_reply_left_and_times_the_step_after_a_step():
    def received(tokens):  # a reply's KV: a view into the buffer it was received into
        kv = np.arange(2 * tokens * 5, dtype=np.float32).reshape(1, 2, 1, tokens, 5)
        return np.frombuffer(bytearray(kv.tobytes()), dtype=np.float32).reshape(kv.shape)

    views = [received(3), received(4), received(5)]
    sent = []

    class Client:  # validate's Client.request, recorded
        def request(self, port, op, header, tensors, conn=None):
            k = len(sent)
            sent.append((op, header, tensors))
            return Exchange(issued_at=10.0 * k, finished_at=10.0 * k + 0.25 * (k + 1), connect_s=0.001, status="ok",
                            header={"h2d_s": 0.01 * k, "compute_s": 0.02, "d2h_s": 0.03},
                            tensors={"logits": np.eye(4, dtype=np.float32)[k + 1].reshape(1, 1, 4), "kv": views[k]},
                            bytes_up=0, bytes_down=0, wire_bytes_up=0, wire_bytes_down=0)

    prompt = np.array([[5, 6, 7]], dtype=np.int64)
    elapsed, marks = composition_client.paced_step(Client(), 1234, prompt)
    assert elapsed == 0.75 and marks == {"h2d_s": 0.02, "compute_s": 0.02, "d2h_s": 0.03}  # the third request's
    assert [op for op, _, _ in sent] == [Op.STEP] * 3
    assert [h["kv"] for _, h, _ in sent] == ["client"] * 3 and [h["end"] for _, h, _ in sent] == [False, False, True]
    (_, _, up0), (_, _, up1), (_, _, up2) = sent
    assert up0["ids"] is prompt and "kv" not in up0
    assert up1["ids"].tolist() == [[1]] and up2["ids"].tolist() == [[2]]  # each reply's argmax, as validate's decode takes it
    assert up1["kv"] is views[0] and up2["kv"] is views[1]  # the received views themselves: Client.request frames them again


def test_a_paced_server_that_cannot_start_leaves_the_paced_rows_out_with_a_note(tiny_session, monkeypatch):
    from djinnsim.validate import realrun

    class Refused:  # a server process that reports it ran out of memory while it built its model
        stopped = False

        def __init__(self, mp, config):
            pass

        def start(self, timeout_s):
            return "oom", "CUDA out of memory"

        def stop(self):
            Refused.stopped = True

    monkeypatch.setattr(realrun, "ServerProcess", Refused)
    notes = len(tiny_session.notes)
    assert composition.run_composition(tiny_session, cost=None, link_gbps=100.0) == []
    [note] = tiny_session.notes[notes:]
    assert "paced rows' server process did not start (oom: CUDA out of memory)" in note and "paced_path not measured" in note
    assert Refused.stopped


def test_the_paced_rows_server_process_is_gone_before_the_first_unpaced_request(tiny_session, monkeypatch):
    """The client shuts it down after the paced rows; its process (on a GPU: its model and CUDA
    context) must have exited before the unpaced rows are served, not be tearing down beside them."""
    started, at_unpaced = [], []
    real_start, real_step = composition.start_paced_server, composition.BackendServer._step

    def spy(s, rates):
        started.append(real_start(s, rates))
        return started[-1]

    def step(self, backend, tensors):
        at_unpaced.append(started[0].process.exitcode)
        return real_step(self, backend, tensors)

    monkeypatch.setattr(composition, "start_paced_server", spy)
    monkeypatch.setattr(composition.BackendServer, "_step", step)
    monkeypatch.setattr(composition, "predict_step_s", lambda *args: {"total": 1.0, "compute": 1.0})
    session = dataclasses.replace(tiny_session, plan=dataclasses.replace(tiny_session.plan, composition_contexts=(CONTEXT,)))
    rows = composition.run_composition(session, cost=None, link_gbps=100.0)
    assert {row.get("paced_gbps") for row in rows} == {None, *RATES}
    assert at_unpaced and set(at_unpaced) == {0}  # exited, by its own SHUTDOWN, before every unpaced step


def test_a_paced_server_interrupted_while_it_starts_is_stopped(tiny_session, monkeypatch):
    from djinnsim.validate import realrun

    stopped = []
    real_stop = realrun.ServerProcess.stop

    def interrupted(self, timeout_s):
        raise KeyboardInterrupt

    def stop(self, timeout_s=10.0):
        real_stop(self, timeout_s)
        stopped.append(self.process.is_alive())

    monkeypatch.setattr(realrun.ServerProcess, "start", interrupted)
    monkeypatch.setattr(realrun.ServerProcess, "stop", stop)
    with pytest.raises(KeyboardInterrupt):
        composition.start_paced_server(tiny_session, list(RATES))
    assert stopped == [False]
