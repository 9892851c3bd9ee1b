"""Turn measured stage results into fits and a `djinnsim.sim.profile.Profile`."""

from __future__ import annotations

from typing import Any

import numpy as np
from djinnsim.errors import DjinnsimError
from djinnsim.sim.profile import (
    SCHEMA_VERSION,
    KvSwaps,
    LinearFit,
    Memory,
    Metadata,
    PiecewiseFit,
    Profile,
)

from .fitting import (
    DECODE_FEATURES,
    DECODE_SCALE,
    PREFILL_FEATURES,
    PREFILL_SCALE,
    FitPoint,
    fit_floor_max,
    fit_linear,
    fit_piecewise,
)
from .plan import EXP21_NEW_TOKENS, EXP21_PROMPT_TOKENS

MAX_JITTER_SAMPLES = 512


# The GPU's work in a prefill: its constant is reading the weights (plus any fixed GPU work), so it
# moves with HBM where a transfer splits it (the host's launch time is the fit's floor, which stays).
PREFILL_GPU_SCALE = ["mixed", "compute", "compute"]


def fit_prefill(points: list[FitPoint]) -> LinearFit:
    """Prefill time over batch x prompt: max(host launch floor, GPU polynomial in tokens), one piece
    (fitting.fit_floor_max). The domain pins context to 0: cached-context prefill is its own fit."""
    fit = fit_floor_max(points, PREFILL_FEATURES, PREFILL_GPU_SCALE, ["prompt_tokens", "batch"])
    if fit.floor_s is None:  # no floor: the additive form, whose constant is the host's
        fit = fit.model_copy(update={"scale": list(PREFILL_SCALE)})
    return _with_domain(fit, {"context": (0.0, 0.0)})


# Stages whose runs are batch-1 decode spells: steps in a row at one batch and a narrow context
# range, on one model in one process. A launch-bound step keeps one host speed for seconds and then
# flips, so each spell's median step is one draw of that level.
LEVEL_ANCHOR_STAGES = ("exp21_step", "warm_decode")  # measured before the decode fit, beside the grid


def decode_spells(rows, stages=("decode", *LEVEL_ANCHOR_STAGES), timeslice_context: float | None = None) -> list[FitPoint]:
    """Every batch-1 decode spell in `rows` from `stages`, as one point at its median context valued
    at its median step: a decode grid point at batch 1, the warm passes of a cold_shapes context,
    an Exp 2.1 run, and (when `timeslice_context` gives the context its rows do not record) the lone
    process of timeslice_mp."""
    spells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        stage = row["stage"]
        if stage not in stages or row.get("unit", "s") != "s" or float(row.get("batch") or 1) != 1.0:
            continue
        if stage == "timeslice_mp":
            if timeslice_context is None or float(row.get("concurrent") or 1) != 1.0:
                continue
            context = timeslice_context
        else:
            context = float(row.get("context") or 0)
        spells.setdefault((stage, str(row["point"])), []).append((context, float(row["value"])))
    points = []
    for steps in spells.values():
        context = float(np.median([c for c, _ in steps]))
        points.append(FitPoint({"batch": 1.0, "context": context, "sum_context": context},
                               float(np.median([v for _, v in steps]))))
    return points


def decode_anchor_points(rows) -> list[FitPoint]:
    """Batch-1 spells that join the decode grid in the decode fit: Exp 2.1's kept runs and the
    cold_shapes stage's warm passes. A quick grid point holds ten steps, so it may sit in one host
    speed only; these spells, measured at other times, anchor the batch-1 level with it."""
    return decode_spells(rows, LEVEL_ANCHOR_STAGES)


def fit_decode(points: list[FitPoint], anchors: list[FitPoint] = ()) -> LinearFit | PiecewiseFit:
    """The decode step over the grid `points` and the batch-1 level `anchors` (decode_anchor_points):
    both fitted, the grid's errors alone deciding where the fit splits."""
    return fit_piecewise([*points, *anchors], DECODE_FEATURES, DECODE_SCALE, ["batch", "context", "sum_context"],
                         ["batch", "context"], judged=points)


def _with_domain(fit, extra: dict[str, tuple[float, float]]):
    if isinstance(fit, PiecewiseFit):
        return PiecewiseFit(pieces=[_with_domain(p, extra) for p in fit.pieces])
    return fit.model_copy(update={"domain": {**fit.domain, **extra}})


def fit_workspace(points: list[FitPoint], features: list[str], scale: list[str], domain_vars: list[str]) -> LinearFit | None:
    points = [p for p in points if p.value > 0]
    if len(points) < len(features) + 1:
        return None
    return fit_linear(points, features, scale, domain_vars)


def quantile_sample(values: list[float], n: int = MAX_JITTER_SAMPLES) -> list[float]:
    """At most n values with the same distribution: the sorted data itself, or its n evenly spaced quantiles."""
    arr = np.sort(np.asarray(values, dtype=float))
    if len(arr) <= n:
        return [float(v) for v in arr]
    return [float(v) for v in np.quantile(arr, (np.arange(n) + 0.5) / n)]


def exp21_prediction(cost) -> dict[str, float]:
    """What a cost model predicts for Exp 2.1: one prefill (first token), then 49 one-token steps."""
    prefill = cost.prefill_s(EXP21_PROMPT_TOKENS, 1)
    steps = [cost.decode_step_s(1, EXP21_PROMPT_TOKENS + t) for t in range(EXP21_NEW_TOKENS - 1)]
    return {"prefill_s": prefill, "step_s_mean": float(np.mean(steps)), "total_s": prefill + float(sum(steps))}


def build_profile(r: dict[str, Any], metadata: Metadata, *, partial: bool = False) -> Profile:
    """Assemble a profile from stage results `r`; raises DjinnsimError naming the missing stages."""
    needed = ["copies", "serde", "network", "prefill", "decode", "memory_start", "weight_bytes"]
    missing = [k for k in needed if k not in r]
    if missing:
        raise DjinnsimError(f"not enough measured to write a profile (missing: {', '.join(missing)})")
    prefill_points = r["prefill"]["points"]
    decode_points = r["decode"]["points"]
    if len(prefill_points) < len(PREFILL_FEATURES) or len(decode_points) < len(DECODE_FEATURES):
        raise DjinnsimError(
            f"too few grid points to fit ({len(prefill_points)} prefill, {len(decode_points)} decode)"
        )
    if "fits" not in r:
        r["fits"] = {"prefill": fit_prefill(prefill_points), "decode": fit_decode(decode_points)}
    if "exp21" in r:
        jitter_decode = r["exp21"]["jitter"]
    else:  # interrupted before Exp 2.1: no step-time distribution was measured
        jitter_decode = [1.0]
        metadata = metadata.model_copy(update={"notes": [*metadata.notes, "no Exp 2.1 runs measured: jitter_decode is [1.0]"]})
    mem = r["memory_start"]
    memory = Memory(
        total_bytes=mem["total_bytes"],
        free_at_start_bytes=mem["free_at_start_bytes"],
        weight_bytes=r["weight_bytes"],
        kv_bytes_per_token=r["prefill"].get("kv_bytes_per_token") or r["kv_bytes_per_token_spec"],
        context_bytes_per_process=mem["context_bytes"],
        prefill_workspace=fit_workspace(r["prefill"]["workspace"], PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"]),
        decode_workspace=fit_workspace(r["decode"]["workspace"], DECODE_FEATURES, DECODE_SCALE, ["batch", "context", "sum_context"]),
        oom_probe_copies=r.get("oom_copies"),
    )
    copies = r["copies"]
    return Profile(
        schema_version=SCHEMA_VERSION,
        metadata=metadata,
        prefill=r["fits"]["prefill"],
        decode_step=r["fits"]["decode"],
        jitter_decode=quantile_sample(jitter_decode),
        jitter_decode_sequence=[float(v) for v in r["exp21"]["jitter"]] if "exp21" in r else [],
        jitter_prefill=quantile_sample(r["prefill"]["jitter"] or [1.0]),
        h2d_pinned=copies["h2d_pinned"],
        h2d_pageable=copies["h2d_pageable"],
        d2h_pinned=copies["d2h_pinned"],
        d2h_pageable=copies["d2h_pageable"],
        serialize=r["serde"]["serialize"],
        deserialize=r["serde"]["deserialize"],
        weight_load=r.get("weights", {}).get("loads", {}),
        network=r["network"],
        memory=memory,
        end_to_end=dict(r.get("end_to_end", {})),
        cold_shapes=r.get("cold_shapes"),
        loads_mp=r.get("loads_mp", {}),
        timeslice_mp=r.get("timeslice_mp"),
        cached_prefill=r.get("cached_prefill", {}).get("fit"),
        kv_swaps=KvSwaps(**r["kv_swaps"]) if "kv_swaps" in r else None,
    )
