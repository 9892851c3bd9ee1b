"""`djinnsim search`: capacities and break-even link rates found by running the simulator.

Two questions, each answered per backend and per (model, GPU, link) group of the scenario's sweep,
and labelled by the cost model that produced it (measured, transferred, roofline):

- Capacity (agents workloads): the largest N whose simulated P99 per phase (REASON and REFLECT
  records of all agents pooled, as Figure 6 and Table 2 use) is at most the SLO, with no OOM record
  and no rejected record, within the scenario's workload, GPU, link and scheduler.
- Break-even (decode workloads, Exp 2.1): the slowest link rate at which a remote backend's mean
  per-token latency is at most a target in ms, or within a percentage of native_pytorch's.

Nothing here is a formula: every probe is `simulate_point` of the same point `djinnsim run` would
simulate (same cost model, same seed through `point_seed`), measured by the same functions of
`sim.metrics` the reports use. A point at N agents draws its own random numbers, so the answer N is
exactly reproducible with `djinnsim run` of the scenario at `agents: [N, N + 1]`.

What the search assumes, and what it verifies
---------------------------------------------
Capacity assumes the set of feasible N is downward closed (if N meets the SLO, every smaller N
does). Queueing, memory and admission usually make it so, but jitter draws differ from N to N and
nothing guarantees it. The search gallops up from N = 1 (doubling, or a step predicted by
extrapolating the P99 line through the last feasible probe and the earliest one at a quarter of its
N or more, 5% past the crossing, at most x4; at least x1.5, except that one step of less may follow
a step of x1.5 or more, as when the crossing is predicted close) until a probe
fails or the cap is reached, then narrows the bracket [largest feasible, smallest infeasible] by
interpolating the P99, each interpolated probe followed by its neighbour on the far side (bisection
when the failure is memory or admission, and after two interpolation rounds that did not halve the
bracket). It stops when the two are adjacent, so the answer
is always verified by simulation: N met the SLO with no OOM or rejection, and N + 1 did not
(`limited_by` names why: "slo", "memory" for an OOM record, "admission" for a rejected record,
in that order of precedence: memory, admission, slo). When the set is not downward closed the
answer is still such a verified boundary, but a larger feasible N may exist; every probe is kept
(`probes.csv`) so a reader can see what was simulated. N is capped (`DEFAULT_MAX_AGENTS`); a cap
that still meets the SLO is reported as `limited_by: "cap"` with `max_agents` = the cap, meaning
"at least the cap", never as a limit found.

Break-even assumes the mean per-token latency does not rise as the link gets faster. So that it
holds, every rate probed for one backend draws the random numbers (step-time jitter) of the
scenario's own point at its own link rate (common random numbers): the probes differ by the link
alone. Drawn per rate instead (as `djinnsim run` seeds a point), the draw-to-draw spread of a mean
per-token latency on the bundled H100 profile is about +-10% (its decode step flips between ~21 and
~42 ms), which would make the answer noise; `djinnsim run` at the answered rate therefore draws
differently and its mean can differ by that spread. It checks
both ends of `LINK_GBPS_BOUNDS` first, then bisects in log space over rates rounded to
`LINK_SIGNIFICANT_DIGITS` significant digits (so the answer is a rate one can write in a scenario)
until the bracket is within `LINK_REL_TOL`. The answer rate met the target and the rate below it
did not, both simulated. `limited_by`: "target" (a boundary found), "bound" (the target is missed
even at the fastest rate searched: no answer), "lowest_rate" (met already at the slowest rate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from djinnsim.errors import DjinnsimError

from . import metrics
from .backends import get_backend
from .records import records_frame
from .parallel import map_points
from .run import CostModels, point_seed
from .safeyaml import strict_json
from .scenario import AgentsWorkload, DecodeWorkload, Point, Scenario, expand_points
from .simulate import simulate_point

# Record.status of a request the server's admission control turned away (it never ran). The
# engine writes it when it models an admission limit; search reads it from the records.
REJECTED_STATUS = "rejected"
OOM_STATUS = "oom"

DEFAULT_MAX_AGENTS = 65536
LINK_GBPS_BOUNDS = (0.1, 3200.0)
LINK_REL_TOL = 0.01
LINK_SIGNIFICANT_DIGITS = 4
NATIVE = "native_pytorch"

GALLOP_MIN_GROWTH = 1.5  # a galloping probe is at least x1.5 the last feasible N (but see below)
GALLOP_MAX_GROWTH = 4  # and at most x4 (x2 when nothing can be extrapolated)
GALLOP_OVERSHOOT = 1.05  # aim 5% past the extrapolated crossing, so the probe likely fails


# --- one probe -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One simulated point of a search: N agents (capacity) or a link rate (break-even)."""

    x: float  # N, or link Gbps
    value_ms: float | None  # pooled P99 per phase, or mean per-token latency; None if nothing finished
    oom: bool
    rejected: bool
    ok: bool  # met the target with no OOM and no rejection

    @property
    def failure(self) -> str | None:
        """Why it failed: memory, admission or the latency target (None when ok)."""
        if self.ok:
            return None
        if self.oom:
            return "memory"
        if self.rejected:
            return "admission"
        return "slo"


def _statuses(frame) -> tuple[bool, bool]:
    status = frame["status"]
    return bool((status == OOM_STATUS).any()), bool((status == REJECTED_STATUS).any())


def agents_probe(scenario: Scenario, point: Point, cost, seed: int, n: int, slo_ms: float) -> Probe:
    """Simulate `point` at N = n and judge it against the SLO."""
    at_n = point.model_copy(update={"n_agents": n})
    result = simulate_point(scenario, at_n, cost, point_seed(seed, at_n))
    frame = records_frame(result.records)
    oom, rejected = _statuses(frame)
    p99 = metrics.agent_summary(frame)["pooled"]["p99_ms"]
    ok = not oom and not rejected and p99 is not None and p99 <= slo_ms
    return Probe(n, p99, oom, rejected, ok)


def decode_per_token_ms(scenario: Scenario, point: Point, cost, seed: int,
                        draws_of: Point | None = None) -> tuple[float | None, bool, bool]:
    """Mean per-token latency (ms) of the measured, OOM-free runs of a decode point; OOM; rejected.
    `draws_of`: the point whose random numbers to draw (default: `point`'s own, as djinnsim run)."""
    result = simulate_point(scenario, point, cost, point_seed(seed, draws_of or point))
    frame = records_frame(result.records)
    oom, rejected = _statuses(frame)
    return metrics.decode_summary(frame)["mean_per_token_ms"], oom, rejected


def link_probe(scenario: Scenario, point: Point, cost, seed: int, gbps: float, target_ms: float) -> Probe:
    """Simulate `point` with its link at `gbps`, drawing the random numbers of `point` itself
    (common random numbers across rates: the probes differ by the link alone)."""
    at_rate = point.model_copy(update={"link": point.link.model_copy(update={"gbps": gbps})})
    per_token, oom, rejected = decode_per_token_ms(scenario, at_rate, cost, seed, draws_of=point)
    ok = not oom and not rejected and per_token is not None and per_token <= target_ms
    return Probe(gbps, per_token, oom, rejected, ok)


# --- the integer search ----------------------------------------------------------------------------


def largest_feasible(evaluate: Callable[[int], Probe], target_ms: float,
                     cap: int = DEFAULT_MAX_AGENTS) -> tuple[Probe | None, Probe | None, list[Probe]]:
    """The largest N in 1..cap with evaluate(N).ok, assuming feasibility is downward closed.

    Returns (probe at the answer or None when N = 1 fails, probe at answer + 1 or None when the
    cap itself is feasible, every probe in the order made). Each N is evaluated at most once.
    """
    if cap < 1:
        raise DjinnsimError(f"the agent cap must be >= 1, got {cap}")
    seen: dict[int, Probe] = {}
    order: list[Probe] = []

    def probe(n: int) -> Probe:
        if n not in seen:
            seen[n] = evaluate(n)
            order.append(seen[n])
        return seen[n]

    lo: Probe | None = None
    feasible: list[Probe] = []
    small_step_ok = True
    n = 1
    while True:  # gallop
        p = probe(n)
        if not p.ok:
            hi = p
            break
        lo = p
        feasible.append(p)
        if n >= cap:
            return lo, None, order
        step = _gallop_next(feasible, target_ms, small_step_ok)
        # a step below x1.5 (the crossing extrapolated close) that still meets the target is not
        # followed by another: a curve bending away from its extrapolation must not cost many probes
        small_step_ok = step >= math.ceil(n * GALLOP_MIN_GROWTH)
        n = min(step, cap)

    fruitless = 0
    while lo is not None and hi.x - lo.x > 1:  # narrow
        width = hi.x - lo.x
        guess = None if fruitless >= 2 else _interpolate(lo, hi, target_ms)
        n = int(guess) if guess is not None else int(lo.x + width // 2)
        n = min(max(n, int(lo.x) + 1), int(hi.x) - 1)
        p = probe(n)
        if p.ok:
            lo = p
        else:
            hi = p
        if guess is not None and hi.x - lo.x > 1:
            # An interpolated probe lands near the crossing: its neighbour on the far side often
            # closes the bracket at once (jitter makes P99 too rough to interpolate to one agent).
            p = probe(n + 1 if p.ok else n - 1)
            if p.ok:
                lo = p
            else:
                hi = p
        fruitless = 0 if guess is None or (hi.x - lo.x) * 2 <= width else fruitless + 1
    return lo, hi, order


def _gallop_next(feasible: list[Probe], target_ms: float, small_step_ok: bool = True) -> int:
    """The next galloping probe after the feasible ones (in order): where the P99 line through the
    last probe and the earliest one at or above a quarter of its N crosses the target, plus
    GALLOP_OVERSHOOT, within [x1.5 (or N + 1 when `small_step_ok`), x4]; doubling when no line
    can be drawn (one probe, no P99, a P99 that does not rise, a target it never reaches)."""
    last = feasible[-1]
    n = int(last.x)
    double = 2 * n
    base = next((p for p in feasible[:-1] if p.x * GALLOP_MAX_GROWTH >= last.x), None)
    if base is None or base.value_ms is None or last.value_ms is None:
        return double
    slope = (last.value_ms - base.value_ms) / (last.x - base.x)
    if slope <= 0:
        return double
    crossing = last.x + (target_ms - last.value_ms) / slope
    if not math.isfinite(crossing):
        return double
    low = n + 1 if small_step_ok else max(n + 1, math.ceil(n * GALLOP_MIN_GROWTH))
    return min(max(math.ceil(crossing * GALLOP_OVERSHOOT), low), GALLOP_MAX_GROWTH * n)


def _interpolate(lo: Probe, hi: Probe, target_ms: float) -> float | None:
    """Where the P99 line through lo and hi crosses the target; None when hi failed for another
    reason than the SLO (its P99 says nothing then) or the line does not rise."""
    if hi.failure != "slo" or lo.value_ms is None or hi.value_ms is None or hi.value_ms <= lo.value_ms:
        return None
    return lo.x + (target_ms - lo.value_ms) / (hi.value_ms - lo.value_ms) * (hi.x - lo.x)


# --- answers ---------------------------------------------------------------------------------------


@dataclass
class Group:
    """One (backend, model, GPU, link) of a scenario, with the cost model that serves it."""

    point: Point
    cost: Any
    cost_model: str  # measured | transferred | roofline (| what a custom cost model calls itself)
    cost_model_detail: str

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.point.model.key, self.point.gpu.key, float(self.point.link.gbps))


@dataclass
class CapacityAnswer:
    backend: str
    model: str
    gpu: str
    link_gbps: float
    cost_model: str
    cost_model_detail: str
    slo_p99_ms: float
    cap: int
    max_agents: int
    p99_ms_at_max: float | None
    p99_ms_above: float | None
    limited_by: str  # slo | memory | admission | cap
    probes: list[Probe] = field(default_factory=list)
    gpus: int = 1  # the GPUs of the pool the N agents share

    @property
    def max_agents_per_gpu(self) -> float:
        return self.max_agents / self.gpus

    def as_json(self) -> dict[str, Any]:
        found = {"max_agents": self.max_agents, "p99_ms_at_max": _round(self.p99_ms_at_max),
                 "p99_ms_above": _round(self.p99_ms_above), "limited_by": self.limited_by,
                 "slo_p99_ms": self.slo_p99_ms, "cost_model": self.cost_model, "model": self.model,
                 "gpu": self.gpu, "link_gbps": self.link_gbps}
        if self.gpus > 1:  # a pool: max_agents is the pool's; per GPU beside it
            found.update(gpus=self.gpus, max_agents_per_gpu=_round(self.max_agents_per_gpu))
        return found


@dataclass
class BreakEvenAnswer:
    backend: str
    model: str
    gpu: str
    cost_model: str
    cost_model_detail: str
    target_ms: float
    target: str  # how the target was set, e.g. "15 ms" or "within 10% of native_pytorch (3.1 ms)"
    link_gbps: float | None  # slowest rate that met it (None: not met within the bounds)
    per_token_ms_at: float | None
    link_gbps_below: float | None  # the rate just below, which missed it (None at the lowest rate)
    per_token_ms_below: float | None
    limited_by: str  # target | bound | lowest_rate
    probes: list[Probe] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"link_gbps": self.link_gbps, "per_token_ms_at": _round(self.per_token_ms_at),
                "link_gbps_below": self.link_gbps_below, "per_token_ms_below": _round(self.per_token_ms_below),
                "limited_by": self.limited_by, "target_ms": _round(self.target_ms), "target": self.target,
                "cost_model": self.cost_model, "model": self.model, "gpu": self.gpu}


def _round(value: float | None, decimals: int = 3) -> float | None:
    """A figure for search.json: null when there is none or it is not finite (JSON has no infinity)."""
    return None if value is None or not math.isfinite(float(value)) else round(float(value), decimals)


def cost_model_kind(cost) -> str:
    return str(getattr(cost, "source", "") or "unknown")


def groups(scenario: Scenario, costs: CostModels, backends: Iterable[str] | None = None,
           extra_backends: Iterable[str] = ()) -> list[Group]:
    """The scenario's (backend, model, GPU, link) points at its first N, restricted to `backends`
    (all when None), in expand_points order; `extra_backends` are added even if the scenario lacks them."""
    wanted = list(scenario.backends) if backends is None else list(dict.fromkeys(backends))
    for name in wanted:
        if name not in scenario.backends:
            raise DjinnsimError(f"backend {name!r} is not in scenario {scenario.name!r} "
                                f"(it has {', '.join(scenario.backends)}; --set backends=[...] changes its list)")
    names = wanted + [b for b in extra_backends if b not in wanted]
    for name in names:
        get_backend(name, scenario.custom_backends)
    update: dict[str, Any] = {"backends": names}
    if isinstance(scenario.workload, AgentsWorkload):
        update["workload"] = scenario.workload.model_copy(update={"agents": [1]})
    points = expand_points(scenario.model_copy(update=update))
    found = []
    for point in points:
        cost = costs.for_point(point)
        found.append(Group(point, cost, cost_model_kind(cost), cost.describe()))
    return found


def search_capacity(scenario: Scenario, slo_p99_ms: float, backends: Iterable[str] | None = None,
                    calibration: Path | None = None, max_agents: int = DEFAULT_MAX_AGENTS,
                    costs: CostModels | None = None, seed: int | None = None, jobs: int | None = None,
                    ray_address: str | None = None) -> list[CapacityAnswer]:
    """The largest N per (backend, model, GPU, link) that meets the SLO, found by simulation.
    Groups are searched in parallel as `sim.parallel.map_points` runs them (`jobs`, `ray_address`;
    neither: on the executor held now); the answers do not depend on where they ran."""
    return search_capacities(scenario, [(slo_p99_ms, backends)], calibration, max_agents, costs, seed, jobs,
                             ray_address)[0]


def search_capacities(scenario: Scenario, questions: list[tuple],
                      calibration: Path | None = None, max_agents: int = DEFAULT_MAX_AGENTS,
                      costs: CostModels | None = None, seed: int | None = None, jobs: int | None = None,
                      ray_address: str | None = None) -> list[list[CapacityAnswer]]:
    """search_capacity for several (SLO, backends) or (SLO, backends, cap) questions at once (a
    question's cap replaces `max_agents`): every group of every question is one task of a single
    map_points call. Returns each question's answers, in order."""
    if not isinstance(scenario.workload, AgentsWorkload):
        raise DjinnsimError(f"--slo-p99-ms needs an agents workload; scenario {scenario.name!r} is "
                            f"{scenario.workload.kind} (use --break-even-ms for decode scenarios)")
    caps = [question[2] if len(question) > 2 else max_agents for question in questions]
    for (slo_p99_ms, *_), cap in zip(questions, caps):
        if not slo_p99_ms > 0:
            raise DjinnsimError(f"--slo-p99-ms must be > 0, got {slo_p99_ms:g}")
        if cap < 1:
            raise DjinnsimError(f"the agent cap must be >= 1, got {cap}")
    costs = costs or CostModels(scenario, calibration)
    base_seed = scenario.seed if seed is None else seed
    asked = [[(float(slo), group, cap) for group in groups(scenario, costs, backends)]
             for (slo, backends, *_), cap in zip(questions, caps)]
    tasks = [(scenario, group.point, group.cost, base_seed, slo, cap) for each in asked for slo, group, cap in each]
    found = iter(map_points(_capacity_task, tasks, jobs=jobs, ray_address=ray_address))
    answers: list[list[CapacityAnswer]] = []
    for each in asked:
        answers.append([])
        for slo, group, cap in each:
            at, above, probes = next(found)
            answers[-1].append(CapacityAnswer(
                backend=group.point.backend.name, model=group.point.model.key, gpu=group.point.gpu.key,
                link_gbps=float(group.point.link.gbps), gpus=group.point.cluster.gpus, cost_model=group.cost_model,
                cost_model_detail=group.cost_model_detail, slo_p99_ms=slo, cap=cap,
                max_agents=int(at.x) if at else 0, p99_ms_at_max=at.value_ms if at else None,
                p99_ms_above=above.value_ms if above else None,
                limited_by=above.failure if above else "cap", probes=probes))
    return answers


def _capacity_task(task: tuple) -> tuple[Probe | None, Probe | None, list[Probe]]:
    """One group's capacity search (a map_points task): largest_feasible over agents_probe."""
    scenario, point, cost, seed, slo_ms, cap = task
    return largest_feasible(lambda n: agents_probe(scenario, point, cost, seed, n, slo_ms), slo_ms, cap)


def _rate(gbps: float) -> float:
    return float(f"{gbps:.{LINK_SIGNIFICANT_DIGITS}g}")


def slowest_link(evaluate: Callable[[float], Probe], bounds: tuple[float, float] = LINK_GBPS_BOUNDS,
                 rel_tol: float = LINK_REL_TOL) -> tuple[Probe | None, Probe | None, list[Probe]]:
    """The slowest rate in `bounds` with evaluate(rate).ok, assuming a faster link never hurts.

    Returns (probe at the answer or None when even the fastest rate fails, probe at the rate below
    or None when the slowest rate already meets it, every probe in order)."""
    low, high = _rate(bounds[0]), _rate(bounds[1])
    if not 0 < low < high:
        raise DjinnsimError(f"link bounds must satisfy 0 < low < high, got {bounds}")
    order: list[Probe] = []

    def probe(gbps: float) -> Probe:
        order.append(evaluate(gbps))
        return order[-1]

    hi = probe(high)
    if not hi.ok:
        return None, None, order
    lo = probe(low)
    if lo.ok:
        return lo, None, order
    while hi.x / lo.x > 1 + rel_tol:
        mid = _rate(math.sqrt(lo.x * hi.x))
        if mid in (lo.x, hi.x):
            break
        p = probe(mid)
        if p.ok:
            hi = p
        else:
            lo = p
    return hi, lo, order


def search_break_even(scenario: Scenario, target_ms: float | None = None, within_native_pct: float | None = None,
                      backends: Iterable[str] | None = None, calibration: Path | None = None,
                      bounds: tuple[float, float] = LINK_GBPS_BOUNDS, rel_tol: float = LINK_REL_TOL,
                      costs: CostModels | None = None, jobs: int | None = None,
                      ray_address: str | None = None) -> list[BreakEvenAnswer]:
    """Per remote backend and (model, GPU): the slowest link rate meeting a per-token target.
    Backends are searched in parallel as in search_capacity (`jobs`, `ray_address`)."""
    if not isinstance(scenario.workload, DecodeWorkload):
        raise DjinnsimError(f"--break-even-ms / --within-native-pct need a decode workload (Exp 2.1); "
                            f"scenario {scenario.name!r} is {scenario.workload.kind}")
    if (target_ms is None) == (within_native_pct is None):
        raise DjinnsimError("give exactly one of --break-even-ms and --within-native-pct")
    if target_ms is not None and not target_ms > 0:
        raise DjinnsimError(f"--break-even-ms must be > 0, got {target_ms:g}")
    if within_native_pct is not None and not within_native_pct >= 0:
        raise DjinnsimError(f"--within-native-pct must be >= 0, got {within_native_pct:g}")
    costs = costs or CostModels(scenario, calibration)
    # One link rate per group: the searched rate replaces the swept one.
    scenario = scenario.model_copy(update={"sweep": scenario.sweep.model_copy(update={"link_gbps": None})})
    extra = [NATIVE] if within_native_pct is not None else []
    found = groups(scenario, costs, backends, extra_backends=extra)
    remote = [g for g in found if g.point.backend.location == "remote"]
    goals: list[tuple[float, str]] = [(float(target_ms), f"{target_ms:g} ms")] * len(remote) if target_ms is not None else []
    if within_native_pct is not None:
        natives = list({g.key[:2]: g for g in found if g.point.backend.name == NATIVE}.values())
        measured = map_points(_native_task, [(scenario, g.point, g.cost, scenario.seed) for g in natives],
                              jobs=jobs, ray_address=ray_address)
        native_ms_of = {}
        for native, (native_ms, oom, _) in zip(natives, measured):
            if native_ms is None or oom:
                raise DjinnsimError(f"{NATIVE} has no OOM-free run on {native.point.model.key} / "
                                    f"{native.point.gpu.key}: no latency to compare with")
            native_ms_of[native.key[:2]] = native_ms
        for group in remote:
            native_ms = native_ms_of[group.key[:2]]
            goals.append((native_ms * (1 + within_native_pct / 100),
                          f"within {within_native_pct:g}% of {NATIVE} ({native_ms:.3f} ms)"))
    tasks = [(scenario, g.point, g.cost, scenario.seed, goal, bounds, rel_tol) for g, (goal, _) in zip(remote, goals)]
    answers = []
    for group, (goal, label), (at, below, probes) in zip(
            remote, goals, map_points(_break_even_task, tasks, jobs=jobs, ray_address=ray_address)):
        limited_by = "bound" if at is None else ("lowest_rate" if below is None else "target")
        answers.append(BreakEvenAnswer(
            backend=group.point.backend.name, model=group.point.model.key, gpu=group.point.gpu.key,
            cost_model=group.cost_model, cost_model_detail=group.cost_model_detail, target_ms=goal,
            target=label, link_gbps=at.x if at else None, per_token_ms_at=at.value_ms if at else None,
            link_gbps_below=below.x if below else None, per_token_ms_below=below.value_ms if below else None,
            limited_by=limited_by, probes=probes))
    return answers


def _native_task(task: tuple) -> tuple[float | None, bool, bool]:
    return decode_per_token_ms(*task)


def _break_even_task(task: tuple) -> tuple[Probe | None, Probe | None, list[Probe]]:
    """One remote backend's break-even search (a map_points task): slowest_link over link_probe."""
    scenario, point, cost, seed, goal, bounds, rel_tol = task
    return slowest_link(lambda gbps: link_probe(scenario, point, cost, seed, gbps, goal), bounds, rel_tol)


# --- output ----------------------------------------------------------------------------------------


def answer_keys(answers: list) -> list[str]:
    """The backend name when the scenario has one group; else backend/model/gpu[/link] (what varies)."""
    names = ("model", "gpu", "link_gbps") if answers and isinstance(answers[0], CapacityAnswer) else ("model", "gpu")
    varies = {name: name in names and len({getattr(a, name) for a in answers}) > 1 for name in ("model", "gpu", "link_gbps")}
    keys = []
    for a in answers:
        parts = [a.backend]
        parts += [a.model] if varies["model"] else []
        parts += [a.gpu] if varies["gpu"] else []
        parts += [f"{a.link_gbps:g}gbps"] if varies["link_gbps"] else []
        keys.append("/".join(parts))
    return keys


def answers_json(answers: list) -> dict[str, Any]:
    return {key: a.as_json() for key, a in zip(answer_keys(answers), answers)}


def capacity_markdown(answers: list[CapacityAnswer]) -> str:
    slo = answers[0].slo_p99_ms if answers else float("nan")
    lines = ["# Search: agents per GPU under a P99 target", "",
             f"Largest N whose simulated P99 per phase (REASON + REFLECT pooled) is <= {slo:g} ms with no OOM",
             "and no rejected request; N and N + 1 were both simulated (`limited_by` says why N + 1 fails;",
             f"`cap`: the cap itself met the SLO, so the capacity is at least the cap). Every probe: probes.csv.", "",
             "| backend | model | GPU | link | cost model | max agents | P99 at max | P99 at max + 1 | limited by | probes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in answers:
        most = f">= {a.max_agents}" if a.limited_by == "cap" else str(a.max_agents)
        if a.gpus > 1:
            most += f" on {a.gpus} GPUs ({a.max_agents_per_gpu:.3g} per GPU)"
        lines.append(f"| {a.backend} | {a.model} | {a.gpu} | {a.link_gbps:g} Gbps | {a.cost_model} | {most} | "
                     f"{_ms(a.p99_ms_at_max)} | {_ms(a.p99_ms_above)} | {a.limited_by} | {len(a.probes)} |")
    lines += ["", *_cost_model_notes(answers)]
    return "\n".join(lines) + "\n"


def break_even_markdown(answers: list[BreakEvenAnswer]) -> str:
    lines = ["# Search: slowest link at which a remote backend meets a per-token target", "",
             "Mean per-token latency of the measured runs, simulated at each probed rate; the answer met the",
             "target and the rate below it did not (`bound`: missed even at the fastest rate searched;",
             f"`lowest_rate`: met already at the slowest). Bounds {LINK_GBPS_BOUNDS[0]:g}..{LINK_GBPS_BOUNDS[1]:g} Gbps.", "",
             "| backend | model | GPU | cost model | target | slowest link | per token there | rate below | per token below | limited by |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in answers:
        lines.append(f"| {a.backend} | {a.model} | {a.gpu} | {a.cost_model} | {a.target} | {_gbps(a.link_gbps)} | "
                     f"{_ms(a.per_token_ms_at, 3)} | {_gbps(a.link_gbps_below)} | {_ms(a.per_token_ms_below, 3)} | "
                     f"{a.limited_by} |")
    lines += ["", *_cost_model_notes(answers)]
    return "\n".join(lines) + "\n"


def _cost_model_notes(answers: list) -> list[str]:
    details = dict.fromkeys(a.cost_model_detail for a in answers)
    notes = ["Cost models: " + "; ".join(details) + "."]
    if len({a.cost_model for a in answers}) > 1:
        notes.append("Rows come from different kinds of cost model: compare rows of the same kind only.")
    return notes


def _ms(value: float | None, decimals: int = 1) -> str:
    return "-" if value is None else f"{value:,.{decimals}f} ms"


def _gbps(value: float | None) -> str:
    return "-" if value is None else f"{value:g} Gbps"


def probes_csv(answers: list) -> str:
    keys = answer_keys(answers)
    rows = ["answer,x,value_ms,oom,rejected,ok"]
    for key, a in zip(keys, answers):
        for p in a.probes:
            value = "" if p.value_ms is None else f"{p.value_ms:.6g}"
            rows.append(f"{key},{p.x:g},{value},{int(p.oom)},{int(p.rejected)},{int(p.ok)}")
    return "\n".join(rows) + "\n"


def write_search_outputs(answers: list, out_dir: Path) -> list[Path]:
    """search.json (what --json prints), search.md, probes.csv, search.png and search.svg in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    capacity = bool(answers) and isinstance(answers[0], CapacityAnswer)
    written = [out_dir / "search.json", out_dir / "search.md", out_dir / "probes.csv"]
    written[0].write_text(strict_json(answers_json(answers), indent=2) + "\n")
    written[1].write_text(capacity_markdown(answers) if capacity else break_even_markdown(answers))
    written[2].write_text(probes_csv(answers))
    from .figures import write_search_figure

    written += write_search_figure(answers, out_dir / "search.png", capacity)
    return written


def answer_dict(answer) -> dict[str, Any]:
    """Everything of an answer, probes included (for tests and callers that want all of it)."""
    return asdict(answer)
