"""`djinnsim calibrate --device cpu` end to end with the tiny model, bad input, interruption and OOM."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from djinnsim.cli import app
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.profile import load_profile
from djinnsim.sim.specs import get_model
from typer.testing import CliRunner

runner = CliRunner()
TINY = get_model("tiny-llama")


@pytest.fixture(scope="module")
def cpu_calibration(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "tiny.json"
    result = runner.invoke(app, ["calibrate", "--device", "cpu", "--model", "tiny-llama", "--quick", "--out", str(out)])
    return result, out, None


def test_cpu_quick_calibration_runs(cpu_calibration):
    # Its duration is not asserted (a timed assertion fails on a loaded machine and proves nothing):
    # about 30 s alone on 2 cores, loads_mp and timeslice_mp worker processes included.
    result, out, _ = cpu_calibration
    assert result.exit_code == 0, result.output
    assert "calibration summary" in result.output


def test_profile_is_accepted_by_the_simulator(cpu_calibration):
    _, out, _ = cpu_calibration
    profile = load_profile(out)
    meta = profile.metadata
    assert meta.source == "measured" and meta.device == "cpu" and meta.quick
    assert meta.model_id == TINY.model_id and meta.dtype == "float32" and meta.weights == "random"
    assert meta.torch and meta.transformers and meta.python and meta.date and meta.command.startswith("djinnsim calibrate")
    cost = ProfileCostModel(profile, TINY)
    assert cost.prefill_s(64, 1) > 0
    assert cost.decode_step_s(1, 100) > 0
    assert cost.out_of_range == set()
    assert cost.kv_bytes_per_token == TINY.kv_bytes_per_token  # measured from the cache, GQA included
    assert cost.weight_bytes == pytest.approx(TINY.parameters * 4, rel=1e-3)  # + rotary buffers
    for tier in ("disk", "pageable", "pinned"):
        assert cost.weight_load(tier).gbps > 0
    assert cost.serialize_s(2**20) > 0 and cost.copy_s(2**20) > 0
    assert len(cost.jitter_samples("decode")) > 10
    e = profile.end_to_end
    assert e["exp21.total_s.p50"] > 0 and e["exp21.predicted.total_s"] > 0
    for backend in ("semantic_blind", "partially_aware", "full_djinn"):
        assert e[f"composition.{backend}.L128.measured_s"] > 0
        assert e[f"composition.{backend}.L128.predicted_s"] > 0


def test_samples_csv_holds_every_stage(cpu_calibration):
    _, out, _ = cpu_calibration
    profile = load_profile(out)
    with (out.parent / profile.samples_file).open() as fh:
        stages = {row["stage"] for row in csv.DictReader(fh)}
    for stage in ("prefill", "decode", "exp21_step", "copy_h2d_pageable", "serialize", "deserialize", "tcp_connect",
                  "tcp_rtt", "tcp_send", "composition", "weights_load_disk", "weights_load_pageable", "cached_prefill",
                  "loads_mp_disk", "loads_mp_pageable", "timeslice_mp", "kv_swap_d2h_pageable", "kv_swap_h2d_pageable"):
        assert stage in stages, stage


def test_composition_also_runs_partially_aware_paced_below_the_loopback_cap(cpu_calibration):
    """Each paced rate at each paced context: its samples and medians kept apart from the unpaced
    composition rows, which alone make the loopback path."""
    from djinnsim.calibrate.plan import plan_for

    _, out, _ = cpu_calibration
    profile = load_profile(out)
    plan = plan_for("cpu", quick=True)
    with (out.parent / profile.samples_file).open() as fh:
        paced = {row["point"] for row in csv.DictReader(fh) if row["stage"] == "composition_paced"}
    want = {f"partially_aware_L{c}_{g:g}gbps" for c in plan.composition_paced_contexts for g in plan.composition_paced_gbps}
    assert want and paced == want
    for c in plan.composition_paced_contexts:
        for g in plan.composition_paced_gbps:
            key = f"composition_paced.partially_aware.L{c}.{g:g}gbps"
            assert profile.end_to_end[f"{key}.measured_s"] > profile.end_to_end[f"{key}.server_compute_s"] > 0
    assert not any(k.startswith("composition.") and "gbps" in k for k in profile.end_to_end)
    # network.paced_path is what those kept rows give (a refit recomputes it from them the same way)
    from djinnsim.calibrate.composition import paced_path, paced_path_bytes, paced_rows_from_end_to_end

    rows = paced_rows_from_end_to_end(profile.end_to_end, TINY)
    assert len(rows) == len(want)
    assert profile.network.paced_path is not None
    assert profile.network.paced_path == paced_path(rows, ProfileCostModel(profile, TINY))
    assert profile.network.paced_path_bytes == paced_path_bytes(rows)
    sizes = sorted({(r["up_bytes"] + r["down_bytes"]) / 2 for r in rows})
    if len(sizes) == 1:  # one paced context: its messages' mean size
        assert profile.network.paced_path_bytes == round(sizes[0])
    else:  # between the contexts' messages
        assert sizes[0] < profile.network.paced_path_bytes < sizes[-1]


def test_profile_carries_the_process_stages_and_the_cached_prefill_fit(cpu_calibration):
    result, out, _ = cpu_calibration
    profile = load_profile(out)
    assert profile.schema_version == 2
    assert set(profile.loads_mp) == {"disk", "pageable"}
    assert all(sorted(t.aggregate_gbps) == [1, 2] for t in profile.loads_mp.values())
    assert [p.processes for p in profile.timeslice_mp.points] == [1, 2]
    cost = ProfileCostModel(profile, TINY)
    assert cost.prefill_s(16, 1, 122) > 0 and cost.out_of_range == set()  # REFLECT's shape, inside the grid
    assert cost.gpu_busy_fraction() == profile.timeslice_mp.gpu_busy_fraction
    # a whole session's KV swapped as a swap does it: one fit per direction and kind (cpu: memcpy for both)
    assert profile.kv_swaps.tensors == cost.kv_tensors == 2 * TINY.num_layers
    # the pageable swap-out also as validate.kv_costs's loop runs it (calibrate/kv_cycle.py)
    assert set(profile.kv_swaps.fits) == {"d2h_pinned", "h2d_pinned", "d2h_pageable", "h2d_pageable", "d2h_pageable_cycle"}
    assert cost.kv_swap_bandwidth("d2h", False) == (profile.kv_swaps.fits["d2h_pageable"], 1)
    for stage in ("cached_prefill", "loads_mp", "timeslice_mp", "kv_swaps"):
        assert f"-- stage {stage} took" in result.output, stage
        assert profile.end_to_end[f"stage.{stage}_s"] > 0
    assert "decoding by k processes" in result.output and "loads by k processes, disk" in result.output
    from djinnsim.calibrate.report import summary_rows

    # item 6: the dedicated stage's measurement, not the decode grid's first pass, and the summary says so
    assert "(stage cold_shapes)" in profile.cold_shapes.source
    assert profile.cold_shapes.source in dict(summary_rows(profile, {}))["new attention shape"]


def test_refit_reproduces_the_profile_from_its_samples(cpu_calibration, tmp_path):
    _, out, _ = cpu_calibration
    target = tmp_path / "refit" / "tiny.json"
    result = runner.invoke(app, ["calibrate", "--refit", str(out), "--out", str(target), "--quiet"])
    assert result.exit_code == 0, result.output
    before, after = load_profile(out), load_profile(target)
    assert after.samples_file == "tiny.csv" and (target.parent / "tiny.csv").is_file()
    # The CSV keeps 9 significant digits: the same fits, up to that rounding.
    assert _approx(after.prefill.model_dump()) == before.prefill.model_dump()
    assert _approx(after.decode_step.model_dump()) == before.decode_step.model_dump()
    assert _approx(after.cached_prefill.model_dump()) == before.cached_prefill.model_dump()
    assert _approx(after.memory.model_dump()) == before.memory.model_dump()  # workspace fits included
    assert _approx(after.kv_swaps.model_dump()) == before.kv_swaps.model_dump()
    assert _approx(after.network.model_dump().get("paced_path")) == before.network.model_dump().get("paced_path")
    assert before.network.paced_path_bytes is not None and after.network.paced_path_bytes == before.network.paced_path_bytes
    # recomputed from the rows the profile keeps, not carried: a profile without it gets it back
    stripped = tmp_path / "stripped" / "tiny.json"
    stripped.parent.mkdir()
    data = json.loads(out.read_text())
    del data["network"]["paced_path"]
    stripped.write_text(json.dumps(data))
    shutil.copyfile(out.parent / before.samples_file, stripped.parent / before.samples_file)
    assert runner.invoke(app, ["calibrate", "--refit", str(stripped), "--quiet"]).exit_code == 0
    assert before.network.paced_path is not None
    assert _approx(load_profile(stripped).network.model_dump()["paced_path"]) == before.network.model_dump()["paced_path"]
    assert after.cold_shapes.source == before.cold_shapes.source and "stage cold_shapes" in after.cold_shapes.source
    assert any("fits recomputed" in note for note in after.metadata.notes)


def test_refit_leaving_a_stage_out(cpu_calibration, tmp_path):
    _, out, _ = cpu_calibration
    target = tmp_path / "held" / "tiny-heldout.json"
    result = runner.invoke(app, ["calibrate", "--refit", str(out), "--out", str(target), "--leave-out", "exp21_step", "--quiet"])
    assert result.exit_code == 0, result.output
    held = load_profile(target)
    assert held.spread.left_out == ["exp21_step"]
    assert any("--leave-out exp21_step" in note for note in held.metadata.notes)
    for args, message in ((["--refit", str(out), "--out", str(target), "--leave-out", "no_such_stage"], "no samples of stage no_such_stage"),
                          (["--device", "cpu", "--leave-out", "exp21_step", "--out", str(target)], "--leave-out applies to --refit only")):
        result = runner.invoke(app, ["calibrate", *args, "--quiet"])
        text = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code == 1 and message in text and "Traceback" not in text


def _other_calibration(out: Path, folder: Path, scale: float = 1.0, **meta) -> Path:
    """A copy of the calibration at `out` in `folder` whose every sample ran `scale` times longer (as
    another spell of the machine would), with its own samples sha256; `meta`: metadata changed."""
    import json

    from djinnsim.sim.provenance import file_sha256

    folder.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(out.with_suffix(".csv").open(newline="")))
    with (folder / "tiny.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "value": f"{float(row['value']) * scale:.9g}"} if row["unit"] == "s" else row)
    data = json.loads(out.read_text())
    data["metadata"].update(meta)
    data["samples_sha256"] = file_sha256(folder / "tiny.csv")
    data["end_to_end"]["exp21.total_s.p50"] *= scale
    (folder / "tiny.json").write_text(json.dumps(data))
    return folder / "tiny.json"


def test_refit_pools_batch1_spells_of_other_calibrations(cpu_calibration, tmp_path):
    """--level-from: another calibration's batch-1 spells join decode_level, over this profile's fit
    (spells 1.5x slower give factors 1.5x larger), named with their samples' sha256; a later refit,
    the held-out one included, applies them again; the same spells twice and another model's
    calibration are refused by name."""
    from djinnsim.validate.heldout import held_out_profile

    _, out, _ = cpu_calibration
    alone, pooled = tmp_path / "alone.json", tmp_path / "pooled.json"
    slower = _other_calibration(out, tmp_path / "slower", 1.5)
    assert runner.invoke(app, ["calibrate", "--refit", str(out), "--out", str(alone), "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["calibrate", "--refit", str(out), "--out", str(pooled), "--level-from", str(slower), "--quiet"])
    assert result.exit_code == 0, result.output
    own, both = load_profile(alone).spread, load_profile(pooled).spread
    assert own.level_sources == [] and len(own.decode_level) >= 2
    assert sorted(both.decode_level) == pytest.approx(sorted(own.decode_level + [f * 1.5 for f in own.decode_level]), rel=1e-6)
    (source,) = both.level_sources
    assert source.path == slower.as_posix() and source.spells == len(own.decode_level) and len(source.samples_sha256) == 64
    again = held_out_profile(pooled, tmp_path / "held")  # Exp 2.1 held out: the pooling stays
    held = load_profile(again)
    # the profile's own Exp 2.1 spells are left out; the source's, another calibration's runs, stay
    (kept,) = held.spread.level_sources
    assert (kept.path, kept.samples_sha256) == (source.path, source.samples_sha256) and held.spread.left_out == ["exp21_step"]
    assert kept.spells == source.spells and 0 < len(held.spread.decode_level) - kept.spells < source.spells
    other_model = _other_calibration(out, tmp_path / "other", 1.0, dtype="bfloat16" if load_profile(out).metadata.dtype != "bfloat16" else "float16")
    for args, message in ((["--refit", str(out), "--out", str(pooled), "--level-from", str(other_model)], "not of"),
                          (["--refit", str(out), "--out", str(pooled), "--level-from", str(out)], "the same spells twice"),
                          (["--refit", str(out), "--out", str(pooled), "--level-from", str(slower), "--level-from", str(slower)],
                           "the same spells twice"),
                          (["--device", "cpu", "--level-from", str(out), "--out", str(pooled)], "--level-from applies to --refit only")):
        result = runner.invoke(app, ["calibrate", *args, "--quiet"])
        text = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code == 1 and message in text and "Traceback" not in text, text


def test_a_profile_beside_another_calibrations_samples_is_refused(cpu_calibration, tmp_path):
    """A profile copied over a folder that holds an older calibration's samples file of the same
    name: a refit, a held-out Exp 2.1 refit and bands would mix two calibrations; refused by name."""
    import shutil

    from djinnsim.sim.provenance import file_sha256

    _, out, _ = cpu_calibration
    profile = load_profile(out)
    assert profile.samples_sha256 == file_sha256(out.with_suffix(".csv"))
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copyfile(out, folder / out.name)
    rows = (out.with_suffix(".csv")).read_text().splitlines()
    (folder / "tiny.csv").write_text("\n".join(rows[:-1]) + "\n")  # one sample short: another file
    result = runner.invoke(app, ["calibrate", "--refit", str(folder / out.name), "--out", str(folder / "r.json"), "--quiet"])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1 and "not the samples file of tiny.json" in text and "Traceback" not in text
    assert not (folder / "r.json").exists()


def test_a_profile_older_than_the_samples_hash_is_checked_by_a_measured_figure(cpu_calibration, tmp_path):
    """A profile that records no samples sha256 (older ones, the bundled among them) beside another
    calibration's samples file of the same name: refused by Exp 2.1's median total, which no fitting
    code changes; beside its own file it refits."""
    import json

    _, out, _ = cpu_calibration
    other = _other_calibration(out, tmp_path / "other", 1.5)
    data = json.loads(out.read_text())
    data["samples_sha256"] = None
    mixed = tmp_path / "other" / "old.json"
    mixed.write_text(json.dumps({**data, "samples_file": "tiny.csv"}))
    result = runner.invoke(app, ["calibrate", "--refit", str(mixed), "--out", str(tmp_path / "r.json"), "--quiet"])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1 and "Exp 2.1 median total" in text and "Traceback" not in text, text
    own = tmp_path / "own" / "tiny.json"
    own.parent.mkdir()
    own.write_text(json.dumps(data))
    (own.parent / "tiny.csv").write_bytes(out.with_suffix(".csv").read_bytes())
    result = runner.invoke(app, ["calibrate", "--refit", str(own), "--out", str(tmp_path / "r.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert other.is_file()


def _approx(value):
    if isinstance(value, dict):
        return {k: _approx(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_approx(v) for v in value)
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-5, abs=1e-12)
    return value


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "tpu"], "--device must be one of"),
        (["--device", "cpu", "--model", "no-such-model"], "unknown model"),
        (["--device", "cpu", "--model", "tiny-llama", "--weights", "/no/such/folder"], "--weights"),
        (["--device", "cpu", "--model", "tiny-llama", "--dtype", "int3"], "unknown dtype"),
        (["--device", "cpu", "--model", "llama-2-7b"], "--device cpu is for small models"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args, message, tmp_path):
    result = runner.invoke(app, ["calibrate", *args, "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 1
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "error: " in text and message in text
    assert "Traceback" not in text


def test_cuda_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = runner.invoke(app, ["calibrate", "--device", "cuda", "--model", "tiny-llama", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 1
    assert "no CUDA GPU is visible" in result.output + (result.stderr if result.stderr_bytes is not None else "")


def _without_loads(out: Path, folder: Path, keep_weights: bool = False) -> Path:
    """A copy of the calibration at `out` as one stopped before its load stages: no weight_load
    (unless `keep_weights`), loads_mp nor timeslice_mp, none of their samples."""
    import json

    from djinnsim.calibrate.refit import LOAD_STAGES
    from djinnsim.sim.provenance import file_sha256

    folder.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(out.with_suffix(".csv").open(newline="")))
    with (folder / "tiny.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        cut = LOAD_STAGES[1:] if keep_weights else LOAD_STAGES
        writer.writerows(row for row in rows if not row["stage"].startswith(cut))
    data = json.loads(out.read_text())
    data.update(loads_mp={}, timeslice_mp=None, samples_sha256=file_sha256(folder / "tiny.csv"))
    if not keep_weights:
        data["weight_load"] = {}
    (folder / "tiny.json").write_text(json.dumps(data))
    return folder / "tiny.json"


def test_a_calibration_stopped_before_its_loads_takes_them_from_another(cpu_calibration, tmp_path):
    """--loads-from: a profile without load stages (an interrupted calibration) asked a whole-model
    load says so in one line; refitted with --loads-from a full calibration it carries that
    calibration's loads, k-process loads and k-process decoding, the source named with its samples'
    sha256, applied again by a later refit; a full profile, a source without loads and a source
    whose samples changed are refused by name."""
    from djinnsim.errors import DjinnsimError

    _, out, _ = cpu_calibration
    full = load_profile(out)
    cut = _without_loads(out, tmp_path / "cut")
    with pytest.raises(DjinnsimError, match="no whole-model load from disk.*--loads-from"):
        ProfileCostModel(load_profile(cut), TINY).weight_load("disk")
    result = runner.invoke(app, ["calibrate", "--refit", str(cut), "--loads-from", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    taken = load_profile(cut)
    assert taken.metadata.loads_from.path == out.as_posix() and taken.metadata.loads_from.date == full.metadata.date
    assert taken.metadata.loads_from.samples_sha256 == full.samples_sha256
    assert taken.weight_load == full.weight_load and taken.loads_mp == full.loads_mp
    assert taken.timeslice_mp.gpu_step_s == pytest.approx(full.timeslice_mp.gpu_step_s, rel=1e-6)  # refitted from the source's samples
    assert taken.spread.weight_load and taken.spread.weight_load == pytest.approx(full.spread.weight_load, rel=1e-6)
    assert taken.metadata.loads_from.sections == ["weight_load", "loads_mp", "timeslice_mp"]
    assert "weight_load, loads_mp, timeslice_mp from" in taken.metadata.notes[-1]
    ProfileCostModel(taken, TINY).weight_load("disk")
    from djinnsim.validate.pipeline import profile_notes  # a validation judged on it names the source too

    assert profile_notes(cut, taken) == [f"the profile {cut} carries its whole-model loads, k-process loads, k-process "
                                         f"decoding from another calibration, {out.as_posix()} ({full.metadata.date}): "
                                         "its own stopped before them"]
    assert profile_notes(out, full) == [] and profile_notes(None, None) == []
    median = tmp_path / "median.json"
    assert runner.invoke(app, ["calibrate", "--refit", str(cut), "--level-point", "median", "--out", str(median),
                               "--quiet"]).exit_code == 0
    assert load_profile(median).metadata.loads_from == taken.metadata.loads_from and load_profile(median).weight_load
    partial = _without_loads(out, tmp_path / "partial", keep_weights=True)
    assert runner.invoke(app, ["calibrate", "--refit", str(partial), "--loads-from", str(out), "--quiet"]).exit_code == 0
    some = load_profile(partial)
    assert some.metadata.loads_from.sections == ["loads_mp", "timeslice_mp"] and some.loads_mp == full.loads_mp
    no_loads = _without_loads(out, tmp_path / "none")
    for args, message in ((["--refit", str(out), "--out", str(tmp_path / "x.json"), "--loads-from", str(cut)],
                           "measured every load stage itself"),
                          (["--refit", str(no_loads), "--out", str(tmp_path / "y.json"), "--loads-from", str(_without_loads(out, tmp_path / "none2"))],
                           "measured no weight_load, loads_mp, timeslice_mp either"),
                          (["--refit", str(no_loads), "--out", str(tmp_path / "w.json"), "--loads-from", str(tmp_path / "nope.json")],
                           "nope.json: no such profile"),
                          (["--device", "cpu", "--loads-from", str(out), "--out", str(tmp_path / "z.json")],
                           "--loads-from applies to --refit only")):
        result = runner.invoke(app, ["calibrate", *args, "--quiet"])
        text = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code == 1 and message in text and "Traceback" not in text, text
    moved = _other_calibration(out, tmp_path / "moved", 1.0)
    assert runner.invoke(app, ["calibrate", "--refit", str(no_loads), "--loads-from", str(moved), "--quiet"]).exit_code == 0
    _other_calibration(out, tmp_path / "moved", 1.1)  # the source redone in place, its sha256 with it
    result = runner.invoke(app, ["calibrate", "--refit", str(no_loads), "--quiet"])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1 and "changed since the profile took its loads" in text and "Traceback" not in text, text


def test_interrupted_calibration_keeps_what_it_measured(tmp_path, monkeypatch):
    """Ctrl-C during Exp 2.1: the grids are measured, so a profile is still written, and marked."""
    from djinnsim.calibrate import bench_compute
    from djinnsim.calibrate import runner as calibration

    def interrupted(session):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_compute, "run_exp21", interrupted)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        calibration.run_calibration(device="cpu", model="tiny-llama", quick=True, out=out, quiet=True)
    profile = load_profile(out)
    assert any(note.startswith("interrupted") for note in profile.metadata.notes)
    assert profile.jitter_decode == [1.0]
    assert (tmp_path / "partial.csv").is_file()
    ProfileCostModel(profile, TINY).decode_step_s(1, 100)


def test_out_of_memory_at_one_grid_point_is_recorded_and_skipped(monkeypatch):
    import torch
    from djinnsim.calibrate import bench_compute
    from djinnsim.calibrate.modeling import build_model
    from djinnsim.calibrate.plan import plan_for
    from djinnsim.calibrate.samples import SampleLog
    from djinnsim.calibrate.session import Session

    real_forward = bench_compute.forward

    def forward(model, ids, cache=None, **kwargs):
        if ids.shape[0] * ids.shape[1] >= 1024:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real_forward(model, ids, cache, **kwargs)

    monkeypatch.setattr(bench_compute, "forward", forward)
    s = Session(spec=TINY, device="cpu", dtype=torch.float32, plan=plan_for("cpu", True), log=SampleLog(None), say=lambda m: None)
    s.model = build_model(TINY, "cpu", torch.float32)
    result = bench_compute.run_prefill_grid(s)
    measured = {(p.inputs["batch"], p.inputs["prompt_tokens"]) for p in result["points"]}
    assert (1, 256) in measured and (1, 1024) not in measured and (4, 256) not in measured
    oom = [r for r in s.log.rows if r["unit"] == "oom"]
    assert {(r["batch"], r["prompt_tokens"]) for r in oom} == {(1, 1024), (4, 256)}


def test_module_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, djinnsim.calibrate.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_default_output_is_named_after_gpu_and_model():
    from djinnsim.calibrate.runner import default_out

    assert default_out("h100-80gb", get_model("meta-llama/Llama-2-7b-hf")) == Path("results/calibration/h100-80gb-llama-2-7b.json")
