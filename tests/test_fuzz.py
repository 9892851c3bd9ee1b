"""Property-based fuzzing (Hypothesis) of scenarios and profiles: whatever the input, reading it
either gives a valid object or raises DjinnsimError with one line; nothing else escapes, nothing
hangs, and a scenario that is accepted runs to strict JSON. (benchmarks/fuzz.py runs the same kinds
of mutations through the real CLI in subprocesses, a thousand and more at a time.)"""

from __future__ import annotations

import json
import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djinnsim.errors import DjinnsimError
from djinnsim.sim import estimate, safeyaml
from djinnsim.sim.profile import Profile, load_profile
from djinnsim.sim.run import bundled_profiles, simulate_scenario
from djinnsim.sim.scenario import MAX_LINK_GBPS, MIN_LINK_GBPS, Scenario, expand_points, parse_scenario

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE = {
    "name": "fuzz", "seed": 1, "backends": ["djinn", "ray_serverless"],
    "workload": {"kind": "agents", "agents": [1, 2], "reason": {"input_tokens": 8, "new_tokens": 3},
                 "act": {"kind": "fixed", "seconds": 1}, "reflect": {"input_tokens": 4, "new_tokens": 3}},
}
FIELDS = [("name",), ("seed",), ("model",), ("gpu",), ("cost_model",), ("backends",), ("link", "gbps"),
          ("link", "rtt_ms"), ("link", "framing_bytes"), ("link", "host_stack"), ("link", "stream_cap_gbps"),
          ("workload", "agents"), ("workload", "iterations"), ("workload", "act", "seconds"),
          ("workload", "reason", "new_tokens"), ("workload", "arrival"), ("sweep", "link_gbps"),
          ("sweep", "model"), ("cluster", "nodes"), ("server", "max_batch"), ("server", "kv_policy"),
          ("server", "rules"), ("custom_backends",), ("trace_point",), ("bands",), ("description",)]

ODD_NUMBERS = st.sampled_from([0, -1, -0.0, 1e-300, 1e300, math.nan, math.inf, -math.inf, 2**64, 2**70, 10**7, 0.5])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=30), ODD_NUMBERS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _with(doc: dict, path: tuple, value) -> dict:
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
    node[path[-1]] = value
    return doc


def _one_line(exc: DjinnsimError) -> None:
    assert str(exc) and "\n" not in str(exc) and "Traceback" not in str(exc)


def _finite_numbers(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite_numbers(v) for v in value)
    return True


@FAST
@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3))
def test_a_mutated_scenario_is_valid_or_one_line(mutations):
    doc = BASE
    for path, value in mutations:
        doc = _with(doc, path, value)
    try:
        scenario = parse_scenario(doc, "fuzz.yaml")
    except DjinnsimError as exc:
        _one_line(exc)
        return
    assert isinstance(scenario, Scenario)
    assert _finite_numbers(scenario.model_dump(mode="json"))  # no NaN or infinity gets in
    assert all(MIN_LINK_GBPS <= r <= MAX_LINK_GBPS for r in scenario.sweep.link_gbps or [scenario.link.gbps])
    try:
        estimate.check_workload(scenario)
    except DjinnsimError as exc:
        _one_line(exc)
        return
    if scenario.point_count <= 64:
        labels = [p.label for p in expand_points(scenario)]
        assert len(labels) == len(set(labels))  # no two points write the same baseline file


@FAST
@given(st.text(max_size=300))
def test_any_text_parses_as_yaml_or_is_one_line(text):
    try:
        safeyaml.parse_yaml(text, "fuzz.yaml")
    except DjinnsimError as exc:
        _one_line(exc)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_read_as_a_scenario_file_give_a_scenario_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "s.yaml"
    path.write_bytes(yaml.safe_dump(BASE).encode()[: len(data) % 200] + data)
    try:
        safeyaml.load_yaml_file(path, "scenario file")
    except DjinnsimError as exc:
        _one_line(exc)


@st.composite
def _yaml_with_anchors(draw):
    """Documents whose anchors and aliases nest at random: small ones load, bombs are refused."""
    width = draw(st.integers(1, 12))
    depth = draw(st.integers(1, 9))
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines), width, depth


@FAST
@given(_yaml_with_anchors())
def test_alias_expansion_is_bounded_and_exact(case):
    text, width, depth = case
    sizes = [1 + width]  # nodes of l0: the sequence and its scalars; l_i: the sequence and width l_(i-1)
    for _ in range(1, depth):
        sizes.append(1 + width * sizes[-1])
    expanded = 1 + sum(1 + size for size in sizes)  # the mapping, each key, each value
    try:
        value = safeyaml.parse_yaml(text, "fuzz.yaml")
    except DjinnsimError as exc:
        assert "aliases are expanded" in str(exc) and expanded > safeyaml.MAX_NODES
        return
    assert expanded <= safeyaml.MAX_NODES and len(value) == depth


PROFILE = json.loads(bundled_profiles()[0].read_text())


def _numeric_paths(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numeric_paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:2]):
            yield from _numeric_paths(value, (*path, i))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path


NUMERIC_PATHS = list(_numeric_paths(PROFILE))


@FAST
@given(st.lists(st.tuples(st.sampled_from(NUMERIC_PATHS), st.one_of(ODD_NUMBERS, SCALARS)), min_size=1, max_size=3))
def test_a_mutated_profile_is_valid_or_one_line(tmp_path_factory, mutations):
    doc = json.loads(json.dumps(PROFILE))
    for path, value in mutations:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    file = tmp_path_factory.mktemp("p") / "p.json"
    file.write_text(json.dumps(doc))  # NaN and Infinity go in as JSON's non-standard constants
    try:
        profile = load_profile(file)
    except DjinnsimError as exc:
        _one_line(exc)
        return
    assert isinstance(profile, Profile) and _finite_numbers(profile.model_dump(mode="json"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(agents=st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True),
       gbps=st.floats(MIN_LINK_GBPS, 400), act_s=st.floats(0, 30), new_tokens=st.integers(1, 6),
       backends=st.lists(st.sampled_from(["djinn", "ray_keepalive", "ray_serverless", "full_djinn"]),
                         min_size=1, max_size=2, unique=True))
def test_an_accepted_scenario_runs_to_strict_json(agents, gbps, act_s, new_tokens, backends):
    from djinnsim.sim.report import point_summaries

    doc = _with(_with(_with(BASE, ("workload", "agents"), agents), ("link", "gbps"), gbps),
                ("workload", "act", "seconds"), act_s)
    doc = _with(_with(doc, ("workload", "reason", "new_tokens"), new_tokens), ("backends",), backends)
    result = simulate_scenario(parse_scenario(doc))
    safeyaml.strict_json(point_summaries(result))  # raises on NaN or infinity
