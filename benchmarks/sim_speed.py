"""How fast djinnsim simulates, against the targets of issue 2 (a 2-core CPU machine).

    python benchmarks/sim_speed.py [--repeats 3]

Three figures, each the median of `--repeats` runs:
  1. agents32 (scenarios/agents32.yaml, 18 points), the simulation alone, in-process;
  2. the same scenario with 1024 agents (djinn, ray_serverless, ray_keepalive), in-process;
  3. the whole `djinnsim run scenarios/agents32.yaml --out <tmp> --quiet` as a user runs it
     (a fresh process: imports, simulation, every output file and figure).
Events are those SimPy scheduled (PointResult.events). cpu_s (user + system CPU seconds) is printed
beside wall_s because on a shared, busy machine wall time also counts waiting for a core; the verdict
is on wall time. Not a test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AGENTS32 = REPO / "scenarios" / "agents32.yaml"
TARGETS_S = {"agents32 simulated": 0.5, "1024 agents simulated": 10.0, "djinnsim run agents32": 3.0}


def simulated(scenario, repeats: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds of simulate_scenario alone, and the events it scheduled."""
    from djinnsim.sim.run import simulate_scenario

    walls, cpus, events = [], [], set()
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = simulate_scenario(scenario)
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu_started)
        events.add(result.events)
    if len(events) != 1:
        raise SystemExit("the same scenario scheduled a different number of events: not deterministic")
    return statistics.median(walls), statistics.median(cpus), events.pop()


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _whole_command(repeats: int) -> tuple[float, float]:
    exe = shutil.which("djinnsim", path=str(Path(sys.executable).parent)) or shutil.which("djinnsim")
    if exe is None:
        raise SystemExit("djinnsim is not installed in this environment (pip install -e .)")
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            started, cpu_started = time.perf_counter(), _children_cpu_s()
            subprocess.run([exe, "run", str(AGENTS32), "--out", str(Path(tmp) / str(i)), "--quiet"],
                           check=True, cwd=tmp)
            walls.append(time.perf_counter() - started)
            cpus.append(_children_cpu_s() - cpu_started)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from djinnsim.sim.scenario import load_scenario

    agents32 = load_scenario(AGENTS32)
    agents1024 = agents32.model_copy(update={
        "name": "agents1024",
        "backends": ["djinn", "ray_serverless", "ray_keepalive"],
        "workload": agents32.workload.model_copy(update={"agents": [1024]}),
    })

    rows = []
    for label, scenario in (("agents32 simulated", agents32), ("1024 agents simulated", agents1024)):
        rows.append((label, *simulated(scenario, args.repeats)))
    rows.append(("djinnsim run agents32", *_whole_command(args.repeats), None))

    print(f"machine: {platform.machine()} {platform.processor() or platform.platform()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, python {platform.python_version()}; "
          f"median of {args.repeats}")
    print(f"{'what':<24}{'wall_s':>9}{'cpu_s':>8}{'events':>10}{'events/s':>12}{'target_s':>10}  verdict")
    for label, wall_s, cpu_s, events in rows:
        target = TARGETS_S[label]
        rate = f"{events / wall_s:,.0f}" if events else "-"
        print(f"{label:<24}{wall_s:>9.3f}{cpu_s:>8.3f}{events if events else '-':>10}{rate:>12}{target:>10.1f}  "
              f"{'PASS' if wall_s <= target else 'FAIL'}")


if __name__ == "__main__":
    main()
