"""`python -m djinnsim.validate.kv_costs`: real KV swaps, re-prefills and reuse against what the
engine charges. On the CPU with the tiny model and a hand-made profile of this machine (its figures
are made up: the verdicts are not the point here, the wiring is); the GPU run skips without CUDA."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner

from conftest import make_profile
from djinnsim.calibrate.environment import host_cpu
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.profile import Bandwidth, load_profile, save_profile
from djinnsim.sim.specs import get_model
from djinnsim.validate import kv_costs

TINY = get_model("tiny-llama")
CONTEXTS = (16, 48)


def _cpu_profile(path: Path, **memory) -> Path:
    profile = make_profile()
    meta = profile.metadata.model_copy(update={
        "device": "cpu", "gpu_name": f"cpu: {host_cpu()}", "gpu_key": None, "model_id": TINY.model_id,
        "dtype": "float32", "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers")})
    mem = profile.memory.model_copy(update={"kv_bytes_per_token": TINY.kv_bytes_per_token, **memory})
    # A slow pageable copy, so the swap's share of a REFLECT shows in the simulated figures.
    slow = Bandwidth(latency_s=2e-5, gbps=0.05)
    save_profile(profile.model_copy(update={"metadata": meta, "memory": mem, "h2d_pageable": slow,
                                            "d2h_pageable": slow}), path)
    return path


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_costs")
    profile = _cpu_profile(folder / "cpu-tiny.json")
    doc = kv_costs.run(profile, folder / "out", device="cpu", contexts=CONTEXTS, repeats=10, warmups=1,
                       sim_draws=4, say=lambda _: None)
    return profile, folder / "out", doc


def test_every_op_at_every_context_with_its_real_interval_and_verdict(result):
    profile, out, doc = result
    rows = doc["rows"]
    keys = {(r["op"], r["host"], r["context_tokens"]) for r in rows}
    expected = {("swap_out", "pageable"), ("swap_in", "pageable"), ("reflect_after_swap", "pageable"),
                ("reflect_discard", None), ("reflect_preserve", None)}
    assert keys == {(op, host, c) for op, host in expected for c in CONTEXTS}
    for r in rows:
        lo, hi = r["real_ci_s"]
        assert r["real_n"] == 10 and 0 < lo <= r["real_mean_s"] <= hi
        err = 100 * (r["sim_s"] - r["real_mean_s"]) / r["real_mean_s"]
        assert r["error_pct"] == pytest.approx(err)
        assert r["verdict"] == kv_costs.verdict(r["sim_s"], r["real_mean_s"], (lo, hi))
    assert sum(doc["summary"][v] for v in kv_costs.VERDICTS) == len(rows)
    meta = doc["meta"]
    assert meta["profile"]["sha256"] == kv_costs.file_sha256(profile)
    assert meta["sample"].startswith("held-out") and "measured cost model" in meta["cost_model"]
    assert json.loads((out / "kv_costs.json").read_text()) == doc
    md = (out / "kv_costs.md").read_text()
    assert meta["profile"]["sha256"] in md and "| reflect_discard | 48 |" in md and meta["target"] in md


def test_kv_costs_json_is_strict_json_with_null_for_a_figure_that_is_not_finite(tmp_path, monkeypatch):
    """A simulated cost that is not finite makes its error not finite too: kv_costs.json holds null
    there, never NaN, so the file stays standard JSON."""
    real = kv_costs.simulated_costs

    def one_nan(*args, **kwargs):
        costs = real(*args, **kwargs)
        return {**costs, ("reflect_preserve", None): float("nan")}

    monkeypatch.setattr(kv_costs, "simulated_costs", one_nan)
    profile = _cpu_profile(tmp_path / "cpu-tiny.json")
    kv_costs.run(profile, tmp_path / "out", device="cpu", contexts=(16,), repeats=2, warmups=0, sim_draws=1,
                 say=lambda _: None)

    def refuse(name):
        raise AssertionError(f"{name} in kv_costs.json")

    rows = json.loads((tmp_path / "out" / "kv_costs.json").read_text(), parse_constant=refuse)["rows"]
    preserve = [r for r in rows if r["op"] == "reflect_preserve"]
    assert [(r["sim_s"], r["error_pct"]) for r in preserve] == [(None, None)]
    assert all(r["sim_s"] is not None for r in rows if r["op"] != "reflect_preserve")


def test_swapped_and_reprefilled_caches_give_the_resident_caches_token(result):
    _, _, doc = result
    for context in CONTEXTS:
        facts = doc["facts"][str(context)]
        assert facts["kv_bytes"] == facts["sim_kv_bytes"] == context * TINY.kv_bytes_per_token
        assert facts["kv_tensors"] == 2 * TINY.num_layers
        assert set(facts["usable"]) == {"discard", "swap_pageable"}
        assert all(u["usable"] and u["top1_agrees"] for u in facts["usable"].values())
        assert facts["usable"]["swap_pageable"]["max_abs_diff"] == 0.0  # the same bytes, the same forward
    assert doc["summary"]["all_usable"]


def test_simulated_figures_are_what_the_engine_charges(result):
    """Jitter-free profile (jitter_prefill = [1]): the REFLECTs cost the prefill fit at the engine's
    passes, each swap one copy of the KV's bytes at the profile's pageable bandwidth, paying its latency
    once per K/V tensor (the engine copies a session's KV as 2 x layers tensors)."""
    profile, _, doc = result
    cost = ProfileCostModel(load_profile(profile), TINY)
    sim = {(r["op"], r["context_tokens"]): r["sim_s"] for r in doc["rows"]}
    for c in CONTEXTS:
        one_way_s = 2 * TINY.num_layers * 2e-5 + c * TINY.kv_bytes_per_token / (0.05 * 1e9)
        assert sim[("reflect_preserve", c)] == pytest.approx(cost.prefill_s(kv_costs.REFLECT_TOKENS, 1, c))
        assert sim[("reflect_discard", c)] == pytest.approx(cost.prefill_s(c + kv_costs.REFLECT_TOKENS, 1, 0))
        assert sim[("swap_out", c)] == pytest.approx(one_way_s)
        assert sim[("swap_in", c)] == pytest.approx(one_way_s)
        assert sim[("reflect_after_swap", c)] == pytest.approx(one_way_s + sim[("reflect_preserve", c)])


def test_verdict_is_the_real_interval_widened_by_ten_percent():
    assert kv_costs.verdict(1.05, 1.0, (0.99, 1.01)) == "PASS"  # within 10% of a tight interval
    assert kv_costs.verdict(1.15, 1.0, (0.95, 1.06)) == "PASS"  # 1.15 <= 1.06 x 1.1
    assert kv_costs.verdict(1.2, 1.0, (0.95, 1.05)) == "FAIL"
    assert kv_costs.verdict(0.8, 1.0, (0.95, 1.05)) == "FAIL"
    assert kv_costs.verdict(1.3, 1.0, (0.6, 1.4)) == "UNSURE"  # inside, but the runs spread 80% of the mean
    assert kv_costs.verdict(3.0, 1.0, (0.6, 1.4)) == "FAIL"  # a wide interval still fails what lies outside it


@pytest.mark.parametrize("args, message", [
    (["--profile", "/no/such.json"], "profile not found"),
    (["--contexts", "a,b"], "--contexts"),
    (["--device", "tpu"], "--device"),
    (["--repeats", "1"], "--repeats"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    profile = _cpu_profile(tmp_path / "p.json")
    base = {"--profile": str(profile), "--out": str(tmp_path / "o"), "--device": "cpu"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = CliRunner().invoke(_app(), [x for kv in base.items() for x in kv])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


@pytest.mark.parametrize("meta, message", [
    ({"model_id": "meta-llama/Llama-2-7b-hf"}, "runs only tiny-llama"),
    ({"device": "cuda", "gpu_name": "NVIDIA H200"}, "does not describe this machine"),
    ({"torch": "0.0.1"}, "does not describe this machine"),
])
def test_a_profile_of_another_model_or_machine_is_refused(tmp_path, meta, message):
    path = _cpu_profile(tmp_path / "p.json")
    profile = load_profile(path)
    save_profile(profile.model_copy(update={"metadata": profile.metadata.model_copy(update=meta)}), path)
    result = CliRunner().invoke(_app(), ["--profile", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 1 and message in result.output and not (tmp_path / "o").exists()


def _app():
    import typer

    app = typer.Typer()
    app.command()(kv_costs.main)
    return app


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_with_pinned_and_pageable_swaps(tmp_path):
    """On a GPU: a profile of this GPU from a quick calibration, then both host-memory kinds."""
    from djinnsim.calibrate.runner import run_calibration

    profile = tmp_path / "gpu.json"
    run_calibration(device="cuda", model="tiny-llama", quick=True, out=profile, quiet=True)
    doc = kv_costs.run(profile, tmp_path / "out", device="cuda", contexts=(64,), repeats=10, warmups=2,
                       sim_draws=4, say=lambda _: None)
    hosts = {r["host"] for r in doc["rows"] if r["op"] == "swap_in"}
    assert hosts == {"pinned", "pageable"} and doc["summary"]["all_usable"]


REPO = Path(__file__).resolve().parents[1]
RUN3_REAL = REPO / "docs/validation/kv-costs-h200-run3/kv_costs.json"
RUN3_PROFILE = REPO / "docs/calibration/h200-run3/h200-llama-2-7b.json"


def test_rejudge_reproduces_the_frozen_profiles_sim_column_and_labels_another_in_sample(tmp_path):
    """--rejudge: the real rows of a committed run against a profile, no device. With the profile
    the run froze it gives that run's simulated column again (held out); with any other it says
    IN-SAMPLE. Where the other profile prices a row otherwise, its verdict follows its own figure."""
    committed = json.loads(RUN3_REAL.read_text())
    same = kv_costs.rejudge_file(RUN3_REAL, RUN3_PROFILE, tmp_path / "same", say=lambda _: None)
    # every row but the pageable swap-out, whose charge changed after run 3 (the copies stage's two
    # regimes, ProfileCostModel.kv_swap_bandwidth), comes back as committed
    kept = [i for i, r in enumerate(committed["rows"]) if (r["op"], r["host"]) != ("swap_out", "pageable")]
    assert len(kept) == 28
    assert [same["rows"][i]["sim_s"] for i in kept] == pytest.approx([committed["rows"][i]["sim_s"] for i in kept], rel=1e-9)
    assert [same["rows"][i]["verdict"] for i in kept] == [committed["rows"][i]["verdict"] for i in kept]
    cost = ProfileCostModel(load_profile(RUN3_PROFILE), get_model(committed["meta"]["model"]))
    for r in same["rows"]:
        if (r["op"], r["host"]) == ("swap_out", "pageable"):
            nbytes = r["context_tokens"] * cost.kv_bytes_per_token
            assert r["sim_s"] == pytest.approx(cost.copy_bandwidth("d2h", False).time_s(nbytes, cost.kv_tensors), rel=1e-9)
            assert r["sim_range_s"][0] == r["sim_s"] < r["sim_range_s"][1]
        else:
            assert r["sim_range_s"] is None and r["in_range"] is None
    assert same["meta"]["profile"]["frozen_before_real_runs"] and "held out" in same["meta"]["sample"]
    profile = load_profile(RUN3_PROFILE)
    slower = profile.model_copy(update={"prefill": profile.prefill.model_copy(
        update={"coef": [2 * c for c in profile.prefill.coef]})})
    other = save_profile(slower, tmp_path / "other.json")
    moved = kv_costs.rejudge_file(RUN3_REAL, other, tmp_path / "other", say=lambda _: None)
    assert not moved["meta"]["profile"]["frozen_before_real_runs"] and "IN-SAMPLE" in moved["meta"]["sample"]
    discard = [(a, b) for a, b in zip(committed["rows"], moved["rows"]) if a["op"] == "reflect_discard"]
    assert all(b["sim_s"] > a["sim_s"] for a, b in discard[-2:])  # compute-bound re-prefills cost more
    assert "IN-SAMPLE" in (tmp_path / "other" / "kv_costs.md").read_text()


def test_rejudge_refuses_what_is_not_a_kv_costs_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": 3}')
    result = CliRunner().invoke(_app(), ["--rejudge", str(bad), "--profile", str(RUN3_PROFILE), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not a kv_costs.json" in result.output and "Traceback" not in result.output



@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.__setitem__("meta", {}), "meta.model"),
    (lambda d: d["meta"].pop("sim_draws"), "meta.sim_draws"),
    (lambda d: d["meta"].__setitem__("seed", "x"), "meta.seed"),
    (lambda d: d["meta"]["profile"].pop("sha256"), "meta.profile.sha256"),
    (lambda d: d["rows"][0].__setitem__("op", "bogus"), "rows[0].op"),
    (lambda d: d["rows"][0].__setitem__("host", "floppy"), "rows[0].host"),
    (lambda d: d["rows"][0].pop("real_mean_s"), "rows[0].real_mean_s"),
    (lambda d: d["rows"][1].__setitem__("real_mean_s", -1.0), "rows[1].real_mean_s"),
    (lambda d: d["rows"][0].__setitem__("real_ci_s", [1.0]), "rows[0].real_ci_s"),
    (lambda d: d["rows"][0].__setitem__("context_tokens", 0), "rows[0].context_tokens"),
    (lambda d: d["rows"][0].__setitem__("real_n", "many"), "rows[0].real_n"),
    (lambda d: d["rows"].__setitem__(0, 3), "rows[0]"),
])
def test_rejudge_refuses_a_damaged_result_in_one_line_naming_the_field(tmp_path, mutate, needle):
    doc = json.loads(RUN3_REAL.read_text())
    mutate(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    result = CliRunner().invoke(_app(), ["--rejudge", str(bad), "--profile", str(RUN3_PROFILE), "--out", str(tmp_path / "o")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and needle in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("sim_range", "met"), [((0.005, 0.050), True), ((0.0105, 0.5), True), ((0.0111, 0.5), False),
                                                 ((0.001, 0.0071), False), ((0.001, 0.0073), True), (None, None)])
def test_a_pageable_swap_outs_range_meets_the_widened_real_interval_or_not(sim_range, met):
    """The range (warm pages, fresh pages) meets the real 95% interval [8, 10] ms widened by 10%
    ([7.2, 11] ms) when it overlaps it; the verdict still judges the point alone."""
    row = kv_costs.judged("swap_out", "pageable", 128, 0.009, (0.008, 0.010), 12, 0.002, sim_range)
    assert row.in_range is met and row.sim_range_s == sim_range
    assert row.verdict == "FAIL" and row.error_pct == pytest.approx(100 * (0.002 - 0.009) / 0.009)
