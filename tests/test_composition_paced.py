"""calibrate's paced composition rows (network.paced_path) take validate's own message path: its
client frames each step from the KV view the last reply left and paces it, and the server's side is
validate's own request handling (validate/server.py serve_model) around calibrate's model, and the
timed request follows a step, as in validate's decode. Before
H200 runs 12 and 13 the rows resent a message framed once, outside the timing, to the composition
server's single thread: a cheaper host path than the one validate's real runs take."""

from __future__ import annotations

import dataclasses

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
from djinnsim.validate.clients import Exchange  # noqa: E402
from djinnsim.validate.protocol import Op  # noqa: E402

CONTEXT = 24
RATES = (4.0, 100.0)
REPEAT = 2


@pytest.fixture(scope="module")
def tiny_session():
    torch.set_num_threads(1)
    spec = get_model("tiny-llama")
    plan = dataclasses.replace(plan_for("cpu", quick=True), composition_contexts=(), composition_repeat=REPEAT,
                               composition_paced_gbps=RATES, composition_paced_contexts=(CONTEXT,))
    return Session(spec, "cpu", torch.float32, plan, SampleLog(None), say=lambda line: None,
                   model=build_model(spec, "cpu", torch.float32))


def test_the_paced_rows_are_validate_steps_served_by_validates_request_handling(tiny_session, monkeypatch):
    steps = []
    validate_step = server._GpuState._step

    def spy(self, header, tensors):
        reply, out = validate_step(self, header, tensors)
        steps.append((self.config.link_gbps, header["kv"], {k: v.shape for k, v in tensors.items()}, reply))
        return reply, out

    def refuse(*args):
        raise AssertionError("the composition server stepped a paced row")

    monkeypatch.setattr(server._GpuState, "_step", spy)
    monkeypatch.setattr(composition.BackendServer, "_step", refuse)
    rows = composition.run_composition(tiny_session, cost=None, link_gbps=100.0)

    spec = tiny_session.spec
    assert [(row["paced_gbps"], row["seq_len"]) for row in rows] == [(g, CONTEXT) for g in RATES]
    def kv_shape(tokens):
        return (spec.num_layers, 2, 1, spec.num_kv_heads, tokens, spec.head_dim)

    for gbps in RATES:  # each sample (one warm-up + REPEAT): the prompt, then two steps sending the KV back up
        mine = [s for s in steps if s[0] == gbps]
        sample = [{"ids": (1, CONTEXT - 2)}, {"ids": (1, 1), "kv": kv_shape(CONTEXT - 2)}, {"ids": (1, 1), "kv": kv_shape(CONTEXT - 1)}]
        assert [s[2] for s in mine] == sample * (1 + REPEAT)
        assert {s[1] for s in mine} == {"client"}
    for *_, reply in steps:  # the server's copy time, split so the rows keep h2d and d2h apart
        assert reply["copy_s"] == pytest.approx(reply["h2d_s"] + reply["d2h_s"], abs=1e-12)
    shape = composition.step_shape("partially_aware", spec, CONTEXT)
    for row in rows:
        assert (row["up_bytes"], row["down_bytes"]) == (shape.up_bytes, shape.down_bytes)
        assert set(row["server"]) == {"h2d_s", "compute_s", "d2h_s"} and all(v > 0 for v in row["server"].values())
        assert row["measured_s"] > sum(row["server"].values())
    kept = {r["point"] for r in tiny_session.log.rows if r["stage"] == "composition_paced"}
    assert kept == {f"partially_aware_L{CONTEXT}_{g:g}gbps" for g in RATES}


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
