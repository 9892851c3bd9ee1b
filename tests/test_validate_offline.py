"""`djinnsim validate --from-real DIR`: a finished validation re-compared without running anything real.

One small CPU validation (tiny model, a hand-made profile of this machine so no calibration runs)
is made once; the offline re-comparison of it must reproduce its comparison exactly (the same
simulator and profile), be byte-identical across runs, and refuse what it cannot do in one line.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import make_profile
from djinnsim.calibrate.environment import host_cpu
from djinnsim.cli import app
from djinnsim.sim.profile import save_profile
from djinnsim.sim.specs import get_model

runner = CliRunner()

DECODE = """
name: tiny-decode
seed: 5
backends: [native_pytorch, full_djinn]
link: {gbps: 25, rtt_ms: 0.2}
workload: {kind: decode, prompt_tokens: 8, new_tokens: 4, runs: 3, warmup_runs: 1}
"""
H100 = Path(__file__).resolve().parents[1] / "docs" / "validation" / "h100-80gb" / "run4-full-calibration"
REPORT_FILES = ("validation.md", "validation.json", "records_sim.csv", "records_real.csv", "scenario.yaml")


def _cpu_profile(path: Path) -> Path:
    """A profile that passes validate's check for this CPU and the tiny model (its figures are made up)."""
    profile = make_profile()
    meta = profile.metadata.model_copy(update={
        "device": "cpu", "gpu_name": f"cpu: {host_cpu()}", "gpu_key": None, "model_id": get_model("tiny-llama").model_id,
        "dtype": "float32", "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers")})
    save_profile(profile.model_copy(update={"metadata": meta}), path)
    return path


def _figures(point: dict) -> dict:
    """A report point without its held-out / in-sample label (which the re-comparison re-decides)."""
    return {k: v for k, v in point.items() if k not in ("sample", "sample_reasons")}


def validate_tiny(folder: Path, *extra: str) -> tuple[Path, Path]:
    """A small real CPU validation of DECODE in `folder` with a hand-made profile: (report, profile)."""
    scenario = folder / "decode.yaml"
    scenario.write_text(DECODE)
    profile = _cpu_profile(folder / "cpu-tiny.json")
    out = folder / "real"
    result = runner.invoke(app, ["validate", str(scenario), "--device", "cpu", "--calibration", str(profile),
                                 "--out", str(out), "--runs", "3", "--warmup-runs", "1", "--repeats", "2", "--quiet",
                                 *extra])
    assert result.exit_code == 0, result.output
    return out, profile


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory) -> Path:
    return validate_tiny(tmp_path_factory.mktemp("offline"))[0]


def _offline(folder: Path, out: Path, *extra: str):
    return runner.invoke(app, ["validate", "--from-real", str(folder), "--out", str(out), "--quiet", *extra])


def test_offline_reproduces_the_comparison_byte_for_byte(real_folder, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = _offline(real_folder, out)
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert set(REPORT_FILES) <= set(names) and {"overlay_native_pytorch.png", "overlay_full_djinn.png"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for name in ("records_real.csv", "scenario.yaml"):
        assert (first / name).read_bytes() == (real_folder / name).read_bytes(), name
    # Same simulator, same profile: every figure and verdict of the live comparison comes back.
    live, offline = (json.loads((f / "validation.json").read_text()) for f in (real_folder, first))
    # The live figures are held out (profile frozen before the runs); offline, the same profile (same
    # hash) keeps them held out unless the model code is newer than the runs (here: uncommitted edits).
    assert live["meta"]["sample"] == {"label": "held-out", "reasons": []}
    assert live["meta"]["profile"]["frozen_sha256"] == offline["meta"]["profile"]["sha256"]
    why = offline["meta"]["sample"]["reasons"]
    assert all(reason.startswith("simulator:") for reason in why)
    label = offline["meta"]["sample"]["label"]
    assert label == ("in-sample" if why else "held-out")

    assert [_figures(p) for p in offline["points"]] == [_figures(p) for p in live["points"]]
    totals = ("PASS", "FAIL", "info", "N/A", "coverage")
    assert {k: offline["summary"][k] for k in totals} == {k: live["summary"][k] for k in totals}
    assert offline["summary"][label] == live["summary"]["held-out"]
    assert offline["oom"] == live["oom"] and offline["notes"] == live["notes"]
    assert (first / "records_sim.csv").read_bytes() == (real_folder / "records_sim.csv").read_bytes()
    md = (first / "validation.md").read_text()
    assert md.startswith("# Validation (offline re-comparison): tiny-decode")
    assert f"Offline re-comparison of `{real_folder}`" in md and live["meta"]["started_at"] in md
    table = md.split("| point | metric")[1].replace(f"| {label} |", "| held-out |")
    assert table == (real_folder / "validation.md").read_text().split("| point | metric")[1]


def test_offline_needs_a_profile_when_the_named_one_is_gone(real_folder, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(real_folder, moved)
    doc = json.loads((moved / "validation.json").read_text())
    profile = Path(doc["meta"]["profile"]["path"])
    doc["meta"]["profile"]["path"] = str(tmp_path / "gone" / "cpu-tiny.json")
    (moved / "validation.json").write_text(json.dumps(doc))
    result = _offline(moved, tmp_path / "r")
    assert result.exit_code == 1
    assert "no longer exists" in result.output and "--calibration" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = _offline(moved, tmp_path / "r", "--calibration", str(profile))
    assert result.exit_code == 0, result.output
    assert [_figures(p) for p in json.loads((tmp_path / "r" / "validation.json").read_text())["points"]] == \
        [_figures(p) for p in json.loads((real_folder / "validation.json").read_text())["points"]]


@pytest.mark.parametrize("args, message", [
    (["--repeats", "2"], "--repeats cannot change them"),
    (["--device", "cpu"], "--device cannot change them"),
    (["--out", "{real}"], "is the folder read with --from-real"),
])
def test_offline_refuses_what_it_cannot_do(real_folder, tmp_path, args, message):
    args = [a.replace("{real}", str(real_folder)) for a in args]
    result = runner.invoke(app, ["validate", "--from-real", str(real_folder), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_offline_refuses_a_folder_without_real_records(real_folder, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(real_folder, partial)
    (partial / "records_real.csv").unlink()
    result = _offline(partial, tmp_path / "r")
    assert result.exit_code == 1 and "no records_real.csv" in result.output


def _gzip_records(folder: Path) -> None:
    """Each records_*.csv of `folder` replaced by its `gzip -n` form, as committed under docs/validation/."""
    import gzip

    for plain in sorted(folder.glob("records_*.csv")):
        plain.with_name(plain.name + ".gz").write_bytes(gzip.compress(plain.read_bytes(), mtime=0))  # no name, no time
        plain.unlink()


def test_offline_reads_gzipped_records_as_the_plain_ones(real_folder, second_real_folder, tmp_path):
    """Committed reports keep their records gzipped: the same folders, their records gzipped in place,
    give byte for byte the reports (and the plain records_real.csv) they give plain, alone and with
    --also-real."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(real_folder, first)
    shutil.copytree(second_real_folder, second)
    runs = {"one": (), "merged": ("--also-real", str(second))}
    for form in ("plain", "gzipped"):
        if form == "gzipped":
            _gzip_records(first)
            _gzip_records(second)
        for name, extra in runs.items():
            result = _offline(first, tmp_path / form / name, *extra)
            assert result.exit_code == 0, result.output
    assert sorted(p.name for p in second.glob("records_*")) == ["records_real.csv.gz", "records_sim.csv.gz"]
    for name in runs:
        for file in ("validation.json", "validation.md", "records_real.csv", "records_sim.csv"):
            assert (tmp_path / "gzipped" / name / file).read_bytes() == (tmp_path / "plain" / name / file).read_bytes(), \
                (name, file)
    assert (tmp_path / "gzipped" / "one" / "records_real.csv").read_bytes() == (real_folder / "records_real.csv").read_bytes()

    (first / "records_real.csv").write_bytes((real_folder / "records_real.csv").read_bytes())
    result = _offline(first, tmp_path / "both")
    assert result.exit_code == 1 and "holds both records_real.csv and records_real.csv.gz" in result.output
    (first / "records_real.csv").unlink()
    (first / "records_real.csv.gz").write_bytes(b"not gzip")
    result = _offline(first, tmp_path / "bad")
    assert result.exit_code == 1 and "cannot read" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not (H100 / "exp21" / "validation.json").is_file(), reason="no H100 reference validation here")
@pytest.mark.parametrize("part", ["exp21", "agents"])
def test_h100_reference_real_side_comes_back(part, tmp_path):
    """NVML figures, first-token stamps and the OOM probe read back from the committed H100 runs."""
    result = _offline(H100 / part, tmp_path / part, "--calibration", str(H100 / "exp21" / "calibration" / "gpu-llama-2-7b.json"))
    assert result.exit_code == 0, result.output
    live, offline = (json.loads((f / "validation.json").read_text()) for f in (H100 / part, tmp_path / part))
    real_keys = ("real_mean", "real_min", "real_max", "real_std", "real_values")
    for a, b in zip(live["points"], offline["points"], strict=True):
        assert (a["label"], a["skipped"], a["stages_real"]) == (b["label"], b["skipped"], b["stages_real"])
        for name, metric in a["metrics"].items():
            assert {k: metric[k] for k in real_keys} == {k: b["metrics"][name][k] for k in real_keys}, (a["label"], name)
    drop = ("sim_oom_n", "verdict")
    assert [{k: v for k, v in r.items() if k not in drop} for r in live["oom"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in offline["oom"]]
    assert offline["notes"] == live["notes"]


def test_every_point_is_simulated_as_often_as_it_ran_for_real(real_folder):
    """Two real repeats: two simulated draws per point, each its own seed, repeat 0 being `djinnsim run`'s."""
    import csv

    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.sim.profile import load_profile
    from djinnsim.sim.records import RECORD_COLUMNS
    from djinnsim.sim.run import point_seed
    from djinnsim.sim.scenario import expand_points, load_scenario
    from djinnsim.sim.simulate import simulate_point

    doc = json.loads((real_folder / "validation.json").read_text())
    assert doc["meta"]["repeats"] == 2
    with (real_folder / "records_sim.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    scenario = load_scenario(real_folder / "scenario.yaml")
    profile = load_profile(Path(doc["meta"]["profile"]["path"]))
    differ = 0
    for point in expand_points(scenario):
        mine = [r for r in rows if int(r["point"]) == point.index]
        assert {r["repeat"] for r in mine} == {"0", "1"}
        draws = {rep: [r["latency_s"] for r in mine if r["repeat"] == rep] for rep in ("0", "1")}
        one = simulate_point(scenario, point, ProfileCostModel(profile, point.model), point_seed(scenario.seed, point))
        assert draws["0"] == [str(r.latency_s) for r in one.records]
        differ += draws["0"] != draws["1"]
        mean = next(p for p in doc["points"] if p["index"] == point.index)["metrics"]["latency_mean_s"]
        assert len(mean["sim_values"]) == 2 and mean["sim"] == pytest.approx(sum(mean["sim_values"]) / 2)
        assert mean["sim_min"] == min(mean["sim_values"]) and mean["sim_max"] == max(mean["sim_values"])
    assert differ  # the profile's step-time jitter: repeat 1 is another draw
    assert RECORD_COLUMNS[0] == "point" and rows and next(iter(rows[0])) == "repeat"


def test_regenerate_scripts_replace_their_committed_reports():
    """Each docs/validation/*/regenerate.sh re-makes reports that are already committed: every
    re-comparison it runs must pass --force, or validate's atomic --out refuses the folder and the
    script stops at its first command."""
    scripts = sorted((Path(__file__).resolve().parents[1] / "docs" / "validation").glob("*/regenerate.sh"))
    assert scripts
    for script in scripts:
        commands = " ".join(script.read_text().replace("\\\n", " ").splitlines())
        for command in commands.split("djinnsim validate --from-real")[1:]:
            command = command.split(" djinnsim ")[0].split(" done")[0]
            assert "--force" in command.split(), f"{script.parent.name}: {command.strip()[:80]}"


@pytest.fixture(scope="module")
def second_real_folder(real_folder) -> Path:
    """A second command's real repeats of real_folder's validation: same scenario, same frozen profile."""
    out = real_folder.parent / "real-2"
    result = runner.invoke(app, ["validate", str(real_folder.parent / "decode.yaml"), "--device", "cpu", "--calibration",
                                 str(real_folder.parent / "cpu-tiny.json"), "--out", str(out), "--runs", "3",
                                 "--warmup-runs", "1", "--repeats", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_repeats_split_over_commands_are_judged_as_one_validation(real_folder, second_real_folder, tmp_path):
    """--also-real: a second command's repeats of the same points follow the first's, renumbered into
    one records file, each command's first repeat simulated in fresh processes as it ran."""
    out = tmp_path / "merged"
    result = _offline(real_folder, out, "--also-real", str(second_real_folder))
    assert result.exit_code == 0, result.output
    first, second = (json.loads((f / "validation.json").read_text()) for f in (real_folder, second_real_folder))
    doc = json.loads((out / "validation.json").read_text())
    assert doc["meta"]["repeats"] == first["meta"]["repeats"] + second["meta"]["repeats"]
    assert [part["folder"] for part in doc["meta"]["parts"]] == [str(real_folder), str(second_real_folder)]
    for a, b, merged in zip(first["points"], second["points"], doc["points"]):
        metric = "latency_mean_s"
        assert merged["metrics"][metric]["real_values"] == a["metrics"][metric]["real_values"] + b["metrics"][metric]["real_values"]
    rows = (out / "records_real.csv").read_text().splitlines()
    counts = [len((f / "records_real.csv").read_text().splitlines()) - 1 for f in (real_folder, second_real_folder)]
    assert len(rows) - 1 == sum(counts)
    assert {row.split(",")[0] for row in rows[1:]} == {str(i) for i in range(doc["meta"]["repeats"])}
    parts = [row.get("part", 0) for row in doc["repeats"]]
    assert parts.count(1) == len(parts) // 2 > 0
    assert "each command's simulated repeats start fresh processes" in (out / "validation.md").read_text()


def test_a_split_commands_first_repeat_is_simulated_cold(real_folder, second_real_folder, tmp_path):
    """The simulator's processes of a split validation start fresh with each command: the second
    command's first repeat of a point pays the first use of its attention shapes again, as the
    first command's does (repeat 0 and repeat n0 simulated alike, later repeats warm)."""
    from djinnsim.sim.profile import load_profile
    from djinnsim.sim.scenario import load_scenario
    from djinnsim.validate.offline import merge_real, read_real_records, real_result
    from djinnsim.validate.pipeline import real_order, real_parts, simulate
    from djinnsim.validate.points import as_run_for_real

    doc = json.loads((real_folder / "validation.json").read_text())
    scenario_v = as_run_for_real(load_scenario(real_folder / "scenario.yaml"))
    real = real_result(doc, scenario_v, read_real_records(real_folder / "records_real.csv"))
    merge_real(real_folder, doc, scenario_v, real, (second_real_folder,))
    from djinnsim.sim.profile import ColdShapes, save_profile

    profile = load_profile(real_folder.parent / "cpu-tiny.json")
    profile = profile.model_copy(update={"cold_shapes": ColdShapes(decode_extra_s=0.01, prefill_extra_s=0.01)})
    profile_path = save_profile(profile, tmp_path / "cpu-tiny-cold.json")
    n0 = json.loads((real_folder / "validation.json").read_text())["meta"]["repeats"]
    split = simulate(scenario_v, profile_path, profile, 2 * n0, real_order(real), parts=real_parts(real))
    one = simulate(scenario_v, profile_path, profile, 2 * n0, real_order(real))
    cold = lambda runs: sum(r.compute_s for r in runs.records)  # noqa: E731
    parts = real_parts(real)
    index, r = next(run for run in real_order(real) if parts.get(run) == 1)  # the second command's first repeat
    assert r == n0 and cold(split[index][r]) > cold(one[index][r])  # its fresh processes pay the new shapes again
    later = [run for run in real_order(real) if parts.get(run) == 1][-1]
    assert cold(split[later[0]][later[1]]) == cold(one[later[0]][later[1]])  # and are warm by its last repeat


def test_also_real_refuses_what_is_not_more_repeats(real_folder, second_real_folder, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(second_real_folder, other)
    doc = json.loads((other / "validation.json").read_text())
    doc["meta"]["seed"] = doc["meta"]["seed"] + 1
    doc["meta"]["profile"]["frozen_sha256"] = "0" * 64
    (other / "validation.json").write_text(json.dumps(doc))
    fewer = tmp_path / "fewer"
    shutil.copytree(second_real_folder, fewer)
    doc = json.loads((fewer / "validation.json").read_text())
    doc["points"] = doc["points"][:1]
    (fewer / "validation.json").write_text(json.dumps(doc))
    no_machine = tmp_path / "no-machine"
    shutil.copytree(second_real_folder, no_machine)
    doc = json.loads((no_machine / "validation.json").read_text())
    del doc["meta"]["machine"]
    (no_machine / "validation.json").write_text(json.dumps(doc))
    resim = tmp_path / "resim"
    assert _offline(second_real_folder, resim).exit_code == 0
    merged = tmp_path / "merged"
    assert _offline(real_folder, merged, "--also-real", str(second_real_folder)).exit_code == 0
    base = ["--from-real", str(real_folder)]
    for args, message in (([*base, "--also-real", str(other)], "seed, the profile frozen before the runs differ"),
                          ([*base, "--also-real", str(fewer)], "the points run differ"),
                          ([*base, "--also-real", str(real_folder)], "the same folder as"),
                          ([*base, "--also-real", str(second_real_folder), "--also-real", str(second_real_folder)], "the same folder as"),
                          ([*base, "--also-real", str(resim)], "a re-comparison of"),
                          ([*base, "--also-real", str(no_machine)], "has no meta.machine"),
                          (["--from-real", str(merged)], "merges the repeats of several commands"),
                          (["--also-real", str(real_folder)], "give --from-real too"),
                          ([*base, "--also-real", str(tmp_path / "nothing")], "is not a folder")):
        result = runner.invoke(app, ["validate", *args, "--out", str(tmp_path / "o"), "--quiet", "--force"])
        text = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code == 1 and message in text and "Traceback" not in text, (args, text)


def test_condition_on_level_is_an_in_sample_rescaling(real_folder, tmp_path):
    """--condition-on-level: the profile's passes scaled by real over simulated compute per token;
    every figure in-sample (the factor comes from the judged runs), the factor written down."""
    out = tmp_path / "conditioned"
    result = _offline(real_folder, out, "--condition-on-level")
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "validation.json").read_text())
    assert all(point["sample"] == "in-sample" for point in doc["points"])
    assert all(any("--condition-on-level" in why for why in point["sample_reasons"]) for point in doc["points"])
    (scaled,) = (out / "calibration").glob("*-level-conditioned.json")
    note = json.loads(scaled.read_text())["metadata"]["notes"][-1]
    assert "conditioned on the real runs' level" in note and "IN-SAMPLE" in note
    factor = float(note.split(" x ")[1].split()[0])
    real = [r["real_compute_per_token_s"] for r in json.loads((real_folder / "validation.json").read_text())["repeats"]]
    sim_then = [r["sim_compute_per_token_s"] for r in json.loads((real_folder / "validation.json").read_text())["repeats"]]
    assert factor == pytest.approx(sum(real) / sum(sim_then), rel=1e-3)
    sim_now = [r["sim_compute_per_token_s"] for r in doc["repeats"]]
    assert sum(sim_now) / len(sim_now) == pytest.approx(sum(real) / len(real), rel=0.05)
    result = runner.invoke(app, ["validate", "--condition-on-level", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1 and "give --from-real DIR" in result.output


def test_a_borrowed_load_source_is_noted_once_and_only_for_the_profile_judged_on(real_folder, tmp_path):
    """A report judged on a profile carrying another calibration's load stages names them once; a
    re-judge of that report on the same profile still once, on a profile without them not at all."""
    from djinnsim.sim.profile import LoadsSource, load_profile

    plain = Path(json.loads((real_folder / "validation.json").read_text())["meta"]["profile"]["path"])
    profile = load_profile(plain)
    source = LoadsSource(path="docs/calibration/elsewhere.json", samples_sha256="0" * 64, date="2026-12-02",
                         sections=["weight_load"])
    borrowed = tmp_path / "borrowed.json"
    save_profile(profile.model_copy(update={"metadata": profile.metadata.model_copy(update={"loads_from": source})}), borrowed)

    def noted(folder: Path) -> list[str]:
        return [n for n in json.loads((folder / "validation.json").read_text())["notes"] if "another calibration" in n]

    once, twice, back = tmp_path / "once", tmp_path / "twice", tmp_path / "back"
    assert _offline(real_folder, once, "--calibration", str(borrowed)).exit_code == 0
    assert noted(once) == [f"the profile {borrowed} carries its whole-model loads from another calibration, "
                           "docs/calibration/elsewhere.json (2026-12-02): its own stopped before them"]
    assert _offline(once, twice, "--calibration", str(borrowed)).exit_code == 0
    assert noted(twice) == noted(once)
    assert _offline(once, back, "--calibration", str(plain)).exit_code == 0
    assert noted(back) == []


def test_a_profile_made_in_the_staging_folder_is_recorded_where_it_ends_up(real_folder, tmp_path):
    """--condition-on-level writes its profile into the report's folder while that is still being
    made: the report names the final path, never the temporary one."""
    out = tmp_path / "conditioned"
    assert _offline(real_folder, out, "--condition-on-level").exit_code == 0
    text = (out / "validation.json").read_text()
    assert ".partial" not in text
    (scaled,) = (out / "calibration").glob("*-level-conditioned.json")
    assert json.loads(text)["meta"]["profile"]["path"] == str(scaled)
