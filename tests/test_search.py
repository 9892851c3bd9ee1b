"""`djinnsim search`: the searches on synthetic curves (Hypothesis), a closed form through the engine
(serial FCFS with fixed costs), the target (each answer reproduced by `djinnsim run`), the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from djinnsim import search_cli
from djinnsim.cli import app
from djinnsim.errors import DjinnsimError
from djinnsim.sim import search
from djinnsim.sim.run import point_seed, run_scenario_file
from djinnsim.sim.scenario import parse_scenario
from djinnsim.sim.search import Probe
from djinnsim.sim.simulate import simulate_point

runner = CliRunner()

# Cheap agents: 8 + 4 tokens, then 4 + 4, a 1 s tool call; on the bundled (measured) H100 profile.
SMALL = {
    "name": "search_small",
    "seed": 5,
    "backends": ["ray_keepalive", "ray_serverless", "djinn"],
    "workload": {"kind": "agents", "agents": [1], "reason": {"input_tokens": 8, "new_tokens": 4},
                 "act": {"kind": "fixed", "seconds": 1}, "reflect": {"input_tokens": 4, "new_tokens": 4}},
}
SMALL_SLO_MS = 3000.0


# --- the integer search on synthetic curves --------------------------------------------------------


def _curve(value, limit_n=None):
    """evaluate(n) for a target of 1000 ms: value(n) ms, an OOM above limit_n; counts calls per n."""
    calls: dict[int, int] = {}

    def evaluate(n: int) -> Probe:
        calls[n] = calls.get(n, 0) + 1
        oom = limit_n is not None and n > limit_n
        v = value(n)
        return Probe(n, v, oom, False, not oom and v <= 1000.0)

    return evaluate, calls


@pytest.mark.parametrize(("slope_ms", "target_ms", "answer"), [(110.0, 455_000.0, 4136), (3.0, 1000.0, 333),
                                                              (0.5, 30_000.0, 60_000)])
def test_a_straight_p99_line_costs_few_agents(slope_ms, target_ms, answer):
    """The gallop extrapolates the P99 line and steps up to x4: the agents simulated over every probe
    (the search's cost) stay under 4x the answer, where doubling and a x1.5 floor cost 7.5x on
    the benchmark's 4096 search."""
    evaluate, _ = _curve(lambda n: slope_ms * n * 1000.0 / target_ms)
    at, above, probes = search.largest_feasible(evaluate, 1000.0)
    assert (at.x, above.x) == (answer, answer + 1)
    assert sum(p.x for p in probes) < 4 * answer


@settings(max_examples=150, deadline=None)
@given(intercept=st.floats(0, 2000), slope=st.floats(1e-3, 500), power=st.floats(0.3, 3.0),
       cap=st.integers(1, 10000), limit=st.one_of(st.none(), st.integers(0, 12000)))
def test_monotone_curves_give_the_exact_threshold(intercept, slope, power, cap, limit):
    value = lambda n: intercept + slope * n ** power  # noqa: E731
    evaluate, calls = _curve(value, limit)
    at, above, probes = search.largest_feasible(evaluate, 1000.0, cap)
    truth = 0
    while truth < cap and value(truth + 1) <= 1000.0 and (limit is None or truth + 1 <= limit):
        truth += 1
    assert (at.x if at else 0) == truth
    assert max(calls.values()) == 1 and len(probes) == len(calls)
    if truth == cap:
        assert above is None
    else:
        assert above.x == truth + 1 and not above.ok
        assert above.failure == ("memory" if limit is not None and truth + 1 > limit else "slo")
    assert len(probes) <= 6 * math.log2(cap + 1) + 4


@settings(max_examples=150, deadline=None)
@given(feasible=st.sets(st.integers(1, 300)), cap=st.integers(1, 300))
def test_any_curve_gives_a_verified_boundary(feasible, cap):
    """No monotonicity: the answer still met the target, and the N above it (simulated) did not."""
    def evaluate(n):
        return Probe(n, 0.0 if n in feasible else 2000.0, False, False, n in feasible)

    at, above, _ = search.largest_feasible(evaluate, 1000.0, cap)
    if at is None:
        assert 1 not in feasible and above.x == 1
    elif above is None:
        assert at.x == cap and cap in feasible
    else:
        assert at.ok and not above.ok and above.x == at.x + 1


@settings(max_examples=100, deadline=None)
@given(threshold=st.floats(0.05, 4000))
def test_slowest_link_brackets_the_threshold(threshold):
    def evaluate(gbps):
        return Probe(gbps, 10.0 if gbps >= threshold else 20.0, False, False, gbps >= threshold)

    at, below, _ = search.slowest_link(evaluate)
    low, high = search.LINK_GBPS_BOUNDS
    if threshold > high:
        assert at is None
    elif threshold <= low:
        assert at.x == low and below is None
    else:
        assert at.ok and not below.ok and below.x < threshold <= at.x
        assert at.x / below.x <= 1 + 2 * search.LINK_REL_TOL


# --- closed form through the engine: serial FCFS, fixed costs --------------------------------------


class _Fixed:
    """CostModels' interface over one cost model."""

    def __init__(self, cost):
        self.cost, self.warnings = cost, []

    def for_point(self, point):
        return self.cost


def test_serial_fcfs_capacity_matches_the_hand_queue(fake_cost):
    """N simultaneous REASONs on one serial GPU: the k-th (0-based) waits k generations of G s each;
    REFLECTs, spaced G apart by then, never wait. The pooled P99 of {L1 + kG} and N x {L2} is known
    by hand for every N (L1, L2: one agent's phases, checked term by term in test_closed_forms), so
    the largest N under an SLO between P99(n) and P99(n + 1) is n."""
    raw = {"name": "closed", "cost_model": "roofline", "backends": ["djinn"],
           "workload": {"kind": "agents", "agents": [1], "reason": {"input_tokens": 8, "new_tokens": 4},
                        "act": {"kind": "fixed", "seconds": 100}, "reflect": {"input_tokens": 4, "new_tokens": 4}}}
    scenario = parse_scenario(raw)
    generation_s = fake_cost.prefill_const_s + 3 * fake_cost.decode_const_s
    point = search.groups(scenario, _Fixed(fake_cost))[0].point.model_copy(update={"n_agents": 1})
    records = simulate_point(scenario, point, fake_cost, point_seed(scenario.seed, point)).records
    l1 = next(r.latency_s for r in records if r.phase == "reason")
    l2 = next(r.latency_s for r in records if r.phase == "reflect")

    def hand_p99_ms(n):
        return float(np.percentile([l1 + k * generation_s for k in range(n)] + [l2] * n, 99)) * 1e3

    n = 37
    slo_ms = (hand_p99_ms(n) + hand_p99_ms(n + 1)) / 2
    [answer] = search.search_capacity(scenario, slo_ms, costs=_Fixed(fake_cost))
    assert answer.max_agents == n and answer.limited_by == "slo"
    assert answer.p99_ms_at_max == pytest.approx(hand_p99_ms(n), rel=1e-4)
    assert answer.p99_ms_above == pytest.approx(hand_p99_ms(n + 1), rel=1e-4)
    assert answer.cost_model == "fake"


# --- the target: every answer reproduced by djinnsim run ---------------------------------------


def test_each_answer_is_met_by_djinnsim_run_and_missed_one_above(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    result = runner.invoke(app, ["search", str(path), "--slo-p99-ms", str(SMALL_SLO_MS), "--json",
                                 "--out", str(tmp_path / "search")])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert set(answers) == set(SMALL["backends"])
    assert json.loads((tmp_path / "search" / "search.json").read_text()) == answers
    for name in ("search.md", "search.png", "probes.csv"):
        assert (tmp_path / "search" / name).stat().st_size > 0
    for backend, answer in answers.items():
        n = answer["max_agents"]
        assert answer["limited_by"] in ("slo", "memory", "admission") and answer["cost_model"] == "measured"
        scenario = {**SMALL, "name": f"check_{backend}", "backends": [backend],
                    "workload": {**SMALL["workload"], "agents": [n, n + 1] if n else [1]}}
        path = tmp_path / f"{backend}.yaml"
        path.write_text(yaml.safe_dump(scenario))
        points = json.loads((run_scenario_file(path, out=tmp_path / backend, quiet=True) / "summary.json")
                            .read_text())["points"]
        by_n = {p["n_agents"]: p for p in points}
        if n:
            assert not by_n[n]["oom"] and by_n[n]["agents"]["pooled"]["p99_ms"] <= SMALL_SLO_MS
            assert by_n[n]["agents"]["pooled"]["p99_ms"] == pytest.approx(answer["p99_ms_at_max"], abs=1e-3)
        above = by_n[n + 1]
        if answer["limited_by"] == "memory":
            assert above["oom"]
        else:
            assert not above["oom"] and above["agents"]["pooled"]["p99_ms"] > SMALL_SLO_MS
            assert above["agents"]["pooled"]["p99_ms"] == pytest.approx(answer["p99_ms_above"], abs=1e-3)
    # what the small scenario exercises: a memory limit and an SLO limit with N > 1
    assert answers["ray_keepalive"]["limited_by"] == "memory"
    assert answers["djinn"]["limited_by"] == "slo" and answers["djinn"]["max_agents"] > 1


def test_a_cap_that_meets_the_slo_is_reported_as_the_cap():
    [answer] = search.search_capacity(parse_scenario(SMALL), 1e9, ["djinn"], max_agents=3)
    assert (answer.max_agents, answer.limited_by, answer.p99_ms_above) == (3, "cap", None)
    assert [p.x for p in answer.probes] == [1, 2, 3]


def test_rejected_records_limit_by_admission():
    probe = Probe(4, 10.0, False, True, False)
    assert probe.failure == "admission"
    assert Probe(4, 10.0, True, True, False).failure == "memory"
    # through the engine: Djinn's admission rule at 3 requests, every agent arriving at once
    raw = {**SMALL, "backends": ["djinn"], "server": {"rules": {"admission": {"enabled": True, "max_concurrent": 3}}}}
    [answer] = search.search_capacity(parse_scenario(raw), 1e9)
    assert (answer.max_agents, answer.limited_by) == (3, "admission")


# --- break-even -----------------------------------------------------------------------------------

DECODE = {
    "name": "decode_small", "seed": 1, "backends": ["native_pytorch", "full_djinn", "partially_aware"],
    "workload": {"kind": "decode", "prompt_tokens": 16, "new_tokens": 4, "runs": 3, "warmup_runs": 1},
}


def test_break_even_answer_meets_the_target_and_the_rate_below_does_not():
    scenario = parse_scenario(DECODE)
    answers = search.search_break_even(scenario, within_native_pct=5.0)
    assert [a.backend for a in answers] == ["full_djinn", "partially_aware"]  # remote ones only
    costs = search.CostModels(scenario, None)
    for a in answers:
        assert a.cost_model == "measured" and a.limited_by in ("target", "bound", "lowest_rate")
        if a.limited_by != "target":
            continue
        group = next(g for g in search.groups(scenario, costs) if g.point.backend.name == a.backend)
        at = search.link_probe(scenario, group.point, group.cost, scenario.seed, a.link_gbps, a.target_ms)
        below = search.link_probe(scenario, group.point, group.cost, scenario.seed, a.link_gbps_below, a.target_ms)
        assert at.ok and not below.ok
    # full_djinn moves ids and logits: a boundary inside the bounds; partially_aware ships the whole
    # KV cache every token, which a link alone cannot bring within 5% of native
    assert [a.limited_by for a in answers] == ["target", "bound"]


def test_break_even_unreachable_target_is_bound():
    answers = search.search_break_even(parse_scenario(DECODE), target_ms=0.001, backends=["full_djinn"])
    assert [(a.limited_by, a.link_gbps) for a in answers] == [("bound", None)]


# --- the CLI's one-line errors ---------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    ([], "exactly one of"),
    (["--slo-p99-ms", "100", "--break-even-ms", "5"], "exactly one of"),
    (["--slo-p99-ms", "100", "--backend", "full_djinn"], "not in scenario"),
    (["--slo-p99-ms", "100", "--backends", "djinn,full_djinn"], "not in scenario"),
    (["--slo-p99-ms", "100", "--backend", "djinn,"], "empty backend name"),
    (["--slo-p99-ms", "-1"], "must be > 0"),
    (["--break-even-ms", "5"], "decode workload"),
])
def test_bad_search_input_is_one_line(tmp_path, args, needle):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    result = runner.invoke(app, ["search", str(path), *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_one_way_to_choose_backends(tmp_path):
    """`--backend B` (repeatable) is the documented choice; a comma-separated value and the hidden
    spelling `--backends B,...` choose the same backends: the same answers, the same folder (no
    override tag: the scenario is unchanged)."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    spellings = {"repeated": ["--backend", "djinn", "--backend", "ray_keepalive"],
                 "commas": ["--backend", "djinn,ray_keepalive"],
                 "hidden": ["--backends", "djinn,ray_keepalive"]}
    printed = {}
    for name, args in spellings.items():
        result = runner.invoke(app, ["search", str(path), "--slo-p99-ms", str(SMALL_SLO_MS), "--json", *args,
                                     "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        printed[name] = result.stdout
        assert (tmp_path / name / "search.json").read_text() == (tmp_path / "repeated" / "search.json").read_text()
    assert list(json.loads(printed["repeated"])) == ["djinn", "ray_keepalive"]
    assert printed["commas"] == printed["hidden"] == printed["repeated"]
    assert search_cli.selected_backends([]) is None
    assert search_cli.selected_backends(["djinn", "djinn,x"]) == ["djinn", "x"]
    help_text = runner.invoke(app, ["search", "--help"], terminal_width=200).output
    assert "--backend " in help_text and "--backends" not in help_text


def test_slo_search_on_a_decode_scenario_is_an_error():
    with pytest.raises(DjinnsimError, match="agents workload"):
        search.search_capacity(parse_scenario(DECODE), 100.0)


def test_answer_keys_name_what_varies(tmp_path):
    raw = {**SMALL, "backends": ["djinn"], "cost_model": "roofline", "sweep": {"gpu": ["h100-80gb", "h200"]}}
    answers = search.search_capacity(parse_scenario(raw), 500.0)
    assert list(search.answers_json(answers)) == ["djinn/h100-80gb", "djinn/h200"]
    assert {a.cost_model for a in answers} == {"roofline"}
    search.write_search_outputs(answers, Path(tmp_path))
    assert "roofline" in (Path(tmp_path) / "search.md").read_text()


def test_search_json_is_strict_json_when_a_p99_is_not_finite(tmp_path):
    """A P99 that is not finite (nothing finished above the answer) is null in search.json, never
    `Infinity`, which standard JSON readers refuse."""
    answer = search.CapacityAnswer(backend="djinn", model="llama-2-7b", gpu="h100-80gb", link_gbps=25.0,
                                   cost_model="measured", cost_model_detail="", slo_p99_ms=5000.0, cap=64,
                                   max_agents=3, p99_ms_at_max=4000.0, p99_ms_above=math.inf, limited_by="slo")
    assert answer.as_json()["p99_ms_above"] is None
    text = (tmp_path / "out").joinpath("search.json")
    search.write_search_outputs([answer], tmp_path / "out")
    doc = json.loads(text.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in search.json"))
    (found,) = doc.values()
    assert found["p99_ms_at_max"] == 4000.0 and found["p99_ms_above"] is None
