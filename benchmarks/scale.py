"""How djinnsim scales, against the targets of issue 11 (a 2-core CPU machine).

    python benchmarks/scale.py [--only NAME ...] [--repeats 1]

Figures (each the median of `--repeats` runs; NAME in brackets):
  1. [agents16384] every agents point of agents32's three backends (ray_keepalive, ray_serverless,
     djinn) at N = 16384 simultaneous agents (benchmarks/scenarios/agents16384.yaml), the
     simulation of each point alone, in-process: at most 5 s each;
  2. [growth] 10,000 and 100,000 agents with Poisson arrivals under continuous batching
     (benchmarks/scenarios/poisson_batching.yaml), simulated in-process: the time may grow by at
     most 12x for 10x the agents;
  3. [poisson100k] the whole `djinnsim run benchmarks/scenarios/poisson_batching.yaml --quiet`
     (100,000 agents) as a user runs it, a fresh process writing every output: at most 10 s;
  4. [poisson1m] the same with 1,000,000 agents (poisson_batching_1m.yaml): at most 120 s and 2 GB;
  5. [exp21] the whole `djinnsim run benchmarks/scenarios/exp21_3000.yaml --quiet` (Exp 2.1, 3000
     runs per point, 8 points): peak RSS at most 250 MB.
A whole command's peak memory is its process's maximum resident set size (getrusage). cpu_s (user +
system CPU seconds) is printed beside wall_s because on a shared, busy machine wall time also counts
waiting for a core; the verdict is on wall time, as the targets say. Not a test: it prints, it asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sim_speed import simulated  # the same in-process timing (this folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "benchmarks" / "scenarios"
FIGURES = ("agents16384", "growth", "poisson100k", "poisson1m", "exp21")

# A whole command run in a child that reports its own wall, CPU and peak RSS (a fresh interpreter,
# so the peak is that command's alone).
_MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
subprocess.run(sys.argv[1:], check=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_mb": usage.ru_maxrss / 1024}))
"""


def _whole_command(scenario: Path, repeats: int) -> tuple[float, float, float]:
    """Median wall s, CPU s and peak RSS (MB) of `djinnsim run SCENARIO --out <tmp> --quiet`."""
    exe = shutil.which("djinnsim", path=str(Path(sys.executable).parent)) or shutil.which("djinnsim")
    if exe is None:
        raise SystemExit("djinnsim is not installed in this environment (pip install -e .)")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            out = subprocess.run([sys.executable, "-c", _MEASURE, exe, "run", str(scenario), "--out",
                                  str(Path(tmp) / str(i)), "--quiet"], check=True, cwd=tmp, capture_output=True,
                                 text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return tuple(statistics.median(r[key] for r in runs) for key in ("wall_s", "cpu_s", "peak_mb"))


def _row(what: str, wall_s: float, cpu_s: float, extra: str, target: str, ok: bool) -> None:
    print(f"{what:<34}{wall_s:>9.2f}{cpu_s:>8.2f}  {extra:<28}{target:<22}{'PASS' if ok else 'FAIL'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES))
    args = parser.parse_args()

    from djinnsim.sim.scenario import load_scenario

    print(f"machine: {platform.machine()} {platform.processor() or platform.platform()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, python {platform.python_version()}; "
          f"median of {args.repeats}")
    print(f"{'what':<34}{'wall_s':>9}{'cpu_s':>8}  {'':<28}{'target':<22}verdict")
    if "agents16384" in args.only:
        base = load_scenario(SCENARIOS / "agents16384.yaml")
        for backend in base.backends:
            wall_s, cpu_s, events = simulated(base.model_copy(update={"backends": [backend]}), args.repeats)
            _row(f"{backend} N=16384 simulated", wall_s, cpu_s, f"{events:,} events", "<= 5 s", wall_s <= 5.0)
    if "growth" in args.only:
        base = load_scenario(SCENARIOS / "poisson_batching.yaml")
        walls = {}
        for agents in (10_000, 100_000):
            scenario = base.model_copy(update={"workload": base.workload.model_copy(update={"agents": [agents]})})
            wall_s, cpu_s, events = simulated(scenario, args.repeats)
            walls[agents] = (wall_s, cpu_s)
            _row(f"poisson {agents:,} agents simulated", wall_s, cpu_s, f"{events:,} events", "", True)
        growth = walls[100_000][0] / walls[10_000][0]
        cpu_growth = walls[100_000][1] / walls[10_000][1]
        print(f"{'growth 10,000 -> 100,000 agents':<34}{growth:>8.1f}x{cpu_growth:>7.1f}x  {'(wall, cpu)':<28}"
              f"{'<= 12x':<22}{'PASS' if growth <= 12 else 'FAIL'}", flush=True)
    for name, scenario, wall_target_s, mb_target in (
            ("poisson100k", "poisson_batching.yaml", 10.0, None),
            ("poisson1m", "poisson_batching_1m.yaml", 120.0, 2048.0),
            ("exp21", "exp21_3000.yaml", None, 250.0)):
        if name not in args.only:
            continue
        wall_s, cpu_s, peak_mb = _whole_command(SCENARIOS / scenario, args.repeats)
        targets, ok = [], True
        if wall_target_s is not None:
            targets.append(f"<= {wall_target_s:g} s")
            ok = ok and wall_s <= wall_target_s
        if mb_target is not None:
            targets.append(f"<= {mb_target:g} MB")
            ok = ok and peak_mb <= mb_target
        _row(f"djinnsim run {scenario}", wall_s, cpu_s, f"peak {peak_mb:,.0f} MB", ", ".join(targets), ok)


if __name__ == "__main__":
    main()
