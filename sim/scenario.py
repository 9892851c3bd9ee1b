"""Scenario files: YAML validated by pydantic, expanded into simulation points."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from djinnsim.errors import DjinnsimError

from .backends import Backend, Scheduler, get_backend
from .safeyaml import describe_path, load_yaml_file
from .server_rules import KvPolicySpec, ServerRules
from .specs import GpuSpec, ModelSpec, get_gpu, get_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Sane bounds (documented in the README's "Robustness" section): far beyond any real deployment, far
# below where a float clock loses its resolution or a run its end.
MIN_LINK_GBPS = 0.001  # 1 Mbit/s
MAX_LINK_GBPS = 1e6  # 1 Pbit/s
MAX_SECONDS = 1e6  # any one duration (ACT, RTT...): 11.6 days
MAX_TOKENS = 1_000_000  # tokens in one phase or prompt
MAX_COUNT = 10_000_000  # agents, runs, iterations
MAX_SEED = 2**64 - 1
MAX_BANDS = 1000
# A scenario's name becomes a folder under results/: one plain path component
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}$"


def check_name(value: str, what: str = "name") -> str:
    """A name that is one safe path component: no separators, NUL, `..`, or leading dot; <= 100 chars."""
    if not re.fullmatch(NAME_PATTERN, value) or ".." in value:
        raise ValueError(f"{what} {value[:60]!r} must be 1-100 letters, digits, '_', '-', '+' or '.', not starting "
                         "with '.' nor holding '..' (it names a results folder)")
    return value


def check_seed(seed: int, option: str = "--seed") -> int:
    """A seed numpy's SeedSequence takes: 0 .. 2^64 - 1."""
    if not 0 <= seed <= MAX_SEED:
        raise DjinnsimError(f"{option} must be an integer in 0..{MAX_SEED}, not {seed}")
    return seed


def _no_duplicates(values: list, what: str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} appears twice (each point would overwrite the other's results)")
        seen.add(value)


class Link(_Strict):
    gbps: float = Field(default=25.0, ge=MIN_LINK_GBPS, le=MAX_LINK_GBPS, description="line rate each way (full duplex)")
    rtt_ms: float = Field(default=0.2, ge=0, le=MAX_SECONDS, description="round-trip propagation time")
    framing_bytes: int = Field(default=137, ge=0, le=2**30, description="1 B type + 8 B length + JSON header, per message")
    host_stack: Literal["nic", "loopback"] = Field(
        default="nic",
        description="nic: the link is a NIC at its line rate, the hosts add the profile's per-message and "
        "(de)serialization costs; loopback: also caps every connection at the TCP throughput the "
        "profile measured on one host's loopback (how `validate` runs its real clients and server) and "
        "charges its loopback host time per message in series with the link, when measured (loopback_path, "
        "serialization included, else serialize and loopback_serial_gbps; paced_path at the link's rate where "
        "the profile has it)",
    )
    stream_cap_gbps: float | None = Field(
        default=None, ge=MIN_LINK_GBPS, le=MAX_LINK_GBPS, description="caps every connection at this many Gbps (overrides host_stack's cap)"
    )


class Server(_Strict):
    scheduler: Scheduler | None = Field(default=None, description="override the backends' default policy")
    max_batch: int = Field(default=64, gt=0, le=MAX_COUNT, description="continuous batching: most sequences per step")
    # --- KV during ACT and Djinn's server rules (sim/server_rules.py documents each default) ---
    kv_policy: KvPolicySpec | None = Field(
        default=None, description="override every backend's kv_policy: preserve | swap | discard | "
        "{kind: ttl, ttl_s, then: swap|discard} | min_waste; null: each backend's own (preserve)")
    kv_swap: Literal["none", "idle"] = Field(
        default="none", description="deprecated alias: idle is kv_policy: swap")
    pinned_host_kv: bool = Field(default=True, description="swapped KV goes to pinned host memory (else pageable)")
    rules: ServerRules = Field(default_factory=ServerRules, description="Djinn's server rules, each off by "
                               "default; `djinn` turns all on with Djinn's values")

    @model_validator(mode="after")
    def _kv_swap_alias(self) -> "Server":
        if self.kv_swap == "idle":
            if self.kv_policy is not None and self.kv_policy.kind != "swap":
                raise ValueError(f"kv_swap: idle contradicts kv_policy: {self.kv_policy.kind}; drop kv_swap")
            self.kv_policy = self.kv_policy or KvPolicySpec(kind="swap")
        return self
    # --- end of the KV / server-rules block ---
    shapes: Literal["warm", "cold"] = Field(
        default="warm",
        description="warm: every GPU process has run every attention shape before (a long-running "
        "deployment); cold: each process starts having run none and pays the profile's cold_shapes "
        "cost the first time it meets one, as freshly started processes do (validation runs this way)",
    )


class Cluster(_Strict):
    """A pool of GPUs: `nodes` nodes of `gpus_per_node` GPUs; each node's NIC (one link) carries its
    GPUs' traffic; the router (sim/engine/router.py) places sessions and serverless tasks on GPUs."""

    nodes: int = Field(default=1, ge=1, le=1024)
    gpus_per_node: int = Field(default=1, ge=1, le=16)
    router: Literal["session_affinity", "least_loaded", "round_robin"] = "session_affinity"

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


class Fixed(_Strict):
    kind: Literal["fixed"] = "fixed"
    seconds: float = Field(ge=0, le=MAX_SECONDS)


class Uniform(_Strict):
    kind: Literal["uniform"]
    low_s: float = Field(ge=0, le=MAX_SECONDS)
    high_s: float = Field(ge=0, le=MAX_SECONDS)

    @model_validator(mode="after")
    def _ordered(self) -> "Uniform":
        if self.high_s < self.low_s:
            raise ValueError("high_s must be >= low_s")
        return self


class Exponential(_Strict):
    kind: Literal["exponential"]
    mean_s: float = Field(gt=0, le=MAX_SECONDS)


Duration = Annotated[Union[Fixed, Uniform, Exponential], Field(discriminator="kind")]


class Phase(_Strict):
    input_tokens: int = Field(ge=0, le=MAX_TOKENS, description="tokens new to the conversation this phase")
    new_tokens: int = Field(gt=0, le=MAX_TOKENS, description="tokens generated")


class Arrival(_Strict):
    kind: Literal["simultaneous", "poisson"] = "simultaneous"
    rate_per_s: float | None = Field(default=None, ge=1e-6, le=1e6)

    @model_validator(mode="after")
    def _rate(self) -> "Arrival":
        if self.kind == "poisson" and self.rate_per_s is None:
            raise ValueError("poisson arrivals need rate_per_s")
        return self


class DecodeWorkload(_Strict):
    """Experiment 2.1: one client decoding, `runs` times."""

    kind: Literal["decode"]
    prompt_tokens: int = Field(default=72, gt=0, le=MAX_TOKENS)
    new_tokens: int = Field(default=50, gt=0, le=MAX_TOKENS)
    batch: int = Field(default=1, gt=0, le=MAX_COUNT)
    runs: int = Field(default=30, gt=0, le=MAX_COUNT)
    warmup_runs: int = Field(default=5, ge=0, le=MAX_COUNT)

    @model_validator(mode="after")
    def _warmup(self) -> "DecodeWorkload":
        if self.warmup_runs >= self.runs:
            raise ValueError("warmup_runs must be < runs")
        return self


class AgentsWorkload(_Strict):
    """Experiment 2.2: N agents, each REASON -> ACT -> REFLECT, `iterations` times."""

    kind: Literal["agents"]
    agents: list[int] = Field(default=[1, 2, 4, 8, 16, 32], min_length=1)
    reason: Phase = Phase(input_tokens=72, new_tokens=50)
    act: Duration = Fixed(seconds=10.0)
    reflect: Phase = Phase(input_tokens=16, new_tokens=50)
    iterations: int = Field(default=1, gt=0, le=MAX_COUNT)
    arrival: Arrival = Arrival()

    @field_validator("agents")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(n <= 0 for n in value):
            raise ValueError("every agent count must be > 0")
        if any(n > MAX_COUNT for n in value):
            raise ValueError(f"every agent count must be <= {MAX_COUNT}")
        _no_duplicates(value, "agent count")
        return value


Workload = Annotated[Union[DecodeWorkload, AgentsWorkload], Field(discriminator="kind")]


class Sweep(_Strict):
    link_gbps: list[Annotated[float, Field(ge=MIN_LINK_GBPS, le=MAX_LINK_GBPS)]] | None = Field(default=None, min_length=1)
    model: list[str] | None = Field(default=None, min_length=1)
    gpu: list[str] | None = Field(default=None, min_length=1)

    @field_validator("link_gbps")
    @classmethod
    def _distinct_rates(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:  # as a point's label writes it: 25 and 25.0000001 would share a file
            _no_duplicates([f"{rate:g}" for rate in value], "link rate")
        return value


class Scenario(_Strict):
    name: str
    description: str = Field(default="", max_length=10_000)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    model: str = "llama-2-7b"
    gpu: str = "h100-80gb"
    cost_model: Literal["profile", "transfer", "roofline"] = Field(
        default="profile",
        description="profile: the calibration as measured (its GPU and model must match); "
        "transfer: the calibration moved to `gpu` by datasheet ratios; roofline: analytic",
    )
    backends: list[str] = Field(min_length=1)
    custom_backends: dict[str, dict[str, Any]] = Field(default_factory=dict)
    link: Link = Link()
    server: Server = Server()
    cluster: Cluster = Cluster()
    workload: Workload
    sweep: Sweep = Sweep()
    trace_point: int = Field(default=-1, description="index of the point whose run goes to trace.json")
    bands: int = Field(default=0, ge=0, le=MAX_BANDS, description="prediction bands: simulate each point this many more times "
                       "under draws of the profile's spread and report P10-P90 of every metric (0: none)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _names_resolve(self) -> "Scenario":
        _no_duplicates(self.backends, "backends: backend")
        for name in self.custom_backends:  # every one, used or not: a broken one is a broken file
            check_name(name, "custom backend")
            get_backend(name, self.custom_backends)
        for name in self.backends:
            get_backend(name, self.custom_backends)
        _no_duplicates([get_model(model).key for model in self.sweep.model or [self.model]], "sweep.model: model")
        _no_duplicates([get_gpu(gpu).key for gpu in self.sweep.gpu or [self.gpu]], "sweep.gpu: GPU")
        count = self.point_count
        if not -count <= self.trace_point < count:
            raise ValueError(f"trace_point {self.trace_point} is outside the {count} points of this scenario")
        return self

    @property
    def point_count(self) -> int:
        ns = len(self.workload.agents) if isinstance(self.workload, AgentsWorkload) else 1
        sweep = self.sweep
        return len(self.backends) * len(sweep.model or [0]) * len(sweep.gpu or [0]) * len(sweep.link_gbps or [0]) * ns


class Point(BaseModel):
    """One simulation: a backend, a model, a GPU, a link and (for agents) N."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    index: int
    backend: Backend
    model: ModelSpec
    gpu: GpuSpec
    link: Link
    n_agents: int | None = None
    cluster: Cluster = Cluster()

    @property
    def label(self) -> str:
        parts = [self.backend.name, self.model.key, self.gpu.key, f"{self.link.gbps:g}gbps"]
        if self.n_agents is not None:
            parts.append(f"n{self.n_agents}")
        if self.cluster != Cluster():  # one GPU keeps its label
            parts.append(f"{self.cluster.nodes}x{self.cluster.gpus_per_node}gpu_{self.cluster.router}")
        return "__".join(parts)


def expand_points(scenario: Scenario) -> list[Point]:
    """The cartesian product of backends, models, GPUs, link rates and N, in a fixed order."""
    models = scenario.sweep.model or [scenario.model]
    gpus = scenario.sweep.gpu or [scenario.gpu]
    rates = scenario.sweep.link_gbps or [scenario.link.gbps]
    ns: list[int | None] = (
        list(scenario.workload.agents) if isinstance(scenario.workload, AgentsWorkload) else [None]
    )
    points = []
    for backend_name, model, gpu, rate, n in itertools.product(scenario.backends, models, gpus, rates, ns):
        points.append(
            Point(
                index=len(points),
                backend=get_backend(backend_name, scenario.custom_backends),
                model=get_model(model),
                gpu=get_gpu(gpu),
                link=scenario.link.model_copy(update={"gbps": rate}),
                n_agents=n,
                cluster=scenario.cluster,
            )
        )
    return points


_UNION_TAGS = {"decode", "agents", "fixed", "uniform", "exponential"}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [str(p) if str(p).isprintable() else repr(p)  # a key holding a newline stays on the one line
           for i, p in enumerate(err["loc"]) if not (i and p in _UNION_TAGS and err["loc"][i - 1] in ("workload", "act"))]
    msg = err["msg"].removeprefix("Value error, ")
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"field {'.'.join(loc)}: {msg}{extra}" if loc else f"{msg}{extra}"


def parse_scenario(raw: Any, source: str = "<scenario>") -> Scenario:
    if not isinstance(raw, dict):
        raise DjinnsimError(f"{source}: a scenario must be a YAML mapping")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        raise DjinnsimError(f"{source}: {_first_error(exc)}") from None
    except DjinnsimError as exc:
        raise DjinnsimError(f"{source}: {exc}") from None


def load_scenario(path: str | Path) -> Scenario:
    return parse_scenario(load_yaml_file(path, "scenario file"), describe_path(path))


def dump_scenario(scenario: Scenario) -> str:
    """The resolved scenario, defaults filled in, for writing next to results."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
