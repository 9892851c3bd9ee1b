"""Small CLI behaviours of issue 12: `validate --strict`, `calibrate --device cpu`'s default model,
a CPU profile that says it predicts no GPU, and warnings printed once on stderr in plain words."""

from __future__ import annotations

import json
import re

import pytest
import typer
from conftest import make_profile

from djinnsim.calibrate.options import CPU_PROFILE_NOTE, default_model
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.notices import emit, fit_inputs
from djinnsim.sim.profile import save_profile
from djinnsim.errors import DjinnsimError
from djinnsim.sim.run import CostModels, simulate_scenario
from djinnsim.sim.scenario import expand_points, parse_scenario
from djinnsim.sim.specs import get_model
from djinnsim.validate.cli import _check_strict


def _report(folder, fail: int):
    folder.mkdir()
    (folder / "validation.json").write_text(json.dumps({"summary": {"PASS": 3, "FAIL": fail, "N/A": 1}}))
    return folder


def test_strict_exits_one_on_any_fail(tmp_path, capsys):
    with pytest.raises(typer.Exit) as caught:
        _check_strict(_report(tmp_path / "failed", 2), strict=True)
    assert caught.value.exit_code == 1 and "2 FAIL" in capsys.readouterr().err
    _check_strict(_report(tmp_path / "passed", 0), strict=True)
    _check_strict(tmp_path / "failed", strict=False)  # without --strict a FAIL is only reported


def test_cpu_calibration_defaults_to_tiny_llama():
    assert default_model("cpu") == "tiny-llama" and default_model("cuda") == "llama-2-7b"


def test_a_cpu_profile_says_it_predicts_no_gpu(tmp_path):
    profile = make_profile(gpu_key=None, gpu_name="cpu: some x86")
    profile = profile.model_copy(update={"metadata": profile.metadata.model_copy(
        update={"device": "cpu", "notes": [CPU_PROFILE_NOTE]})})
    assert "not a prediction for any GPU" in ProfileCostModel(profile, get_model("llama-2-7b")).describe()
    path = save_profile(profile, tmp_path / "cpu.json")
    scenario = parse_scenario({"name": "c", "backends": ["full_djinn"], "gpu": "h100-80gb", "cost_model": "roofline",
                               "workload": {"kind": "decode", "runs": 2, "warmup_runs": 0, "new_tokens": 2}})
    # a CPU profile has no GPU of its own: a run refuses it for a GPU, and warns whenever it reads it
    models = CostModels(scenario.model_copy(update={"cost_model": "profile"}), path)
    with pytest.raises(DjinnsimError, match="measured on the CPU and stands for no GPU"):
        models.for_point(expand_points(scenario)[0])
    assert any("measured on a CPU" in w and "not predictions for any GPU" in w for w in models.warnings)
    assert simulate_scenario(scenario).warnings == []  # the roofline run never read it


def test_warnings_once_on_stderr_in_words(capsys):
    emit(["a thing happened, so X", "a thing happened, so X", "another"])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "warning: a thing happened, so X\nwarning: another\n"
    assert fit_inputs({"prompt_tokens": 16, "batch": 1, "context": 122}) == "16 prompt tokens, batch 1, 122 context tokens"


def test_a_profile_with_another_calibrations_loads_says_so(tmp_path):
    """A profile whose load stages come from another calibration (`calibrate --refit --loads-from`):
    every run reading it names that calibration among its warnings."""
    from djinnsim.sim.profile import LoadsSource

    profile = make_profile()
    source = LoadsSource(path="docs/calibration/run7/p.json", samples_sha256="ab" * 32, date="2026-12-02T18:13:03+00:00")
    profile = profile.model_copy(update={"metadata": profile.metadata.model_copy(update={"loads_from": source})})
    path = save_profile(profile, tmp_path / "p.json")
    scenario = parse_scenario({"name": "c", "backends": ["full_djinn"], "gpu": "h100-80gb", "cost_model": "profile",
                               "workload": {"kind": "decode", "runs": 2, "warmup_runs": 0, "new_tokens": 2}})
    warnings = simulate_scenario(scenario, path).warnings
    assert any("whole-model loads, k-process loads, k-process decoding from another calibration, "
               "docs/calibration/run7/p.json (2026-12-02T18:13:03+00:00)" in w for w in warnings), warnings


def test_a_profile_of_another_gpu_names_its_gpu_and_key(tmp_path):
    """A profile measured on one GPU, a scenario of another with cost_model: profile: one line naming the
    profile's GPU by name and by key beside the scenario's key (a hand-edited profile whose name and
    key disagree would otherwise read as a contradiction)."""
    profile = make_profile()
    path = save_profile(profile, tmp_path / "p.json")
    meta = profile.metadata
    other = "h200" if meta.gpu_key != "h200" else "h100-80gb"
    scenario = parse_scenario({"name": "c", "backends": ["full_djinn"], "gpu": other, "cost_model": "profile",
                               "workload": {"kind": "decode", "runs": 2, "warmup_runs": 0, "new_tokens": 2}})
    with pytest.raises(DjinnsimError, match=re.escape(f"measured on {meta.gpu_name} ({meta.gpu_key}), but the scenario asks {other};")):
        simulate_scenario(scenario, path)


@pytest.mark.parametrize("cost_model", ["profile", "transfer"])
def test_a_cpu_profile_on_a_gpu_scenario_points_to_validate_not_to_a_transfer_it_cannot_make(tmp_path, cost_model):
    """A CPU profile stands for no GPU: a GPU scenario refuses it in one line that names what it serves
    (validate --device cpu), not a transfer that would fail next for want of a datasheet."""
    profile = make_profile()
    meta = profile.metadata.model_copy(update={"device": "cpu", "gpu_name": "cpu: Intel Xeon", "gpu_key": None})
    path = save_profile(profile.model_copy(update={"metadata": meta}), tmp_path / "p.json")
    scenario = parse_scenario({"name": "c", "backends": ["full_djinn"], "gpu": "h100-80gb", "cost_model": cost_model,
                               "workload": {"kind": "decode", "runs": 2, "warmup_runs": 0, "new_tokens": 2}})
    with pytest.raises(DjinnsimError, match=r"measured on the CPU and stands for no GPU.*validate --device cpu"):
        simulate_scenario(scenario, path)


def test_a_server_scheduler_that_batches_separate_processes_is_named_once_per_backend():
    """server.scheduler overrides every backend's policy; where the backend's agents are separate
    processes with their own model copies (Ray keep-alive, serverless), batching or queueing them as one
    server is not what a GPU does: the run says so, and says nothing for a shared-weights backend."""
    doc = {"name": "s", "backends": ["ray_keepalive", "ray_serverless", "djinn"], "gpu": "h100-80gb",
           "cost_model": "roofline", "server": {"scheduler": "continuous_batching"},
           "workload": {"kind": "agents", "agents": [2], "reason": {"input_tokens": 8, "new_tokens": 2},
                        "act": {"kind": "fixed", "seconds": 0.1}, "reflect": {"input_tokens": 4, "new_tokens": 2}}}
    warnings = simulate_scenario(parse_scenario(doc)).warnings
    named = [w for w in warnings if w.startswith("server.scheduler: continuous_batching replaces")]
    assert [w.split()[3] for w in named] == ["ray_keepalive's", "ray_serverless's"]
    doc["server"] = {"scheduler": "time_sliced"}
    assert not [w for w in simulate_scenario(parse_scenario(doc)).warnings if w.startswith("server.scheduler")]
