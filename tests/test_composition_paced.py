"""calibrate's paced composition rows (network.paced_path) take validate's own message path: its
client frames each step from the KV view the last reply left and paces it, and the server's side is
validate's own request handling (validate/server.py serve_model) around calibrate's model. Before
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
    kv_shape = (spec.num_layers, 2, 1, spec.num_kv_heads, CONTEXT - 1, spec.head_dim)
    for gbps in RATES:  # each sample (one warm-up + REPEAT): the prompt, then the step sending its KV back up
        mine = [s for s in steps if s[0] == gbps]
        assert [s[2] for s in mine] == [{"ids": (1, CONTEXT - 1)}, {"ids": (1, 1), "kv": kv_shape}] * (1 + REPEAT)
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


def test_a_paced_step_frames_again_the_kv_view_its_prompt_reply_left_and_times_that_step_whole():
    kv = np.arange(2 * 3 * 5, dtype=np.float32).reshape(1, 2, 1, 3, 5)
    received = bytearray(kv.tobytes())  # the reply's receive buffer
    view = np.frombuffer(received, dtype=np.float32).reshape(kv.shape)
    sent = []

    class Client:  # validate's Client.request, recorded
        def request(self, port, op, header, tensors, conn=None):
            sent.append((op, header, tensors))
            first = len(sent) == 1
            return Exchange(issued_at=10.0, finished_at=10.0 + (0.5 if first else 0.25), connect_s=0.001, status="ok",
                            header={"h2d_s": 0.01, "compute_s": 0.02, "d2h_s": 0.03},
                            tensors={"logits": np.array([[[0.0, 3.0, 1.0]]], dtype=np.float32), "kv": view} if first else {},
                            bytes_up=0, bytes_down=0, wire_bytes_up=0, wire_bytes_down=0)

    prompt = np.array([[5, 6, 7]], dtype=np.int64)
    elapsed, marks = composition_client.paced_step(Client(), 1234, prompt)
    assert elapsed == 0.25 and marks == {"h2d_s": 0.01, "compute_s": 0.02, "d2h_s": 0.03}
    (op1, head1, up1), (op2, head2, up2) = sent
    assert op1 == op2 == Op.STEP
    assert head1["kv"] == head2["kv"] == "client" and head2["end"] and not head1["end"]
    assert up1["ids"] is prompt and "kv" not in up1
    assert up2["ids"].tolist() == [[1]]  # the argmax of the prompt's last logits, as validate's decode takes it
    assert up2["kv"] is view  # the received view itself: Client.request frames it again, inside the timing
