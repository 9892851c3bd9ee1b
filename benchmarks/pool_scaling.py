"""How agent density and tail latency scale with the GPUs of a pool, under each router.

    python benchmarks/pool_scaling.py [--jobs 2] [--ray [ADDRESS]] [--poisson RATE_PER_GPU]

The base is scenarios/pool32.yaml (llama-2-7b on H100s, the bundled measured profile, 25 Gbps per
node, agents REASON -> 10 s ACT -> REFLECT, all starting together); the pool grows 1, 2, 4, 8 GPUs
on one node, then 2 and 4 nodes of 8. For every pool size and router it prints:

  - keep-alive density: the most agents with no OOM record, simulated (bisection over N);
  - Djinn density: the memory bound (one weight copy per GPU, a KV cache per session), computed,
    not simulated (simulating ~23,000 agents per point is beyond a quick benchmark);
  - P99 per-phase latency (REASON + REFLECT pooled, ms) of each backend at 4 and at 16 agents per
    GPU, simulated; OOM where that point had an OOM record.

`--poisson R`: agents arrive as a Poisson process of R per second per GPU and ACT is exponential
(mean 10 s) instead of everyone starting together with a fixed 10 s ACT: sessions then end at
different times, which is where the routers part ways.

Points run through sim.parallel.map_points (`--jobs`, `--ray`), as `djinnsim run` does. Not a test:
it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL32 = REPO / "scenarios" / "pool32.yaml"
SIZES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8)]  # (nodes, GPUs per node)
ROUTERS = ["session_affinity", "round_robin", "least_loaded"]
LOADS = [4, 16]  # agents per GPU


def _pool(scenario, nodes: int, per_node: int, router: str, backends: list[str], agents: list[int],
          poisson_per_gpu: float | None = None):
    from djinnsim.sim.scenario import Arrival, Cluster, Exponential

    workload = {"agents": agents}
    if poisson_per_gpu:
        workload["arrival"] = Arrival(kind="poisson", rate_per_s=poisson_per_gpu * nodes * per_node)
        workload["act"] = Exponential(kind="exponential", mean_s=10.0)
    return scenario.model_copy(update={
        "backends": backends,
        "cluster": Cluster(nodes=nodes, gpus_per_node=per_node, router=router),
        "workload": scenario.workload.model_copy(update=workload),
    })


def _has_oom(task) -> bool:
    from djinnsim.sim.run import CostModels, point_seed
    from djinnsim.sim.scenario import expand_points
    from djinnsim.sim.simulate import simulate_point

    scenario = task
    point = expand_points(scenario)[0]
    cost = CostModels(scenario, None).for_point(point)
    records = simulate_point(scenario, point, cost, point_seed(scenario.seed, point)).records
    return bool((records.column("status") == "oom").any())


def keepalive_density(task) -> int:
    """The most agents with no OOM record on this pool (no OOM is monotone in N here)."""
    scenario, nodes, per_node, router, poisson = task
    low, high = 0, 8 * nodes * per_node  # 80 GB holds at most 5 actors of 13.5 GB weights
    while high - low > 1:
        mid = (low + high) // 2
        if _has_oom(_pool(scenario, nodes, per_node, router, ["ray_keepalive"], [mid], poisson)):
            high = mid
        else:
            low = mid
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS")
    parser.add_argument("--poisson", type=float, default=None, metavar="RATE_PER_GPU")
    args = parser.parse_args()

    from djinnsim.sim.parallel import map_points
    from djinnsim.sim.report import point_summaries
    from djinnsim.sim.run import simulate_scenario
    from djinnsim.sim.scenario import load_scenario

    base = load_scenario(POOL32)
    started = time.perf_counter()
    configs = [(n, g, r) for n, g in SIZES for r in ROUTERS]
    density = map_points(keepalive_density, [(base, n, g, r, args.poisson) for n, g, r in configs], jobs=args.jobs,
                         ray_address=args.ray)
    rows = []
    cost_model = None
    for (nodes, per_node, router), keepalive in zip(configs, density):
        gpus = nodes * per_node
        scenario = _pool(base, nodes, per_node, router, list(base.backends), [load * gpus for load in LOADS],
                         args.poisson)
        result = simulate_scenario(scenario, jobs=args.jobs, ray_address=args.ray)
        summaries = point_summaries(result)
        cost_model = summaries[0]["cost_model"]
        p99 = {}
        for s in summaries:
            value = s["agents"]["pooled"]["p99_ms"]
            p99[(s["backend"], s["n_agents"] // gpus)] = "OOM" if s["oom"] else f"{value:,.0f}"
        djinn_bound = next(s["memory_bound_agents"] for s in summaries if s["backend"] == "djinn")
        rows.append((f"{nodes}x{per_node}", gpus, router, keepalive, djinn_bound, p99))
    wall_s = time.perf_counter() - started

    arrivals = (f"Poisson arrivals {args.poisson:g}/s per GPU, exponential ACT (mean 10 s)" if args.poisson
                else "all agents start together, fixed 10 s ACT")
    print(f"pool scaling: {POOL32.relative_to(REPO)} base, {arrivals}; cost model: {cost_model}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}; "
          f"jobs={args.jobs}{', ray=' + args.ray if args.ray else ''}; wall {wall_s:.1f} s")
    backends = list(base.backends)
    short = {"ray_keepalive": "keep-alive", "ray_serverless": "serverless", "djinn": "Djinn"}
    heads = [f"P99 ms {short.get(b, b)} @{load}/GPU" for load in LOADS for b in backends]
    print("| pool | GPUs | router | keep-alive max agents (simulated) | Djinn max agents (memory bound) | "
          + " | ".join(heads) + " |")
    print("|---" * (5 + len(heads)) + "|")
    for pool, gpus, router, keepalive, djinn_bound, p99 in rows:
        cells = [p99[(b, load)] for load in LOADS for b in backends]
        print(f"| {pool} | {gpus} | {router} | {keepalive} | {djinn_bound:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
