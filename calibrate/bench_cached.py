"""Prefill on top of a cached context: new tokens x cached context x batch (stage `cached_prefill`).

Djinn's REFLECT phase prefills 16-24 new tokens after a kept context of ~120 tokens; the prefill
grid starts every prompt from an empty cache. Here the context is the model's own prefill of random
tokens (a real past_key_values of the model's cache class), then each count of new tokens runs on
top of it and the cache is cut back to the context (untimed) before the next pass.
"""

from __future__ import annotations

import time

from djinnsim.sim.profile import LinearFit

from .fitting import FitPoint, describe_floor_split, fit_floor_max, floor_split_stats
from .modeling import cache_from_tensors, cache_tensors, cut_cache, forward, random_ids
from .session import Session, is_oom
from .timer import Timing

# time = max(floor, c0 + c1 b p + c2 b p^2 + c3 b p c + c4 b c): the host's launches overlap the GPU's
# work (weights, the new tokens' matmuls and their attention among themselves, their attention over
# the context, reading the context's KV), so a pass takes the longer of the two.
CACHED_PREFILL_FEATURES = ["1", "tokens", "tokens_sq", "tokens_ctx", "sum_context"]
CACHED_PREFILL_SCALE = ["mixed", "compute", "compute", "compute", "memory"]
CACHED_PREFILL_DOMAIN = ["prompt_tokens", "batch", "context"]


def cached_prefill_points(plan, max_position: int) -> list[tuple[int, int, int]]:
    """(batch, context, new tokens), in that order: one cache per (batch, context) serves every count."""
    return [(b, c, p) for b in plan.cached_prefill_batches for c in plan.cached_prefill_contexts
            for p in plan.cached_prefill_tokens if c + p < max_position]


def fit_cached_prefill(points: list[FitPoint]) -> LinearFit | None:
    """max(host launch floor, GPU work) in one piece (fitting.fit_floor_max); None with too few points."""
    if len(points) <= len(CACHED_PREFILL_FEATURES):
        return None
    return fit_floor_max(points, CACHED_PREFILL_FEATURES, CACHED_PREFILL_SCALE, CACHED_PREFILL_DOMAIN)


def _restore(cache, context: int, saved):
    """The cache cut back to its first `context` tokens (rebuilt from a copy where it cannot crop)."""
    if context == 0:
        return None
    cut = cut_cache(cache, context)
    return cut if cut is not None else cache_from_tensors([(k.clone(), v.clone()) for k, v in saved])


def run_cached_prefill(s: Session) -> dict:
    """Time each grid point (one warm-up pass, then `cached_prefill_repeat`); returns points and the fit."""
    import torch

    plan = s.plan
    started = time.perf_counter()
    grid = cached_prefill_points(plan, s.spec.max_position_embeddings)
    points: list[FitPoint] = []
    skipped = 0
    current, cache, saved = None, None, None
    with torch.inference_mode():
        for n, (batch, context, new) in enumerate(grid):
            if time.perf_counter() - started > plan.cached_prefill_budget_s:
                skipped = len(grid) - n
                s.notes.append(f"cached_prefill: time budget {plan.cached_prefill_budget_s:.0f} s spent, {skipped} of {len(grid)} points not measured")
                break
            try:
                if current != (batch, context):
                    cache = saved = None
                    s.free()
                    if context:
                        ids = random_ids(s.spec, batch, context, "cpu", seed=context * 13 + batch).to(s.device)
                        _, cache = forward(s.model, ids)
                        saved = None if hasattr(cache, "crop") else [(k.clone(), v.clone()) for k, v in cache_tensors(cache)]
                    current = (batch, context)
                ids = random_ids(s.spec, batch, new, "cpu", seed=new * 7 + batch).to(s.device)
                timing = Timing()
                for rep in range(1 + plan.cached_prefill_repeat):  # the first pass warms the shape up
                    s.sync()
                    t0 = time.perf_counter()
                    forward(s.model, ids, cache)
                    s.sync()
                    if rep:
                        timing.samples_s.append(time.perf_counter() - t0)
                    cache = _restore(cache, context, saved)
            except (RuntimeError, MemoryError) as exc:
                if not is_oom(exc):
                    raise
                s.log.add("cached_prefill", f"b{batch}_c{context}_p{new}", float("nan"), "oom",
                          batch=batch, context=context, prompt_tokens=new)
                current, cache, saved = None, None, None
                s.free()
                continue
            s.log.add_timing("cached_prefill", f"b{batch}_c{context}_p{new}", timing.samples_s,
                             batch=batch, context=context, prompt_tokens=new)
            points.append(FitPoint({"prompt_tokens": new, "batch": batch, "context": context}, timing.p50))
            s.advance(1)
    cache = saved = None
    s.free()
    s.log.flush()
    fit = fit_cached_prefill(points)
    s.say(f"cached_prefill: {len(points)} points (new tokens x cached context x batch) in {time.perf_counter() - started:.1f} s"
          + (f", {skipped} skipped by the time budget" if skipped else ""))
    if fit is not None:  # the whole-fit worst error is the floor's host spread: say which side it is on
        s.say(f"cached_prefill fit: {describe_floor_split(floor_split_stats(fit, points))}")
    return {"points": points, "fit": fit}
