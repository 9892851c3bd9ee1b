"""What the figures cost: Figure 6 (PNG at 200 dpi plus SVG) for agents32's one panel and for a
12-panel sweep (3 GPUs x 1 model x 4 links, roofline cost model), in CPU and wall seconds.

    python benchmarks/figure_speed.py [--repeats 3]

The summaries come from simulating the scenarios once (not timed); each figure is then written
`--repeats` times and the median printed. cpu_s is printed beside wall_s because on a shared,
busy machine wall time also counts waiting for a core. Not a test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _summaries(scenario):
    from djinnsim.sim.report import point_summaries
    from djinnsim.sim.run import simulate_scenario

    return point_summaries(simulate_scenario(scenario))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from djinnsim.sim import figures
    from djinnsim.sim.overrides import apply_overrides, collect
    from djinnsim.sim.scenario import load_scenario

    agents32 = load_scenario(REPO / "scenarios" / "agents32.yaml")
    grid = apply_overrides(agents32, collect(["cost_model=roofline", "workload.agents=[1,2,4,8]"],
                                             gpu="a100-80gb,h100-80gb,h200", link_gbps="10,25,100,400"))
    cases = {"figure6, 1 panel (agents32)": agents32, "figure6, 12 panels (3 GPUs x 4 links)": grid}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; median of {args.repeats}")
    print(f"{'what':40s} {'wall_s':>7s} {'cpu_s':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, scenario in cases.items():
            summaries = _summaries(scenario)
            walls, cpus = [], []
            for i in range(args.repeats):
                started, cpu_started = time.perf_counter(), time.process_time()
                figures.write_figure6(summaries, list(scenario.backends), Path(tmp) / f"f{i}.png")
                walls.append(time.perf_counter() - started)
                cpus.append(time.process_time() - cpu_started)
            print(f"{name:40s} {statistics.median(walls):7.2f} {statistics.median(cpus):7.2f}")


if __name__ == "__main__":
    main()
