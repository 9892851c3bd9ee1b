"""Fitting recovers known synthetic cost functions (within 2%), and bends only where the data bends."""

from __future__ import annotations

import numpy as np
import pytest
from djinnsim.calibrate.fitting import (
    DECODE_FEATURES,
    DECODE_SCALE,
    PREFILL_FEATURES,
    PREFILL_SCALE,
    FitPoint,
    fit_bandwidth,
    fit_floor_max,
    fit_linear,
    floor_split_stats,
    predict,
)
from djinnsim.calibrate.profile_builder import fit_decode, fit_prefill
from djinnsim.sim.profile import LinearFit, PiecewiseFit
from hypothesis import given, settings
from hypothesis import strategies as st

PROMPTS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BATCHES = (1, 2, 4, 8, 16, 32)
CONTEXTS = (64, 256, 512, 1024, 2048, 4096)


def prefill_grid(cost, noise: float = 0.0, seed: int = 0) -> list[FitPoint]:
    rng = np.random.default_rng(seed)
    points = []
    for b in BATCHES:
        for p in PROMPTS:
            if b * p <= 32768:
                inputs = {"prompt_tokens": p, "batch": b, "context": 0}
                points.append(FitPoint(inputs, cost(b * p, b * p * p) * (1 + noise * rng.standard_normal())))
    return points


def decode_grid(cost, noise: float = 0.0, seed: int = 0) -> list[FitPoint]:
    rng = np.random.default_rng(seed)
    points = []
    for b in (1, 2, 4, 8, 16, 32, 64):
        for c in CONTEXTS:
            if b * c <= 98304:
                inputs = {"batch": b, "context": c, "sum_context": b * c}
                points.append(FitPoint(inputs, cost(b, b * c) * (1 + noise * rng.standard_normal())))
    return points


def _close(got: list[float], want: list[float], rel: float = 0.02) -> None:
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=rel), (got, want)


@settings(max_examples=25, deadline=None)
@given(
    a=st.floats(1e-3, 5e-2),
    b=st.floats(1e-6, 1e-4),
    c=st.floats(1e-11, 1e-8),
)
def test_prefill_fit_recovers_quadratic_costs(a, b, c):
    points = prefill_grid(lambda tokens, tokens_sq: a + b * tokens + c * tokens_sq)
    fit = fit_linear(points, PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"])
    _close(fit.coef, [a, b, c])
    assert fit.max_rel_err < 1e-6 and fit.r2 > 0.999999


@settings(max_examples=25, deadline=None)
@given(
    a=st.floats(5e-3, 5e-2),
    b=st.floats(1e-5, 1e-3),
    c=st.floats(1e-8, 1e-6),
)
def test_decode_fit_recovers_linear_costs(a, b, c):
    points = decode_grid(lambda batch, sum_context: a + b * batch + c * sum_context)
    fit = fit_decode(points)
    assert isinstance(fit, LinearFit), "smooth data must stay one piece"
    _close(fit.coef, [a, b, c])
    assert fit.features == DECODE_FEATURES and fit.scale == DECODE_SCALE


def test_recovery_survives_measurement_noise():
    a, b, c = 0.02, 3e-5, 6e-10
    points = prefill_grid(lambda tokens, tokens_sq: a + b * tokens + c * tokens_sq, noise=0.003, seed=7)
    fit = fit_linear(points, PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"])
    # Every point is predicted within 2% (the coefficients themselves trade off under noise).
    for p in points:
        truth = a + b * p.inputs["batch"] * p.inputs["prompt_tokens"] + c * p.inputs["batch"] * p.inputs["prompt_tokens"] ** 2
        assert predict(fit, p.inputs) == pytest.approx(truth, rel=0.02)


def test_host_bound_then_compute_bound_prefill_is_fitted_as_the_longer_of_the_two():
    """Eager prefill: flat (the host's launch time) for small inputs, then the GPU's work. The host
    launches while the GPU runs, so a pass takes the longer of the two: the fit is exact on such
    data, where the additive form (one piece, or pieces split on one input) misses by tens of
    percent (it pays the launch floor on top of the compute-bound passes)."""
    points = prefill_grid(lambda tokens, tokens_sq: max(0.03, 3e-5 * tokens + 5e-10 * tokens_sq))
    additive = fit_linear(points, PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"])
    fit = fit_prefill(points)
    assert isinstance(fit, LinearFit) and fit.floor_s == pytest.approx(0.03, rel=1e-6)
    worst = max(abs(predict(fit, p.inputs) - p.value) / p.value for p in points)
    assert worst < 1e-3 < 0.1 < additive.max_rel_err
    assert fit.domain["context"] == (0.0, 0.0)


@settings(max_examples=25, deadline=None)
@given(
    floor=st.floats(1.5e-2, 5e-2),
    a=st.floats(1e-3, 5e-3),
    b=st.floats(1e-5, 5e-5),
    c=st.floats(1e-10, 1e-9),
)
def test_floor_max_fit_recovers_a_known_floor_and_gpu_polynomial(floor, a, b, c):
    points = prefill_grid(lambda tokens, tokens_sq: max(floor, a + b * tokens + c * tokens_sq))
    fit = fit_floor_max(points, PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"])
    assert fit.floor_s == pytest.approx(floor, rel=0.02)
    _close(fit.coef, [a, b, c])
    assert fit.max_rel_err < 0.01


@settings(max_examples=25, deadline=None)
@given(noise=st.floats(0.0, 0.1), seed=st.integers(0, 2**16), knee=st.floats(0.005, 0.05))
def test_floor_max_fit_finds_the_floor_in_noise_and_never_fits_worse_than_the_sum(noise, seed, knee):
    """Noisy launch-bound-then-linear data: a floor is found, within the noise of the true one,
    and the fit's relative error is never above the additive fit's on the same points (the sum
    is where the search starts; a split is kept only when it does better). Noise up to 10%: at
    20% (normal) a low outlier can make the additive form the better fit in relative error, and no
    floor is then right (noise 0.1875, seed 1873: the true form's relative SSE 7.8, the sum's 4.1)."""
    points = prefill_grid(lambda tokens, tokens_sq: max(knee, 3e-5 * tokens), noise=noise, seed=seed)
    fit = fit_floor_max(points, PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"])
    additive = fit_linear(points, PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"])
    assert fit.floor_s is not None and fit.floor_s == pytest.approx(knee, rel=0.05 + 2 * noise)

    def relative_sse(f):
        return sum(((predict(f, p.inputs) - p.value) / p.value) ** 2 for p in points)

    assert relative_sse(fit) <= relative_sse(additive) * (1 + 1e-9)


def test_floor_max_fit_without_a_floor_in_the_data_stays_additive():
    """Data with no flat part: no split beats the plain sum, so the fit has no floor."""
    points = prefill_grid(lambda tokens, tokens_sq: 0.002 + 3e-5 * tokens + 5e-10 * tokens_sq)
    fit = fit_prefill(points)
    assert fit.floor_s is None and fit.scale == PREFILL_SCALE
    _close(fit.coef, [0.002, 3e-5, 5e-10])
    assert "floor_s" not in fit.model_dump(mode="json")  # written as before the field existed


def test_floor_split_puts_the_host_spread_on_the_floor_side():
    """Launch-bound points scattered 2x about the floor (host spells), GPU-bound ones exact: the
    whole fit's worst error is the floor side's, the points above it fit to rounding, and the
    floor-bound points' measured p10-p90 shows the spread."""
    rng = np.random.default_rng(7)

    def cost(tokens, tokens_sq):
        gpu = 3e-5 * tokens
        return gpu if gpu > 0.03 else 0.03 * rng.uniform(0.7, 1.4)

    points = prefill_grid(cost)
    fit = fit_floor_max(points, PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"])
    split = floor_split_stats(fit, points)
    assert split["at_floor"] + split["above"] == len(points) and split["at_floor"] > 0 < split["above"]
    assert split["above_max_rel_err"] < 0.02 < 0.1 < split["at_floor_max_rel_err"] == pytest.approx(fit.max_rel_err)
    floor_bound = sorted(p.value for p in points if 3e-5 * p.inputs["batch"] * p.inputs["prompt_tokens"] < fit.floor_s)
    assert floor_bound[0] <= split["at_floor_p10_s"] < split["at_floor_p90_s"] <= floor_bound[-1]
    assert split["at_floor_p90_s"] > 1.3 * split["at_floor_p10_s"]


def test_floor_split_of_an_additive_fit_is_none():
    points = prefill_grid(lambda tokens, tokens_sq: 0.002 + 3e-5 * tokens)
    assert floor_split_stats(fit_prefill(points), points) is None


def test_pieces_cover_the_grid_without_gaps():
    points = prefill_grid(lambda tokens, tokens_sq: max(0.03, 3e-5 * tokens))
    fit = fit_prefill(points)
    from djinnsim.sim.costmodel import evaluate_fit

    for prompt in range(16, 4097, 37):  # also between grid values
        _, inside = evaluate_fit(fit, {"prompt_tokens": prompt, "batch": 1, "context": 0})
        assert inside, prompt


SIZES = [4096, 65536, 2**20, 2**24, 2**28, 2**30]


def test_bandwidth_fit_recovers_latency_and_rate():
    seconds = [2e-5 + n / 12e9 for n in SIZES]
    bw, stats = fit_bandwidth(SIZES, seconds)
    assert bw.latency_s == pytest.approx(2e-5, rel=0.02)
    assert bw.gbps == pytest.approx(12.0, rel=0.02)
    assert bw.large_gbps is None and stats["max_rel_err"] < 1e-6


def test_bandwidth_fit_gives_large_buffers_their_own_rate():
    """Past 16 MiB the host pages are fresh and fault: 1.5 GB/s instead of 12."""
    seconds = [2e-5 + n / (12e9 if n <= 2**24 else 1.5e9) for n in SIZES]
    bw, _ = fit_bandwidth(SIZES, seconds)
    assert bw.gbps == pytest.approx(12.0, rel=0.02)
    assert bw.large_from_bytes == 2**24
    assert bw.large_gbps == pytest.approx(1.5, rel=0.02)
    assert bw.time_s(2**30) == pytest.approx(2e-5 + 2**30 / 1.5e9, rel=0.02)
    assert bw.time_s(2**20) == pytest.approx(2e-5 + 2**20 / 12e9, rel=0.02)


def test_exp21_runs_become_decode_fit_points_one_per_run():
    from djinnsim.calibrate.profile_builder import decode_anchor_points

    rows = [{"stage": "exp21_step", "point": f"run{run}", "value": str(0.02 + 0.01 * run + 1e-4 * t), "unit": "s",
             "context": str(72 + t)} for run in (2, 3) for t in range(49)]
    rows.append({"stage": "decode", "point": "b1_c64", "value": "0.5", "unit": "s", "context": "64"})
    points = sorted(decode_anchor_points(rows), key=lambda p: p.value)
    assert [p.inputs for p in points] == [{"batch": 1.0, "context": 96.0, "sum_context": 96.0}] * 2
    assert [p.value for p in points] == pytest.approx([0.0424, 0.0524])


def test_repeated_spells_at_one_input_cannot_make_a_piece():
    """A launch-bound batch-1 level that flips between spells: grid points near 25 ms, and ten
    longer spells, all at one context, near 35 ms. Three coefficients fitted through two inputs
    would join the levels with a slope (zero at context 0, the upper level at the spells' context);
    the spells at one input measure the noise there, so no piece may rest on them alone."""
    from djinnsim.calibrate.fitting import determined

    rng = np.random.default_rng(5)
    points = decode_grid(lambda batch, sum_context: 0.025 * (1 + 0.08 * rng.standard_normal()))
    points += [FitPoint({"batch": 1.0, "context": 96.0, "sum_context": 96.0}, 0.035 * (1 + 0.05 * rng.standard_normal()))
               for _ in range(10)]
    fit = fit_decode(points)
    at = {c: predict(fit, {"batch": 1.0, "context": float(c), "sum_context": float(c)}) for c in (64, 96, 128, 1024)}
    assert max(at.values()) / min(at.values()) < 1.1, at  # no slope joining the two levels
    assert 0.025 <= at[96] <= 0.035
    pieces = fit.pieces if isinstance(fit, PiecewiseFit) else [fit]
    for piece in pieces:
        inside = [p for p in points if all(lo <= p.inputs[v] <= hi for v, (lo, hi) in piece.domain.items())]
        assert determined(inside, DECODE_FEATURES)


def test_a_piece_must_determine_its_coefficients():
    from djinnsim.calibrate.fitting import determined

    def at(batch, context):
        return FitPoint({"batch": float(batch), "context": float(context), "sum_context": float(batch * context)}, 0.03)

    assert determined([at(b, c) for b in (1, 2) for c in (64, 512)], DECODE_FEATURES)
    assert not determined([at(1, 68)] + [at(1, 96)] * 10, DECODE_FEATURES)  # two inputs, three coefficients
    assert not determined([at(1, c) for c in (64, 256, 512, 1024, 2048)], DECODE_FEATURES)  # batch 1 only: fixed or per-batch?
    assert not determined([at(b, c) for b, c in ((1, 64), (2, 64), (4, 64))], DECODE_FEATURES)  # no spare point


def test_decode_spells_take_every_batch1_spell_once():
    from djinnsim.calibrate.profile_builder import decode_anchor_points, decode_spells

    def rows(stage, point, values, context, batch=1, **extra):
        return [{"stage": stage, "point": point, "rep": str(i), "batch": str(batch), "context": str(context + i),
                 "value": str(v), "unit": "s", **extra} for i, v in enumerate(values)]

    samples = (rows("decode", "b1_c64", [0.020, 0.022, 0.024], 66) + rows("decode", "b2_c64", [0.5] * 3, 66, batch=2)
               + rows("warm_decode", "c333", [0.030, 0.031, 0.040], 333) + rows("exp21_step", "run2", [0.035] * 5, 72)
               + rows("timeslice_mp", "k1", [0.036] * 3, 0, concurrent="1")
               + rows("timeslice_mp", "k2", [0.05] * 3, 0, concurrent="2")
               + [{"stage": "decode_new_segments", "point": "b1_c64", "batch": "1", "context": "66", "value": "0", "unit": "count"}])
    got = sorted((p.inputs["context"], p.value) for p in decode_spells(samples))
    assert [c for c, _ in got] == [67.0, 74.0, 334.0]
    assert [v for _, v in got] == pytest.approx([0.022, 0.035, 0.031])
    with_lone = decode_spells(samples, ("decode", "timeslice_mp"), timeslice_context=87.5)
    assert sorted((p.inputs["context"], p.value) for p in with_lone) == [(67.0, 0.022), (87.5, 0.036)]
    assert all(p.inputs["batch"] == 1.0 and p.inputs["sum_context"] == p.inputs["context"] for p in with_lone)
    anchors = sorted(p.value for p in decode_anchor_points(samples))  # the grid is in the fit already
    assert anchors == pytest.approx([0.031, 0.035])


def _outside(fit, batches, contexts, max_sum_context) -> list[tuple[int, int]]:
    from djinnsim.sim.costmodel import evaluate_fit

    return [(b, c) for b in batches for c in contexts if b * c <= max_sum_context
            and not evaluate_fit(fit, {"batch": b, "context": c, "sum_context": b * c})[1]]


def test_reach_cut_stretches_sum_context_over_the_added_slab():
    from djinnsim.calibrate.fitting import reach_cut

    # A piece above a cut at context 96 whose points start at context 260 (batch 1-64).
    domain = {"batch": (1.0, 64.0), "context": (260.0, 2052.0), "sum_context": (260.0, 65792.0)}
    assert reach_cut(domain, "context", 96.0) == {"batch": (1.0, 64.0), "context": (96.0, 2052.0),
                                                 "sum_context": (96.0, 65792.0)}
    # Below a cut: the box grows up to it, sum_context up to the slab's largest batch x context.
    low = {"batch": (2.0, 64.0), "context": (68.0, 68.0), "sum_context": (136.0, 4352.0)}
    assert reach_cut(low, "context", 96.0)["sum_context"] == (136.0, 6144.0)
    assert reach_cut(low, "batch", 1.0)["sum_context"] == (68.0, 4352.0)
    # A box that reaches the cut (one point at context 96, batch 1) still covers its face there.
    reached = {"batch": (1.0, 64.0), "context": (68.0, 96.0), "sum_context": (68.0, 4352.0)}
    assert reach_cut(reached, "context", 96.0) == {**reached, "sum_context": (68.0, 6144.0)}
    # A cut strictly inside the box changes nothing; nor does a box without batch and context.
    assert reach_cut(domain, "batch", 8.0) == domain
    assert reach_cut({"prompt_tokens": (16.0, 256.0)}, "prompt_tokens", 512.0) == {"prompt_tokens": (16.0, 512.0)}


def _slow_off_grid_fit(at_96: tuple[tuple[int, float], ...]):
    """The decode fit of a grid at contexts 68-2052 (batch 1-64, up to 65,536 tokens) whose context
    68 runs in a slow state, plus slow points at context 96 (batch, seconds): it cuts at 96."""
    contexts = (64, 256, 512, 1024, 2048)
    points = [FitPoint({"batch": b, "context": c + 4, "sum_context": b * (c + 4)}, 0.026 + 5e-8 * b * c)
              for b in (1, 2, 4, 8, 16, 32, 64) for c in contexts if b * c <= 65536]
    points = [FitPoint(p.inputs, 0.035) if p.inputs["context"] == 68 else p for p in points]
    points += [FitPoint({"batch": float(b), "context": 96.0, "sum_context": 96.0 * b}, v) for b, v in at_96]
    fit = fit_decode(points)
    assert isinstance(fit, PiecewiseFit) and fit.pieces[0].domain["context"] == (68.0, 96.0)
    return fit


def test_decode_pieces_leave_no_gap_where_split_points_sit_off_the_grid():
    """Points off the grid's contexts (96, between the grid's 68 and 260, at batches 1-64) in a slow
    state: the fit cuts at context 96, and the piece above it must start there at every batch (it
    used to start at sum_context 260, leaving batch 1 at context 97-259 outside)."""
    fit = _slow_off_grid_fit(((1, 0.034), (2, 0.036), (4, 0.035), (8, 0.037), (64, 0.035)))
    assert _outside(fit, (1, 2, 3, 8, 64), range(68, 2053), 65792) == []


def test_no_gap_where_the_lower_piece_reaches_the_cut_at_one_batch_only():
    """The slow points off the grid sit at context 96 at batches 1-2 only, so the piece below the
    cut reaches it in context but its points' sum_context stops at 64 x 68: batch 64 at contexts
    69-95 was inside it in batch and context, outside in sum_context, and below the piece above."""
    fit = _slow_off_grid_fit(((1, 0.034), (2, 0.036), (1, 0.035), (2, 0.037), (1, 0.035)))
    assert _outside(fit, (1, 2, 3, 8, 64), range(68, 2053), 65792) == []


def test_h200_decode_samples_refit_without_gaps():
    """The bundled H200 samples refitted: the same pieces, domains that cover the grid's box (the
    first bundled fit left batch 1 at contexts 97-259 outside every piece)."""
    from pathlib import Path

    from djinnsim.calibrate.refit import decode_points, read_samples
    from djinnsim.sim.profile import load_profile

    folder = Path(__file__).resolve().parents[1] / "sim" / "data" / "profiles"
    bundled = load_profile(folder / "h200-llama-2-7b.json").decode_step
    fit = fit_decode(decode_points(read_samples(folder / "h200-llama-2-7b.csv")))
    def pieces(f):
        return f.pieces if isinstance(f, PiecewiseFit) else [f]

    assert len(pieces(fit)) == len(pieces(bundled))
    for ours, theirs in zip(pieces(fit), pieces(bundled)):
        assert ours.coef == pytest.approx(theirs.coef, rel=1e-9, abs=1e-15)
    assert _outside(bundled, (1,), (100, 200, 259), 65792) == []
    assert _outside(fit, (1, 2, 3, 8, 64), range(68, 2053), 65792) == []


@pytest.mark.parametrize("level", [1e-3, 0.0137, 0.03, 0.5])
def test_flat_data_gets_no_floor_over_a_constant_that_fits_as_well(level):
    """All points at one level: the plain constant fits exactly, and a floor (the split's level) can
    only tie it in rounding. The fit must not then report a floor with a GPU constant of the same
    size: a faster launch-bound level (bands.level_scaled moves the floor only) would leave such a
    prefill where it was, where the additive constant, the host's, moves with it."""
    from djinnsim.sim.bands import _scale_level

    fit = fit_prefill(prefill_grid(lambda tokens, tokens_sq: level))
    assert fit.floor_s is None and fit.scale == PREFILL_SCALE
    faster = _scale_level(fit, 0.5)
    assert predict(faster, {"prompt_tokens": 16, "batch": 1, "context": 0}) == pytest.approx(0.5 * level)


def test_level_spells_join_the_decode_fit_but_do_not_split_it():
    """H200 run 10's samples: Exp 2.1's batch-1 spells at context 96 ran at about 26 ms, the decode
    grid minutes later at 32-35 ms at every context. Judged on every point the fit split at 96 (26.3
    ms below, 33.3 above: no cost of context); judged on the grid, with the spells fitted, it is one
    level between the two. A grid whose own steps change with context still splits."""
    from pathlib import Path

    from djinnsim.calibrate.fitting import FitPoint, fit_piecewise, predict
    from djinnsim.calibrate.profile_builder import DECODE_FEATURES, DECODE_SCALE, decode_anchor_points
    from djinnsim.calibrate.refit import decode_grid_points, read_samples

    rows = read_samples(Path(__file__).resolve().parents[1] / "docs" / "calibration" / "h200-run10" / "h200-llama-2-7b.csv.gz")
    grid, spells = decode_grid_points(rows), decode_anchor_points(rows)
    old = fit_piecewise([*grid, *spells], DECODE_FEATURES, DECODE_SCALE, ["batch", "context", "sum_context"], ["batch", "context"])
    fit = fit_decode(grid, spells)

    def b1(f, c):
        return predict(f, {"batch": 1, "context": c, "sum_context": c})

    assert isinstance(old, PiecewiseFit) and b1(old, 150) / b1(old, 80) > 1.2
    assert isinstance(fit, LinearFit)
    assert b1(old, 80) < b1(fit, 80) < b1(old, 150) and abs(b1(fit, 1000) / b1(fit, 80) - 1) < 0.01
    trend = [FitPoint({"batch": float(b), "context": float(c), "sum_context": float(b * c)},
                      (0.02 if c <= 96 else 0.04) * (1 + 0.001 * ((b * 7 + c) % 5)))
             for b in (1, 2, 4) for c in (68, 80, 96, 260, 516, 1028, 2052)]
    assert isinstance(fit_decode(trend, spells), PiecewiseFit)
