"""How big a scenario is before it runs: SimPy events, records and expected wall time.

`djinnsim run` calls `check_workload` before simulating anything. It refuses a scenario past
`MAX_EVENTS` events, `MAX_RECORDS` records (each record stays in memory until the outputs are
written) or `MAX_POINTS` points, and warns with the expected time above `WARN_AFTER_S`.

The estimate is per point, from the tokens its workload generates and what each token costs the
engine in events, measured with `PointResult.events` on the shipped scenarios (see the README's
"Robustness" section):

- one request per token (round_trip token or op): 18 events per token (uplink, GPU step,
  downlink, host costs);
- a local backend (native_pytorch): 3 per token;
- one request per phase on a time-sliced GPU (processes sharing it, the Ray baselines): none per
  token since the executor shares the GPU as a fluid (14-25 events per agent of agents32, all in
  its two calls, at N = 4-16,384), 0.1 counted (4.5 before: a 16,384-agent agents32 run warned of
  4 minutes and took 5 s);
- one request per phase otherwise (a phase's steps run as one pass of Djinn's server): none per
  token, 0.4 counted;
- and about 20 per generate call (an agent's phase, a decode run: connection, prefill, ACT), 24 counted.

It is an upper bound when requests fail early (an OOM ends an agent), and it is computed per
dimension of the sweep, never by listing the points, so a sweep of a billion points is refused in
microseconds. `EVENTS_PER_S` is the rate the 2-core CPU machine simulates at (60k-150k events/s over
the shipped scenarios; the lower end is used so the warning errs long).
"""

from __future__ import annotations

from djinnsim.errors import DjinnsimError

from .backends import get_backend
from .scenario import AgentsWorkload, Scenario

EVENTS_PER_S = 80_000
MAX_EVENTS = 2_000_000_000  # about 7 hours at EVENTS_PER_S
MAX_RECORDS = 20_000_000  # records held in memory (a few GB as a table)
MAX_POINTS = 100_000
WARN_AFTER_S = 60.0

EVENTS_PER_TOKEN_REMOTE = 18.0
EVENTS_PER_TOKEN_LOCAL = 3.0
EVENTS_PER_TOKEN_TIMESLICED = 0.1
EVENTS_PER_TOKEN_PHASE = 0.4
EVENTS_PER_CALL = 24.0


def _events_per_token(backend, scheduler: str | None) -> float:
    if backend.location == "local":
        return EVENTS_PER_TOKEN_LOCAL
    if backend.round_trip in ("token", "op"):
        return EVENTS_PER_TOKEN_REMOTE
    if (scheduler or backend.scheduler) == "time_sliced":
        return EVENTS_PER_TOKEN_TIMESLICED
    return EVENTS_PER_TOKEN_PHASE


def estimate(scenario: Scenario) -> dict[str, float]:
    """Points, events and records of a whole run (bands included), and the expected seconds."""
    sweep = scenario.sweep
    others = len(sweep.model or [0]) * len(sweep.gpu or [0]) * len(sweep.link_gbps or [0])
    workload = scenario.workload
    backends = [get_backend(name, scenario.custom_backends) for name in scenario.backends]
    repeats = 1 + scenario.bands
    events = records = 0.0
    if isinstance(workload, AgentsWorkload):
        agents = float(sum(workload.agents))
        tokens = agents * workload.iterations * (workload.reason.new_tokens + workload.reflect.new_tokens)
        for backend in backends:
            events += tokens * _events_per_token(backend, scenario.server.scheduler)
            events += agents * workload.iterations * 2 * EVENTS_PER_CALL
            per_token = backend.round_trip in ("token", "op") and backend.location == "remote"
            records += tokens if per_token else agents * workload.iterations * 2
        points = len(backends) * len(workload.agents) * others
    else:
        tokens = float(workload.runs) * workload.new_tokens
        for backend in backends:
            events += tokens * _events_per_token(backend, scenario.server.scheduler) + workload.runs * EVENTS_PER_CALL
            records += tokens if backend.round_trip in ("token", "op") or backend.location == "local" else workload.runs
        points = len(backends) * others
    events *= others * repeats
    records *= others
    return {"points": points, "events": events, "records": records, "seconds": events / EVENTS_PER_S}


def check_workload(scenario: Scenario, jobs: int = 1) -> str | None:
    """Refuse a run past the limits (DjinnsimError); return a warning with the expected time when
    it is long, else None."""
    size = estimate(scenario)
    if size["points"] > MAX_POINTS:
        raise DjinnsimError(f"{scenario.name}: {size['points']:,.0f} points; djinnsim runs at most {MAX_POINTS:,} "
                            "per scenario (split the sweep)")
    if size["records"] > MAX_RECORDS:
        raise DjinnsimError(f"{scenario.name}: about {size['records']:,.0f} records to keep in memory, past the "
                            f"limit of {MAX_RECORDS:,} (fewer agents, runs or tokens, or split the sweep)")
    if size["events"] > MAX_EVENTS:
        raise DjinnsimError(f"{scenario.name}: about {size['events']:.2g} events, past the limit of {MAX_EVENTS:.2g} "
                            f"(about {_duration(size['seconds'])} of simulation); fewer agents, runs or tokens, "
                            "or split the sweep")
    seconds = size["seconds"] / max(min(jobs, size["points"]), 1)
    if seconds >= WARN_AFTER_S:
        return (f"a large run: about {size['events']:.2g} simulated events in {size['points']:,.0f} points, "
                f"expected to take {_duration(seconds)} on a 2-core CPU machine")
    return None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
