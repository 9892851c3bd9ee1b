"""Memory facts: free memory at start, CUDA context overhead, weights, and the --oom-probe."""

from __future__ import annotations

import os

from .environment import host_memory_bytes
from .session import Session, is_oom
from .telemetry import memory_free_bytes, nvml_handle


def nvml_index(gpu: int) -> int:
    """NVML numbers devices physically; CUDA_VISIBLE_DEVICES may renumber them for CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [v.strip() for v in visible.split(",")]
        if gpu < len(entries) and entries[gpu].isdigit():
            return int(entries[gpu])
    return gpu


def free_before_cuda(gpu: int) -> tuple[int, int] | None:
    """(free, total) device memory read through NVML before this process creates a CUDA context."""
    nvml, handle = nvml_handle(nvml_index(gpu))
    return memory_free_bytes(nvml, handle) if handle is not None else None


def context_overhead(s: Session, before: tuple[int, int] | None) -> dict[str, int | None]:
    """Memory this process holds beyond the allocator's reserved blocks, right after CUDA starts."""
    if not s.is_cuda:
        return {"total_bytes": host_memory_bytes(), "free_at_start_bytes": None, "context_bytes": 0}
    import torch

    torch.zeros(1, device=s.device)  # create the context and the allocator
    s.sync()
    free_now, total = torch.cuda.mem_get_info(s.device)
    reserved = torch.cuda.memory_reserved(s.device)
    if before is not None:
        context = (before[0] - free_now) - reserved
        free_at_start = before[0]
    else:
        context = (total - free_now) - reserved  # other processes' memory is counted too
        free_at_start = free_now
        s.notes.append("no NVML reading before CUDA init: context overhead includes other processes' memory")
    s.say(
        f"memory: total {total / 2**30:.2f} GiB, free at start {free_at_start / 2**30:.2f} GiB, "
        f"CUDA context {context / 2**20:.0f} MiB"
    )
    return {"total_bytes": int(total), "free_at_start_bytes": int(free_at_start), "context_bytes": int(max(context, 0))}


def weight_bytes(model) -> int:
    return int(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())))


def oom_probe(s: Session, copy_bytes: int, limit: int = 64) -> int:
    """Model copies that fit: the resident one plus whole weight-sized allocations until one fails."""
    if not s.is_cuda:
        return 1
    import torch

    held = []
    try:
        while len(held) < limit:
            held.append(torch.empty(copy_bytes, dtype=torch.uint8, device=s.device))
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
    copies = 1 + len(held)
    del held
    s.free()
    s.say(f"oom probe: {copies} copies of {copy_bytes / 2**30:.2f} GiB fit (one resident, CUDA context shared)")
    return copies
