"""Pageable KV swap-outs on the host allocator: what a swap-out's host pages are (warm, or fresh
from the kernel) depending on what ran before it. A CPU-only stand-in for `tensor.to("cpu")` on a
GPU: a clone allocates host memory through torch's CPU allocator (posix_memalign -> glibc malloc)
and writes every byte of it, as the driver's copy into a freshly allocated pageable tensor does.

    python benchmarks/pageable_swap_patterns.py [--sizes-mib 1,4,8,16] [--repeats 12] [--tensors 64]

Each (pattern, size) runs in its own process (the allocator's state is the thing measured). A set
is `--tensors` buffers of the size (Llama-2-7B: 64 K and V tensors of 0.5 MiB per 128 tokens).
Patterns (calibrate.bench_copies's kv_swaps and kv_cycle stages time the calibrated ones):

- freed: calibrate's kv_swaps stage before the change: the previous set freed, then the timed
  swap-out at once;
- validate_cpu: validate/kv_costs.py's loop on a CPU device (only pageable; the previous set is
  still bound while the next one is allocated, freed by the rebinding after the timed call), with
  forward-like churn (preserve, discard, reflect) and the swap-in clone between;
- validate_gpu: the same loop's host side on a GPU (hosts pinned then pageable): the previous
  pageable set freed by the pinned swap-out's rebinding, then the pinned swap-in and a REFLECT
  (host-side: small tensor objects only), then the timed pageable swap-out;
- server: 4 sessions swapped out and in round robin (a Djinn server's steady state: the set freed
  by a swap-in is below sets still held).

Prints per pattern and size: wall-clock GB/s and process-CPU GB/s (user + system time of all
threads: on a shared machine the wall clock carries the waits for a core) at the median, and the
minor page faults per swap (the set's pages: size x tensors / 4 KiB). Not a test: it prints.

On the shared 2-core CPU machine (2026-12-03, glibc 2.36, torch 2.13.0+cpu, load average 3.5-6, so
the GB/s are contended; 12 swaps after 10 warm-ups), minor faults per swap-out, median [min-max],
of the set's pages:

| pattern | 1 MiB (16384 pages) | 4 MiB (65536) | 8 MiB (131072) | 16 MiB (262144) |
|---|---|---|---|---|
| freed | 0 [0-0] | 0 [0-0] | 0 [0-0] | 0 [0-0] |
| validate_cpu | 0 [0-1760] | 0 [0-4065] | 0 [0-10208] | 4064 [0-32736] |
| validate_gpu | 16321 (all) | 65345 (all) | 130945 (all) | 261953 (all) |
| server | 0 [0-1280] | 1536 [0-7168] | 2048 [0-18432] | 6144 [0-28672] |

Process-CPU GB/s, median: freed 3.8 / 2.1 / 1.1 / 2.3; validate_cpu 2.5 / 1.5 / 2.6 / 2.2;
validate_gpu 0.9 / 1.2 / 1.1 / 1.8; server 2.4 / 2.2 / 1.2 / 2.5 (1 / 4 / 8 / 16 MiB).

Why: a freed set returns to the kernel only by a trim of glibc's heap top, which a free of a chunk
of 64 KiB or more runs (after consolidating the small free chunks, the tensors' objects, that
separate the big ones) when the top exceeds M_TRIM_THRESHOLD. validate_gpu's forward-like work frees
256 KiB temporaries from the heap after the set was freed: trimmed, every page fresh (with 300 small
tensors and no temporaries: no fault; with one temporary: every third swap fresh). With
MALLOC_TRIM_THRESHOLD_=4294967296 and MALLOC_MMAP_THRESHOLD_=33554432 validate_gpu faults 0 pages;
with the trim threshold alone (which freezes the mmap threshold at 128 KiB) every pattern faults
every page: each tensor is its own mapping, unmapped when freed. In `server` the set a swap-in frees
lies below sets still held, which no trim reaches.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PAGE_BYTES = 4096


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _forward_like(torch, small: int = 300, activations: int = 4):
    """A forward pass's host-side allocations: many small tensors (on a GPU, only their objects are
    host memory) and a few activation-sized temporaries; the last small one lives on (the logits)."""
    temps = [torch.empty(256 * 1024, dtype=torch.uint8).fill_(1) for _ in range(activations)]
    objects = [torch.zeros(64) for _ in range(small)]
    del temps
    return objects[-1].clone()


def run_pattern(pattern: str, each: int, tensors: int, repeats: int, warmups: int = 10) -> list[tuple[float, float, int]]:
    """(wall s, process CPU s, minor faults) of each timed swap-out after `warmups`."""
    import torch

    dev = [torch.empty(each, dtype=torch.uint8).fill_(1) for _ in range(tensors)]
    swap = lambda ts: [t.clone() for t in ts]  # noqa: E731
    out: list[tuple[float, float, int]] = []

    def timed(fn):
        f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
        result = fn()
        sample = (time.perf_counter() - t0, time.process_time() - c0, _faults() - f0)
        return sample, result

    held = [swap(dev)]
    pool = swap(dev)  # validate_gpu: the pinned pool, allocated once
    host_kv = None
    sessions: list[list] = []
    for i in range(warmups + repeats):
        if pattern == "freed":
            held.clear()
            sample, new = timed(lambda: swap(dev))
            held.append(new)
            del new
        elif pattern == "validate_cpu":
            logits = _forward_like(torch)  # preserve
            logits = _forward_like(torch)  # discard
            sample, host_kv = timed(lambda: swap(dev))
            restored = swap(host_kv)
            logits = _forward_like(torch)  # reflect on the restored cache
            del restored, logits
        elif pattern == "validate_gpu":
            logits = _forward_like(torch)
            logits = _forward_like(torch)
            host_kv = pool  # the pinned swap-out's rebinding frees the previous pageable set
            logits = _forward_like(torch)  # pinned swap-in (device memory) + reflect
            sample, host_kv = timed(lambda: swap(dev))
            logits = _forward_like(torch)  # pageable swap-in (device memory) + reflect
            del logits
        elif pattern == "server":
            sample, new = timed(lambda: swap(dev))
            sessions.append(new)
            del new
            if len(sessions) > 4:
                sessions.pop(0)  # the oldest session swapped in: its host set freed
            _forward_like(torch)
        else:
            raise ValueError(pattern)
        if i >= warmups:
            out.append(sample)
    return out


PATTERNS = ("freed", "validate_cpu", "validate_gpu", "server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # pattern:each, run in this process
    args = parser.parse_args()
    if args.one:
        pattern, each = args.one.split(":")
        print(json.dumps(run_pattern(pattern, int(each), args.tensors, args.repeats)))
        return
    print(f"{'pattern':13} {'MiB':>4} {'wall GB/s':>10} {'cpu GB/s':>9} {'faults/swap':>12} {'of pages':>9}  faults per swap")
    for mib in (float(m) for m in args.sizes_mib.split(",")):
        each = int(mib * 2**20)
        total = each * args.tensors
        for pattern in args.patterns.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", f"{pattern}:{each}", "--tensors", str(args.tensors),
                                   "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
            samples = json.loads(done.stdout)
            wall = statistics.median(total / s[0] / 1e9 for s in samples)
            cpu = statistics.median(total / max(s[1], 1e-9) / 1e9 for s in samples)
            faults = [s[2] for s in samples]
            print(f"{pattern:13} {mib:4g} {wall:10.2f} {cpu:9.2f} {statistics.median(faults):12.0f} {total // PAGE_BYTES:9d}  "
                  + " ".join(str(f) for f in faults), flush=True)


if __name__ == "__main__":
    main()
