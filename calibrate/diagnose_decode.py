"""Why eager decode steps vary on the lent machines: a diagnostic, not part of a calibration.

Run on a GPU: `python -m djinnsim.calibrate.diagnose_decode [model]`. It times Exp 2.1-style greedy
decoding and single decode steps under the conditions a calibration might change: a cache built
from random tensors vs the model's own, peak-memory bookkeeping, an emptied allocator cache, a
rich progress bar, and a second Python thread.

`python -m djinnsim.calibrate.diagnose_decode [model] --spells SECONDS` instead asks whether the
batch-1 step's level (two launch-bound levels, about 23 and 35 ms on the lent H200) follows where
the launching thread runs: back-to-back Exp 2.1 runs for SECONDS each, (K) as the OS schedules the
thread, (L) pinned to one CPU (os.sched_setaffinity), for SECONDS / 3 on each of up to 8 CPUs spread
over the allowed set, (M) unpinned beside an NVML sampler thread at
50 ms as calibrate and validate run one; per condition the runs' median steps, their spread and the
share of runs above the midpoint of the two levels' medians.
"""

from __future__ import annotations

import gc
import sys
import threading
import time

import numpy as np
import torch
from djinnsim.calibrate import modeling as m
from djinnsim.calibrate.bench_compute import random_cache
from djinnsim.calibrate.plan import plan_for
from djinnsim.calibrate.samples import SampleLog
from djinnsim.calibrate.session import PeakMemory, Session
from djinnsim.sim.specs import get_model


def spells(model, spec, dev: str, seconds: float) -> None:
    """Back-to-back Exp 2.1 runs under three placements of the launching thread (module docstring)."""
    import os

    from djinnsim.calibrate.telemetry import NvmlSampler, nvml_handle

    ids = m.random_ids(spec, 1, 72, "cpu").to(dev)

    def run_for(label: str, spell_s: float = seconds) -> list[float]:
        medians, until = [], time.perf_counter() + spell_s
        while time.perf_counter() < until:
            medians.append(float(np.median(m.timed_greedy_decode(model, ids, 50, dev).step_s)))
        return medians

    every = os.sched_getaffinity(0)
    results = {}
    with torch.inference_mode():
        m.timed_greedy_decode(model, ids, 50, dev)  # warm-up
        results["K unpinned"] = run_for("K")
        cpus = sorted(every)
        for cpu in cpus[:: max(1, len(cpus) // 8)][:8]:
            os.sched_setaffinity(0, {cpu})
            results[f"L pinned to cpu {cpu}"] = run_for("L", seconds / 3)
        os.sched_setaffinity(0, every)
        nvml, handle = nvml_handle(int(dev.split(":")[1]))
        sampler = NvmlSampler(nvml, handle, period_s=0.05) if handle is not None else None
        if sampler is not None:
            with sampler:
                sampler.phase = "spells"
                results["M unpinned + NVML thread"] = run_for("M")
            clocks = [row[2]["sm_clock_mhz"] for row in sampler.rows]
            if clocks:
                print(f"M: SM clock p10 {np.percentile(clocks, 10):.0f} MHz, p90 {np.percentile(clocks, 90):.0f} MHz ({len(clocks)} samples)")
    every_run = np.concatenate([np.asarray(v) for v in results.values()])
    low, high = np.percentile(every_run, 10), np.percentile(every_run, 90)
    cut = (low + high) / 2
    print(f"levels: p10 of all runs' median steps {low * 1e3:.2f} ms, p90 {high * 1e3:.2f} ms; cut {cut * 1e3:.2f} ms")
    for label, values in results.items():
        v = np.asarray(values)
        print(f"{label:28} runs {len(v):3}  median step p50 {np.median(v) * 1e3:6.2f} ms  p10 {np.percentile(v, 10) * 1e3:6.2f}"
              f"  p90 {np.percentile(v, 90) * 1e3:6.2f}  above cut {np.mean(v > cut):5.0%}"
              f"  in order: {' '.join(f'{x * 1e3:.0f}' for x in v)}")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    name = args[0] if args and not args[0].replace(".", "").isdigit() else "llama-2-7b"
    if "--spells" in sys.argv:
        seconds = float(sys.argv[sys.argv.index("--spells") + 1])
        spec = get_model(name); dev = "cuda:0"
        spells(m.build_model(spec, dev, torch.float16), spec, dev, seconds)
        return
    spec = get_model(name); dev = "cuda:0"
    t0 = time.time(); model = m.build_model(spec, dev, torch.float16); torch.cuda.synchronize(); print("build", time.time() - t0)
    s = Session(spec=spec, device=dev, dtype=torch.float16, plan=plan_for(dev, True), log=SampleLog(None), model=model)
    ids = m.random_ids(spec, 1, 72, "cpu").to(dev)

    def p50(x): return f"p50 {1e3*np.median(x):.2f} ms min {1e3*np.min(x):.2f} max {1e3*np.max(x):.2f} n={len(x)}"
    def loop(cache, n, peak):
        token = m.random_ids(spec, 1, 1, "cpu").to(dev); out = []
        for _ in range(n):
            torch.cuda.synchronize()
            ctx = PeakMemory(s) if peak else None
            if ctx: ctx.__enter__()
            t = time.perf_counter(); lg, cache = m.forward(model, token, cache); token = lg[:, -1:].argmax(-1); torch.cuda.synchronize(); out.append(time.perf_counter() - t)
            if ctx: ctx.__exit__(None, None, None)
        return out
    def exp21(): return m.timed_greedy_decode(model, ids, 50, dev).step_s
    with torch.inference_mode():
        print("A  exp21          ", p50(exp21()))
        print("A2 exp21          ", p50(exp21()))
        print("B  rand c64 nopeak", p50(loop(random_cache(s, 1, 64), 20, False)))
        print("C  rand c64 peak  ", p50(loop(random_cache(s, 1, 64), 20, True)))
        _, c = m.forward(model, ids[:, :64])
        print("D  model c64 peak ", p50(loop(c, 20, True)))
        _, c = m.forward(model, ids[:, :64])
        print("D2 model c64 nopk ", p50(loop(c, 20, False)))
        torch.cuda.empty_cache(); print("E  exp21 after empty_cache", p50(exp21()))
        gc.collect(); print("F  exp21 after gc", p50(exp21()))
        for i in range(3):
            gc.collect(); torch.cuda.empty_cache(); print(f"G{i} rand c64 after free", p50(loop(random_cache(s, 1, 64), 6, True)))
        from rich.progress import Progress
        with Progress() as pr:
            pr.add_task("x", total=3)
            print("H  exp21 under rich progress", p50(exp21()))
            print("H2 rand under rich progress", p50(loop(random_cache(s, 1, 64), 20, True)))
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("x", exp21())); th.start(); th.join()
        print("I  exp21 in a thread", p50(out["x"]))
        print("J  exp21 again", p50(exp21()))


if __name__ == "__main__":
    main()
