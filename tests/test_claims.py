"""Claims from simulated data only: the searched density, the seed's checklist, GPU busy share."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from djinnsim.sim import claims as claims_mod
from djinnsim.sim.records import Record
from djinnsim.sim.run import simulate_scenario
from djinnsim.sim.scenario import parse_scenario
from djinnsim.sim.search import CapacityAnswer, search_capacity

GROUP = "llama-2-7b-hf / h100-80gb / 25 Gbps"


def _answer(backend, n, limited_by="slo", at=150.0, above=250.0):
    return CapacityAnswer(backend=backend, model="llama-2-7b-hf", gpu="h100-80gb", link_gbps=25.0,
                          cost_model="measured", cost_model_detail="measured", slo_p99_ms=200.0, cap=65536,
                          max_agents=n, p99_ms_at_max=at if n else None, p99_ms_above=above, limited_by=limited_by)


@pytest.mark.parametrize("djinn,keep,verdict,value", [
    (40, 2, "PASS", 20.0), (39, 2, "FAIL", 19.5), (25, 0, "PASS", None), (19, 0, "FAIL", None), (0, 0, "FAIL", None),
])
def test_searched_density_verdicts(djinn, keep, verdict, value):
    claim = claims_mod.density_claim(GROUP, {"djinn": _answer("djinn", djinn), "ray_keepalive": _answer("ray_keepalive", keep)})
    assert claim.verdict == verdict and claim.value == (None if value is None else pytest.approx(value))
    assert f"Djinn {djinn} agents" in claim.detail and f"keep-alive {keep} agents" in claim.detail


def test_searched_density_says_when_the_cap_was_reached():
    capped = replace(_answer("djinn", 65536, "cap"), p99_ms_above=None)
    claim = claims_mod.density_claim(GROUP, {"djinn": capped, "ray_keepalive": _answer("ray_keepalive", 2)})
    assert claim.verdict == "PASS" and ">= 65536 agents (the search cap)" in claim.detail
    assert claims_mod.density_claim(GROUP, {}).verdict == "N/A"


@pytest.mark.parametrize("max_agents,limited_by,verdict", [
    (1, "memory", "PASS"), (2, "memory", "PASS"), (3, "memory", "FAIL"), (5, "memory", "FAIL"), (9, "cap", "FAIL"),
])
def test_keepalive_oom_claim(max_agents, limited_by, verdict):
    claim = claims_mod.keepalive_oom_claim(GROUP, _answer("ray_keepalive", max_agents, limited_by))
    assert claim.verdict == verdict
    if limited_by == "memory":
        assert claim.value == max_agents + 1 and claim.unit == "N"
    assert claims_mod.keepalive_oom_claim(GROUP, None).verdict == "N/A"


def _point(backend, n, p99, oom=False, reason_ms=100.0, reflect_ms=40.0):
    phases = {"reason": {"mean_ms": reason_ms, "breakdown_mean_ms": {"compute": reason_ms - 1}},
              "reflect": {"mean_ms": reflect_ms, "breakdown_mean_ms": {"compute": reflect_ms - 1}}}
    return {"backend": backend, "n_agents": n, "oom": oom, "agents": {"pooled": {"p99_ms": p99}, "phases": phases}}


def test_checklist_claims_from_summaries():
    points = {"djinn": [_point("djinn", 1, 120, reflect_ms=50.0), _point("djinn", 32, 199.9)],
              "ray_serverless": [_point("ray_serverless", 32, 5000.1)]}
    assert claims_mod.djinn_n32_claim(GROUP, points).verdict == "PASS"
    assert claims_mod.serverless_claim(GROUP, points).verdict == "PASS"
    reflect = claims_mod.reflect_claim(GROUP, points)
    assert reflect.verdict == "PASS" and reflect.value == pytest.approx(0.5)
    points = {"djinn": [_point("djinn", 1, 120, reflect_ms=50.1), _point("djinn", 32, 200.0)],
              "ray_serverless": [_point("ray_serverless", 32, 5000.0)]}
    assert claims_mod.djinn_n32_claim(GROUP, points).verdict == "FAIL"
    assert claims_mod.serverless_claim(GROUP, points).verdict == "FAIL"
    assert claims_mod.reflect_claim(GROUP, points).verdict == "FAIL"
    assert claims_mod.djinn_n32_claim(GROUP, {"djinn": [_point("djinn", 16, 1.0)]}).verdict == "N/A"


def test_pool_claims_are_per_gpu():
    """On 4 GPUs "N = 32" is 32 agents per GPU (N = 128), REFLECT vs REASON is at one agent per GPU,
    the keep-alive OOM N is the fullest GPU's actors, and density compares agents per GPU."""
    gpus = 4
    points = {"djinn": [_point("djinn", 32, 500.0), _point("djinn", 4, 120, reflect_ms=50.0),
                        _point("djinn", 128, 199.9)],
              "ray_serverless": [_point("ray_serverless", 32, 100.0), _point("ray_serverless", 128, 5000.1)]}
    djinn32 = claims_mod.djinn_n32_claim(GROUP, points, gpus)
    assert (djinn32.verdict, djinn32.value) == ("PASS", 199.9) and "(N = 128)" in djinn32.name
    assert claims_mod.serverless_claim(GROUP, points, gpus).value == 5000.1
    assert claims_mod.latency_claim(GROUP, points, gpus).value == pytest.approx(5000.1 / 199.9)
    reflect = claims_mod.reflect_claim(GROUP, points, gpus)
    assert reflect.verdict == "PASS" and reflect.value == pytest.approx(0.5) and "1 agent per GPU" in reflect.name
    # keep-alive: N = 12 runs, 13 OOMs on 4 GPUs: 4 actors on the fullest GPU (fails 2..3); 9 OOMs: 3 (passes)
    keep = replace(_answer("ray_keepalive", 12, "memory"), gpus=gpus)
    assert (claims_mod.keepalive_oom_claim(GROUP, keep).value, claims_mod.keepalive_oom_claim(GROUP, keep).verdict) \
        == (4.0, "FAIL")
    assert claims_mod.keepalive_oom_claim(GROUP, replace(keep, max_agents=8)).verdict == "PASS"
    # density per GPU: keep-alive serves none, so Djinn must serve 20 per GPU (80 on 4 GPUs) alone
    none = replace(_answer("ray_keepalive", 0), gpus=gpus)
    for djinn, verdict in ((79, "FAIL"), (80, "PASS")):
        claim = claims_mod.density_claim(GROUP, {"djinn": replace(_answer("djinn", djinn), gpus=gpus),
                                                 "ray_keepalive": none})
        assert claim.verdict == verdict and "per GPU" in claim.name
    bound = claims_mod.density_bound_claim(GROUP, {
        "djinn": [{**_point("djinn", 4, 1.0), "memory_bound_agents": 2876}],
        "ray_keepalive": [{**_point("ray_keepalive", 4, 1.0), "memory_bound_agents": 20}]}, gpus)
    assert bound.verdict == "bound" and bound.value == pytest.approx((2876 / 4) / 6)  # 21 OOMs: 6 on the fullest GPU


def _rec(issued_at, started_at, compute_s, finished_at, warmup=False, status="ok"):
    return Record(point=0, backend="b", model="m", gpu="g", link_gbps=1.0, n_agents=1, agent=0, run=0, phase="decode",
                  step=0, status=status, warmup=warmup, issued_at=issued_at, started_at=started_at,
                  finished_at=finished_at, connect_s=0.0, uplink_s=0.0, queue_s=0.0, load_s=0.0, copy_s=0.0,
                  compute_s=compute_s, downlink_s=0.0, context_tokens=0, input_tokens=1, new_tokens=1, bytes_up=0,
                  bytes_down=0, wire_bytes_up=0, wire_bytes_down=0, h2d_bytes=0, d2h_bytes=0, gpu_mem_bytes=0,
                  gpu_mem_peak_bytes=0)


SMALL = {
    "name": "claims_small", "seed": 5, "backends": ["ray_keepalive", "ray_serverless", "djinn"],
    "workload": {"kind": "agents", "agents": [1, 2], "reason": {"input_tokens": 8, "new_tokens": 4},
                 "act": {"kind": "fixed", "seconds": 1}, "reflect": {"input_tokens": 4, "new_tokens": 4}},
}


def test_claims_of_a_simulation_search_with_its_cost_models():
    from djinnsim.sim.report import point_summaries

    scenario = parse_scenario(SMALL)
    result = simulate_scenario(scenario)
    claims = {c.name.split(" (")[0]: c for c in claims_mod.evaluate_claims(point_summaries(result), "agents", result)}
    density = claims["density"]
    answers = {a.backend: a for a in search_capacity(scenario, claims_mod.SEED_SLO_P99_MS, ["djinn", "ray_keepalive"])}
    expected = answers["djinn"].max_agents / answers["ray_keepalive"].max_agents
    assert density.verdict in ("PASS", "FAIL") and density.value == pytest.approx(expected)
    oom = claims["keep-alive OOM at N = 2-3"]
    assert oom.value == search_capacity(scenario, math.inf, ["ray_keepalive"])[0].max_agents + 1
    for claim in claims.values():
        assert claim.cost_model.startswith("measured cost model")
        assert not (claim.verdict == "PASS" and "bound" in claim.name)


def test_decode_utilization_claim_from_summaries():
    from djinnsim.sim.report import point_summaries

    raw = {"name": "u", "seed": 1, "backends": ["semantic_blind", "full_djinn"],
           "workload": {"kind": "decode", "prompt_tokens": 16, "new_tokens": 4, "runs": 3, "warmup_runs": 1}}
    result = simulate_scenario(parse_scenario(raw))
    summaries = point_summaries(result)
    [claim] = [c for c in claims_mod.evaluate_claims(summaries, "decode", result) if "utilization" in c.name]
    shares = [s["gpu_utilization"] for s in summaries]
    assert all(0 < s <= 1 for s in shares)
    assert claim.value == pytest.approx(shares[1] / shares[0]) and claim.verdict == ("PASS" if shares[1] > shares[0] else "FAIL")
    # judged from the summaries alone: the records are not needed
    assert [c.verdict for c in claims_mod.evaluate_claims(summaries, "decode") if "utilization" in c.name] == [claim.verdict]


def test_keepalive_oom_search_stops_at_its_cap_per_gpu():
    """Actors that leave (Poisson arrivals, short tool calls) on a pool of 2 GPUs never run out of
    memory: the claims' OOM search stops at 64 actors per GPU instead of galloping to 65536."""
    from djinnsim.sim.report import point_summaries

    raw = {"name": "leaving", "seed": 7, "backends": ["ray_keepalive"],
           "cluster": {"nodes": 2, "gpus_per_node": 1, "router": "least_loaded"},
           "workload": {"kind": "agents", "agents": [1], "reason": {"input_tokens": 16, "new_tokens": 6},
                        "act": {"kind": "exponential", "mean_s": 0.5}, "reflect": {"input_tokens": 8, "new_tokens": 6},
                        "arrival": {"kind": "poisson", "rate_per_s": 4}}}
    result = simulate_scenario(parse_scenario(raw))
    [claim] = [c for c in claims_mod.evaluate_claims(point_summaries(result), "agents", result)
               if c.name.startswith("keep-alive OOM")]
    cap = claims_mod.OOM_SEARCH_CAP_PER_GPU * 2
    assert claim.verdict == "FAIL" and claim.detail == f"no OOM up to N = {cap} (limited by cap)"
