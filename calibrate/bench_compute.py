"""GPU compute: the prefill grid, the decode-step grid with a real KV cache, and the Exp 2.1 run."""

from __future__ import annotations

import numpy as np

from .fitting import FitPoint
from .modeling import cache_from_tensors, cache_tensors, forward, random_ids, timed_greedy_decode
from .plan import EXP21_NEW_TOKENS, EXP21_PROMPT_TOKENS, decode_points, prefill_points
from .session import PeakMemory, Session, is_oom
from .timer import Timing, fmt_s, measure


def run_prefill_grid(s: Session) -> dict:
    """Prefill latency over batch x prompt (logits for the last position, as generation needs)."""
    import torch

    spec, plan = s.spec, s.plan
    points, workspace, jitter = [], [], []
    kv_bytes_per_token = None
    skip_from: dict[int, int] = {}  # batch -> smallest prompt that ran out of memory
    for batch, prompt in prefill_points(plan, spec.max_position_embeddings):
        s.advance(1)
        if prompt >= skip_from.get(batch, 1 << 62):
            continue
        ids = random_ids(spec, batch, prompt, "cpu", seed=batch * 7919 + prompt).to(s.device)
        try:
            with torch.inference_mode():
                with PeakMemory(s) as peak:
                    _, cache = forward(s.model, ids)  # doubles as the warm-up
                if kv_bytes_per_token is None:
                    held = sum(k.nbytes + v.nbytes for k, v in cache_tensors(cache))
                    kv_bytes_per_token = held // (batch * prompt)
                del cache
                timing = measure(lambda: forward(s.model, ids), s.sync, warmup=0, repeat=plan.prefill_repeat, min_repeat=2, budget_s=3.0)
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            skip_from[batch] = prompt
            s.log.add("prefill", f"b{batch}_p{prompt}", float("nan"), "oom", batch=batch, prompt_tokens=prompt)
            s.say(f"prefill b={batch:>2} p={prompt:>5}: out of memory, skipped")
            s.free()
            continue
        s.log.add_timing("prefill", f"b{batch}_p{prompt}", timing.samples_s, batch=batch, prompt_tokens=prompt)
        inputs = {"prompt_tokens": prompt, "batch": batch, "context": 0}
        points.append(FitPoint(inputs, timing.p50))
        jitter.extend(np.asarray(timing.samples_s) / timing.p50)
        flops = batch * prompt * spec.flops_per_token(prompt // 2)
        line = f"prefill b={batch:>2} p={prompt:>5}: {timing.describe()}  {flops / timing.p50 / 1e12:7.2f} TFLOP/s"
        if peak.workspace_bytes is not None:
            workspace.append(FitPoint(inputs, float(peak.workspace_bytes)))
            s.log.add("prefill_workspace", f"b{batch}_p{prompt}", float(peak.workspace_bytes), "bytes", batch=batch, prompt_tokens=prompt)
            line += f"  workspace {peak.workspace_bytes / 2**20:8.1f} MiB"
        s.say(line)
        del ids
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


def run_decode_grid(s: Session, max_sum_context: int) -> dict:
    """Decode-step latency over batch x context, stepping a real (growing) KV cache."""
    import time

    import torch

    spec, plan = s.spec, s.plan
    points, workspace = [], []
    skip_from: dict[int, int] = {}
    kv_bytes = spec.kv_bytes_per_token
    for batch, context in decode_points(plan, spec.max_position_embeddings, max_sum_context):
        s.advance(1)
        if context >= skip_from.get(batch, 1 << 62):
            continue
        try:
            with torch.inference_mode():
                cache = random_cache(s, batch, context)
                token = random_ids(spec, batch, 1, "cpu", seed=batch).to(s.device)
                steps, contexts, ws = [], [], None
                for i in range(plan.decode_warmup_steps + plan.decode_steps):
                    ctx_before = cache.get_seq_length()
                    s.sync()
                    with PeakMemory(s) as peak:
                        t0 = time.perf_counter()
                        logits, cache = forward(s.model, token, cache)
                        token = logits[:, -1:].argmax(-1)
                        s.sync()
                        elapsed = time.perf_counter() - t0
                    if i >= plan.decode_warmup_steps:
                        steps.append(elapsed)
                        contexts.append(ctx_before)
                        ws = peak.workspace_bytes if ws is None else max(ws, peak.workspace_bytes or 0)
                del cache, logits, token
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            skip_from[batch] = context
            s.log.add("decode", f"b{batch}_c{context}", float("nan"), "oom", batch=batch, context=context)
            s.say(f"decode  b={batch:>2} c={context:>5}: out of memory, skipped")
            s.free()
            continue
        for rep, (step_s, ctx) in enumerate(zip(steps, contexts)):
            s.log.add("decode", f"b{batch}_c{context}", step_s, "s", rep, batch=batch, context=ctx, sum_context=batch * ctx)
        timing = Timing(steps)
        mid_context = float(np.median(contexts))
        inputs = {"batch": batch, "context": mid_context, "sum_context": batch * mid_context}
        points.append(FitPoint(inputs, timing.p50))
        hbm_bytes = spec.weight_bytes + batch * mid_context * kv_bytes
        line = f"decode  b={batch:>2} c={context:>5}: {timing.describe()}  {hbm_bytes / timing.p50 / 1e9:7.1f} GB/s (weights+KV read)"
        if ws is not None:
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
