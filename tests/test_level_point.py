"""`calibrate --refit P --level-point median`: the point at the median batch-1 level the bands draw.

Closed forms on a committed H200 calibration (run 5, its samples beside it): the refitted point is the
median level times the fit at every batch, the spread is re-expressed over it so every band draw is
where it was, and bad input is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from djinnsim.calibrate.spread import at_median_level
from djinnsim.cli import app
from djinnsim.errors import DjinnsimError
from djinnsim.sim import bands
from djinnsim.sim.costmodel import ProfileCostModel, evaluate_fit
from djinnsim.sim.profile import Spread, load_profile, save_profile
from djinnsim.sim.specs import get_model
from typer.testing import CliRunner

runner = CliRunner()
RUN5 = Path(__file__).resolve().parents[1] / "docs" / "calibration" / "h200-run5" / "h200-llama-2-7b.json"


def _refit(source: Path, out: Path, *args: str) -> None:
    result = runner.invoke(app, ["calibrate", "--refit", str(source), "--out", str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(the refit with the point at the fit, the refit with --level-point median) of run 5's calibration."""
    folder = tmp_path_factory.mktemp("level-point")
    _refit(RUN5, folder / "fit.json")
    _refit(RUN5, folder / "median.json", "--level-point", "median")
    return folder, load_profile(folder / "fit.json"), load_profile(folder / "median.json")


def test_the_point_is_the_median_level_times_the_fit_at_every_batch(pair):
    _, fit, median = pair
    m = float(np.median(fit.spread.decode_level))
    assert median.spread.point_level == pytest.approx(m, rel=1e-12) and m > 1.05  # run 5's spells sit above its fit
    spec = get_model(fit.metadata.model_id)
    old, new = ProfileCostModel(fit, spec), ProfileCostModel(median, spec)
    for batch, context in ((1, 70), (1, 2054), (8, 512), (64, 1030)):
        assert new.decode_step_s(batch, batch * context) == pytest.approx(m * old.decode_step_s(batch, batch * context), rel=1e-12)
    for name in ("prefill", "cached_prefill"):  # the host floors move, the GPU's work stays
        before, after = getattr(fit, name), getattr(median, name)
        assert before.floor_s is not None and after.floor_s == pytest.approx(m * before.floor_s, rel=1e-12)
        assert after.coef == before.coef
    assert float(np.median(median.spread.decode_level)) == pytest.approx(1.0, rel=1e-12)
    assert median.metadata.notes[-1].endswith(f"(passes x {m:.4f})") and "--level-point median" in median.metadata.notes[-1]
    assert fit.spread.point_level is None and "point_level" not in json.loads(Path(pair[0] / "fit.json").read_text())["spread"]


def test_every_band_draw_stays_where_it_was(pair):
    """The same factor draw (same generator state) gives the same decode step, in seconds, on either
    profile: factor f / m of the point m x fit is f x fit; the lists hold the same spells."""
    _, fit, median = pair
    m = median.spread.point_level
    assert sorted(f * m for f in median.spread.decode_level) == pytest.approx(sorted(fit.spread.decode_level), rel=1e-12)
    inputs = [{"batch": b, "context": c, "sum_context": b * c} for b, c in ((1, 72), (1, 1500), (16, 700))]
    for seed in range(20):
        f_old = bands.draw_factors(fit.spread, np.random.default_rng(seed))
        f_new = bands.draw_factors(median.spread, np.random.default_rng(seed))
        assert f_new.decode == pytest.approx(f_old.decode / m, rel=1e-12)
        old, new = bands.scale_profile(fit, f_old), bands.scale_profile(median, f_new)
        for x in inputs:
            assert evaluate_fit(new.decode_step, x)[0] == pytest.approx(evaluate_fit(old.decode_step, x)[0], rel=1e-12)


def test_later_refits_keep_the_median_point_until_told_fit(pair, tmp_path):
    """A refit of a median-point profile (the held-out one validate makes included) takes the median
    again over its own spells; `--level-point fit` puts the point back at the fit."""
    from djinnsim.validate.heldout import held_out_profile

    folder, fit, median = pair
    held = load_profile(held_out_profile(folder / "median.json", tmp_path))
    assert held.spread.left_out == ["exp21_step"] and held.spread.point_level is not None
    assert float(np.median(held.spread.decode_level)) == pytest.approx(1.0, rel=1e-12)
    back = tmp_path / "back.json"
    _refit(folder / "median.json", back, "--level-point", "fit")
    again = load_profile(back)
    assert again.spread.point_level is None and again.decode_step.coef == pytest.approx(fit.decode_step.coef, rel=1e-12)
    assert again.spread.decode_level == pytest.approx(fit.spread.decode_level, rel=1e-12)
    assert not any("passes x" in note for note in again.metadata.notes[-1:])


def test_no_spells_no_median_point(pair):
    _, fit, _ = pair
    for spread in (None, Spread(decode_residual=[1.0])):
        with pytest.raises(DjinnsimError, match="no batch-1 decode spells"):
            at_median_level(fit.model_copy(update={"spread": spread}), [])


@pytest.mark.parametrize("args, message", [
    (["--refit", str(RUN5), "--level-point", "mean"], "--level-point 'mean': not one of fit, median"),
    (["--device", "cpu", "--level-point", "median"], "--level-point applies to --refit only"),
])
def test_bad_level_point_is_one_line(args, message, tmp_path):
    result = runner.invoke(app, ["calibrate", *args, "--out", str(tmp_path / "x.json"), "--quiet"])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1 and message in text and "Traceback" not in text, text
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("value", [float("nan"), -1.2, 0.0, "1.2", True, 1e9])
def test_a_corrupt_point_level_is_refused_and_an_absent_one_loads(pair, tmp_path, value):
    folder, _, median = pair
    data = json.loads((folder / "median.json").read_text())
    data["spread"]["point_level"] = value
    path = tmp_path / "corrupt.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DjinnsimError, match=r"invalid profile field spread\.point_level|NaN is not a JSON number") as err:
        load_profile(path)
    assert "\n" not in str(err.value)
    del data["spread"]["point_level"]  # a profile older than the field: the point at the fit
    path.write_text(json.dumps(data))
    assert load_profile(path).spread.point_level is None


def test_an_old_profile_round_trips_byte_identical(tmp_path):
    shutil.copyfile(RUN5, tmp_path / "p.json")
    save_profile(load_profile(tmp_path / "p.json"), tmp_path / "q.json")
    assert (tmp_path / "q.json").read_bytes() == RUN5.read_bytes()


def test_a_report_names_the_moved_point(pair):
    """validate's profile record carries point_level where it is set, and the report's profile line says it."""
    from djinnsim.validate.pipeline import profile_meta
    from djinnsim.validate.report import _point_level

    folder, _, median = pair
    moved, plain = profile_meta(folder / "median.json", "given", median), profile_meta(folder / "fit.json", "given", load_profile(folder / "fit.json"))
    assert moved["point_level"] == median.spread.point_level and "point_level" not in plain
    assert _point_level(plain) == "" and f"passes x {median.spread.point_level:.4f}" in _point_level(moved)
