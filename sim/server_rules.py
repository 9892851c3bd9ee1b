"""Djinn's server rules and the KV policy during ACT: the scenario schema (`server.rules`,
`server.kv_policy`, a backend's `kv_policy`), each rule a toggle with a documented default.

The facts come from Djinn's code history (docs: reference.md, "Server facts worth modelling"). Every
rule is off by default: the shipped scenarios model the evaluation plan's server (one request at a
time, no limits), and a scenario turns a rule on to ask what it changes. The rules bind a server
that holds one shared weight copy for every session (`weights: shared`, Djinn's VMU); the Ray
baselines' per-agent processes and per-request tasks have none of them, and ignore them.

| rule | when on (the default values are Djinn's) |
|---|---|
| `memory_split` | usable = min(total - reserve_gib, free - free_margin_gib) at start; weights must fit the text share, session arenas + session KV (+ a request's own KV) the data share, a pass's workspace the stack share; an allocation past its share is an OOM (no compaction) |
| `session_arena_mib` | each session reserves an arena of this size at open (256 MB, later 64 MB), on top of its KV (which lives in PyTorch's allocator) |
| `admission` | at most `max_concurrent` requests inside the server at once (arrived, not yet answered); one past it is rejected: a record with status "rejected", and its agent stops |
| `qos` | agents take the classes of `agent_classes` in turn; a class admits at most its share of `max_concurrent` (0.3 / 0.5 / 0.2, rounded); a serial server takes waiting requests by strict priority realtime > interactive > batch, a request moving up one class per `escalate_after_ms` waited |
| `idle_eviction_s` | a session idle this long (60 s) loses its KV (wherever it is); its next phase re-prefills the whole context (record `kv_state` "evicted") |
| `max_concurrent_prefills` | at most this many prefills at once (4): binds continuous batching (prefills per iteration) and time slicing; a serial server runs one anyway |
| `swap_pool` | host memory for swapped KV is a pinned pool of `gib` (32) for at most `sessions` (100); a swap that does not fit keeps the KV resident |
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QOS_CLASSES = ("realtime", "interactive", "batch")  # strict priority, highest first
KV_POLICY_TAGS = ("preserve", "swap", "discard", "ttl", "min_waste")


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class KvPolicySpec(_Rule):
    """What a session's KV does while its agent is in ACT (a tool call); a bare tag is `{kind: tag}`.

    preserve: stays resident. swap: moves to host memory over PCIe at ACT start and comes back when
    the next phase arrives (its restore is in that phase's copy time). discard: is freed; the next
    phase re-prefills the whole context. ttl: stays `ttl_s`, then does `then` (swap or discard) if the
    agent is still in ACT (Continuum). min_waste: per ACT, the cheapest of preserve, swap and discard
    in GPU memory x time (InferCept; the formula is in sim/engine/kvpolicy.py).
    """

    kind: Literal["preserve", "swap", "discard", "ttl", "min_waste"] = "preserve"
    ttl_s: float = Field(default=10.0, ge=0, le=86_400, description="ttl: seconds kept resident before `then`")
    then: Literal["swap", "discard"] = Field(default="swap", description="ttl: what follows the time-to-live")

    @model_validator(mode="before")
    @classmethod
    def _tag(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @property
    def label(self) -> str:
        return f"ttl({self.ttl_s:g}s, then {self.then})" if self.kind == "ttl" else self.kind


class MemorySplit(_Rule):
    enabled: bool = False
    text: float = Field(default=0.50, gt=0, le=1, description="share of usable memory for weights")
    data: float = Field(default=0.35, gt=0, le=1, description="share for session arenas and KV")
    stack: float = Field(default=0.15, gt=0, le=1, description="share for per-execution scratch (workspace)")
    reserve_gib: float = Field(default=2.0, ge=0, le=1024, description="usable <= total - reserve_gib")
    free_margin_gib: float = Field(default=1.0, ge=0, le=1024, description="usable <= free - free_margin_gib")

    @model_validator(mode="after")
    def _shares(self) -> "MemorySplit":
        if self.text + self.data + self.stack > 1 + 1e-9:
            raise ValueError("text + data + stack shares must not exceed 1")
        return self

    def usable_bytes(self, total_bytes: int, free_bytes: int) -> int:
        return max(int(min(total_bytes - self.reserve_gib * 2**30, free_bytes - self.free_margin_gib * 2**30)), 0)


class Admission(_Rule):
    enabled: bool = False
    max_concurrent: int = Field(default=64, gt=0, le=1_000_000, description="requests inside the server at once")


class Qos(_Rule):
    enabled: bool = False
    shares: dict[Literal["realtime", "interactive", "batch"], float] = Field(
        default_factory=lambda: {"realtime": 0.3, "interactive": 0.5, "batch": 0.2},
        description="each class's share of admission.max_concurrent")
    escalate_after_ms: float = Field(default=800.0, gt=0, le=3.6e6, description="waiting time per class step up")
    agent_classes: list[Literal["realtime", "interactive", "batch"]] = Field(
        default=["interactive"], min_length=1, description="agent i is of class agent_classes[i % len]")

    @model_validator(mode="after")
    def _complete(self) -> "Qos":
        if set(self.shares) != set(QOS_CLASSES) or any(not 0 <= v <= 1 for v in self.shares.values()):
            raise ValueError("shares must give realtime, interactive and batch a value in [0, 1]")
        return self

    def limit(self, qos_class: str, max_concurrent: int) -> int:
        return int(math.floor(self.shares[qos_class] * max_concurrent + 0.5))


class SwapPool(_Rule):
    enabled: bool = False
    gib: float = Field(default=32.0, gt=0, le=65_536, description="pinned host memory for swapped KV")
    sessions: int = Field(default=100, gt=0, le=10_000_000, description="sessions swapped out at once")


class ServerRules(_Rule):
    """Djinn's server rules (see the module docstring); all off by default."""

    memory_split: MemorySplit = MemorySplit()
    session_arena_mib: float = Field(default=0, ge=0, le=65_536, description="0: off; Djinn: 256, later 64")
    admission: Admission = Admission()
    qos: Qos = Qos()
    idle_eviction_s: float | None = Field(default=None, gt=0, le=86_400, description="null: off; Djinn: 60")
    max_concurrent_prefills: int | None = Field(default=None, gt=0, le=100_000, description="null: off; Djinn: 4")
    swap_pool: SwapPool = SwapPool()

    @model_validator(mode="before")
    @classmethod
    def _djinn(cls, value: Any) -> Any:
        return DJINN_RULES if value == "djinn" else value

    @property
    def arena_bytes(self) -> int:
        return int(self.session_arena_mib * 2**20)


# `server: {rules: djinn}`: every rule on with the values of Djinn's code (the later 64 MB arena).
DJINN_RULES: dict[str, Any] = {
    "memory_split": {"enabled": True},
    "session_arena_mib": 64,
    "admission": {"enabled": True},
    "qos": {"enabled": True},
    "idle_eviction_s": 60,
    "max_concurrent_prefills": 4,
    "swap_pool": {"enabled": True},
}
