"""GPU compute: the prefill grid, the decode-step grid with a real KV cache, and the Exp 2.1 run.

Launch-bound points (small batches) depend on the host CPU, whose speed drifts by tens of percent
over seconds on the lent machines. So each grid is walked in several interleaved passes, and a
point's value is the median over all passes: drift then spreads over every point instead of
biasing the ones measured first.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from .fitting import FitPoint
from .modeling import (
    cache_from_tensors,
    cache_tensors,
    forward,
    random_ids,
    timed_greedy_decode,
)
from .plan import EXP21_NEW_TOKENS, EXP21_PROMPT_TOKENS, decode_points, prefill_points
from .session import PeakMemory, Session, is_oom
from .timer import Timing, fmt_s, measure

BIG_ALLOCATION_BYTES = 4 * 2**30  # free the allocator cache after points this large, not after every point



def _skip_oom(s, exc: BaseException, stage: str, label: str, what: str, **fields) -> None:
    """An out-of-memory error at one grid point: log it, free memory, and let the grid go on.
    Anything else is re-raised."""
    if not is_oom(exc):
        raise exc
    s.log.add(stage, label, float("nan"), "oom", **fields)
    s.say(f"{what}: out of memory, skipped")
    s.free()

def warm_up(s: Session) -> None:
    """Untimed prefill and greedy decode: lazy kernel loading, allocator pools and host caches settle."""
    import torch

    ids = random_ids(s.spec, 1, EXP21_PROMPT_TOKENS, "cpu", seed=1).to(s.device)
    with torch.inference_mode():
        # The process's very first forward (library and kernel set-up) against the same one warm.
        for rep, stage in enumerate(("first_forward", "first_forward_warm", "first_forward_warm", "first_forward_warm")):
            s.sync()
            t0 = time.perf_counter()
            forward(s.model, ids)
            s.sync()
            s.log.add(stage, f"p{EXP21_PROMPT_TOKENS}", time.perf_counter() - t0, "s", rep, batch=1, prompt_tokens=EXP21_PROMPT_TOKENS)
        started_at = time.perf_counter()
        while time.perf_counter() - started_at < s.plan.warmup_s:
            timed_greedy_decode(s.model, ids, 20, s.device)
    s.sync()


def run_prefill_grid(s: Session) -> dict:
    """Prefill latency over batch x prompt (logits for the last position, as generation needs)."""
    import torch

    spec, plan = s.spec, s.plan
    grid = prefill_points(plan, spec.max_position_embeddings)
    samples: dict[tuple[int, int], list[float]] = defaultdict(list)
    workspace_of: dict[tuple[int, int], int] = {}
    kv_bytes_per_token = None
    skip_from: dict[int, int] = {}  # batch -> smallest prompt that ran out of memory
    for pass_ in range(plan.grid_passes):
        for batch, prompt in grid:
            s.advance(1 / plan.grid_passes)
            if prompt >= skip_from.get(batch, 1 << 62):
                continue
            ids = random_ids(spec, batch, prompt, "cpu", seed=batch * 7919 + prompt).to(s.device)
            try:
                with torch.inference_mode():
                    if pass_ == 0:  # the first visit warms the point up and reads its memory
                        with PeakMemory(s) as peak:
                            _, cache = forward(s.model, ids)
                        if kv_bytes_per_token is None:
                            held = sum(k.nbytes + v.nbytes for k, v in cache_tensors(cache))
                            kv_bytes_per_token = held // (batch * prompt)
                        if peak.workspace_bytes is not None:
                            workspace_of[(batch, prompt)] = peak.workspace_bytes
                        del cache
                    timing = measure(lambda: forward(s.model, ids), s.sync, warmup=0, repeat=plan.prefill_repeat, min_repeat=1, budget_s=2.0)
            except (RuntimeError, MemoryError) as exc:
                _skip_oom(s, exc, "prefill", f"b{batch}_p{prompt}", f"prefill b={batch:>2} p={prompt:>5}",
                          batch=batch, prompt_tokens=prompt)
                skip_from[batch] = prompt
                continue
            samples[(batch, prompt)].extend(timing.samples_s)
            for rep, value in enumerate(timing.samples_s):
                s.log.add("prefill", f"b{batch}_p{prompt}", value, "s", pass_ * 100 + rep, batch=batch, prompt_tokens=prompt)
            if batch * prompt * (kv_bytes_per_token or 0) > BIG_ALLOCATION_BYTES:
                s.free()
    points, workspace, jitter = [], [], []
    for (batch, prompt), values in samples.items():
        timing = Timing(values)
        inputs = {"prompt_tokens": prompt, "batch": batch, "context": 0}
        points.append(FitPoint(inputs, timing.p50))
        jitter.extend(np.asarray(values) / timing.p50)
        flops = batch * prompt * spec.flops_per_token(prompt // 2)
        line = f"prefill b={batch:>2} p={prompt:>5}: {timing.describe()}  {flops / timing.p50 / 1e12:7.2f} TFLOP/s"
        if (batch, prompt) in workspace_of:
            ws = workspace_of[(batch, prompt)]
            workspace.append(FitPoint(inputs, float(ws)))
            s.log.add("prefill_workspace", f"b{batch}_p{prompt}", float(ws), "bytes", batch=batch, prompt_tokens=prompt)
            line += f"  workspace {ws / 2**20:8.1f} MiB"
        s.say(line)
    s.free()
    s.log.flush()
    return {"points": points, "workspace": workspace, "jitter": jitter, "kv_bytes_per_token": kv_bytes_per_token}


def random_cache(s: Session, batch: int, context: int):
    """A KV cache of the model's own class and layout, `context` tokens per sequence, random values."""
    import torch

    spec = s.spec
    shape = (batch, spec.num_kv_heads, context, spec.head_dim)
    gen = torch.Generator(device=s.device).manual_seed(context * 31 + batch)
    pairs = [
        (torch.randn(shape, generator=gen, dtype=s.dtype, device=s.device), torch.randn(shape, generator=gen, dtype=s.dtype, device=s.device))
        for _ in range(spec.num_layers)
    ]
    return cache_from_tensors(pairs)


def _segments(s: Session) -> int:
    """cudaMalloc calls so far (allocator segments created): a step that makes some pays for them."""
    if not s.is_cuda:
        return 0
    import torch

    return int(torch.cuda.memory_stats(s.device).get("segment.all.allocated", 0))


def _decode_point(s: Session, batch: int, context: int) -> tuple[list[float], list[int], int | None, list[int]]:
    """Step a fresh `context`-token cache; returns step times, contexts before each, peak scratch,
    and the allocator segments each step had to create."""
    import torch

    plan = s.plan
    steps, contexts, ws, new_segments = [], [], None, []
    with torch.inference_mode():
        cache = random_cache(s, batch, context)
        token = random_ids(s.spec, batch, 1, "cpu", seed=batch).to(s.device)
        for i in range(plan.decode_warmup_steps + plan.decode_steps):
            ctx_before = cache.get_seq_length()
            segments_before = _segments(s)
            with PeakMemory(s) as peak:
                s.sync()
                t0 = time.perf_counter()
                logits, cache = forward(s.model, token, cache)
                token = logits[:, -1:].argmax(-1)
                s.sync()
                elapsed = time.perf_counter() - t0
            if i >= plan.decode_warmup_steps:
                steps.append(elapsed)
                contexts.append(ctx_before)
                new_segments.append(_segments(s) - segments_before)
                if peak.workspace_bytes is not None:
                    ws = max(ws or 0, peak.workspace_bytes)
        del cache, logits, token
    return steps, contexts, ws, new_segments


def run_decode_grid(s: Session, max_sum_context: int) -> dict:
    """Decode-step latency over batch x context, stepping a real (growing) KV cache."""
    spec, plan = s.spec, s.plan
    grid = decode_points(plan, spec.max_position_embeddings, max_sum_context)
    samples: dict[tuple[int, int], list[tuple[float, int]]] = defaultdict(list)
    workspace_of: dict[tuple[int, int], int] = {}
    skip_from: dict[int, int] = {}
    for pass_ in range(plan.grid_passes):
        for batch, context in grid:
            s.advance(1 / plan.grid_passes)
            if context >= skip_from.get(batch, 1 << 62):
                continue
            try:
                steps, contexts, ws, new_segments = _decode_point(s, batch, context)
            except (RuntimeError, MemoryError) as exc:
                _skip_oom(s, exc, "decode", f"b{batch}_c{context}", f"decode  b={batch:>2} c={context:>5}",
                          batch=batch, context=context)
                skip_from[batch] = context
                continue
            # The first pass(es) warm the allocator and the host up: logged, not fitted.
            stage = "decode" if pass_ >= plan.decode_discard_passes else "decode_warm_pass"
            for rep, (step_s, ctx, segs) in enumerate(zip(steps, contexts, new_segments)):
                s.log.add(stage, f"b{batch}_c{context}", step_s, "s", pass_ * 100 + rep, batch=batch, context=ctx, sum_context=batch * ctx)
                s.log.add("decode_new_segments", f"b{batch}_c{context}", float(segs), "count", pass_ * 100 + rep, batch=batch, context=ctx)
            if stage == "decode":
                samples[(batch, context)].extend(zip(steps, contexts))
            if ws is not None:
                workspace_of[(batch, context)] = max(workspace_of.get((batch, context), 0), ws)
            if batch * context * spec.kv_bytes_per_token > BIG_ALLOCATION_BYTES:
                s.free()
    points, workspace = [], []
    for (batch, context), pairs in samples.items():
        timing = Timing([p[0] for p in pairs])
        mid_context = float(np.median([p[1] for p in pairs]))
        inputs = {"batch": batch, "context": mid_context, "sum_context": batch * mid_context}
        points.append(FitPoint(inputs, timing.p50))
        hbm_bytes = spec.weight_bytes + batch * mid_context * spec.kv_bytes_per_token
        line = f"decode  b={batch:>2} c={context:>5}: {timing.describe()}  {hbm_bytes / timing.p50 / 1e9:7.1f} GB/s (weights+KV read)"
        if (batch, context) in workspace_of:
            ws = workspace_of[(batch, context)]
            workspace.append(FitPoint(inputs, float(ws)))
            s.log.add("decode_workspace", f"b{batch}_c{context}", float(ws), "bytes", batch=batch, context=context, sum_context=batch * context)
            line += f"  workspace {ws / 2**20:8.1f} MiB"
        s.say(line)
    s.free()
    s.log.flush()
    return {"points": points, "workspace": workspace}


def run_exp21(s: Session) -> dict:
    """Exp 2.1 natively: 72-token prompt, 50 new tokens, greedy, batch 1; the first runs discarded."""
    import torch

    plan = s.plan
    ids = random_ids(s.spec, 1, EXP21_PROMPT_TOKENS, "cpu", seed=21).to(s.device)
    runs = []
    with torch.inference_mode():
        for run in range(plan.exp21_runs):
            timing = timed_greedy_decode(s.model, ids, EXP21_NEW_TOKENS, s.device)
            s.advance(1)
            if run < plan.exp21_discard:
                continue
            runs.append(timing)
            s.log.add("exp21_prefill", f"run{run}", timing.prefill_s, "s", run, batch=1, prompt_tokens=EXP21_PROMPT_TOKENS)
            for t, step_s in enumerate(timing.step_s):
                s.log.add("exp21_step", f"run{run}", step_s, "s", t, batch=1, context=EXP21_PROMPT_TOKENS + t)
            s.log.add("exp21_total", f"run{run}", timing.total_s, "s", run)
    steps = np.concatenate([r.step_s for r in runs])
    totals = Timing([r.total_s for r in runs])
    s.say(
        f"exp2.1 ({len(runs)} runs kept of {plan.exp21_runs}): total {totals.describe()}; "
        f"step p50 {fmt_s(float(np.median(steps)))} p90 {fmt_s(float(np.percentile(steps, 90)))}; "
        f"prefill p50 {fmt_s(float(np.median([r.prefill_s for r in runs])))}"
    )
    s.log.flush()
    return {
        "total": totals,
        "prefill": Timing([r.prefill_s for r in runs]),
        "step": Timing(list(steps)),
        "jitter": list(steps / np.median(steps)),
    }
