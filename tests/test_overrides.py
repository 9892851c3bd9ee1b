"""`--set FIELD=VALUE` and its shortcuts (sim/overrides.py), the results folder they name, `--version`
and `python -m djinnsim`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from djinnsim import __version__
from djinnsim.cli import app
from djinnsim.errors import DjinnsimError
from djinnsim.sim.overrides import apply_overrides, collect, load_overridden, overrides_tag, parse_set, results_folder
from djinnsim.sim.scenario import load_scenario
from test_cli import SMALL  # a two-point agents scenario

REPO = Path(__file__).resolve().parents[1]
AGENTS32 = REPO / "scenarios" / "agents32.yaml"
runner = CliRunner()



def _apply(*sets: str, **shortcuts):
    return apply_overrides(load_scenario(AGENTS32), collect(sets, **shortcuts), "agents32.yaml")


def test_set_any_dotted_field_value_parsed_as_yaml():
    scenario = _apply("workload.agents=[1,1024]", "gpu=h200", "link.rtt_ms=0.5", "server.rules.admission.enabled=true",
                      "cost_model=transfer")
    assert scenario.workload.agents == [1, 1024]
    assert scenario.gpu == "h200" and scenario.link.rtt_ms == 0.5 and scenario.server.rules.admission.enabled is True
    assert scenario.workload.reason.new_tokens == 50  # what the file set and no override touched stays
    assert _apply("server.kv_policy={kind: ttl, ttl_s: 5, then: swap}").server.kv_policy.kind == "ttl"
    assert _apply("backends.1=djinn", "backends=[djinn]").backends == ["djinn"]  # applied in order


def test_shortcuts():
    scenario = _apply(agents="1,8,1024", backends="djinn,ray_keepalive", gpu="h200", link_gbps="100")
    assert scenario.workload.agents == [1, 8, 1024] and scenario.backends == ["djinn", "ray_keepalive"]
    assert scenario.gpu == "h200" and scenario.link.gbps == 100
    assert _apply(agents="[2, 4]").workload.agents == [2, 4] and _apply(agents="64").workload.agents == [64]
    swept = _apply(gpu="a100-80gb,h100-80gb", link_gbps="10,25")
    assert swept.sweep.gpu == ["a100-80gb", "h100-80gb"] and swept.sweep.link_gbps == [10, 25]
    # one value replaces a sweep the file has
    sweep_file = apply_overrides(load_scenario(AGENTS32), collect(["sweep.gpu=[a100-80gb, h100-80gb]"]))
    raw = sweep_file.model_dump(mode="json", exclude_unset=True)
    assert apply_overrides(sweep_file, collect(gpu="h100-80gb")).sweep.gpu is None and raw["sweep"]["gpu"]


@pytest.mark.parametrize("sets, needles", [
    (["workload.agents=[0]"], ["workload.agents", "> 0"]),
    (["workload.agnts=[1]"], ["workload.agnts", "Extra inputs"]),
    (["gpu=h900"], ["h900"]),
    (["link.gbps=-1"], ["link.gbps", "greater than"]),
    (["workload.agents"], ["FIELD=VALUE"]),
    (["=3"], ["dotted field"]),
    (["workload..agents=[1]"], ["dotted field"]),
    (["workload.agents=[1, 2"], ["malformed YAML"]),
    (["description=" + "[" * 100 + "]" * 100], ["malformed YAML", "nest"]),
    (["link.gbps=.nan"], ["link.gbps"]),
    (["seed=-1"], ["seed"]),
    (["seed.x=1"], ["seed", "not a mapping"]),
    (["backends.7=djinn"], ["backends.7", "3 items"]),
])
def test_bad_overrides_are_one_line_naming_the_field(sets, needles):
    with pytest.raises(DjinnsimError) as caught:
        _apply(*sets)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_a_field_a_sweep_replaces_is_refused_not_ignored():
    swept = apply_overrides(load_scenario(AGENTS32), collect(["sweep.gpu=[a100-80gb, h100-80gb]"]))
    with pytest.raises(DjinnsimError, match="would change nothing.*--gpu"):
        apply_overrides(swept, collect(["gpu=h200"]))
    assert apply_overrides(swept, collect(["gpu=h200", "sweep.gpu=null"])).sweep.gpu is None


def test_results_folder_follows_the_file_and_the_overrides(tmp_path):
    assert results_folder(AGENTS32) == "agents32"
    copy = tmp_path / "mine.yaml"
    copy.write_text(AGENTS32.read_text())  # the same `name: agents32`
    assert load_overridden(copy)[1] == "mine"
    tag = overrides_tag(collect(["workload.agents=[1,1024]"]))
    assert len(tag) == 8 and results_folder(AGENTS32, collect(["workload.agents=[1,1024]"])) == f"agents32__{tag}"
    # the same change however it is spelled, a different change a different tag
    assert overrides_tag(collect(["workload.agents=[1, 1024]"])) == tag == overrides_tag(collect(agents="1,1024"))
    assert overrides_tag(collect(["workload.agents=[1,1025]"])) != tag


def test_run_with_overrides_writes_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "copy.yaml").write_text(SMALL)
    result = runner.invoke(app, ["run", "copy.yaml", "--quiet", "--agents", "3", "--set", "link.gbps=10"])
    assert result.exit_code == 0, result.output
    folder = results_folder("copy.yaml", collect(["link.gbps=10"], agents="3"))
    (out,) = (tmp_path / "results" / folder).iterdir()
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["n_agents"], p["link_gbps"]) for p in summary["points"]] == [(3, 10.0)]
    assert not (tmp_path / "results" / "small").exists()
    bad = runner.invoke(app, ["run", "copy.yaml", "--set", "workload.agents=[0]"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "workload.agents" in bad.output


def test_search_takes_overrides(tmp_path):
    (tmp_path / "s.yaml").write_text(SMALL)
    result = runner.invoke(app, ["search", str(tmp_path / "s.yaml"), "--slo-p99-ms", "100000", "--max-agents", "4",
                                 "--json", "--set", "link.gbps=10", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.splitlines()[-1])["djinn"]
    assert answer["link_gbps"] == 10.0 and answer["max_agents"] == 4


def test_version_and_python_m():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"djinnsim {__version__}"
    done = subprocess.run([sys.executable, "-m", "djinnsim", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"djinnsim {__version__}"


def test_parse_set_keeps_the_text_after_the_first_equals():
    assert parse_set("description=a=b").value == "a=b"
