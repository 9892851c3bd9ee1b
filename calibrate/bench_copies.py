"""Host<->device copies from pinned and from pageable host memory, 4 KiB to 1 GiB."""

from __future__ import annotations

from djinnsim.sim.profile import Bandwidth

from .fitting import fit_bandwidth
from .session import Session
from .timer import measure


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
