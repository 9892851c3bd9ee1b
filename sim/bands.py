"""Prediction bands: the same point simulated under K draws of the spread calibration saw.

A point estimate says nothing about how far a real run may land from it on a machine whose
launch-bound decode level drifts by tens of percent between spells. The profile's `spread`
section (sim.profile.Spread) holds measured / predicted factors per cost category; each band draw
takes one factor per category (decode step, prefill with or without a cached context, weight load,
host<->device copy), scales the profile's cost functions by them, and simulates the point again
with its own random streams. The copy factor scales the kv_swaps stage's fits too. Where the
copies stage saw pageable device-to-host copies in two regimes (warm heap pages, fresh
page-faulting ones), a draw also picks the regime of a pageable KV swap-out's host pages
(Factors.kv_fresh). P10 and P90 over the draws, per summary metric, are the band.

Draw d of a point takes its factors from SeedSequence([seed, key, BAND_TAG, d]) and its
simulation streams from point_seed(seed, point, BAND_REPEAT_BASE + d), where `key` leaves the
backend out: backends at one model, GPU, link and N see the same factors (common random numbers),
and the draws never reuse a validation repeat's streams. Same scenario + seed + K: same bands.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from djinnsim.errors import DjinnsimError

from .costmodel import CostModel, ProfileCostModel
from .profile import LinearFit, PiecewiseFit, Profile, Spread, WeightLoad

BAND_QUANTILES = (10.0, 90.0)
BAND_TAG = 0xBA9D
BAND_REPEAT_BASE = 1 << 20
# Share of band draws whose pageable KV swap-outs meet fresh host pages where the size leaves the
# regime open: nothing measured says which regime a process's allocator will be in, so either, alike
# (P10 and P90 over the draws then reach toward the warm and the fresh charge).
KV_FRESH_SHARE = 0.5
# Summary fields that describe the point rather than measure it: no band.
_NOT_METRICS = {"index", "link_gbps", "n_agents", "capacity_bytes", "events", "records", "memory_bound_agents"}


@dataclass(frozen=True)
class Factors:
    """Multipliers of each cost category's time (1.0: as the profile predicts)."""

    decode: float = 1.0
    prefill: float = 1.0
    load: float = 1.0
    copy: float = 1.0
    # a pageable KV swap-out's host pages all fresh (page-faulting), where the tensor size leaves the
    # regime open (ProfileCostModel.kv_swap_bandwidth); False: the regime the copies stage saw
    kv_fresh: bool = False
    # the loopback host path (network.loopback_path, or the series rate where it is unset)
    path: float = 1.0
    # per tier, k processes loading at once; a tier absent here takes `load`
    loads_mp: tuple[tuple[str, float], ...] = ()
    # the GPU's own time per step once k processes saturate it (timeslice_mp's g)
    timeslice: float = 1.0


def draw_factors(spread: Spread, rng: np.random.Generator) -> Factors:
    """One factor per category, each drawn from its measured list (an empty list gives 1.0).
    The decode step takes the level of one batch-1 spell: a real run sits at one launch-bound level
    for seconds at a time, so the band spans the spells' spread, not that of the grid's residuals
    (those stand in only where a profile records no spell)."""

    def pick(values: list[float]) -> float:
        return float(rng.choice(np.asarray(values, dtype=float))) if values else 1.0

    factors = Factors(decode=pick(spread.decode_level or spread.decode_residual), prefill=pick(spread.prefill_residual),
                      load=pick(spread.weight_load), copy=pick(spread.copies))
    # drawn after those, so the factors above are those of profiles without two pageable regimes
    factors = replace(factors, kv_fresh=bool(rng.random() < KV_FRESH_SHARE))
    # then the later categories: a spread without them draws nothing more (its bands unchanged)
    loads = tuple((tier, pick(values)) for tier, values in sorted((spread.loads_mp or {}).items()) if values)
    factors = replace(factors, path=pick(spread.loopback_path or []), loads_mp=loads)
    return replace(factors, timeslice=pick(spread.timeslice_gpu or []))


def _scale_fit(fit: LinearFit | PiecewiseFit, factor: float) -> LinearFit | PiecewiseFit:
    if isinstance(fit, PiecewiseFit):
        return PiecewiseFit(pieces=[_scale_fit(p, factor) for p in fit.pieces])
    floor = None if fit.floor_s is None else fit.floor_s * factor
    return fit.model_copy(update={"coef": [c * factor for c in fit.coef], "floor_s": floor})


def _scale_rate(spec, factor: float):
    """A Bandwidth or WeightLoad whose every time is `factor` times longer."""
    if isinstance(spec, WeightLoad):
        return WeightLoad(fixed_s=spec.fixed_s * factor, gbps=spec.gbps / factor,
                          aggregate_gbps={k: v / factor for k, v in spec.aggregate_gbps.items()})
    return spec.model_copy(update={"latency_s": spec.latency_s * factor, "gbps": spec.gbps / factor,
                                   "large_gbps": None if spec.large_gbps is None else spec.large_gbps / factor})


def _scale_path(network, factor: float):
    """The network with its loopback link `factor` times slower: the host path (or the series rate)
    and the loopback cap, whose time beyond the server the spread's factors measure; the line rate
    and the per-message costs as measured."""
    if factor == 1.0:
        return network
    path = None if network.loopback_path is None else [(b, s * factor) for b, s in network.loopback_path]
    paced = None if network.paced_path is None else [(g, s * factor) for g, s in network.paced_path]
    serial = None if network.loopback_serial_gbps is None else network.loopback_serial_gbps / factor
    cap = None if network.loopback_gbps is None else network.loopback_gbps / factor
    return network.model_copy(update={"loopback_path": path, "paced_path": paced, "loopback_serial_gbps": serial,
                                      "loopback_gbps": cap})


def scale_profile(profile: Profile, f: Factors) -> Profile:
    """The profile with each category's cost functions scaled by its factor (domains unchanged);
    prefill on a cached context is a prefill, scaled by the prefill factor."""
    loads = dict(f.loads_mp)
    cached = {} if profile.cached_prefill is None else {"cached_prefill": _scale_fit(profile.cached_prefill, f.prefill)}
    return profile.model_copy(update={
        "decode_step": _scale_fit(profile.decode_step, f.decode),
        "prefill": _scale_fit(profile.prefill, f.prefill),
        **cached,
        "weight_load": {tier: _scale_rate(spec, f.load) for tier, spec in profile.weight_load.items()},
        # k processes loading at once: their tier's own factor where the spread has one, else the lone
        # load's (the cost model reads their aggregates from here)
        "loads_mp": {tier: spec.model_copy(update={"aggregate_gbps": {k: v / loads.get(tier, f.load)
                                                                      for k, v in spec.aggregate_gbps.items()}})
                     for tier, spec in profile.loads_mp.items()},
        "network": _scale_path(profile.network, f.path),
        **({"timeslice_mp": profile.timeslice_mp.model_copy(
            update={"gpu_step_s": profile.timeslice_mp.gpu_step_s * f.timeslice})}
           if f.timeslice != 1.0 and profile.timeslice_mp is not None and profile.timeslice_mp.gpu_step_s else {}),
        **{name: _scale_rate(getattr(profile, name), f.copy)
           for name in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")},
        "kv_swaps": None if profile.kv_swaps is None else profile.kv_swaps.model_copy(
            update={"fits": {k: _scale_rate(v, f.copy) for k, v in profile.kv_swaps.fits.items()}}),
    })


def _scale_level(fit: LinearFit | PiecewiseFit, factor: float) -> LinearFit | PiecewiseFit:
    """A pass fit with its launch-bound level `factor` times longer: a fit with a host floor
    (max(floor, GPU work)) moves its floor only, the GPU's work stays; an additive fit, whose terms
    mix the two, scales whole."""
    if isinstance(fit, PiecewiseFit):
        return PiecewiseFit(pieces=[_scale_level(p, factor) for p in fit.pieces])
    if fit.floor_s is not None:
        return fit.model_copy(update={"floor_s": fit.floor_s * factor})
    return _scale_fit(fit, factor)


def level_scaled(profile: Profile, factor: float) -> Profile:
    """The profile with every pass it times (decode step, prefill, prefill on a cached context) at a
    launch-bound level `factor` times longer (`_scale_level`), everything else as measured."""
    update = {"decode_step": _scale_fit(profile.decode_step, factor), "prefill": _scale_level(profile.prefill, factor)}
    if profile.cached_prefill is not None:
        update["cached_prefill"] = _scale_level(profile.cached_prefill, factor)
    return profile.model_copy(update=update)


def spread_of(cost: CostModel) -> tuple[Profile, Spread]:
    """The profile and spread behind a cost model, or a one-line error saying why there is none."""
    profile = getattr(cost, "profile", None)
    if not isinstance(cost, ProfileCostModel) or profile is None:
        raise DjinnsimError(f"bands need a measured profile; the {cost.source} cost model has no spread to draw from")
    if profile.spread is None:
        raise DjinnsimError("bands need the profile's spread section, which this profile lacks: "
                            "re-fit it from its samples (djinnsim calibrate --refit PROFILE)")
    return profile, profile.spread


def banded_cost(cost: CostModel, f: Factors) -> ProfileCostModel:
    """The cost model of a measured (or transferred) profile with its costs scaled by `f`."""
    if not isinstance(cost, ProfileCostModel):
        raise DjinnsimError(f"bands need a measured profile; the {cost.source} cost model has no spread to draw from")
    return ProfileCostModel(scale_profile(cost.profile, f), cost.model,
                            pageable_swap_out="fresh" if f.kv_fresh else "expected")


def factor_rng(seed: int, point, draw: int) -> np.random.Generator:
    key = f"{point.model.model_id}|{point.gpu.key}|{point.link.gbps:g}|{point.link.rtt_ms:g}|{point.n_agents}"
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode()), BAND_TAG, draw]))


def draw_results(scenario, point, cost: CostModel, seed: int, k: int) -> list:
    """K simulations of `point`, draw d with the factors and streams of draw d."""
    from .run import point_seed
    from .simulate import simulate_point

    _, spread = spread_of(cost)
    out = []
    for d in range(k):
        scaled = banded_cost(cost, draw_factors(spread, factor_rng(seed, point, d)))
        out.append(simulate_point(scenario, point, scaled, point_seed(seed, point, BAND_REPEAT_BASE + d)))
    return out


def flatten(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a point summary under dotted keys (booleans and descriptive fields left out)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _NOT_METRICS:
            if not (isinstance(value, float) and math.isnan(value)):
                out[name] = float(value)
    return out


def band(values: list[float]) -> list[float]:
    lo, hi = np.percentile(np.asarray(values, dtype=float), BAND_QUANTILES)
    return [float(lo), float(hi)]


def bands_of(draw_summaries: list[dict[str, Any]], decimals: int = 4) -> dict[str, list[float]]:
    """P10 and P90 over the draws of every metric all draws have."""
    flat = [flatten(s) for s in draw_summaries]
    keys = [k for k in flat[0] if all(k in f for f in flat)] if flat else []
    return {k: [round(v, decimals) for v in band([f[k] for f in flat])] for k in keys}


def scenario_bands(scenario, points: list, cost_for: Callable, seed: int, k: int, summarize: Callable,
                   progress: Callable | None = None) -> list[dict[str, list[float]]]:
    """Per point, the P10-P90 band of every summary metric over `k` draws; `summarize(PointResult)`
    is the summary.json entry of one simulated point."""
    if k < 2:
        raise DjinnsimError(f"bands need at least 2 draws, not {k}")
    out = []
    for point in points:
        out.append(bands_of([summarize(r) for r in draw_results(scenario, point, cost_for(point), seed, k)]))
        if progress is not None:
            progress(len(out), len(points), point.label)
    return out


HEADLINE = {
    "decode": (("decode.mean_per_token_ms", "mean ms/token"), ("decode.p99_per_token_ms", "P99 ms/token")),
    "agents": (("agents.pooled.mean_ms", "mean ms/phase"), ("agents.pooled.p99_ms", "P99 ms/phase")),
}


def bands_markdown(summaries: list[dict[str, Any]], workload: str, k: int, cost_models: list[str]) -> str:
    """bands.md: each point's headline latencies, point estimate beside the P10-P90 band, and the
    band's half-width relative to its middle; summary.json holds the band of every metric."""
    heads = HEADLINE["agents" if workload == "agents" else "decode"]
    lines = [f"# Prediction bands: P10-P90 over {k} draws of the profile's spread", "",
             "Each draw scales the decode step, prefill, weight load and copy costs by one factor drawn from "
             "what calibration measured over what the profile predicts (profile `spread` section), and "
             "simulates the point with its own random streams. Cost models: " + "; ".join(sorted(set(cost_models))),
             "", "| point | " + " | ".join(f"{h} | P10-P90 | half-width" for _, h in heads) + " |",
             "|---|" + "---|---|---|" * len(heads)]
    for s in summaries:
        flat, bands = flatten(s), s.get("bands_p10_p90", {})
        cells = []
        for key, _ in heads:
            lo_hi = bands.get(key)
            value = flat.get(key)
            cells.append("-" if value is None else f"{value:.4g}")
            if lo_hi is None:
                cells += ["-", "-"]
            else:
                mid = (lo_hi[0] + lo_hi[1]) / 2
                cells += [f"{lo_hi[0]:.4g} - {lo_hi[1]:.4g}",
                          f"{100 * (lo_hi[1] - lo_hi[0]) / 2 / mid:.1f}%" if mid > 0 else "-"]
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
