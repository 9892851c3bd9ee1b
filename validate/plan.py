"""A reference validation planned as device commands: estimate each item's GPU time, print its command.

    python -m djinnsim.validate.plan PLAN.yaml [--profile PATH]         # the table of estimates
    python -m djinnsim.validate.plan PLAN.yaml --command ITEM           # one item's shell command

A plan (docs/validation/h200/plan.yaml) names a calibration command and validation items, each a
scenario with the shortening `djinnsim validate` applies (points, agents, ACT, repeats). The
estimate simulates every point of an item once, cold shapes and all, with a measured profile (by
default the bundled H100 one, the scenario's GPU replaced by the profile's), and adds what the
real runs spend outside the simulated requests:

    estimate_s = OVERHEAD_FACTOR * repeats * sum(simulated seconds per point) + PROCESS_START_S * GPU processes
                 + OOM_COPY_S * copies probed

The constants come from the H100 run 4 (docs/validation/h100-80gb/run4-full-calibration): its agent
part simulated to 138 s over its repeats, its real repeats spanned 144.5 s, and its real runs took
218 s in all with 5 GPU processes and a 6-copy OOM probe (1.05 * 138 + 5 * 7 + 6 * 8 = 228 s). They are rough: an item's time budget (--time-budget-s) stops new real runs
before the 10-minute command limit whatever the estimate says.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from djinnsim.errors import DjinnsimError

OVERHEAD_FACTOR = 1.05
PROCESS_START_S = 7.0
OOM_COPY_S = 8.0
COMMAND_LIMIT_S = 600
COMMAND_MARGIN_S = 40  # start-up, the report, the tarball


def load_plan(path: Path) -> dict:
    try:
        plan = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DjinnsimError(f"cannot read plan {path}: {exc}") from None
    if not isinstance(plan, dict) or "items" not in plan:
        raise DjinnsimError(f"{path} is not a plan (no items)")
    return plan


def max_fit_agents(scenario_path: Path, profile_path: Path | None) -> int:
    """The most keep-alive agents whose model copies fit on the scenario's GPU, as the simulator's
    memory bound gives it (the profile moved to that GPU by datasheet ratios when it is another)."""
    from djinnsim.sim.run import CostModels
    from djinnsim.sim.scenario import expand_points, load_scenario
    from djinnsim.sim.simulate import memory_bound_agents

    scenario = load_scenario(scenario_path)
    scenario = scenario.model_copy(update={"backends": ["ray_keepalive"], "cost_model": "transfer"})
    point = expand_points(scenario)[0]
    bound = memory_bound_agents(scenario, point.backend, CostModels(scenario, profile_path).for_point(point))
    if bound is None:
        raise DjinnsimError(f"{scenario_path}: keep-alive has no memory bound on {scenario.gpu}")
    return int(bound)


def item_shortening(item: dict, base: Path, profile_path: Path | None):
    from .points import Shortening

    agents = item.get("agents")
    if agents is not None:
        agents = tuple(max_fit_agents(base / item["scenario"], profile_path) if a == "max_fit" else int(a)
                       for a in agents)
    return Shortening(agents=agents, act_s=item.get("act_s"), runs=item.get("runs"),
                      warmup_runs=item.get("warmup_runs"))


def estimate_item(item: dict, base: Path, profile_path: Path | None) -> dict:
    """Simulated seconds of each point of the item on the profile's GPU, and the estimate."""
    from djinnsim.sim.profile import load_profile
    from djinnsim.sim.run import bundled_profiles
    from djinnsim.sim.scenario import AgentsWorkload, expand_points, load_scenario

    from .pipeline import real_processes, simulate
    from .points import select_points, validation_scenario

    path = profile_path or next(p for p in bundled_profiles() if "llama-2-7b" in p.name)
    profile = load_profile(path)
    scenario = load_scenario(base / item["scenario"])
    short = item_shortening(item, base, profile_path)
    scenario_v = validation_scenario(scenario, short, None, profile.metadata.gpu_key)
    chosen = {p.index for p in select_points(expand_points(scenario_v), item.get("points"))}
    sims = simulate(scenario_v, path, profile, 1)
    per_point = {sims[i][0].point.label: max((r.finished_at for r in sims[i][0].records), default=0.0)
                 for i in sorted(chosen)}
    processes = {real for i in chosen for real in real_processes(sims[i][0].point).values()}
    keepalive = isinstance(scenario_v.workload, AgentsWorkload) and any(
        sims[i][0].point.backend.name == "ray_keepalive" for i in chosen)
    most = max((sims[i][0].point.n_agents or 1) for i in chosen) if chosen else 0
    # The real runner loads keep-alive copies up to --oom-probe-max (or the first OOM) after the points.
    oom_copies = max(0, min(probe_max(item, short), max_fit_agents(base / item["scenario"], profile_path) + 1)
                     - most) if keepalive else 0
    repeats = int(item.get("repeats", 5))
    estimate = (OVERHEAD_FACTOR * repeats * sum(per_point.values()) + PROCESS_START_S * len(processes)
                + OOM_COPY_S * oom_copies)
    return {"name": item["name"], "priority": item.get("priority"), "points": per_point, "repeats": repeats,
            "processes": len(processes), "oom_copies": oom_copies, "estimate_s": estimate,
            "agents": short.agents, "profile": str(path)}


def probe_max(item: dict, short) -> int:
    """--oom-probe-max of an item: its own, else its largest N (no copies beyond the points)."""
    return int(item.get("oom_probe_max") or max(short.agents or (1,)))


def command(plan: dict, item: dict, base: Path, profile_path: Path | None, budget_s: float) -> str:
    """The `djinnsim validate` command of one item, writing to $OUT/<name>."""
    short = item_shortening(item, base, profile_path)
    args = ["djinnsim", "validate", str(base / item["scenario"]), "--gpu", "0", "--calibration", plan["profile"],
            "--repeats", str(item.get("repeats", 5)), "--time-budget-s", str(int(budget_s))]
    for pattern in item.get("points") or []:
        args += ["--points", pattern]
    if short.agents is not None:
        args += ["--agents", ",".join(str(n) for n in short.agents)]
    if short.act_s is not None:
        args += ["--act-s", f"{short.act_s:g}"]
    if short.runs is not None:
        args += ["--runs", str(short.runs)]
    if short.warmup_runs is not None:
        args += ["--warmup-runs", str(short.warmup_runs)]
    if short.agents is not None:
        args += ["--oom-probe-max", str(probe_max(item, short))]
    if item.get("level_probe"):
        args += ["--level-probe"]
    return " ".join(shlex.quote(a) for a in args) + f" --out \"$OUT/{item['name']}\""


def table(plan: dict, rows: list[dict]) -> str:
    cal = plan.get("calibration", {})
    lines = ["| priority | item | points (simulated s per repeat) | repeats | GPU processes | OOM copies | "
             "estimate | cumulative with calibration |", "|---|---|---|---|---|---|---|---|"]
    total = float(cal.get("estimate_s", 0))
    for row in sorted(rows, key=lambda r: r["priority"] or 99):
        total += row["estimate_s"]
        points = "; ".join(f"{label.split('__')[0]} {label.split('__')[-1]} {s:.1f}" for label, s in row["points"].items())
        lines.append(f"| {row['priority']} | {row['name']} | {points} | {row['repeats']} | {row['processes']} | "
                     f"{row['oom_copies']} | {row['estimate_s']:.0f} s | {total:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m djinnsim.validate.plan", description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--profile", type=Path, default=None, help="measured profile to simulate with (default: bundled H100)")
    parser.add_argument("--command", metavar="ITEM", help="print this item's command and exit")
    parser.add_argument("--budget-s", type=float, default=None, help="--time-budget-s of the command (default: 560)")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan)
        base = args.plan.parent
        items = {item["name"]: item for item in plan["items"]}
        if args.command:
            if args.command not in items:
                raise DjinnsimError(f"no item {args.command!r} in {args.plan}; items: {', '.join(items)}")
            budget = args.budget_s or COMMAND_LIMIT_S - COMMAND_MARGIN_S
            print(command(plan, items[args.command], base, args.profile, budget))
            return 0
        rows = [estimate_item(item, base, args.profile) for item in plan["items"]]
        print(f"Estimated device time per item (simulated with {rows[0]['profile'] if rows else '-'}; "
              f"calibration {plan.get('calibration', {}).get('estimate_s', 0)} s first):\n")
        print(table(plan, rows))
    except DjinnsimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
