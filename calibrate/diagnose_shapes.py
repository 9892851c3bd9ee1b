"""Is a decode step slower the first time a process meets its shapes? A diagnostic, not a calibration.

The validation's agent points showed freshly started worker processes decoding at 80-110 ms per
token for their first phases and at 30-35 ms once they had seen the same context lengths, while an
older process beside them ran fast. This times greedy decode passes over new and repeated context
lengths, each attention variant in a fresh process, and profiles one cold and one warm step.

Run on a GPU: `python -m djinnsim.calibrate.diagnose_shapes [model] > out.json` (prints a table on
stderr, JSON on stdout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

VARIANTS = ("sdpa", "sdpa-no-cudnn", "eager")
PASSES = (("new 72", 72), ("repeat 72", 72), ("new 200", 200), ("repeat 200", 200))


def _variant(name: str, variant: str) -> dict:
    import numpy as np
    import torch

    from djinnsim.calibrate import modeling as m
    from djinnsim.sim.specs import get_model

    dev = os.environ.get("DJINNSIM_DIAG_DEVICE", "cuda:0")
    spec = get_model(name)
    if variant == "sdpa-no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    t0 = time.perf_counter()
    model = m.build_model(spec, dev, torch.float16)
    if variant == "eager":
        model.set_attn_implementation("eager")
    m.synchronize(dev)
    out: dict = {"variant": variant, "build_s": time.perf_counter() - t0, "torch": torch.__version__,
                 "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
                 "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
                 "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled(), "passes": []}
    with torch.inference_mode():  # the server's warm-up: a few short steps
        logits, cache = m.forward(model, m.random_ids(spec, 1, 8, dev))
        for _ in range(3):
            logits, cache = m.forward(model, logits[:, -1:].argmax(-1), cache)
    m.synchronize(dev)

    def run_pass(label: str, prompt: int) -> None:
        timing = m.timed_greedy_decode(model, m.random_ids(spec, 1, prompt, dev), 50, dev)
        steps = np.array(timing.step_s) * 1e3
        out["passes"].append({"pass": label, "prefill_ms": timing.prefill_s * 1e3,
                              "step_p50_ms": float(np.median(steps)), "step_mean_ms": float(steps.mean()),
                              "first5_ms": [round(float(x), 2) for x in steps[:5]]})

    for label, prompt in PASSES:
        run_pass(label, prompt)
    if variant == "sdpa":  # same process, a new model object: per process or per model?
        del model, cache, logits
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        model = m.build_model(spec, dev, torch.float16)
        run_pass("rebuilt model, repeat 72", 72)
        run_pass("rebuilt model, new 300", 300)
        out["profile"] = _profile(model, spec, dev)
    return out


def _profile(model, spec, dev) -> dict:
    """Top CPU ops of a cold decode step (new context length) and a warm one (seen before)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from djinnsim.calibrate import modeling as m

    result = {}
    with torch.inference_mode():
        for label in ("cold", "warm"):
            logits, cache = m.forward(model, m.random_ids(spec, 1, 500, dev))
            token = logits[:, -1:].argmax(-1)
            m.synchronize(dev)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                m.forward(model, token, cache)
                m.synchronize(dev)
            rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
            result[label] = [(e.key, round(e.self_cpu_time_total / 1e3, 3), e.count) for e in rows]
    return result


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--variant":
        print(json.dumps(_variant(sys.argv[3] if len(sys.argv) > 3 else "llama-2-7b", sys.argv[2])))
        return
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-2-7b"
    results = []
    for variant in VARIANTS:  # each in a fresh process: nothing cached from the one before
        proc = subprocess.run([sys.executable, "-m", "djinnsim.calibrate.diagnose_shapes", "--variant", variant, name],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            results.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=1))
    for r in results:
        if "error" in r:
            print(f"{r['variant']}: {r['error']}", file=sys.stderr)
            continue
        print(f"{r['variant']} (cudnn_sdp {r['cudnn_sdp']}, build {r['build_s']:.1f} s)", file=sys.stderr)
        for p in r["passes"]:
            print(f"  {p['pass']:<28} prefill {p['prefill_ms']:7.1f} ms  step p50 {p['step_p50_ms']:6.1f} "
                  f"mean {p['step_mean_ms']:6.1f}  first {p['first5_ms']}", file=sys.stderr)
        for label, rows in r.get("profile", {}).items():
            print(f"  profile {label}: " + "; ".join(f"{k} {t} ms x{c}" for k, t, c in rows[:6]), file=sys.stderr)


if __name__ == "__main__":
    main()
