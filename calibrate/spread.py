"""The spread calibration saw, from its raw samples, for the profile's `spread` section.

Every factor is a measurement over what the profile itself predicts for it (its fits, its
bandwidths, its load times), so a factor of 1.10 means "this sample ran 10% slower than the cost
model says". The simulator's prediction bands (sim.bands) draw from these lists. Samples come as
calibrate holds them in memory (numbers) or as read back from the samples CSV (strings).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from djinnsim.sim.costmodel import evaluate_fit
from djinnsim.sim.profile import LevelSource, Profile, Spread

from .profile_builder import LEVEL_ANCHOR_STAGES, decode_spells, quantile_sample

MAX_FACTORS = 64
COPY_STAGES = ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")
LOAD_TIERS = ("disk", "pageable", "pinned")


def _num(row: dict, key: str) -> float | None:
    value = row.get(key)
    return None if value in (None, "") else float(value)


def _groups(rows, stage: str) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["stage"] == stage and row.get("unit", "s") == "s":
            grouped[str(row["point"])].append(row)
    return grouped


def _ratio(measured: float, predicted: float) -> float | None:
    return measured / predicted if predicted > 0 and measured > 0 else None


def _kept(values) -> list[float]:
    return quantile_sample([v for v in values if v is not None], MAX_FACTORS)


def spell_factors(rows, profile: Profile, measured_by: Profile | None = None) -> list[float | None]:
    """Each batch-1 decode spell in `rows` (grid points at batch 1, cold_shapes' warm passes, Exp 2.1
    runs, timeslice_mp's lone process): its median step over `profile`'s decode fit at its context.
    `measured_by`: the profile of the calibration that ran them (for timeslice_mp's context)."""
    timeslice = (measured_by or profile).timeslice_mp
    context = None if timeslice is None else float(np.mean(timeslice.context_tokens))
    return [_ratio(spell.value, evaluate_fit(profile.decode_step, spell.inputs)[0])
            for spell in decode_spells(rows, ("decode", *LEVEL_ANCHOR_STAGES, "timeslice_mp"), timeslice_context=context)]


def decode_levels(rows, profile: Profile, pooled: list[float | None] = ()) -> list[float]:
    """This calibration's batch-1 spells over its decode fit, with `pooled`: those of earlier
    calibrations of the same GPU and model over the same fit (spell_factors of their samples)."""
    return _kept(spell_factors(rows, profile) + list(pooled))


def decode_residuals(rows, profile: Profile) -> list[float]:
    out = []
    for group in _groups(rows, "decode").values():
        batch = _num(group[0], "batch") or 1.0
        context = float(np.median([_num(r, "context") or 0.0 for r in group]))
        fitted, _ = evaluate_fit(profile.decode_step, {"batch": batch, "context": context, "sum_context": batch * context})
        out.append(_ratio(float(np.median([_num(r, "value") for r in group])), fitted))
    return _kept(out)


def prefill_residuals(rows, profile: Profile) -> list[float]:
    out = []
    for group in _groups(rows, "prefill").values():
        batch, prompt = _num(group[0], "batch") or 1.0, _num(group[0], "prompt_tokens") or 0.0
        fitted, _ = evaluate_fit(profile.prefill, {"prompt_tokens": prompt, "batch": batch, "context": 0.0,
                                                   "tokens": batch * prompt})
        out.append(_ratio(float(np.median([_num(r, "value") for r in group])), fitted))
    return _kept(out)


def load_factors(rows, profile: Profile) -> list[float]:
    """Lone loads (one at a time) of each tier over fixed_s + bytes / gbps."""
    out = []
    for tier in LOAD_TIERS:
        spec = profile.weight_load.get(tier)
        if spec is None:
            continue
        for group in _groups(rows, f"weights_load_{tier}").values():
            for row in group:
                if (_num(row, "concurrent") or 1.0) != 1.0 or not _num(row, "nbytes"):
                    continue
                out.append(_ratio(_num(row, "value"), spec.fixed_s + _num(row, "nbytes") / (spec.gbps * 1e9)))
    return _kept(out)


def copy_factors(rows, profile: Profile) -> list[float]:
    out = []
    for name in COPY_STAGES:
        bandwidth = getattr(profile, name)
        for group in _groups(rows, f"copy_{name}").values():
            out += [_ratio(_num(r, "value"), bandwidth.time_s(_num(r, "nbytes") or 0.0)) for r in group]
    return _kept(out)


def loads_mp_factors(rows, profile: Profile, pooled: list[Profile] = ()) -> dict[str, list[float]] | None:
    """Per tier, k processes loading at once (k >= 2): each of this calibration's runs, its wall over
    the median wall at its k (`rows`: its samples), and each `pooled` calibration's aggregate at the
    same tier and k over this profile's (a time factor: theirs slower gives more than 1). None when
    the profile measured no k-process loads."""
    if not profile.loads_mp:
        return None
    out: dict[str, list[float]] = {}
    for tier, loads in profile.loads_mp.items():
        walls = _groups(rows, f"loads_mp_{tier}")
        factors: list[float | None] = []
        for k in sorted(k for k in loads.aggregate_gbps if k >= 2):
            values = [_num(r, "value") for r in walls.get(f"k{k}_wall", [])]
            values = [v for v in values if v is not None and np.isfinite(v) and v > 0]
            factors += [_ratio(v, float(np.median(values))) for v in values] or [1.0]
            for other in pooled:
                theirs = other.loads_mp.get(tier)
                if theirs is not None and k in theirs.aggregate_gbps:
                    factors.append(_ratio(loads.aggregate_gbps[k], theirs.aggregate_gbps[k]))
        kept = _kept(factors)
        if kept:
            out[tier] = kept
    return out or None


def timeslice_factors(profile: Profile, pooled: list[Profile] = ()) -> list[float] | None:
    """The spread of timeslice_mp's g: each process's median step at each saturated k over k g (the
    processes of one calibration), and each `pooled` calibration's g over this one's (the GPU's own
    time between calibrations: 8.01-8.16 ms in H200 runs 1-7). None without g."""
    measured = profile.timeslice_mp
    if measured is None or measured.gpu_step_s is None:
        return None
    g = measured.gpu_step_s
    factors: list[float | None] = []
    for point in measured.points:
        if point.processes >= 2 and point.processes in measured.saturated_k:
            factors += [_ratio(step, point.processes * g) for step in point.per_process_step_s_p50]
    for other in pooled:
        theirs = other.timeslice_mp
        if theirs is not None and theirs.gpu_step_s is not None:
            factors.append(_ratio(theirs.gpu_step_s, g))
    return _kept(factors) or None


def _beyond_server(end_to_end: dict, prefix: str) -> float | None:
    """A composition row's median step beyond the server's compute and copies (the copies where
    recorded: the first H200 calibration kept the compute only, a few ms of hundreds)."""
    measured, compute = end_to_end.get(f"{prefix}.measured_s"), end_to_end.get(f"{prefix}.server_compute_s")
    if measured is None or compute is None:
        return None
    beyond = measured - compute - sum(end_to_end.get(f"{prefix}.server_{k}", 0.0) for k in ("h2d_s", "d2h_s"))
    return beyond if beyond > 0 else None


def path_factors(rows, profile: Profile, pooled: list[Profile] = ()) -> list[float] | None:
    """The loopback path's spread, on the composition stage's partially_aware steps beyond the
    server's compute and copies (the link over loopback: connection, wire at the cap, host path):
    each repeat's over the median repeat's at each message size, and each `pooled` calibration's
    median over this one's at each size both ran (the path moves between calibrations: H200 runs 6
    and 7). None without such rows (older calibrations)."""
    e = profile.end_to_end
    factors: list[float | None] = []
    for point, group in _groups(rows, "composition").items():
        if not point.startswith("partially_aware_L"):
            continue
        prefix = f"composition.partially_aware.{point.rsplit('_', 1)[1]}"
        beyond = _beyond_server(e, prefix)
        values = [_num(r, "value") for r in group]
        values = [v for v in values if v is not None and np.isfinite(v)]
        if beyond is None or not values:
            continue
        server = e[f"{prefix}.measured_s"] - beyond  # the medians': the repeats' own server times are not kept
        factors += [_ratio(v - server, float(np.median(values)) - server) for v in values]
        for other in pooled:
            theirs = _beyond_server(other.end_to_end, prefix)
            if theirs is not None:
                factors.append(_ratio(theirs, beyond))
    kept = _kept(factors)
    return kept or None


def spread_from_samples(profile: Profile, rows, left_out: tuple[str, ...] = (),
                        level_from: list[tuple[str, str, Profile, list]] = ()) -> Spread:
    """The profile's spread from the raw samples its fits came from (`rows` without `left_out` stages).
    `level_from`: (path, samples sha256, profile, samples) of other calibrations whose batch-1 spells join
    decode_level: one calibration may sit at one launch-bound level throughout. `left_out` holds this
    calibration's own stages out (e.g. its Exp 2.1 runs, minutes from the real ones judged); the other
    calibrations' spells of those stages stay, runs of other sessions that no judged run shares."""
    rows = [row for row in rows if row["stage"] not in left_out]
    pooled = [spell_factors(other_rows, profile, other)
              for _, _, other, other_rows in level_from]
    others = [other for _, _, other, _ in level_from]
    borrowed = profile.metadata.loads_from  # its k-process loads are this profile's own samples here
    load_others = [other for _, sha, other, _ in level_from if borrowed is None or sha != borrowed.samples_sha256]
    return Spread(
        decode_level=decode_levels(rows, profile, [f for factors in pooled for f in factors]),
        decode_residual=decode_residuals(rows, profile),
        prefill_residual=prefill_residuals(rows, profile),
        weight_load=load_factors(rows, profile),
        copies=copy_factors(rows, profile),
        loads_mp=loads_mp_factors(rows, profile, load_others),
        loopback_path=path_factors(rows, profile, others),
        timeslice_gpu=timeslice_factors(profile, load_others),
        left_out=sorted(left_out),
        source="calibrate.spread: raw samples over the profile's own predictions",
        level_sources=[LevelSource(path=path, samples_sha256=sha, spells=sum(f is not None for f in factors))
                       for (path, sha, _, _), factors in zip(level_from, pooled)],
    )


LEVEL_POINTS = ("fit", "median")


def with_spread(profile: Profile, rows, left_out: tuple[str, ...] = (),
                level_from: list[tuple[str, str, Profile, list]] = (), level_point: str = "fit") -> Profile:
    """The profile with its spread. `level_point` "median": its point moved to the median of the
    batch-1 spell levels the bands draw (`at_median_level`); "fit": the point at the fits."""
    new = profile.model_copy(update={"spread": spread_from_samples(profile, rows, left_out, level_from)})
    return at_median_level(new, rows, left_out, level_from) if level_point == "median" else new


def at_median_level(profile: Profile, rows, left_out: tuple[str, ...] = (),
                    level_from: list[tuple[str, str, Profile, list]] = ()) -> Profile:
    """The profile with its passes at the median m of its spread's decode_level (sim.bands.level_scaled:
    the decode step x m at every batch, prefill and cached-prefill host floors x m) and its spread
    taken again over that point: each spell's factor becomes f / m, each grid residual over the new
    fits, so a band draw f / m of the point m x fit is f x fit, where it was. The decode step is
    scaled whole: calibrate's decode grid is launch-bound from batch 1 to 64 (on the H200 its batch-64
    steps sit in the batch-1 range, and residuals show no trend with batch), and bands scale the whole
    fit by the level drawn, so a batch-1-only shift would move the bands at larger batches."""
    from djinnsim.errors import DjinnsimError
    from djinnsim.sim.bands import level_scaled

    levels = profile.spread.decode_level if profile.spread is not None else []
    if not levels:
        raise DjinnsimError("--level-point median: the profile's spread has no batch-1 decode spells "
                            "(decode_level) to take a level from")
    median = float(np.median(levels))
    scaled = level_scaled(profile, median)
    spread = spread_from_samples(scaled, rows, left_out, level_from)
    return scaled.model_copy(update={"spread": spread.model_copy(update={"point_level": median})})
