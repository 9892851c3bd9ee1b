"""How fast `djinnsim search` answers, against issue 10's target (N up to 4096 in at most 10 s on
the 2-core CPU machine).

    python benchmarks/search_speed.py [--repeats 1]

Four figures, each the median of `--repeats` runs (wall and CPU seconds, probes, agents simulated):
  1. the whole `djinnsim search scenarios/agents32.yaml --slo-p99-ms 5000 --json` command in a
     fresh process (imports, every backend, outputs), as a user runs it; 1b. the same with --jobs 2;
  2. an in-process search whose answer is about 4096: Djinn (serial FCFS, bundled H100 profile)
     with short phases (8 + 4 tokens, then 4 + 4; a 1 s tool call), so memory allows ~6,000
     sessions and the P99 SLO (455 s, what about 4,100 queued generations take) is what binds;
  3. the same search with the cap at 4096 and no binding SLO (the cap reached: galloping only).
"Agents simulated" sums N over every probe: the search's cost in simulator work, whatever the
engine's speed. Not a test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 10.0
LARGE = {
    "name": "search_large", "seed": 5, "backends": ["djinn"],
    "workload": {"kind": "agents", "agents": [1], "reason": {"input_tokens": 8, "new_tokens": 4},
                 "act": {"kind": "fixed", "seconds": 1}, "reflect": {"input_tokens": 4, "new_tokens": 4}},
}
LARGE_SLO_MS = 455_000.0


def _in_process(slo_ms: float, max_agents: int, repeats: int):
    from djinnsim.sim.scenario import parse_scenario
    from djinnsim.sim.search import search_capacity

    scenario = parse_scenario(LARGE)
    walls, cpus, answer = [], [], None
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        [answer] = search_capacity(scenario, slo_ms, max_agents=max_agents)
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu_started)
    return statistics.median(walls), statistics.median(cpus), answer


def _command(repeats: int, *extra: str):
    walls, stdout = [], ""
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "djinnsim.cli", "search", str(REPO / "scenarios" / "agents32.yaml"),
                                   "--slo-p99-ms", "5000", "--json", "--out", f"{tmp}/{i}", *extra],
                                  capture_output=True, text=True, check=True, cwd=REPO)
            walls.append(time.perf_counter() - started)
            stdout = done.stdout
    return statistics.median(walls), json.loads(stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, median of {args.repeats}; target: N up to 4096 in <= {TARGET_S:g} s")

    wall, answers = _command(args.repeats)
    print(f"1. djinnsim search scenarios/agents32.yaml --slo-p99-ms 5000 --json: {wall:.2f} s (whole command)")
    for backend, answer in answers.items():
        print(f"     {backend}: {json.dumps(answer)}")
    wall, parallel = _command(args.repeats, "--jobs", "2")
    same = "the same answers" if parallel == answers else "DIFFERENT answers"
    print(f"1b. the same with --jobs 2 (its three backends in two local processes): {wall:.2f} s, {same}")

    for label, slo_ms, cap in (("2. answer about 4096 (SLO binds)", LARGE_SLO_MS, 65536),
                               ("3. cap 4096 reached (no binding SLO)", 1e12, 4096)):
        wall, cpu, a = _in_process(slo_ms, cap, args.repeats)
        agents = int(sum(p.x for p in a.probes))
        verdict = "meets" if wall <= TARGET_S else "MISSES"
        print(f"{label}: {wall:.2f} s wall, {cpu:.2f} s CPU, {len(a.probes)} probes, {agents} agents simulated; "
              f"max_agents {a.max_agents} ({a.limited_by}), P99 {a.p99_ms_at_max:,.0f} ms at it, "
              f"{'-' if a.p99_ms_above is None else f'{a.p99_ms_above:,.0f} ms'} above; {verdict} the {TARGET_S:g} s target")


if __name__ == "__main__":
    main()
