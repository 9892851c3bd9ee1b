"""The work after the simulation of a large point, timed alone: the parent's frame and summary, and
what the baseline's child does (its runs and the JSON file), on the records of one simulation.

    python benchmarks/after_simulation.py [--agents 100000] [--repeats 3]

Runs benchmarks/scenarios/poisson_batching.yaml (Poisson arrivals, continuous batching) at
`--agents`, then times each part `--repeats` times in this process (CPU seconds; pandas imported
before the timings). To compare two trees, run this file with each tree's environment. Not a test:
it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import pandas  # noqa: F401  (its import is start-up cost, timed elsewhere)

    from djinnsim.sim import metrics, report
    from djinnsim.sim.records import records_frame
    from djinnsim.sim.run import simulate_scenario
    from djinnsim.sim.scenario import load_scenario

    base = load_scenario(REPO / "benchmarks" / "scenarios" / "poisson_batching.yaml")
    scenario = base.model_copy(update={"workload": base.workload.model_copy(update={"agents": [args.agents]})})
    point = simulate_scenario(scenario, None, progress=None).points[0]
    summary_s, baseline_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            started = time.process_time()
            frame = records_frame(point.records, metrics.SUMMARY_COLUMNS)
            phases = metrics.agent_phases(frame)
            summary = report.point_summary(point, "agents", frame, phases)
            summary_s.append(time.process_time() - started)
            started = time.process_time()
            document = report.baseline_runs_document(point, scenario, frame, phases)
            report._write_baseline(Path(tmp) / "baseline.json", document,
                                   lambda d: report.with_summary(d, point, scenario, summary))
            baseline_s.append(time.process_time() - started)
    print(f"{args.agents:,} agents, {len(point.records):,} records; CPU s, median of {args.repeats} "
          f"(each: {', '.join(f'{s:.3f}' for s in summary_s)} / {', '.join(f'{s:.3f}' for s in baseline_s)})")
    print(f"frame and summary (the parent)      {statistics.median(summary_s):.3f}")
    print(f"baseline runs and JSON (its child)  {statistics.median(baseline_s):.3f}")


if __name__ == "__main__":
    main()
