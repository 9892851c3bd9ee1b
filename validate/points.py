"""The validation scenario: the user's scenario with a workload short enough to run for real.

Real and simulated runs use this one scenario, so they describe the same points. The GPU is the
profile's (a validation compares with the machine it calibrated), the model is one model (the
tiny one with --device cpu), and sweeps over GPUs and models are dropped; link sweeps stay.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from djinnsim.errors import DjinnsimError
from djinnsim.sim.scenario import AgentsWorkload, DecodeWorkload, Point, Scenario, expand_points, parse_scenario

CPU_MODEL = "tiny-llama"


@dataclass(frozen=True)
class Shortening:
    """Workload overrides; None keeps the scenario's value."""

    runs: int | None = None
    warmup_runs: int | None = None
    new_tokens: int | None = None
    prompt_tokens: int | None = None
    agents: tuple[int, ...] | None = None
    act_s: float | None = None
    iterations: int | None = None


def validation_scenario(scenario: Scenario, short: Shortening, model: str | None, gpu_key: str | None) -> Scenario:
    """A validated copy of `scenario` with the overrides applied (one-line error if they clash)."""
    raw = scenario.model_dump(mode="json")
    workload = raw["workload"]
    if isinstance(scenario.workload, DecodeWorkload):
        for field in ("runs", "warmup_runs", "new_tokens", "prompt_tokens"):
            value = getattr(short, field)
            if value is not None:
                workload[field] = value
    else:
        assert isinstance(scenario.workload, AgentsWorkload)
        if short.agents is not None:
            workload["agents"] = list(short.agents)
        if short.act_s is not None:
            workload["act"] = {"kind": "fixed", "seconds": short.act_s}
        if short.iterations is not None:
            workload["iterations"] = short.iterations
        if short.new_tokens is not None:
            for phase in ("reason", "reflect"):
                workload[phase]["new_tokens"] = short.new_tokens
        if short.prompt_tokens is not None:
            workload["reason"]["input_tokens"] = short.prompt_tokens
    if model is not None:
        raw["model"] = model
    if gpu_key is not None:
        raw["gpu"] = gpu_key
    raw["cost_model"] = "profile"
    raw["sweep"] = {"link_gbps": raw.get("sweep", {}).get("link_gbps")}
    raw["name"] = f"{scenario.name}-validation"
    return as_run_for_real(parse_scenario(raw, f"validation of {scenario.name}"))


def as_run_for_real(scenario: Scenario) -> Scenario:
    """The real runs start fresh GPU processes, which meet every attention shape for the first time
    (and the simulated repeats carry each process's shapes over, in the order they ran); their
    sockets are on one host's loopback, so its measured TCP throughput caps every connection."""
    return scenario.model_copy(update={"server": scenario.server.model_copy(update={"shapes": "cold"}),
                                       "link": scenario.link.model_copy(update={"host_stack": "loopback"})})


def select_points(points: list[Point], patterns: list[str] | None) -> list[Point]:
    """Points whose index or label matches one of `patterns` (ints, or globs like 'full_djinn*')."""
    if not patterns:
        return points
    chosen = []
    for point in points:
        for pattern in patterns:
            if (pattern.isdigit() and int(pattern) == point.index) or fnmatch.fnmatchcase(point.label, pattern):
                chosen.append(point)
                break
    if not chosen:
        labels = ", ".join(f"{p.index}:{p.label}" for p in points)
        raise DjinnsimError(f"--points {' '.join(patterns)} matches no point; the points are {labels}")
    return chosen


def parse_agents(text: str | None) -> tuple[int, ...] | None:
    """'1,2,4' -> (1, 2, 4)."""
    if text is None or text == "":
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise DjinnsimError(f"--agents must be a comma-separated list of positive integers, not {text!r}") from None
    if any(v <= 0 for v in values):
        raise DjinnsimError(f"--agents must be a comma-separated list of positive integers, not {text!r}")
    return values


def points_of(scenario: Scenario) -> list[Point]:
    return expand_points(scenario)
