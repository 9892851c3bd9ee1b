"""The first-run cost of new attention shapes: a pass cold (its shapes never run in this process)
against the same pass warm (run again at once).

PyTorch's cuDNN attention, which SDPA picks on Hopper, builds and caches an execution plan per
(batch, query length, key length): on the H100 a decode step at a context length the process has
not met took 76-86 ms against 25-30 ms warm (`python -m djinnsim.calibrate.diagnose_shapes`). The
calibration grids measure warm passes only, so this stage measures the difference, on lengths no
other stage uses, and the process's very first forward (library set-up) in the warm-up.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
from scipy.optimize import nnls

from djinnsim.sim.profile import ColdShapes

from .modeling import forward, random_ids
from .session import Session

# Lengths no grid, the warm-up or Exp 2.1 uses (they are odd; those are round or 72-121).
PREFILL_PROMPTS = (37, 211, 613)
DECODE_CONTEXTS = (333, 777, 1555)
DECODE_STEPS = 6


def _timed(s: Session, fn) -> float:
    s.sync()
    t0 = time.perf_counter()
    fn()
    s.sync()
    return time.perf_counter() - t0


def run_cold_shapes(s: Session) -> ColdShapes | None:
    import torch

    from .bench_compute import random_cache

    with torch.inference_mode():
        for prompt in PREFILL_PROMPTS:
            if prompt >= s.spec.max_position_embeddings:
                continue
            ids = random_ids(s.spec, 1, prompt, "cpu", seed=prompt).to(s.device)
            s.log.add("cold_prefill", f"p{prompt}", _timed(s, lambda: forward(s.model, ids)), "s", 0, batch=1, prompt_tokens=prompt)
            for rep in range(3):
                s.log.add("warm_prefill", f"p{prompt}", _timed(s, lambda: forward(s.model, ids)), "s", rep, batch=1, prompt_tokens=prompt)
        for context in DECODE_CONTEXTS:
            if context + DECODE_STEPS >= s.spec.max_position_embeddings:
                continue
            for stage in ("cold_decode", "warm_decode", "warm_decode"):
                cache = random_cache(s, 1, context)
                token = random_ids(s.spec, 1, 1, "cpu", seed=context).to(s.device)
                for step in range(DECODE_STEPS):
                    box = {}

                    def one_step(cache=cache, token=token):
                        box["out"] = forward(s.model, token, cache)

                    elapsed = _timed(s, one_step)
                    logits, cache = box["out"]
                    token = logits[:, -1:].argmax(-1)
                    s.log.add(stage, f"c{context}", elapsed, "s", step, batch=1, context=context + step)
                del cache
    s.log.flush()
    cold = fit_cold_shapes(s.log.rows)
    if cold is not None:
        s.say(f"new attention shapes: decode step +{cold.decode_extra_s * 1e3:.1f} ms, prefill +{cold.prefill_extra_s * 1e3:.1f} ms "
              f"+{cold.prefill_extra_per_token_s * 1e6:.1f} us/token (cold minus warm, {cold.n_samples} pairs)")
    return cold


def _f(row: dict, key: str) -> float | None:
    value = row.get(key)
    return None if value in (None, "") else float(value)


def fit_cold_shapes(rows: list[dict]) -> ColdShapes | None:
    """The cold-shape costs from sample rows (a SampleLog's or its CSV's). Without this stage's rows,
    the decode cost comes from the decode grid's first pass (cold lengths) against its kept passes."""
    by_stage: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("unit", "s") != "s":
            continue
        stage = row["stage"]
        if stage in ("cold_decode", "warm_decode", "decode", "decode_warm_pass"):
            key = (row["point"], _f(row, "context"))
        elif stage in ("cold_prefill", "warm_prefill", "first_forward", "first_forward_warm"):
            key = (row["point"], _f(row, "prompt_tokens"))
        else:
            continue
        value = _f(row, "value")
        if value is not None and np.isfinite(value):
            by_stage[stage][key].append(value)

    def paired(cold_stage: str, warm_stage: str) -> list[tuple[tuple, float]]:
        cold, warm = by_stage.get(cold_stage, {}), by_stage.get(warm_stage, {})
        return [(k, float(np.median(cold[k]) - np.median(warm[k]))) for k in cold if k in warm]

    decode = paired("cold_decode", "warm_decode")
    source = "cold minus warm passes at lengths new to the process (stage cold_shapes)"
    if not decode:
        decode = paired("decode_warm_pass", "decode")
        source = "decode grid: its first pass (lengths new to the process) minus its kept passes; prefill not measured"
    if not decode:
        return None
    prefill = paired("cold_prefill", "warm_prefill")
    fixed = per_token = 0.0
    if prefill:
        tokens = np.array([k[1] or 0.0 for k, _ in prefill])
        extra = np.array([v for _, v in prefill])
        (fixed, per_token), _ = nnls(np.column_stack([np.ones_like(tokens), tokens]), extra)
    first = paired("first_forward", "first_forward_warm")
    return ColdShapes(
        decode_extra_s=max(float(np.median([v for _, v in decode])), 0.0),
        prefill_extra_s=float(fixed),
        prefill_extra_per_token_s=float(per_token),
        first_forward_s=max(first[0][1], 0.0) if first else None,
        n_samples=len(decode) + len(prefill),
        source=source,
    )
