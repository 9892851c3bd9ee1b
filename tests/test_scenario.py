"""Scenario files: every invalid field is named in a one-line error; sweeps expand in a fixed order."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from djinnsim.errors import DjinnsimError
from djinnsim.sim.scenario import dump_scenario, expand_points, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[1]


def _agents(**workload):
    return {"name": "s", "backends": ["djinn"], "workload": {"kind": "agents", **workload}}


def _decode(**workload):
    return {"name": "s", "backends": ["full_djinn"], "workload": {"kind": "decode", **workload}}


def _error(raw, source: str = "s.yaml") -> str:
    with pytest.raises(DjinnsimError) as info:
        parse_scenario(raw, source)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{source}: "), message
    return message


@pytest.mark.parametrize("raw,needles", [
    (_agents(agents=[4, 0]), ["workload.agents", "> 0"]),
    (_agents(agents=[-3]), ["workload.agents", "> 0"]),
    (_agents(agents=[]), ["workload.agents"]),
    (_agents(iterations=0), ["workload.iterations"]),
    (_agents(reason={"input_tokens": 8, "new_tokens": 0}), ["workload.reason.new_tokens"]),
    (_agents(reflect={"input_tokens": -1, "new_tokens": 4}), ["workload.reflect.input_tokens"]),
    (_agents(reason={"input_tokens": 8, "new_tokens": 4, "colour": 1}), ["workload.reason.colour"]),
    (_agents(act={"kind": "uniform", "low_s": 5, "high_s": 1}), ["workload.act", "high_s"]),
    (_agents(act={"kind": "gamma", "shape": 2}), ["workload.act"]),
    (_agents(arrival={"kind": "poisson"}), ["workload.arrival", "rate_per_s"]),
    (_decode(runs=5, warmup_runs=5), ["workload", "warmup_runs"]),
    (_decode(runs=5, warmup_runs=7), ["workload", "warmup_runs"]),
    (_decode(prompt_tokens=0), ["workload.prompt_tokens"]),
    (_decode(batch=0), ["workload.batch"]),
    ({**_decode(), "model": "llama-9000"}, ["unknown model", "llama-9000"]),
    ({**_decode(), "gpu": "rtx-2080"}, ["unknown GPU", "rtx-2080"]),
    ({**_decode(), "sweep": {"gpu": ["h100-80gb", "tpu-v5"]}}, ["unknown GPU", "tpu-v5"]),
    ({**_decode(), "sweep": {"model": ["gpt2", "bert"]}}, ["unknown model", "bert"]),
    ({**_decode(), "sweep": {"link_gbps": []}}, ["sweep.link_gbps"]),
    ({**_decode(), "backends": ["full_djinn", "quantum"]}, ["unknown backend", "quantum"]),
    ({**_decode(), "backends": []}, ["backends"]),
    ({**_decode(), "colour": "blue"}, ["field colour", "Extra inputs"]),
    ({**_decode(), "link": {"gbps": 0}}, ["link.gbps"]),
    ({**_decode(), "link": {"rtt_ms": -1}}, ["link.rtt_ms"]),
    ({**_decode(), "server": {"scheduler": "round_robin"}}, ["server.scheduler"]),
    ({**_decode(), "cost_model": "magic"}, ["cost_model"]),
    ({"backends": ["djinn"], "workload": {"kind": "agents"}}, ["field name", "required"]),
    ({"name": "s", "backends": ["djinn"], "workload": {"kind": "batch"}}, ["workload"]),
])
def test_invalid_field_is_named(raw, needles):
    message = _error(raw)
    for needle in needles:
        assert needle in message, message


def test_not_a_mapping():
    assert "mapping" in _error(["a", "list"])


def test_union_tag_is_not_in_the_field_path():
    message = _error(_agents(agents=[0]))
    assert "workload.agents.agents" not in message


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nbackends: [djinn\nworkload:\n  kind: agents\n")
    with pytest.raises(DjinnsimError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "malformed YAML" in message and "line" in message


def test_missing_file(tmp_path):
    with pytest.raises(DjinnsimError, match="scenario file not found: .*nowhere.yaml"):
        load_scenario(tmp_path / "nowhere.yaml")


def test_error_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nbackends: [djinn]\nworkload: {kind: agents, agents: [0]}\n")
    with pytest.raises(DjinnsimError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: field workload.agents")


def test_shipped_scenarios_load_and_round_trip(tmp_path):
    for path in sorted((REPO / "scenarios").glob("*.yaml")):
        scenario = load_scenario(path)
        again = tmp_path / path.name
        again.write_text(dump_scenario(scenario))
        assert load_scenario(again) == scenario


def test_defaults_are_the_reference_workloads():
    agents = parse_scenario(_agents()).workload
    assert agents.agents == [1, 2, 4, 8, 16, 32]
    assert (agents.reason.input_tokens, agents.reason.new_tokens) == (72, 50)
    assert agents.act.seconds == 10.0
    decode = parse_scenario(_decode()).workload
    assert (decode.prompt_tokens, decode.new_tokens, decode.runs, decode.warmup_runs) == (72, 50, 30, 5)


def test_sweep_expands_in_product_order():
    scenario = parse_scenario({
        "name": "sweep", "backends": ["ray_keepalive", "djinn"],
        "sweep": {"model": ["llama-2-7b", "mistral-7b"], "gpu": ["a100-80gb", "h100-80gb", "h200"],
                  "link_gbps": [10, 25]},
        "link": {"rtt_ms": 0.5, "framing_bytes": 64},
        "workload": {"kind": "agents", "agents": [1, 4, 16]},
    })
    points = expand_points(scenario)
    expected = list(itertools.product(["ray_keepalive", "djinn"], ["llama-2-7b-hf", "mistral-7b-v0.1"],
                                      ["a100-80gb", "h100-80gb", "h200"], [10.0, 25.0], [1, 4, 16]))
    assert len(points) == 2 * 2 * 3 * 2 * 3 == 72
    assert [(p.backend.name, p.model.key, p.gpu.key, p.link.gbps, p.n_agents) for p in points] == expected
    assert [p.index for p in points] == list(range(72))
    # The swept rate replaces the link's; everything else about the link is kept.
    assert {(p.link.rtt_ms, p.link.framing_bytes) for p in points} == {(0.5, 64)}
    assert len({p.label for p in points}) == 72


def test_decode_points_have_no_agent_count():
    points = expand_points(parse_scenario({**_decode(), "backends": ["full_djinn", "semantic_blind"]}))
    assert [(p.backend.name, p.n_agents) for p in points] == [("full_djinn", None), ("semantic_blind", None)]


def test_backends_at_the_same_point_draw_the_same_random_numbers():
    """Common random numbers: a point's draws depend on what it simulates, not on the backend or on
    what else the scenario sweeps. At N = 1, batching has nothing to batch: same latencies (with warm
    shapes: the batching engine's kernels have no first-run cost, the serial server's have)."""
    from djinnsim.sim.run import simulate_scenario

    workload = {"kind": "agents", "agents": [1, 4], "reason": {"input_tokens": 72, "new_tokens": 8},
                "act": {"kind": "uniform", "low_s": 1, "high_s": 3}, "reflect": {"input_tokens": 8, "new_tokens": 8}}
    both = parse_scenario({"name": "a", "seed": 5, "backends": ["djinn", "batched"], "workload": workload,
                           "server": {"shapes": "warm"},
                           "custom_backends": {"batched": {"base": "djinn", "scheduler": "continuous_batching"}}})
    alone = parse_scenario({"name": "b", "seed": 5, "backends": ["djinn"], "workload": {**workload, "agents": [4]},
                            "server": {"shapes": "warm"}})
    result = simulate_scenario(both)

    def latencies(point):
        return [r.finished_at - r.issued_at for r in point.records]

    djinn_n1, djinn_n4, batched_n1, _ = result.points
    assert latencies(djinn_n1) == pytest.approx(latencies(batched_n1), rel=1e-12)  # summed in another order
    assert latencies(simulate_scenario(alone).points[0]) == latencies(djinn_n4)
