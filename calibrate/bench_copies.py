"""Host<->device copies from pinned and from pageable host memory, 4 KiB to 1 GiB."""

from __future__ import annotations

import numpy as np

from djinnsim.sim.profile import Bandwidth

from .fitting import fit_bandwidth
from .kv_cycle import PAGE_BYTES, REFLECT_TOKENS, KvCycle, minor_faults
from .session import Session, is_oom
from .timer import Timing, measure

CYCLE_WARMUPS = 3  # validate.kv_costs's default: the allocator's thresholds settle in the first swaps


def _host_buffer(nbytes: int, pinned: bool):
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    buf.fill_(1)  # fault the pages in: an untouched pageable buffer would time the page faults
    return buf


def run_copies(s: Session) -> dict[str, Bandwidth]:
    """Fit latency + bytes/rate per direction and host-memory kind. On the CPU both are memcpy."""
    import torch

    pinned_kinds = (True, False) if s.is_cuda else (False,)
    fitted: dict[str, Bandwidth] = {}
    for pinned in pinned_kinds:
        kind = "pinned" if pinned else "pageable"
        sizes, h2d_s, d2h_s = [], [], []
        for nbytes in s.plan.copy_sizes:
            host = _host_buffer(nbytes, pinned)
            dev = torch.empty(nbytes, dtype=torch.uint8, device=s.device)
            repeat = s.plan.repeat if nbytes < 2**28 else max(2, s.plan.repeat // 2)
            h2d = measure(lambda: dev.copy_(host, non_blocking=pinned), s.sync, warmup=1, repeat=repeat)
            if pinned or not s.is_cuda:
                d2h = measure(lambda: host.copy_(dev, non_blocking=pinned), s.sync, warmup=1, repeat=repeat)
            else:
                # Pageable D2H as PyTorch code pays it (tensor.cpu()): into freshly allocated host
                # memory, page faults included. Into an already-touched buffer is logged for reference.
                d2h = measure(lambda: dev.to("cpu"), s.sync, warmup=1, repeat=repeat)
                warm = measure(lambda: host.copy_(dev), s.sync, warmup=1, repeat=repeat)
                s.log.add_timing("copy_d2h_pageable_prefaulted", f"{nbytes}", warm.samples_s, nbytes=nbytes)
            for name, timing in (("h2d", h2d), ("d2h", d2h)):
                s.log.add_timing(f"copy_{name}_{kind}", f"{nbytes}", timing.samples_s, nbytes=nbytes)
            s.say(
                f"copy {kind:8} {nbytes / 2**20:10.3f} MiB: h2d {h2d.describe()} {nbytes / h2d.p50 / 1e9:6.2f} GB/s | "
                f"d2h {d2h.describe()} {nbytes / d2h.p50 / 1e9:6.2f} GB/s"
            )
            sizes.append(nbytes)
            h2d_s.append(h2d.p50)
            d2h_s.append(d2h.p50)
            s.advance(1)
        for name, times in (("h2d", h2d_s), ("d2h", d2h_s)):
            bw, stats = fit_bandwidth(sizes, times)
            fitted[f"{name}_{kind}"] = bw
            s.say(f"fit {name}_{kind}: latency {bw.latency_s * 1e6:.1f} us + bytes / {bw.gbps:.2f} GB/s (max rel err {100 * stats['max_rel_err']:.1f}%)")
    if not s.is_cuda:
        for name in ("h2d", "d2h"):
            fitted[f"{name}_pinned"] = fitted[f"{name}_pageable"]
        s.notes.append("device cpu: host<->device copies are host memcpy; pinned = pageable")
    s.free()
    s.log.flush()
    return fitted


def kv_swap_tensor_bytes(s: Session, context: int) -> int:
    """Bytes of one of a session's K or V tensors (one layer) at `context` tokens, in the calibrated dtype."""
    import torch

    element = torch.empty((), dtype=s.dtype).element_size()
    return context * s.spec.num_kv_heads * s.spec.head_dim * element


def _release_held(held: list) -> None:
    """Untimed, before a swap-out of the `freed` pattern: every earlier swapped-out set freed."""
    held.clear()


def _counting_faults(fn, faults: list[int]):
    """`fn` that also appends the process's minor page faults during each call to `faults`."""
    def call():
        before = minor_faults()
        result = fn()
        faults.append(minor_faults() - before)
        return result
    return call


def _swap_cycle(s: Session, context: int, repeat: int) -> tuple[list[float], list[int], int] | None:
    """The pageable swap-out as validate.kv_costs times it (calibrate.kv_cycle's sequence, with the
    calibrated model's own prefilled K and V): (seconds and minor page faults per swap-out, the set's
    bytes). None without a model or where the context + REFLECT does not fit its positions."""
    if s.model is None or context + REFLECT_TOKENS > s.spec.max_position_embeddings:
        return None
    hosts = ("pinned", "pageable") if s.is_cuda else ("pageable",)
    samples, facts = KvCycle(s.model, s.spec, s.device, seed=0).measure(context, hosts, repeat, CYCLE_WARMUPS)
    return samples[("swap_out", "pageable")], facts["swap_out_faults"]["pageable"], facts["kv_bytes"]


def _swap_repeat(s: Session, nbytes: int) -> int:
    """Timed swaps of a set of `nbytes`: pageable swap-outs of large sets page-fault with long tails
    (p90 8x the p50 on the H200), so 5 at least, and half the plan's repeats from 256 MiB."""
    return s.plan.repeat if nbytes < 2**28 else max(5, s.plan.repeat // 2)


def _log_faults(s: Session, name: str, context: int, nbytes: int, faults: list[int]) -> None:
    """One `kv_swap_<name>_faults` row (unit count) per timed swap-out."""
    for rep, count in enumerate(faults):
        s.log.add(f"kv_swap_{name}_faults", f"{context}", float(count), "count", rep, nbytes=nbytes)


def run_kv_cycle(s: Session) -> dict[str, Bandwidth]:
    """The pageable swap-out in validate.kv_costs's own loop (`_swap_cycle`), at the smallest and
    largest of `plan.kv_swap_contexts` (two sizes fit latency + bytes / rate; each repeat also runs
    two REFLECTs, a re-prefill and a pinned swap, and a full calibration has no 10 s to spare: H200
    run 13 ended its last stage at 570 s of 578): {"d2h_pageable_cycle": fit}, empty where it
    could not run. Its own stage, after `warm_up` and `cold_shapes`: the model's first forwards
    stay theirs (the process's library set-up, the first use of a shape), and the `kv_swaps`
    stage's pageable pattern keeps the host heap it had before this loop existed."""
    contexts = sorted({min(s.plan.kv_swap_contexts), max(s.plan.kv_swap_contexts)})
    sizes, times = [], []
    for context in contexts:
        try:
            cycle = _swap_cycle(s, context, _swap_repeat(s, context * s.spec.kv_bytes_per_token))
        except (RuntimeError, MemoryError) as exc:  # the prefill of the context ran out of memory
            if not is_oom(exc):
                raise
            s.free()
            s.notes.append(f"kv_cycle: out of memory at context {context}; the cycle fit not measured")
            s.say(f"kv cycle C={context}: out of memory, stage skipped")
            return {}
        if cycle is None:
            continue
        seconds, faults, kv_bytes = cycle
        timing = Timing(seconds)
        s.log.add_timing("kv_swap_d2h_pageable_cycle", f"{context}", timing.samples_s, nbytes=kv_bytes)
        _log_faults(s, "d2h_pageable_cycle", context, kv_bytes, faults)
        sizes.append(float(kv_bytes))
        times.append(timing.p50)
        s.say(f"kv swap pageable C={context:5} as validate's loop: out {timing.describe()} "
              f"{kv_bytes / timing.p50 / 1e9:6.2f} GB/s, faults per swap-out p50 {int(np.median(faults))} "
              f"of {kv_bytes // PAGE_BYTES} pages")
        s.free()
        s.advance(1)
    s.log.flush()
    if len(sizes) < 2:
        return {}
    bw, stats = fit_bandwidth(sizes, times)
    s.say(f"fit kv swap d2h_pageable_cycle: latency {bw.latency_s * 1e6:.1f} us + bytes / {bw.gbps:.2f} GB/s "
          f"(max rel err {100 * stats['max_rel_err']:.1f}%)")
    return {"d2h_pageable_cycle": bw}


def run_kv_swaps(s: Session) -> dict:
    """A session's whole KV cache moved the way a swap moves it, at contexts `plan.kv_swap_contexts`:
    its 2 x layers K and V tensors one after another, timed around one synchronize for the set.

    - pinned: into (out of) a pool allocated once, `copy_(non_blocking=True)` for every tensor, so the
      copies queue on one stream and their fixed latencies overlap (a swap pool holds them so);
    - pageable: `tensor.to("cpu")` into freshly allocated host memory, and back with `tensor.to(device)`.
      Whether the host pages a pageable swap-out writes are warm (glibc's heap) or fresh (returned
      to the kernel and faulted again) depends on what ran since the previous set was freed
      (calibrate/kv_cycle.py), so the swap-out is timed in two patterns, each swap-out's minor page
      faults counted beside its time (rows `kv_swap_d2h_pageable[_cycle]_faults`, unit count):
      - `d2h_pageable` (freed): the previous set freed (untimed) right before the timed swap-out,
        flat buffers of the K/V tensors' bytes, nothing in between (the stage's pattern since H200
        run 4: on the H200 1.3-2.1 GB/s, fresh pages; on the 2-core CPU machine every page warm);
      - `d2h_pageable_cycle`, timed by its own stage after `warm_up` and `cold_shapes`
        (`run_kv_cycle`) and merged into this section: validate.kv_costs's own loop
        (calibrate.kv_cycle.KvCycle) on the calibrated model: REFLECT, re-prefill, the pinned swap (on a GPU), then the pageable swap-out
        with the previous pageable set freed by the rebinding before the REFLECTs in between. Added
        after H200 KV-costs runs 1-8 (which real pageable swap-outs ran at 2.5-11.4 GB/s, between the
        two stages' regimes): those runs are in-sample for it; no constant comes from them, the stage
        times the validation's sequence on the machine being calibrated.

    Which one a simulated swap-out should pay: a lone session (one set at a time on the host, other
    work in between: validate's loop, an agent alone on a server) is the cycle; a server swapping
    several sessions in and out finds the set freed by a swap-in below sets still held, which glibc
    cannot trim, so its pages stay warm (4 sessions round robin on the CPU machine: a median of
    0-2.3% of the pages fresh per swap-out, at most 14%): the copies stage's warm regime (ProfileCostModel.kv_swap_bandwidth).

    Fits time = latency + bytes / rate per direction and kind, on the whole set's bytes; the
    simulator charges a swap of the model's KV with it (CostModel.kv_swap_bandwidth). On the CPU
    every kind is a memcpy (clone)."""
    import torch

    tensors = 2 * s.spec.num_layers
    kinds = ("pinned", "pageable") if s.is_cuda else ("pageable",)
    points: dict[str, tuple[list[float], list[float]]] = {}

    def add(name: str, context: int, nbytes: int, timing: Timing) -> None:
        s.log.add_timing(f"kv_swap_{name}", f"{context}", timing.samples_s, nbytes=nbytes)
        sizes, times = points.setdefault(name, ([], []))
        sizes.append(float(nbytes))
        times.append(timing.p50)

    for context in s.plan.kv_swap_contexts:
        each = kv_swap_tensor_bytes(s, context)
        total = each * tensors
        dev = [torch.empty(each, dtype=torch.uint8, device=s.device).fill_(1) for _ in range(tensors)]
        repeat = _swap_repeat(s, total)
        for kind in kinds:
            note = ""
            if kind == "pinned":
                pool = [torch.empty(each, dtype=torch.uint8, pin_memory=True) for _ in range(tensors)]
                out = measure(lambda: [p.copy_(t, non_blocking=True) for p, t in zip(pool, dev)], s.sync, warmup=1, repeat=repeat)
                back = measure(lambda: [p.to(s.device, non_blocking=True) for p in pool], s.sync, warmup=1, repeat=repeat)
                del pool
            else:  # pageable; on the CPU both directions are a memcpy
                to_host = (lambda t: t.to("cpu")) if s.is_cuda else (lambda t: t.clone())
                to_device = (lambda t: t.to(s.device)) if s.is_cuda else (lambda t: t.clone())
                held = [[to_host(t) for t in dev]]
                faults: list[int] = []
                out = measure(_counting_faults(lambda: held.append([to_host(t) for t in dev]), faults), s.sync,
                              warmup=1, repeat=repeat, setup=lambda: _release_held(held))
                faults = faults[-len(out.samples_s):]
                _log_faults(s, "d2h_pageable", context, total, faults)
                note = f" (faults p50 {int(np.median(faults))} of {total // PAGE_BYTES} pages)"
                back = measure(lambda: [to_device(t) for t in held[-1]], s.sync, warmup=1, repeat=repeat)
                del held
            add(f"d2h_{kind}", context, total, out)
            add(f"h2d_{kind}", context, total, back)
            s.say(f"kv swap {kind:8} C={context:5} ({tensors} x {each / 2**20:.2f} MiB): out {out.describe()} "
                  f"{total / out.p50 / 1e9:6.2f} GB/s{note} | in {back.describe()} {total / back.p50 / 1e9:6.2f} GB/s")
            s.free()
        del dev
        s.free()
        s.advance(1)
    fits = {}
    for name, (sizes, times) in points.items():
        if len(sizes) < 2:
            continue
        bw, stats = fit_bandwidth(sizes, times)
        fits[name] = bw
        s.say(f"fit kv swap {name}: latency {bw.latency_s * 1e6:.1f} us + bytes / {bw.gbps:.2f} GB/s "
              f"(max rel err {100 * stats['max_rel_err']:.1f}%)")
    if not s.is_cuda and "d2h_pageable" in fits:
        for name in ("d2h", "h2d"):
            fits[f"{name}_pinned"] = fits[f"{name}_pageable"]
    s.log.flush()
    return {"tensors": tensors, "fits": fits}
