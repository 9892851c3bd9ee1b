"""`djinnsim validate --level-probe` (validate.anchored): a short native decode on each point's own
process before its first repeat and after its last, outside the scored runs; the point judged again
at the level the probe before it measured, counted apart from the main verdicts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_validate_offline import validate_tiny  # noqa: E402

from djinnsim.cli import app  # noqa: E402
from djinnsim.sim.costmodel import ProfileCostModel  # noqa: E402
from djinnsim.sim.profile import load_profile  # noqa: E402
from djinnsim.sim.specs import get_model  # noqa: E402
from djinnsim.validate import anchored, clients  # noqa: E402
from djinnsim.validate.plan import command  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, Path]:
    return validate_tiny(tmp_path_factory.mktemp("probe"), "--level-probe")


def test_the_probes_run_outside_the_scored_repeats(probed):
    out, _ = probed
    doc = json.loads((out / "validation.json").read_text())
    assert doc["meta"]["level_probe"] is True
    rows = list(csv.DictReader((out / "records_real.csv").open()))
    probes = doc["level_probes"]
    assert sorted(probes) == sorted(str(p["index"]) for p in doc["points"])
    for index, probe in probes.items():
        mine = [r for r in rows if r["point"] == index]
        before, after = probe["before"], probe["after"]
        assert len(before["step_s"]) == clients.PROBE_NEW_TOKENS - 1 == len(after["step_s"])
        assert before["prompt_tokens"] == clients.PROBE_PROMPT_TOKENS
        # the probe is the second of two identical decodes: the first pays the lengths' first use
        assert len(before["cold_step_s"]) == len(before["step_s"]) == len(after["cold_step_s"])
        for one in (before, after):
            assert one["cold_at"] + sum(one["cold_step_s"]) <= one["at"]
        assert before["at"] + sum(before["step_s"]) < min(float(r["issued_at"]) for r in mine)
        assert after["at"] > max(float(r["finished_at"]) for r in mine)


def test_anchored_profile_is_the_profile_at_the_probed_level(probed):
    out, profile_path = probed
    doc = json.loads((out / "validation.json").read_text())
    profile = load_profile(profile_path)
    cost = ProfileCostModel(profile, get_model("tiny-llama"))
    assert [row["index"] for row in doc["anchored"]["rows"]] == [p["index"] for p in doc["points"]]
    for row in doc["anchored"]["rows"]:
        probe = doc["level_probes"][str(row["index"])]["before"]
        steps = probe["step_s"]
        m = np.median(steps) / np.median([cost.decode_step_s(1, probe["prompt_tokens"] + i) for i in range(len(steps))])
        assert row["factor"] == pytest.approx(m, rel=1e-12)
        scaled = load_profile(out / row["profile"])
        scaled_cost = ProfileCostModel(scaled, get_model("tiny-llama"))
        for ctx in (1, 40, 500):
            assert scaled_cost.decode_step_s(1, ctx) == pytest.approx(m * cost.decode_step_s(1, ctx), rel=1e-9)
        assert scaled.spread is None or scaled.spread.decode_level == []
        assert scaled.metadata.notes[-1].startswith(anchored.ANCHORED_NOTE)


def test_anchored_verdicts_are_counted_apart(probed):
    out, _ = probed
    doc = json.loads((out / "validation.json").read_text())
    main = sum(1 for p in doc["points"] for m in p["metrics"].values())
    assert sum(doc["summary"][v] for v in ("PASS", "FAIL", "info", "N/A")) == main
    extra = sum(1 for p in doc["anchored"]["points"] for m in p["metrics"].values())
    assert sum(doc["anchored"]["summary"][v] for v in ("PASS", "FAIL", "info", "N/A")) == extra == main
    md = (out / "validation.md").read_text()
    assert "## Anchored to the level probe before each point" in md
    assert md.index("**Summary:") < md.index("**Anchored:")


def test_offline_rejudges_the_anchored_points_from_the_saved_probes(probed, tmp_path):
    out, _ = probed
    again = tmp_path / "again"
    result = runner.invoke(app, ["validate", "--from-real", str(out), "--out", str(again), "--quiet"])
    assert result.exit_code == 0, result.output
    live, offline = (json.loads((f / "validation.json").read_text()) for f in (out, again))
    assert offline["level_probes"] == live["level_probes"]
    assert offline["anchored"]["rows"] == live["anchored"]["rows"]
    figures = [{k: v for k, v in p.items() if k not in ("sample", "sample_reasons")} for p in live["anchored"]["points"]]
    assert [{k: v for k, v in p.items() if k not in ("sample", "sample_reasons")}
            for p in offline["anchored"]["points"]] == figures
    refused = runner.invoke(app, ["validate", "--from-real", str(out), "--level-probe", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 1 and "--level-probe" in refused.output and "Traceback" not in refused.output


def test_probe_factor_ignores_what_is_not_a_step():
    class Flat:
        def decode_step_s(self, batch, context):
            return 0.02

    assert anchored.probe_factor({"prompt_tokens": 32, "step_s": []}, Flat()) is None
    assert anchored.probe_factor({"prompt_tokens": 32, "step_s": [float("nan"), 0.0, 0.03, 0.04, 0.05]},
                                 Flat()) == pytest.approx(2.0)


def test_a_plan_item_asks_for_the_probe(tmp_path):
    plan = {"profile": "p.json", "items": []}
    item = {"name": "x", "scenario": "exp21.yaml", "points": ["*__25gbps"], "repeats": 5, "level_probe": True}
    base = Path(__file__).resolve().parents[1] / "docs" / "validation" / "h200"
    assert "--level-probe" in command(plan, item, base, None, 300).split()
    assert "--level-probe" not in command(plan, {**item, "level_probe": False}, base, None, 300).split()
