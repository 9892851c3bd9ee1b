"""Backend presets: bytes per token against reference.md's formulas, the passes each one runs,
scenario-defined backends and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from djinnsim.errors import DjinnsimError
from djinnsim.sim.backends import get_backend, preset_names
from djinnsim.sim.scenario import expand_points, parse_scenario
from djinnsim.sim.simulate import World, phase_passes, token_pass
from djinnsim.sim.specs import get_model

LLAMA = get_model("llama-2-7b")
V = 32000
KV = 512 * 1024  # 2 x 32 layers x 4096 x 2 B
PROMPT, NEW = 72, 50
STEPS = range(NEW)


def L(t: int) -> int:
    return PROMPT + t


def _bytes(name: str, model=LLAMA) -> list[tuple[int, int]]:
    backend = get_backend(name)
    return [backend.step_bytes(model, t, PROMPT) for t in STEPS]


def test_llama_kv_bytes_per_token_is_512_kib():
    assert LLAMA.kv_bytes_per_token == KV
    assert LLAMA.logits_bytes_per_position == V * 2


def test_mistral_gqa_kv_bytes_per_token():
    mistral = get_model("mistral-7b")
    assert mistral.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 8 KV heads of 128, not 32
    assert mistral.kv_bytes_per_token == KV // 4


def test_semantic_blind_bytes_per_token():
    assert _bytes("semantic_blind") == [(L(t) * 8, L(t) * V * 2) for t in STEPS]


def test_partially_aware_bytes_per_token():
    # reference.md: last id + KV(L_t - 1) up, last logits + KV(L_t) down. At t = 0 no cache exists
    # yet: the prompt's ids go up and the first cache comes back.
    expected = [(72 * 8 if t == 0 else 8 + (L(t) - 1) * KV, V * 2 + L(t) * KV) for t in STEPS]
    assert _bytes("partially_aware") == expected


def test_full_djinn_bytes_per_token():
    assert _bytes("full_djinn") == [((72 * 8 if t == 0 else 8), V * 2) for t in STEPS]


def test_native_pytorch_moves_nothing():
    assert _bytes("native_pytorch") == [(0, 0)] * NEW


def test_per_run_totals_match_reference_figures():
    totals = {name: tuple(map(sum, zip(*_bytes(name)))) for name in ("semantic_blind", "partially_aware", "full_djinn")}
    blind_up, blind_down = totals["semantic_blind"]
    assert blind_down == V * 2 * sum(L(t) for t in STEPS) == 308_800_000  # "about 309 MB down"
    assert blind_up == 8 * 4825
    partial_up, partial_down = totals["partially_aware"]
    assert partial_up == 72 * 8 + sum(8 + (L(t) - 1) * KV for t in STEPS[1:])
    assert partial_up == pytest.approx(2.5e9, rel=0.02) and partial_down == pytest.approx(2.5e9, rel=0.02)
    assert totals["full_djinn"] == (72 * 8 + 49 * 8, 3_200_000)  # "about 3.2 MB down"


def test_gqa_model_ships_a_quarter_of_the_kv():
    mistral = get_model("mistral-7b")
    llama_up = [up for up, _ in _bytes("partially_aware")]
    mistral_up = [up for up, _ in _bytes("partially_aware", mistral)]
    assert mistral_up == [72 * 8 if t == 0 else 8 + (L(t) - 1) * 2 * 32 * 8 * 128 * 2 for t in STEPS]
    assert sum(mistral_up) < sum(llama_up) / 3.9


def test_op_remoting_pays_round_trips_not_bytes():
    backend = get_backend("op_remoting")
    ops = backend.ops_per_layer * LLAMA.num_layers
    assert ops == 12 * 32
    for t in STEPS:
        up, down = backend.step_bytes(LLAMA, t, PROMPT)
        assert up == (72 if t == 0 else 1) * 8 + ops * backend.bytes_per_op
        assert down == V * 2 + ops * backend.bytes_per_op


def test_every_preset_resolves():
    names = preset_names()
    assert {"native_pytorch", "semantic_blind", "partially_aware", "full_djinn",
            "ray_keepalive", "ray_serverless", "djinn", "op_remoting",
            "partially_aware_1c1e018", "full_djinn_1c1e018"} <= set(names)
    for name in names:
        assert get_backend(name).name == name


# --- what each preset computes ------------------------------------------------------------------


def test_token_passes_per_preset():
    def passes(name):
        return [token_pass(get_backend(name), PROMPT, t) for t in range(3)]

    assert passes("semantic_blind") == [("prefill", 72, 0), ("prefill", 73, 0), ("prefill", 74, 0)]
    assert passes("full_djinn") == [("prefill", 72, 0), ("decode", 72), ("decode", 73)]
    assert passes("native_pytorch") == [("prefill", 72, 0), ("decode", 72), ("decode", 73)]
    # First the prompt is prefilled; then the client sends the cache of L_t - 1 tokens back.
    assert passes("partially_aware") == [("prefill", 72, 0), ("decode", 72), ("decode", 73)]
    assert passes("partially_aware_1c1e018") == [("prefill", 1, 0)] * 3
    assert passes("full_djinn_1c1e018") == passes("semantic_blind")


def test_phase_requests_of_agent_backends():
    djinn, keepalive = get_backend("djinn"), get_backend("ray_keepalive")
    # REASON: 72 ids up, 50 generated ids down; REFLECT after 122 tokens of context.
    assert djinn.phase_bytes(LLAMA, 0, 72, 50) == (72 * 8, 50 * 8)
    assert djinn.phase_bytes(LLAMA, 122, 16, 50) == (16 * 8, 50 * 8)
    assert keepalive.phase_bytes(LLAMA, 122, 16, 50) == (138 * 8, 50 * 8)
    # Djinn reuses the session KV; keep-alive re-prefills the whole context.
    assert phase_passes(djinn, 122, 16, 3) == [("prefill", 16, 122), ("decode", 138), ("decode", 139)]
    assert phase_passes(keepalive, 122, 16, 3) == [("prefill", 138, 0), ("decode", 138), ("decode", 139)]


@pytest.mark.parametrize("name,down_total", [
    ("semantic_blind", 308_800_000),
    ("full_djinn", 3_200_000),
    ("native_pytorch", 0),
])
def test_simulated_run_moves_the_formula_bytes(name, down_total, fake_cost):
    scenario = parse_scenario({
        "name": "bytes", "cost_model": "roofline", "backends": [name],
        "workload": {"kind": "decode", "prompt_tokens": PROMPT, "new_tokens": NEW, "runs": 2, "warmup_runs": 1},
    })
    point = expand_points(scenario)[0]
    records = World(scenario, point, fake_cost, np.random.SeedSequence(1)).run()
    for run in (0, 1):
        run_records = [r for r in records if r.run == run]
        assert len(run_records) == NEW
        assert sum(r.bytes_down for r in run_records) == down_total
    assert [r.warmup for r in records] == [True] * NEW + [False] * NEW


# --- scenario-defined backends ----------------------------------------------------------------


def _with_custom(custom: dict, backends: list[str]):
    return parse_scenario({
        "name": "custom", "cost_model": "roofline", "backends": backends, "custom_backends": custom,
        "workload": {"kind": "decode", "prompt_tokens": 8, "new_tokens": 4, "runs": 1, "warmup_runs": 0},
    }, "custom.yaml")


def test_custom_backend_with_base_overrides_only_what_it_names(fake_cost):
    scenario = _with_custom({"djinn_keepconn": {"base": "full_djinn", "connection": "persistent"}},
                            ["full_djinn", "djinn_keepconn"])
    base, custom = (p.backend for p in expand_points(scenario))
    assert custom.name == "djinn_keepconn"
    assert custom.connection == "persistent"
    assert custom.model_dump(exclude={"name", "description", "connection"}) == \
        base.model_dump(exclude={"name", "description", "connection"})
    point = expand_points(scenario)[1]
    records = World(scenario, point, fake_cost, np.random.SeedSequence(0)).run()
    assert [r.connect_s > 0 for r in records] == [True, False, False, False]  # one connection, kept


def test_custom_backend_chain_of_bases():
    scenario = _with_custom({
        "a": {"base": "partially_aware", "return_logits": "all"},
        "b": {"base": "a", "connection": "persistent"},
    }, ["b"])
    b = expand_points(scenario)[0].backend
    assert (b.kv, b.return_logits, b.connection) == ("client", "all", "persistent")


def test_custom_backend_from_scratch():
    fields = {k: v for k, v in get_backend("djinn").model_dump().items() if k not in ("name", "description")}
    scenario = _with_custom({"mine": {**fields, "scheduler": "continuous_batching"}}, ["mine"])
    assert expand_points(scenario)[0].backend.scheduler == "continuous_batching"


@pytest.mark.parametrize("custom,backends,needles", [
    ({}, ["no_such_backend"], ["unknown backend", "no_such_backend"]),
    ({"mine": {"base": "no_such_base"}}, ["mine"], ["unknown backend", "no_such_base"]),
    ({"mine": {"base": "djinn", "kv": "bogus"}}, ["mine"], ["mine", "kv"]),
    ({"mine": {"base": "djinn", "colour": "red"}}, ["mine"], ["mine", "colour"]),
    ({"mine": {"base": "djinn", "ops_per_layer": -1}}, ["mine"], ["mine", "ops_per_layer"]),
    ({"x": {"base": "y"}, "y": {"base": "x"}}, ["x"], ["circular", "x -> y -> x"]),
])
def test_bad_backend_is_a_one_line_error_naming_it(custom, backends, needles):
    with pytest.raises(DjinnsimError) as info:
        _with_custom(custom, backends)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("custom.yaml: ")
    for needle in needles:
        assert needle in message, message


def test_get_backend_unknown_lists_known_ones():
    with pytest.raises(DjinnsimError, match="unknown backend 'nope'; known backends: .*full_djinn"):
        get_backend("nope")


def test_bundled_yaml_files_read_as_yaml_safe_load_reads_them():
    """The bundled models, GPUs and backend presets are read by LibYAML's parser where PyYAML has it
    (specs.load_bundled_yaml): the same values, of the same types, in the same order."""
    import yaml

    from djinnsim.sim import specs

    data = Path(specs.__file__).parent / "data"
    files = [*sorted(data.glob("models/*.yaml")), *sorted(data.glob("gpus/*.yaml")), data / "backends.yaml"]
    assert len(files) >= 9
    for path in files:
        text = path.read_text()
        assert repr(specs.load_bundled_yaml(text)) == repr(yaml.safe_load(text)), path.name
