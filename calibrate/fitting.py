"""Fit cost functions to measured points: linear in named features, piecewise where the data bends.

Features are the ones `djinnsim.sim.costmodel.feature_value` evaluates, so a fit written here is
read back by the simulator unchanged. Fits minimise relative error (grids span orders of magnitude,
and a 1 ms error matters at 5 ms, not at 5 s) under non-negative coefficients (each term is a cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from djinnsim.sim.costmodel import feature_value
from djinnsim.sim.profile import Bandwidth, LinearFit, PiecewiseFit

PREFILL_FEATURES = ["1", "tokens", "tokens_sq"]
PREFILL_SCALE = ["host", "compute", "compute"]
DECODE_FEATURES = ["1", "batch", "sum_context"]
DECODE_SCALE = ["mixed", "compute", "memory"]


@dataclass(frozen=True)
class FitPoint:
    """One measured point: the cost-model inputs (prompt_tokens, batch, context, sum_context) and its value."""

    inputs: dict[str, float]
    value: float


def _design(points: Sequence[FitPoint], features: Sequence[str]) -> np.ndarray:
    return np.array([[feature_value(f, p.inputs) for f in features] for p in points], dtype=float)


def solve_relative(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising sum(((a @ coef) - y) / y)^2."""
    from scipy.optimize import lsq_linear

    weights = 1.0 / np.maximum(np.abs(y), np.finfo(float).tiny)
    scaled = a * weights[:, None]
    norms = np.linalg.norm(scaled, axis=0)
    norms[norms == 0] = 1.0  # a feature that is zero everywhere: its coefficient stays 0
    result = lsq_linear(scaled / norms, y * weights, bounds=(0.0, np.inf), method="bvls", tol=1e-12)
    return result.x / norms


def fit_stats(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    resid = pred - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return {
        "r2": r2,
        "rmse_s": float(np.sqrt(np.mean(resid**2))),
        "max_rel_err": float(np.max(np.abs(resid) / np.maximum(np.abs(y), np.finfo(float).tiny))),
    }


def _domain(points: Sequence[FitPoint], variables: Sequence[str]) -> dict[str, tuple[float, float]]:
    return {v: (min(p.inputs[v] for p in points), max(p.inputs[v] for p in points)) for v in variables}


def determined(points: Sequence[FitPoint], features: Sequence[str]) -> bool:
    """Whether `points` pin down every coefficient with some left over: more distinct feature rows
    than features, and no feature a combination of the others over them."""
    a = _design(points, features)
    return len({tuple(row) for row in a}) > len(features) and np.linalg.matrix_rank(a) == len(features)


def fit_linear(
    points: Sequence[FitPoint],
    features: Sequence[str],
    scale: Sequence[str],
    domain_vars: Sequence[str],
) -> LinearFit:
    if len(points) < len(features):
        raise ValueError(f"{len(points)} points cannot fit {len(features)} features")
    a = _design(points, features)
    y = np.array([p.value for p in points], dtype=float)
    coef = solve_relative(a, y)
    return LinearFit(
        features=list(features),
        coef=[float(c) for c in coef],
        scale=list(scale),
        domain=_domain(points, domain_vars),
        n_samples=len(points),
        **fit_stats(a @ coef, y),
    )


def _relative_sse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(((pred - y) / y) ** 2))


def _floor_level(y: np.ndarray) -> float:
    """The constant nearest `y` in relative error: argmin_f sum(((f - y) / y)^2)."""
    return float(np.sum(1.0 / y) / np.sum(1.0 / y**2))


def fit_floor_max(
    points: Sequence[FitPoint],
    features: Sequence[str],
    scale: Sequence[str],
    domain_vars: Sequence[str],
    *,
    max_rounds: int = 20,
) -> LinearFit:
    """time = max(floor, sum(coef * feature)) on relative error, coefficients and floor non-negative.

    A pass whose host launches kernels while the GPU runs the earlier ones takes the longer of the
    host's launch time (the floor, the same for every short pass) and the GPU's work (the sum); an
    additive fit pays both, so it over-charges the long passes by the floor and, pulled by them,
    misses the short ones. Each split of the points by measured time into floor-bound (the lower
    ones) and GPU-bound gives a floor (their level) and a sum (fitted on the rest); the best split
    is then refined by re-assigning each point to the side the fit puts it on, until nothing moves.
    Where no split beats the plain sum, the fit has no floor (`floor_s` None): the additive form."""
    a = _design(points, features)
    y = np.array([p.value for p in points], dtype=float)
    plain = solve_relative(a, y)
    best = (_relative_sse(a @ plain, y), plain, None)
    order = np.argsort(y, kind="stable")
    need = len(features) + 1

    def fit_split(at_floor: np.ndarray):
        above = ~at_floor
        if above.sum() < need or not at_floor.any():
            return None
        coef = solve_relative(a[above], y[above])
        floor = _floor_level(y[at_floor])
        return _relative_sse(np.maximum(a @ coef, floor), y), coef, floor

    # a split must beat the plain sum by more than rounding: on flat data both fit exactly, and a
    # floor there would stand on a GPU constant of its own size (the additive constant is the host's)
    margin = 1e-12 * len(y)
    for k in range(1, len(y) - need + 1):
        at_floor = np.zeros(len(y), dtype=bool)
        at_floor[order[:k]] = True
        tried = fit_split(at_floor)
        if tried is not None and tried[0] < best[0] - (margin if best[2] is None else 0.0):
            best = tried
    for _ in range(max_rounds):  # refine: each point on the side the best fit puts it
        _, coef, floor = best
        if floor is None:
            break
        tried = fit_split(a @ coef < floor)
        if tried is None or tried[0] >= best[0]:
            break
        best = tried
    _, coef, floor = best
    pred = a @ coef if floor is None else np.maximum(a @ coef, floor)
    return LinearFit(
        features=list(features),
        coef=[float(c) for c in coef],
        scale=list(scale),
        domain=_domain(points, domain_vars),
        floor_s=None if floor is None else float(floor),
        n_samples=len(points),
        **fit_stats(pred, y),
    )


def floor_split_stats(fit: LinearFit | PiecewiseFit, points: Sequence[FitPoint]) -> dict[str, float] | None:
    """A max(floor, GPU work) fit's error apart on each side of its floor; None without a floor.

    The whole-fit worst error of such a fit is the host's: over H200 calibrations 2-13 about 70% of
    the cached-context prefill grid sits at the launch floor, whose passes range over 2x within one
    calibration (host spells, p10-p90 about 20-40 ms), while the passes above it miss by a few per
    cent. `at_floor` and `above` count the points on each side (by where the fit puts them); the
    floor-bound points' measured p10 and p90 show the host's spread; each side's median and worst
    relative error."""
    if not isinstance(fit, LinearFit) or fit.floor_s is None:
        return None
    y = np.array([p.value for p in points], dtype=float)
    work = _design(points, fit.features) @ np.asarray(fit.coef, dtype=float)
    err = np.abs(np.maximum(work, fit.floor_s) - y) / y
    at_floor = work < fit.floor_s
    out: dict[str, float] = {"at_floor": int(at_floor.sum()), "above": int((~at_floor).sum())}
    for side, mask in (("at_floor", at_floor), ("above", ~at_floor)):
        if mask.any():
            out[f"{side}_median_rel_err"] = float(np.median(err[mask]))
            out[f"{side}_max_rel_err"] = float(err[mask].max())
    if at_floor.any():
        out["at_floor_p10_s"], out["at_floor_p90_s"] = (float(v) for v in np.percentile(y[at_floor], [10, 90]))
    return out


def describe_floor_split(split: dict[str, float] | None) -> str:
    """One line for a calibration log: where a floor fit's error lies (floor_split_stats)."""
    if split is None:
        return "no floor"
    parts = [f"{split['at_floor']} at the floor"]
    if split["at_floor"]:
        parts[0] += (f" (measured p10-p90 {1e3 * split['at_floor_p10_s']:.1f}-{1e3 * split['at_floor_p90_s']:.1f} ms,"
                     f" median err {100 * split['at_floor_median_rel_err']:.1f}%, worst {100 * split['at_floor_max_rel_err']:.1f}%)")
    parts.append(f"{split['above']} above it")
    if split["above"]:
        parts[1] += f" (median err {100 * split['above_median_rel_err']:.1f}%, worst {100 * split['above_max_rel_err']:.1f}%)"
    return ", ".join(parts)


def predict(fit: LinearFit | PiecewiseFit, inputs: dict[str, float]) -> float:
    from djinnsim.sim.costmodel import evaluate_fit

    return evaluate_fit(fit, inputs)[0]


def whole_fit_stats(fit: LinearFit | PiecewiseFit, points: Sequence[FitPoint]) -> dict[str, float]:
    pred = np.array([predict(fit, p.inputs) for p in points])
    return fit_stats(pred, np.array([p.value for p in points]))


def reach_cut(domain: dict[str, tuple[float, float]], var: str, cut: float) -> dict[str, tuple[float, float]]:
    """A piece's domain stretched along `var` to the cut that bounds it.

    The box of a piece's own points stops at its last grid value, short of the cut when the other
    side's points lie elsewhere in the other inputs (a decode piece above a cut at context 96 whose
    points start at 260). `sum_context` is batch x context, so where the box grows in batch or
    context it grows over the added slab too: without that a batch-1 step at context 100 would
    sit inside the piece in batch and context and outside it in sum_context. A box that reaches the
    cut already adds only its face at the cut, which may still lie past its points' sum_context: a
    piece below a cut at context 96 whose only point there is at batch 1 holds batch 64 at contexts
    69-95 in batch and context, and the piece above starts at 96, so sum_context covers the face too.
    A cut strictly inside the box changes nothing.
    """
    lo, hi = domain[var]
    if lo < cut < hi:
        return domain
    out = {**domain, var: (min(lo, cut), max(hi, cut))}
    if var in ("batch", "context") and {"batch", "context", "sum_context"} <= domain.keys():
        slab = {**domain, var: (cut, lo) if cut <= lo else (hi, cut)}
        (b_lo, b_hi), (c_lo, c_hi) = slab["batch"], slab["context"]
        s_lo, s_hi = domain["sum_context"]
        out["sum_context"] = (min(s_lo, b_lo * c_lo), max(s_hi, b_hi * c_hi))
    return out


def fit_piecewise(
    points: Sequence[FitPoint],
    features: Sequence[str],
    scale: Sequence[str],
    domain_vars: Sequence[str],
    split_vars: Sequence[str],
    *,
    max_pieces: int = 3,
    min_gain: float = 0.25,
    good_enough: float = 0.02,
    judged: Sequence[FitPoint] | None = None,
) -> LinearFit | PiecewiseFit:
    """One linear fit, or pieces split along `split_vars` where that cuts the worst relative error.

    `judged` (default: all `points`): the points whose worst relative error decides a split; the
    others join every fit but not that decision. The decode fit's batch-1 level spells, measured in
    other spells than the grid, would otherwise split it where their level differs from the grid's,
    which is no cost of context or batch (H200 runs 9 and 10: a step at context 96, 26.3 ms below
    and 33.3 ms above, where the grid alone is flat).

    A split is tried only if one piece misses some point by more than `good_enough`, and kept only
    if it lowers the maximum relative error by at least `min_gain` (a fraction), so smooth data
    stays one piece. Each piece's points must determine its coefficients (`determined`): repeats at
    one input (separate spells of the same step) measure the noise there, not a slope, and a piece
    at one batch cannot tell a per-batch cost from a fixed one. Every piece's domain reaches the
    cuts that bound it (`reach_cut`), so adjacent pieces share their boundary value and the domains
    leave no gap between measured grid values; the lower piece wins at the boundary.
    """
    judged = list(points) if judged is None else list(judged)
    single = fit_linear(points, features, scale, domain_vars)
    single_err = whole_fit_stats(single, judged)["max_rel_err"] if judged else 0.0
    if max_pieces < 2 or single_err <= good_enough:
        return single
    best: tuple[float, list[LinearFit]] | None = None
    min_points = len(features) + 1
    for var in split_vars:
        values = sorted({p.inputs[var] for p in points})
        for cut in values[:-1]:
            low = [p for p in points if p.inputs[var] <= cut]
            high = [p for p in points if p.inputs[var] > cut]
            if len(low) < min_points or len(high) < min_points or not (determined(low, features) and determined(high, features)):
                continue
            low_judged = [p for p in judged if p.inputs[var] <= cut]
            if not low_judged or len(low_judged) == len(judged):  # a piece the decision cannot see
                continue
            low_fit = fit_piecewise(
                low, features, scale, domain_vars, split_vars, max_pieces=max_pieces - 1, min_gain=min_gain,
                good_enough=good_enough, judged=low_judged,
            )
            high_fit = fit_linear(high, features, scale, domain_vars)
            low_pieces = low_fit.pieces if isinstance(low_fit, PiecewiseFit) else [low_fit]
            pieces = [p.model_copy(update={"domain": reach_cut(p.domain, var, cut)}) for p in [*low_pieces, high_fit]]
            err = whole_fit_stats(PiecewiseFit(pieces=pieces), judged)["max_rel_err"]
            if best is None or err < best[0]:
                best = (err, pieces)
    if best is None or best[0] > (1.0 - min_gain) * single_err:
        return single
    return PiecewiseFit(pieces=best[1])


SLOW_REGIME_RATIO = 0.5  # large sizes this much slower than the best rate below them form their own regime


def _fit_latency_rate(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    a = np.column_stack([np.ones_like(x), x])
    latency, per_byte = solve_relative(a, y)
    if per_byte <= 0:  # flat data (all sizes cost the same): take the best observed rate
        per_byte = float(np.min(y / x))
    return float(latency), float(per_byte)


def fit_bandwidth(nbytes: Sequence[float], seconds: Sequence[float]) -> tuple[Bandwidth, dict[str, float]]:
    """time = latency + bytes / rate, fitted on relative error; returns the Bandwidth and its fit error.

    If the largest sizes run at under half the best rate of the smaller ones (host buffers that are
    freshly mapped and page-fault on first touch do this), they get their own rate (`large_gbps`)
    above the largest size of the fast regime (`large_from_bytes`), instead of dragging one line.
    """
    order = np.argsort(np.asarray(nbytes, dtype=float))
    x = np.asarray(nbytes, dtype=float)[order]
    y = np.asarray(seconds, dtype=float)[order]
    rate = x / y
    split = len(x)
    for i in range(2, len(x)):
        if np.all(rate[i:] < SLOW_REGIME_RATIO * rate[:i].max()):
            split = i
            break
    latency, per_byte = _fit_latency_rate(x[:split], y[:split])
    extra = {}
    if split < len(x):
        large_per_byte = float(np.median((y[split:] - latency) / x[split:]))
        extra = {"large_from_bytes": int(x[split - 1]), "large_gbps": 1.0 / large_per_byte / 1e9}
    bw = Bandwidth(latency_s=latency, gbps=1.0 / per_byte / 1e9, **extra)
    pred = np.array([bw.time_s(v) for v in x])
    return bw, fit_stats(pred, y)


def loopback_cap_gbps(nbytes: Sequence[float], seconds: Sequence[float]) -> float:
    """The GB/s one loopback connection moves, as the simulator's cap: the throughput of the largest
    size measured (the plan's largest covers the largest message a backend ships). The cap only
    binds on large messages, where a fitted line's rate, pulled by the mid sizes, overstates it."""
    largest = int(np.argmax(np.asarray(nbytes, dtype=float)))
    return float(nbytes[largest]) / float(seconds[largest]) / 1e9


def describe_fit(fit: LinearFit | PiecewiseFit, unit: str = "s") -> list[str]:
    pieces = fit.pieces if isinstance(fit, PiecewiseFit) else [fit]
    lines = []
    for i, piece in enumerate(pieces):
        terms = " + ".join(f"{c:.4g}*{f}" if f != "1" else f"{c:.4g}" for c, f in zip(piece.coef, piece.features))
        if piece.floor_s is not None:
            terms = f"max({piece.floor_s:.4g}, {terms})"
        dom = ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in piece.domain.items())
        lines.append(
            f"piece {i + 1}/{len(pieces)}: {unit} = {terms}  [{dom}]  "
            f"r2={piece.r2:.4f} rmse={piece.rmse_s:.3g} {unit} max_rel_err={100 * (piece.max_rel_err or 0):.1f}% n={piece.n_samples}"
        )
    return lines
