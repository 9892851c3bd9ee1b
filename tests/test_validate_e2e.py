"""`djinnsim validate --device cpu` end to end with the tiny model: calibration first, real server
and worker processes, real sockets on loopback, the simulator on the same points, the report.

Timing figures on a shared 2-core CPU are not expected to meet the GPU targets; these tests check
the pipeline and what must hold anywhere: payload bytes counted on the socket equal the formulas,
every point ran every repeat, and the report holds every figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from djinnsim.cli import app  # noqa: E402
from djinnsim.sim.specs import get_model  # noqa: E402

runner = CliRunner()

DECODE = """
name: tiny-decode
seed: 5
backends: [native_pytorch, semantic_blind, partially_aware, full_djinn]
link: {gbps: 25, rtt_ms: 0.2}
workload: {kind: decode, prompt_tokens: 8, new_tokens: 4, runs: 30, warmup_runs: 5}
"""

AGENTS = """
name: tiny-agents
seed: 6
backends: [djinn, ray_keepalive, ray_serverless]
link: {gbps: 25, rtt_ms: 0.2}
workload:
  kind: agents
  agents: [1, 2, 4]
  reason: {input_tokens: 8, new_tokens: 3}
  act: {kind: fixed, seconds: 10}
  reflect: {input_tokens: 4, new_tokens: 3}
"""


def _points(out: Path) -> dict[str, dict]:
    doc = json.loads((out / "validation.json").read_text())
    return {p["backend"] + (f"/n{p['n_agents']}" if p["n_agents"] else ""): p for p in doc["points"]}


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    """No --calibration: validate calibrates this machine first (quick), then validates."""
    folder = tmp_path_factory.mktemp("decode")
    scenario = folder / "decode.yaml"
    scenario.write_text(DECODE)
    out = folder / "report"
    result = runner.invoke(app, ["validate", str(scenario), "--device", "cpu", "--out", str(out), "--runs", "2",
                                 "--warmup-runs", "1", "--repeats", "2", "--quiet"])
    return result, out


def test_decode_calibrates_first_and_reports_every_point(decode_run):
    result, out = decode_run
    assert result.exit_code == 0, result.output
    profiles = list((out / "calibration").glob("*.json"))
    assert len(profiles) == 1
    assert json.loads(profiles[0].read_text())["metadata"]["model_id"] == "djinnsim/tiny-llama"
    points = _points(out)
    assert set(points) == {"native_pytorch", "semantic_blind", "partially_aware", "full_djinn"}
    for point in points.values():
        assert point["skipped"] is None
        mean = point["metrics"]["latency_mean_s"]
        assert len(mean["real_values"]) == 2 and mean["sim"] > 0
    for name in ("validation.md", "records_real.csv", "records_sim.csv", "scenario.yaml"):
        assert (out / name).is_file()
    assert len(list(out.glob("overlay_*.png"))) == 4
    assert "| full_djinn" in (out / "validation.md").read_text()


def test_decode_payload_bytes_counted_on_the_socket(decode_run):
    _, out = decode_run
    points = _points(out)
    spec = get_model("tiny-llama")
    prompt, new, vocab_bytes, kv = 8, 4, spec.logits_bytes_per_position, spec.kv_bytes_per_token
    # full_djinn: the prompt once, then one id a token; last-token logits back
    m = points["full_djinn"]["metrics"]
    assert m["bytes_up"]["real_mean"] == 8 * (prompt + new - 1)
    assert m["bytes_down"]["real_mean"] == new * vocab_bytes
    # semantic_blind: all L_t ids up, logits of all L_t positions down
    m = points["semantic_blind"]["metrics"]
    assert m["bytes_up"]["real_mean"] == 8 * sum(prompt + t for t in range(new))
    assert m["bytes_down"]["real_mean"] == vocab_bytes * sum(prompt + t for t in range(new))
    # partially_aware: the whole KV both ways; at t = 0 nothing is cached yet, so the prompt goes up
    m = points["partially_aware"]["metrics"]
    assert m["bytes_up"]["real_mean"] == 8 * prompt + sum(8 + (prompt + t - 1) * kv for t in range(1, new))
    assert m["bytes_down"]["real_mean"] == sum(vocab_bytes + (prompt + t) * kv for t in range(new))
    for name in ("full_djinn", "semantic_blind", "native_pytorch"):
        for key in ("bytes_up", "bytes_down"):
            assert points[name]["metrics"][key]["verdict"] == "PASS", (name, key)
    assert points["native_pytorch"]["metrics"]["bytes_down"]["real_mean"] == 0


def test_agents_with_the_profile_just_made(decode_run, tmp_path):
    _, decode_out = decode_run
    profile = next((decode_out / "calibration").glob("*.json"))
    scenario = tmp_path / "agents.yaml"
    scenario.write_text(AGENTS)
    out = tmp_path / "report"
    result = runner.invoke(app, ["validate", str(scenario), "--device", "cpu", "--calibration", str(profile),
                                 "--out", str(out), "--agents", "1,2", "--act-s", "0.05", "--repeats", "2",
                                 "--points", "djinn*", "--points", "*n1", "--quiet"])
    assert result.exit_code == 0, result.output
    points = _points(out)
    assert set(points) == {"djinn/n1", "djinn/n2", "ray_keepalive/n1", "ray_serverless/n1"}
    for point in points.values():
        assert point["skipped"] is None, point["skipped"]
        assert point["notes"] == [] or all("outside the calibrated range" in n for n in point["notes"])
        for key in ("bytes_up", "bytes_down"):
            assert point["metrics"][key]["verdict"] == "PASS", (point["label"], key)
        assert len(point["metrics"]["ttft_s"]["real_values"]) == 2  # the servers stamp the first token
    # djinn sends only the new tokens; keep-alive and serverless resend the whole conversation
    reason, reflect, new = 8, 4, 3
    assert points["djinn/n1"]["metrics"]["bytes_up"]["real_mean"] == 8 * (reason + reflect)
    assert points["ray_keepalive/n1"]["metrics"]["bytes_up"]["real_mean"] == 8 * (reason + reason + new + reflect)
    assert points["djinn/n2"]["metrics"]["bytes_down"]["real_mean"] == 8 * 2 * new  # per agent
    doc = json.loads((out / "validation.json").read_text())
    assert [row["backend"] for row in doc["oom"]] == ["ray_keepalive"]
    assert doc["oom"][0]["verdict"] == "N/A"  # no OOM probe on the CPU
    records = (out / "records_real.csv").read_text().splitlines()
    # per repeat: djinn n1 2 phases, n2 4, keep-alive n1 2, serverless n1 2 -> 10; two repeats
    assert len(records) - 1 == 20
    serverless = [line for line in records if ",ray_serverless," in line]
    assert serverless and all(float(line.split(",")[RECORD_LOAD_COLUMN]) > 0 for line in serverless)


RECORD_LOAD_COLUMN = 1 + [
    "point", "backend", "model", "gpu", "link_gbps", "n_agents", "agent", "run", "phase", "step", "status", "warmup",
    "issued_at", "started_at", "finished_at", "connect_s", "uplink_s", "queue_s", "load_s",
].index("load_s")


def test_refuses_a_profile_from_another_stack(decode_run, tmp_path):
    _, decode_out = decode_run
    raw = json.loads(next((decode_out / "calibration").glob("*.json")).read_text())
    raw["metadata"]["torch"] = "0.0.1"
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(raw))
    scenario = tmp_path / "decode.yaml"
    scenario.write_text(DECODE)
    result = runner.invoke(app, ["validate", str(scenario), "--device", "cpu", "--calibration", str(foreign),
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "does not describe this machine" in result.output and "torch 0.0.1" in result.output
    assert "Traceback" not in result.output
