"""Whole-model weight loads to the device: from a safetensors file, from pageable and from pinned
host memory, alone and with 2 or 4 loads at once (the contention a serverless baseline meets).

The file is written by calibrate into a temporary folder. Each load starts from an emptied allocator
cache so device allocation is paid as a fresh process would pay it. Concurrent loads are threads of
this process (each a whole model): the copy engines, PCIe and the page cache are what they share.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from djinnsim.sim.profile import WeightLoad

from .environment import filesystem_of
from .session import Session, is_oom
from .timer import Timing, measure


def _host_state(model, max_bytes: int | None) -> dict:
    """The model's tensors copied to host memory (shared tensors once), optionally a prefix of them."""
    state, seen, total = {}, set(), 0
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().to("cpu", copy=True).contiguous()
        total += tensor.numel() * tensor.element_size()
        if max_bytes is not None and total >= max_bytes:
            break
    return state


def _nbytes(state: dict, keys: list[str]) -> int:
    return sum(state[k].numel() * state[k].element_size() for k in keys)


def _drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget this one file's cached pages (no global cache drop)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def load_from_file(path: Path, names, device: str) -> dict:
    """Tensors `names` of a safetensors file, read onto `device` (the disk tiers)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as fh:
        return {k: fh.get_tensor(k) for k in names}


def load_from_host(state: dict, names, device: str, non_blocking: bool = False) -> dict:
    """Host tensors copied to `device` (on the CPU: fresh copies, the host memcpy a load is there)."""
    if device.startswith("cuda"):
        return {k: state[k].to(device, non_blocking=non_blocking) for k in names}
    return {k: state[k].clone() for k in names}


def _two_point_fit(small_bytes: int, small_s: float, big_bytes: int, big_s: float) -> tuple[float, float]:
    """(fixed_s, gbps) through two sizes; falls back to a pure rate if the slope is not positive."""
    if big_bytes > small_bytes and big_s > small_s:
        per_byte = (big_s - small_s) / (big_bytes - small_bytes)
        return max(big_s - big_bytes * per_byte, 0.0), 1.0 / per_byte / 1e9
    return 0.0, big_bytes / big_s / 1e9


def run_weight_loads(s: Session) -> dict:
    """Measure loads; frees the resident model first (this is the last stage that needs memory)."""
    from safetensors.torch import save_file

    plan = s.plan
    state = _host_state(s.model, plan.weight_load_max_bytes)
    s.model = None
    s.free()
    keys = list(state)
    total_bytes = _nbytes(state, keys)
    quarter: list[str] = []
    for k in keys:
        quarter.append(k)
        if _nbytes(state, quarter) >= total_bytes / 4:
            break
    parts = {"quarter": quarter, "whole": keys}
    whole_label = "whole model" if plan.weight_load_max_bytes is None else f"first {total_bytes / 2**30:.2f} GiB of tensors"
    if plan.weight_load_max_bytes is not None:
        s.notes.append(f"weight loads timed on a prefix of the model's tensors ({total_bytes} bytes), not the whole model")

    folder = s.scratch_dir()
    results: dict = {"loads": {}, "extra": {}}
    pinned: dict = {}
    try:
        path = folder / "model.safetensors"
        t0 = time.perf_counter()
        save_file(state, str(path))
        dropped = _drop_page_cache(path)  # also fsyncs: the write time includes reaching the disk
        write_s = time.perf_counter() - t0
        fstype = filesystem_of(str(folder))
        s.log.add("weights_write", "safetensors", write_s, "s", nbytes=total_bytes)
        s.say(f"weights: wrote {total_bytes / 1e9:.2f} GB to {folder} ({fstype}) in {write_s:.2f} s ({total_bytes / write_s / 1e9:.2f} GB/s)")
        s.notes.append(f"weight file written to a {fstype} file system")
        s.advance(1)

        def load_disk(names):
            out = load_from_file(path, names, s.device)
            s.sync()
            return out

        def load_pageable(names):
            out = load_from_host(state, names, s.device)
            s.sync()
            return out

        def load_pinned(names):
            out = load_from_host(pinned, names, s.device, non_blocking=True)
            s.sync()
            return out

        if plan.weight_load_cold and dropped:
            t0 = time.perf_counter()
            load_disk(keys)
            cold_s = time.perf_counter() - t0
            s.free()
            s.log.add("weights_load_disk_cold", "whole", cold_s, "s", nbytes=total_bytes)
            results["extra"]["weights.disk_cold_s"] = cold_s
            s.say(f"weights: cold disk load (file dropped from page cache) {cold_s:.3f} s, {total_bytes / cold_s / 1e9:.2f} GB/s")
        if s.is_cuda:
            t0 = time.perf_counter()
            pinned = {k: v.pin_memory() for k, v in state.items()}
            pin_s = time.perf_counter() - t0
            s.log.add("weights_pin", "whole", pin_s, "s", nbytes=total_bytes)
            s.say(f"weights: pinning host copy took {pin_s:.2f} s ({total_bytes / pin_s / 1e9:.2f} GB/s)")
        tiers = {"disk": load_disk, "pageable": load_pageable}
        if s.is_cuda:
            tiers["pinned"] = load_pinned
        for tier, load in tiers.items():
            lone: dict[str, Timing] = {}
            for part, names in parts.items():
                lone[part] = measure(lambda: load(names), s.sync, warmup=1, repeat=plan.weight_load_repeat, setup=s.free)
                nbytes = _nbytes(state, names)
                s.log.add_timing(f"weights_load_{tier}", part, lone[part].samples_s, nbytes=nbytes, concurrent=1)
                s.say(f"weights: {tier:8} load, {part:7} ({nbytes / 1e9:6.2f} GB): {lone[part].describe()} {nbytes / lone[part].p50 / 1e9:6.2f} GB/s")
            fixed_s, gbps = _two_point_fit(_nbytes(state, quarter), lone["quarter"].p50, total_bytes, lone["whole"].p50)
            aggregate = {}
            for k in plan.weight_load_concurrency:
                agg = _concurrent(s, load, keys, k, total_bytes)
                if agg is not None:
                    aggregate[k] = agg
                    s.log.add(f"weights_load_{tier}", f"concurrent{k}", agg, "GB/s", nbytes=total_bytes, concurrent=k)
                    s.say(f"weights: {tier:8} load x{k} at once: aggregate {agg:6.2f} GB/s ({whole_label} each)")
            results["loads"][tier] = WeightLoad(fixed_s=fixed_s, gbps=gbps, aggregate_gbps=aggregate)
            s.say(f"weights: {tier:8} fit: {fixed_s * 1e3:.1f} ms + bytes / {gbps:.2f} GB/s")
            s.advance(1)
            s.log.flush()
        s.weight_file = path  # kept for the loads_mp stage; the runner removes the scratch folder
    finally:
        pinned.clear()
    if not s.is_cuda:
        results["loads"]["pinned"] = results["loads"]["pageable"]
        s.notes.append("device cpu: weight 'loads' are host memcpy; pinned = pageable")
    results["total_bytes"] = total_bytes
    return results


def _concurrent(s: Session, load, names: list[str], k: int, nbytes: int) -> float | None:
    """Aggregate GB/s of k simultaneous whole loads (first start to last finish)."""
    barrier = threading.Barrier(k)
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def worker():
        try:
            barrier.wait()
            t0 = time.perf_counter()
            out = load(names)
            spans.append((t0, time.perf_counter()))
            del out
        except BaseException as exc:  # re-raised below unless it is an OOM
            errors.append(exc)

    s.free()
    threads = [threading.Thread(target=worker) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.free()
    if errors:
        if all(isinstance(e, (RuntimeError, MemoryError)) and is_oom(e) for e in errors):
            s.say(f"weights: x{k} concurrent loads ran out of memory, skipped")
            s.log.add("weights_load", f"concurrent{k}", float("nan"), "oom", concurrent=k)
            return None
        raise errors[0]
    wall = max(e for _, e in spans) - min(b for b, _ in spans)
    return k * nbytes / wall / 1e9
