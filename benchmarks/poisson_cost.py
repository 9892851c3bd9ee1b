"""What simulating Poisson agents under continuous batching costs, in-process (issue 11).

    python benchmarks/poisson_cost.py [--agents 10000] [--opcodes]

Simulates benchmarks/scenarios/poisson_batching.yaml with `--agents` agents (`simulate_scenario`,
no outputs written) and prints its CPU seconds and events. Two uses beside the timing:
  - instructions, which a shared machine does not blur: the count of
    `valgrind --tool=cachegrind --cache-sim=no python benchmarks/poisson_cost.py --agents 10000`
    less that of the same with `--agents 1` (imports and set-up) is the run's (with
    PYTHONHASHSEED=0, repeat counts agree within a few tenths of a percent);
  - `--opcodes`: the bytecodes the run executes, per agent, by function, counted with
    `sys.settrace` (slow: a few thousand agents), the top 40 printed: where the work of an agent goes.
Not a test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

SCENARIO = Path(__file__).resolve().parent / "scenarios" / "poisson_batching.yaml"


def _count_opcodes(run) -> tuple[collections.Counter, collections.Counter]:
    """Bytecodes executed and calls made per function (file:name) while `run()` runs."""
    opcodes: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    def trace(frame, event, _arg):
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = f"{Path(code.co_filename).name}:{code.co_name}"
        calls[key] += 1

        def step(_frame, kind, _arg):
            if kind == "opcode":
                opcodes[key] += 1
            return step

        return step

    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(None)
    return opcodes, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--opcodes", action="store_true", help="count bytecodes per function (slow)")
    args = parser.parse_args()

    from djinnsim.sim.engine import world
    from djinnsim.sim.run import simulate_scenario
    from djinnsim.sim.scenario import load_scenario

    base = load_scenario(SCENARIO)
    scenario = base.model_copy(update={"workload": base.workload.model_copy(update={"agents": [args.agents]})})
    if not args.opcodes:
        started = time.process_time()
        result = simulate_scenario(scenario)
        print(f"{args.agents:,} agents: {time.process_time() - started:.2f} CPU s, {result.events:,} events")
        return
    run_events = world.CountingEnvironment.run
    counted: list = []

    def run(env, until=None):  # the events alone: set-up and records' table aside
        opcodes, calls = _count_opcodes(lambda: run_events(env, until))
        counted.append((opcodes, calls))

    world.CountingEnvironment.run = run
    result = simulate_scenario(scenario)
    opcodes, calls = counted[0]
    per_agent = args.agents
    print(f"{args.agents:,} agents, {result.events:,} events: {sum(opcodes.values()) / per_agent:,.0f} bytecodes "
          f"and {sum(calls.values()) / per_agent:,.1f} calls per agent")
    print(f"{'bytecodes/agent':>16}{'calls/agent':>13}  function")
    for key, count in opcodes.most_common(40):
        print(f"{count / per_agent:>16,.1f}{calls[key] / per_agent:>13.2f}  {key}")


if __name__ == "__main__":
    main()
