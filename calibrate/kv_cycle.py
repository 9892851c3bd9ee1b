"""One session's KV cache put through what a server does with it while its agent waits, in one
order: the sequence both the calibration's kv_swaps stage and validate.kv_costs run.

Each repeat, on a session prefilled to C tokens (batch 1, the model's own K and V tensors):

1. a REFLECT of 16 new tokens on the resident cache (preserve), then the whole context re-prefilled
   (discard), each up to its first new token;
2. per host kind, in the order given (pinned before pageable on a GPU): the swap-out (every K and V
   tensor to host memory; its result rebinds the one host set this session holds, freeing the
   previous one), the swap-in (back to new device tensors), and a REFLECT on the restored cache.

Why one shared sequence: a pageable swap-out's time is set by the host allocator's state, not by
the bus. `tensor.to("cpu")` allocates through torch's CPU allocator (posix_memalign -> glibc malloc);
K/V tensors of up to 32 MiB land in glibc's heap once its dynamic mmap threshold has risen (the first
free of an mmapped chunk raises it to that chunk's size, and the trim threshold to twice that), and
a freed set stays in the heap, its pages warm, unless glibc trims the heap's top back to the kernel:
only when a free of a chunk of 64 KiB or more consolidates the small free chunks (the tensors'
objects) between the big ones and the top grows past the trim threshold. What ran between the
previous set's free and the next swap-out (a forward pass's many small allocations and its larger
frees) decides whether that happens, so a stage timing another sequence times another regime: on
the 2-core CPU machine (benchmarks/pageable_swap_patterns.py) a swap-out right after the previous
set was freed found every page warm, the same after forward-like work in between found every page
fresh (with the trim threshold fixed, MALLOC_TRIM_THRESHOLD_, every page warm again), and 4
sessions swapped in and out round robin found a median of 0-2.3% fresh (at most 14%).

Timed as calibrate times (host wall clock around synchronized calls); every swap-out also counts the
process's minor page faults (`resource.getrusage`), the number of host pages it met fresh.
"""

from __future__ import annotations

import resource
import time
from typing import Callable

from djinnsim.sim.specs import ModelSpec

REFLECT_TOKENS = 16
USABLE_COSINE = 0.999
PAGE_BYTES = 4096  # a base page on x86-64: a first touch of one is one minor fault


def minor_faults() -> int:
    """The process's minor page faults so far (every thread): a first touch of a fresh page is one."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class KvCycle:
    """A model on `device` and one session's KV of C tokens at a time, with timed operations."""

    def __init__(self, model, spec: ModelSpec, device: str, seed: int) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.spec = spec
        self.device = device
        self.seed = seed

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result

    def first_token(self, ids, pairs=None):
        """One forward over `ids` (after the cache `pairs`, if any): the last position's logits,
        and the new token picked from them (so the time includes what a server does for it)."""
        from djinnsim.calibrate.modeling import cache_from_tensors, forward

        cache = cache_from_tensors(pairs) if pairs is not None else None
        logits, _ = forward(self.model, ids, cache)
        last = logits[:, -1]
        last.argmax(-1)
        return last

    def measure(self, context: int, hosts: tuple[str, ...], repeats: int, warmups: int) -> tuple[dict, dict]:
        """({(op, host): [seconds per repeat]}, facts) for a session of `context` tokens; facts hold
        the KV's bytes and tensors, whether the swapped and re-prefilled caches are usable, and
        `swap_out_faults` {host: [minor page faults per recorded swap-out]}."""
        from djinnsim.calibrate.modeling import cache_tensors, forward, random_ids

        torch = self.torch
        with torch.inference_mode():
            ids = random_ids(self.spec, 1, context + REFLECT_TOKENS, self.device, seed=self.seed + context)
            prompt, reflect = ids[:, :context], ids[:, context:]
            _, cache = forward(self.model, prompt)
            pairs = [(k.contiguous(), v.contiguous()) for k, v in cache_tensors(cache)]
            del cache
            tensors = [t for pair in pairs for t in pair]
            kv_bytes = sum(t.numel() * t.element_size() for t in tensors)
            samples: dict[tuple[str, str | None], list[float]] = {}
            faults: dict[str, list[int]] = {}

            def keep(key, value):
                samples.setdefault(key, []).append(value)

            reference = None
            outputs = {}
            for i in range(warmups + repeats):
                record = i >= warmups
                preserve_s, logits = self.timed(lambda: self.first_token(reflect, pairs))
                reference = logits if reference is None else reference
                discard_s, logits = self.timed(lambda: self.first_token(ids))
                outputs.setdefault("discard", logits)
                if record:
                    keep(("reflect_preserve", None), preserve_s)
                    keep(("reflect_discard", None), discard_s)
                for host in hosts:
                    swap_out = self._swap_out(tensors, host)  # a pinned pool is allocated here, not counted
                    faults_before = minor_faults()
                    out_s, host_kv = self.timed(swap_out)
                    out_faults = minor_faults() - faults_before
                    in_s, restored = self.timed(self._swap_in(host_kv, host))
                    back = list(zip(restored[0::2], restored[1::2]))
                    reflect_s, logits = self.timed(lambda: self.first_token(reflect, back))
                    outputs.setdefault(f"swap_{host}", logits)
                    del restored, back
                    if record:
                        keep(("swap_out", host), out_s)
                        keep(("swap_in", host), in_s)
                        keep(("reflect_after_swap", host), in_s + reflect_s)
                        faults.setdefault(host, []).append(out_faults)
            facts = {"kv_bytes": kv_bytes, "kv_tensors": len(tensors),
                     "usable": {name: usable(reference, logits) for name, logits in outputs.items()},
                     "swap_out_faults": faults}
        return samples, facts

    def _swap_out(self, tensors: list, host: str) -> Callable[[], list]:
        torch = self.torch
        if not self.device.startswith("cuda"):
            return lambda: [t.clone() for t in tensors]  # host memcpy, as calibrate copies on the CPU
        if host == "pageable":
            return lambda: [t.to("cpu") for t in tensors]
        pool = getattr(self, "_pool", None)
        if pool is None or [p.shape for p in pool] != [t.shape for t in tensors]:
            pool = self._pool = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        return lambda: [p.copy_(t, non_blocking=True) for p, t in zip(pool, tensors)]

    def _swap_in(self, host_kv: list, host: str) -> Callable[[], list]:
        if not self.device.startswith("cuda"):
            return lambda: [t.clone() for t in host_kv]
        pinned = host == "pinned"
        return lambda: [t.to(self.device, non_blocking=pinned) for t in host_kv]


def usable(reference, logits) -> dict:
    """Whether `logits` (after a swap or a re-prefill) give what the resident cache gave."""
    import torch

    a, b = reference.float().flatten(), logits.float().flatten()
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    top1 = bool(a.argmax() == b.argmax())
    max_abs_diff = float((a - b).abs().max())
    tied = float(a.max() - a[b.argmax()]) <= 2 * max_abs_diff  # b's pick is a's best within the noise
    return {"top1_agrees": top1, "top1_tied": tied, "cosine": cosine, "max_abs_diff": max_abs_diff,
            "usable": (top1 or tied) and cosine >= USABLE_COSINE}
