"""SIGINT at random moments of a 1024-agent sweep: does any folder look complete when it is not?

    python benchmarks/interrupts.py --signals 40 [--seed 0] [--signal INT|TERM]

First one uninterrupted `djinnsim run` of the sweep (Ray keep-alive and Djinn at N = 1, 4, 16, 64,
256 and 1024; ray_serverless at 1024 agents alone would take most of the time) measures how long the whole command takes, T, and keeps its folder as the reference. Then
`--signals` runs each receive the signal at a moment drawn uniformly from [0, T] (start-up,
imports, simulation, writing), all into default folders of one results/ tree, so runs that start
in the same second also test that default folders never mix. Afterwards every folder under
results/ is one of:

  complete     byte for byte the reference run's files (same scenario and seed: the same bytes)
  incomplete   holding a summary.json, but not the reference's files: the failure this counts
  partial      a `.partial-` folder left behind (only a SIGKILL or power cut may leave one)

and every run's exit code and whether its stderr held a traceback are counted. The target:
0 incomplete folders holding a summary.json, 0 partial folders.
"""

from __future__ import annotations

import argparse
import filecmp
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

SWEEP = {
    "name": "sweep1024", "seed": 42, "model": "llama-2-7b", "gpu": "h100-80gb",
    "backends": ["ray_keepalive", "djinn"],
    "link": {"gbps": 25, "rtt_ms": 0.2},
    "workload": {"kind": "agents", "agents": [1, 4, 16, 64, 256, 1024],
                 "reason": {"input_tokens": 72, "new_tokens": 50}, "act": {"kind": "fixed", "seconds": 10},
                 "reflect": {"input_tokens": 16, "new_tokens": 50}, "iterations": 1,
                 "arrival": {"kind": "simultaneous"}},
}


def _run(cwd: Path, args: list[str], delay_s: float | None, signum: int) -> tuple[int, str, float]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "djinnsim", "run", "sweep.yaml", "--quiet", *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if delay_s is not None:
        try:
            proc.wait(timeout=delay_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=600)
    return proc.returncode, stderr, time.perf_counter() - started


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", choices=["INT", "TERM"], default="INT")
    opts = parser.parse_args()
    signum = getattr(signal, f"SIG{opts.signal}")
    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory(prefix="djinnsim-interrupts-") as tmp:
        work = Path(tmp)
        (work / "sweep.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
        code, stderr, whole_s = _run(work, ["--out", "reference"], None, signum)
        if code != 0:
            raise SystemExit(f"the reference run failed (exit {code}): {stderr.strip()[-300:]}")
        reference = work / "reference"
        codes, tracebacks, delays = Counter(), 0, []
        for _ in range(opts.signals):
            delay_s = rng.uniform(0.0, whole_s)
            delays.append(delay_s)
            code, stderr, _ = _run(work, [], delay_s, signum)
            codes[code] += 1
            if "Traceback (most recent call last)" in stderr:
                tracebacks += 1
                print(f"a traceback after a signal at {delay_s:.3f} s (exit {code}):\n{stderr.strip()[:1200]}")
        # every run folder anywhere under results/ (its name follows the scenario file, not `name`)
        folders = sorted(p for p in (work / "results").glob("*/*") if p.is_dir())
        verdicts = Counter()
        for folder in folders:
            if ".partial-" in folder.name:
                verdicts["partial"] += 1
            elif not (folder / "summary.json").exists():
                verdicts["no summary.json"] += 1
            elif _same_tree(folder, reference):
                verdicts["complete"] += 1
            else:
                verdicts["incomplete"] += 1
    print(f"sweep: {len(SWEEP['backends'])} backends x N = {SWEEP['workload']['agents']}; "
          f"an uninterrupted run takes {whole_s:.1f} s (the whole command)")
    print(f"{opts.signals} SIG{opts.signal}s at moments uniform in [0, {whole_s:.1f}] s "
          f"(median {sorted(delays)[len(delays) // 2]:.1f} s)")
    print("exit codes: " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())))
    print(f"runs whose stderr held a traceback: {tracebacks}")
    print(f"{'folders under results/':<28}{len(folders):>5}")
    for name in ("complete", "incomplete", "partial", "no summary.json"):
        print(f"  {name:<26}{verdicts[name]:>5}")
    print(f"incomplete folders holding a summary.json: {verdicts['incomplete']}")
    if verdicts["incomplete"] or verdicts["partial"] or tracebacks:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
