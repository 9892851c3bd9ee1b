"""validate/transfer_check.py: the transferred-vs-measured tables, on the CPU in seconds.

The offline re-comparisons themselves are `djinnsim validate --from-real` (tests/test_validate_offline.py);
here they are replaced by a stand-in that writes a report, so what is checked is this script's own
logic: which profile judges which run, the rows, the per-metric counts and the document splice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from djinnsim.sim.profile import LinearFit, load_profile, save_profile
from djinnsim.validate import transfer_check as tc

H100 = tc.DEFAULT_SOURCE
H200 = tc.DEFAULT_MEASURED


def _by_query(rows):
    return {(r.group, r.what): r for r in rows}


def test_a_profile_moved_onto_its_own_gpu_answers_as_before():
    """Every ratio is 1: the transferred column must equal the measured one, row by row, except the
    capacity, which a transfer takes from the target's datasheet (the measured one is what CUDA saw)."""
    from djinnsim.sim.specs import get_gpu

    measured = load_profile(H200)
    rows = tc.primitives(measured, tc.transferred_profile(measured, "h200"))
    assert len(rows) > 40
    for row in rows:
        if row.group == "memory":
            assert row.transferred == get_gpu("h200").memory_bytes / 2**30 != row.measured
        else:
            assert row.transferred == pytest.approx(row.measured, rel=1e-12, abs=1e-12), row


def test_h100_moved_to_h200_scales_memory_terms_and_keeps_host_terms():
    h100, h200 = load_profile(H100), load_profile(H200)
    moved = tc.transferred_profile(h100, "h200")
    assert moved.metadata.source == "transferred" and moved.metadata.gpu_key == "h200"
    assert moved.metadata.gpu_name == "NVIDIA H200" and moved.metadata.torch == h100.metadata.torch
    rows = _by_query(tc.primitives(h200, moved))
    # PCIe is 50 GB/s on both datasheets: the copy rate comes through unchanged.
    assert rows[("copies", "h2d pinned rate")].transferred == pytest.approx(h100.h2d_pinned.gbps)
    # The H100 profile has no cached-context prefill stage: its answer is an extrapolation, flagged.
    reflect = next(r for (g, w), r in rows.items() if g == "prefill" and "cached context" in w)
    assert tc.TRANSFERRED in reflect.outside and tc.MEASURED not in reflect.outside
    # Decode's memory-bound term scales by HBM bandwidth (3350 -> 4800 GB/s): a longer context costs
    # the transferred model less extra time than the H100's own fit.
    step = {c: rows[("decode step", f"batch 32, context {c}")].transferred for c in (128, 2048)}
    assert isinstance(h100.decode_step, LinearFit) and h100.decode_step.features[2] == "sum_context"
    memory_s_per_token = h100.decode_step.coef[2] * 3350 / 4800
    assert step[2048] - step[128] == pytest.approx(memory_s_per_token * 32 * (2048 - 128) * 1e3, rel=1e-6)


def _report(values: dict[str, tuple[float, float, str]], load: tuple[float, float] | None = None) -> dict:
    """A validation.json with one point: metric -> (real mean, sim, verdict)."""
    metrics = {m: {"real_mean": real, "sim": sim, "rel_err": None if sim is None else (sim - real) / real, "verdict": verdict}
               for m, (real, sim, verdict) in values.items()}
    point = {"label": "djinn__llama-2-7b-hf__h200__25gbps__n1", "metrics": metrics,
             "stages_real": {"load_s": load[0]} if load else {}, "stages_sim": {"load_s": load[1]} if load else {}}
    return {"points": [point], "summary": {"PASS": 1, "FAIL": 1}, "meta": {"sample": {"label": "in-sample"}}}


def test_rows_and_per_metric_counts_say_which_cost_model_is_closer():
    reports = {tc.MEASURED: _report({"latency_mean_s": (1.0, 1.02, "PASS"), "latency_p99_s": (2.0, 1.5, "FAIL"),
                                     "ttft_s": (0.05, None, "N/A")}, (3.0, 3.3)),
               tc.TRANSFERRED: _report({"latency_mean_s": (1.0, 0.90, "FAIL"), "latency_p99_s": (2.0, 1.9, "PASS"),
                                        "ttft_s": (0.05, None, "N/A")}, (3.0, 2.4))}
    rows = tc.run_rows("agents-124", reports)
    assert [(r.metric, r.closer()) for r in rows] == [("latency_mean_s", tc.MEASURED), ("latency_p99_s", tc.TRANSFERRED),
                                                       ("load_s", tc.MEASURED)]
    summary = {e["metric"]: e for e in tc.per_metric_summary(rows)}
    assert summary["latency_mean_s"]["better"] == tc.MEASURED and summary["latency_mean_s"]["measured_pass"] == 1
    assert summary["latency_p99_s"]["better"] == tc.TRANSFERRED
    assert summary["latency_p99_s"]["transferred_mean_abs_err"] == pytest.approx(0.05)
    assert summary["load_s"]["measured_mean_abs_err"] == pytest.approx(0.1)
    text = "\n".join(tc.runs_table(rows) + tc.summary_table(list(summary.values())))
    assert "djinn 25gbps__n1" in text and "**transferred**" in text


def test_each_run_is_judged_by_its_own_measured_profile(tmp_path, monkeypatch):
    """A run with a held-out profile in calibration/ is judged with it; the others with --measured."""
    runs = tmp_path / "runs"
    for name in ("exp21-25", "agents-124"):
        (runs / name).mkdir(parents=True)
    (runs / "exp21-25" / "calibration").mkdir()
    held_out = runs / "exp21-25" / "calibration" / "h200-llama-2-7b-heldout.json"
    held_out.write_text("{}")
    seen = []

    def fake_offline(req):
        seen.append((req.from_real.name, Path(req.calibration).name, req.bands))
        req.out.mkdir(parents=True)
        (req.out / "validation.json").write_text(json.dumps(_report({"latency_mean_s": (1.0, 1.0, "PASS")})))
        return req.out

    monkeypatch.setattr("djinnsim.validate.offline.run_offline", fake_offline)
    rows, info = tc.resimulate([runs / "exp21-25", runs / "agents-124"], H200, tmp_path / "moved.json", tmp_path / "work", 3)
    assert seen == [("exp21-25", held_out.name, 3), ("exp21-25", "moved.json", 3),
                    ("agents-124", H200.name, 3), ("agents-124", "moved.json", 3)]
    assert len(rows) == 2 and info["agents-124"][tc.MEASURED]["profile"] == H200
    assert info["agents-124"][tc.MEASURED]["sample"] == "in-sample"


def test_the_label_names_the_kinds_of_its_reasons():
    sample = {"label": "in-sample", "reasons": ["simulator: newer", "profile: not the frozen one"]}
    assert tc._sample(sample) == "in-sample (simulator, profile)"
    assert tc._sample({"label": "held-out", "reasons": []}) == "held-out"


def test_the_doc_gets_the_section_and_nothing_else_changes(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\nbefore\n\n{tc.BEGIN}\nold tables\n{tc.END}\n\nafter\n")
    assert tc.main(["--no-runs", "--doc", str(doc)]) == 0
    first = doc.read_text()
    assert first.startswith("# title\n\nbefore\n\n" + tc.BEGIN) and first.endswith(tc.END + "\n\nafter\n")
    assert "old tables" not in first and "| decode step | batch 1, context 128 |" in first
    assert "`python -m djinnsim.validate.transfer_check --no-runs --doc " in first
    assert tc.main(["--no-runs", "--doc", str(doc)]) == 0
    assert doc.read_text() == first, "the same profiles must give the same bytes"


@pytest.mark.parametrize("args, message", [
    (["--no-runs", "--measured", "nowhere.json"], "profile not found: nowhere.json"),
    (["--runs", "nowhere"], "--runs nowhere holds no validation folders"),
])
def test_bad_input_is_one_line(args, message, capsys):
    assert tc.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_doc_without_markers_is_refused(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("no markers\n")
    assert tc.main(["--no-runs", "--doc", str(doc)]) == 1
    assert "section to replace" in capsys.readouterr().err and doc.read_text() == "no markers\n"


def test_a_profile_without_a_bundled_gpu_cannot_be_moved(tmp_path, capsys):
    profile = load_profile(H100)
    path = save_profile(profile.model_copy(update={"metadata": profile.metadata.model_copy(update={"gpu_key": None})}),
                        tmp_path / "nokey.json")
    assert tc.main(["--no-runs", "--source", str(path)]) == 1
    assert "names no bundled GPU" in capsys.readouterr().err


def test_only_folders_of_real_runs_are_re_simulated(tmp_path):
    for name, meta in (("exp21-25", {}), ("exp21-25-resim", {"offline": {"from_real": "exp21-25"}}), ("notes", None)):
        (tmp_path / name).mkdir()
        if meta is not None:
            (tmp_path / name / "validation.json").write_text(json.dumps({"meta": meta}))
    assert tc.real_run_folders(tmp_path) == [tmp_path / "exp21-25"]
    assert tc.real_run_folders(tmp_path / "nowhere") == []


def test_the_time_slicing_rows_are_the_model_the_executors_charge():
    """Each process's step with k decoding at once, max(lone step, k g), g absolute (timeslice_mp's
    gpu_step_s at the stage's context), not the measured slowdown interpolated; a profile without
    the stage (the H100's, moved) gives the relative model, lone x max(1, k f)."""
    from djinnsim.sim.costmodel import ProfileCostModel
    from djinnsim.sim.specs import get_model

    h100, h200 = load_profile(H100), load_profile(H200)
    moved = tc.transferred_profile(h100, "h200")
    rows = _by_query(tc.primitives(h200, moved))
    context = round(sum(h200.timeslice_mp.context_tokens) / 2)
    measured, transferred = (ProfileCostModel(p, get_model("llama-2-7b")) for p in (h200, moved))
    g = measured.decode_gpu_s(1, context)
    assert g == pytest.approx(h200.timeslice_mp.gpu_step_s, rel=0.01)
    assert transferred.decode_gpu_s(1, context) is None
    f = transferred.gpu_busy_fraction()
    for k in (1, 2, 4, 8):
        row = rows[("time-slicing", f"decode step, k = {k} processes at once: max(lone step, k g)")]
        lone = measured.decode_step_s(1, context)
        assert row.measured == pytest.approx(1e3 * max(lone, k * g), rel=1e-12)
        assert row.transferred == pytest.approx(1e3 * transferred.decode_step_s(1, context) * max(1.0, k * f), rel=1e-12)
    assert rows[("time-slicing", f"GPU time of a decode step (g), context {context}")].measured == pytest.approx(1e3 * g)
