"""Why eager decode steps vary on the lent machines: a diagnostic, not part of a calibration.

Run on a GPU: `python -m djinnsim.calibrate.diagnose_decode [model]`. It times Exp 2.1-style greedy
decoding and single decode steps under the conditions a calibration might change: a cache built
from random tensors vs the model's own, peak-memory bookkeeping, an emptied allocator cache, a
rich progress bar, and a second Python thread.
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


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-2-7b"
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
