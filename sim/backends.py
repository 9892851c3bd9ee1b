"""Backends are presets over a few toggles, not classes.

Toggles (all visible in sim/data/backends.yaml, and definable in a scenario):
  location       local: the client owns the GPU, nothing crosses a link; remote: client <-> link <-> server
  weights        shared: one resident copy; per_agent: each agent's own process holds a copy (and a
                 CUDA context) for its whole life; per_request: every request loads them from
                 `weight_tier` and frees them after
  kv             session: the KV cache stays on the GPU across steps and phases; request: it lives for
                 one request and the next phase re-prefills the whole context; client: it travels to the
                 client after every step and back with the next; none: there is no KV cache
  step_compute   incremental: one token with the cached context; full_context: a forward over all L_t
                 tokens; last_token: a 1-token forward with no past (the 1c1e018 bug)
  round_trip     token: one request per generated token; phase: one request per generate call;
                 op: one round trip per operator (ops_per_layer x layers per token, bytes_per_op each way)
  send_ids       all: every request carries the whole sequence; new: only ids the server has not seen;
                 last: the last id only
  return_logits  none | last | all positions, per generated token
  connection     per_request: a new TCP connection (1 RTT + setup) per request; persistent: opened once
  kv_between_phases  (kv: request) keep: the process holds its last request's KV on the GPU until its
                 next request starts, which drops it and re-prefills the whole context into a fresh one
                 (a keep-alive actor, as the seed describes it); free: the KV is freed when the request
                 ends. A per-request task's process ends with its request, so it can only free.
  memory_full    oom: an allocation that does not fit fails (an OOM record); wait: it queues until memory frees
  scheduler      default GPU executor policy: serial_fcfs (one request at a time, as Djinn's server),
                 time_sliced (independent processes share the GPU, as a fluid of their passes' turns),
                 time_sliced_per_pass (the same, one GPU turn per pass: exact, slow), continuous_batching
  kv_policy      what a session KV does during ACT: preserve (default), swap, discard, ttl, min_waste
                 (sim/server_rules.py, sim/engine/kvpolicy.py); the scenario's server.kv_policy overrides it
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from djinnsim.errors import DjinnsimError

from .engine.plan import GeneratePlan, ServingPlan, generate_plan, serving_plan
from .server_rules import KvPolicySpec
from .specs import TOKEN_ID_BYTES, ModelSpec, load_bundled_yaml

Scheduler = Literal["serial_fcfs", "time_sliced", "time_sliced_per_pass", "continuous_batching"]


class Backend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    description: str = ""
    location: Literal["local", "remote"]
    weights: Literal["shared", "per_agent", "per_request"]
    weight_tier: Literal["disk", "pageable", "pinned"] = "disk"
    kv: Literal["session", "request", "client", "none"]
    step_compute: Literal["incremental", "full_context", "last_token"]
    round_trip: Literal["token", "phase", "op"]
    ops_per_layer: int = Field(default=0, ge=0, le=100_000)
    bytes_per_op: int = Field(default=0, ge=0, le=2**40)
    send_ids: Literal["all", "new", "last"]
    return_logits: Literal["none", "last", "all"]
    connection: Literal["per_request", "persistent"]
    kv_between_phases: Literal["keep", "free"] = "keep"
    memory_full: Literal["oom", "wait"] = "oom"
    scheduler: Scheduler = "serial_fcfs"
    kv_policy: KvPolicySpec = KvPolicySpec()

    @model_validator(mode="after")
    def _kv_outlives_its_process(self) -> "Backend":
        if self.weights == "per_request" and self.kv == "request" and self.kv_between_phases == "keep":
            raise ValueError("kv_between_phases: keep needs a process that outlives its request; "
                             "weights: per_request frees everything with it (set kv_between_phases: free)")
        return self

    # --- bytes on the wire, per reference.md's formulas ------------------------------------
    def step_bytes(self, model: ModelSpec, t: int, prompt_tokens: int, cached_tokens: int = 0) -> tuple[int, int]:
        """Payload (up, down) bytes of generated token t (0-based) in a per-token decode.

        L_t = prompt_tokens + t is the sequence length the step's forward ends at; `cached_tokens`
        of the prompt already have a KV cache from an earlier phase (kv = session or client).
        """
        seq_len = prompt_tokens + t
        if self.location == "local":
            return 0, 0
        if self.send_ids == "all":
            ids = seq_len
        elif self.send_ids == "new" or (self.kv == "client" and t == 0):
            ids = prompt_tokens - cached_tokens if t == 0 else 1
        else:
            ids = 1
        up = ids * TOKEN_ID_BYTES
        down = self._logits_bytes(model, seq_len)
        if self.kv == "client":
            # reference.md writes the uplink as last id + KV(L_t - 1) for every t; at t = 0 of a
            # conversation no cache exists yet, so a real client sends the prompt ids and gets the
            # first cache back (later phases send the cache they hold with the new ids).
            cache_up = seq_len - 1 if t > 0 else cached_tokens
            up += cache_up * model.kv_bytes_per_token
            down += seq_len * model.kv_bytes_per_token
        if self.round_trip == "op":
            ops = self.ops_per_layer * model.num_layers
            up += ops * self.bytes_per_op
            down += ops * self.bytes_per_op
        return up, down

    def phase_bytes(self, model: ModelSpec, context_tokens: int, input_tokens: int, new_tokens: int) -> tuple[int, int]:
        """Payload (up, down) bytes of one generate request (round_trip=phase).

        `context_tokens` are already in the conversation (and in the session KV if kv=session);
        `input_tokens` are new to it; the reply carries `new_tokens` ids and any logits.
        """
        if self.location == "local":
            return 0, 0
        if self.send_ids == "all" or self.kv != "session":
            ids = context_tokens + input_tokens
        else:
            ids = input_tokens
        up = ids * TOKEN_ID_BYTES
        # logits of positions context + input + t for t < new_tokens, summed in closed form
        seq_len = context_tokens + input_tokens
        positions = {"none": 0, "last": new_tokens,
                     "all": new_tokens * seq_len + new_tokens * (new_tokens - 1) // 2}[self.return_logits]
        return up, new_tokens * TOKEN_ID_BYTES + positions * model.logits_bytes_per_position

    # --- the plan the engine follows ----------------------------------------------------------
    def serving(self, scheduler: str | None = None) -> ServingPlan:
        """The serving path, resolved once; `scheduler` overrides the default policy."""
        return serving_plan(self, scheduler)

    def plan(self, model: ModelSpec, context_tokens: int, input_tokens: int, new_tokens: int,
             batch: int = 1, scheduler: str | None = None) -> GeneratePlan:
        """One typed plan of a generate call: its requests' passes, bytes and KV changes."""
        return generate_plan(self, model, serving_plan(self, scheduler), context_tokens, input_tokens,
                             new_tokens, batch)

    def _logits_bytes(self, model: ModelSpec, seq_len: int) -> int:
        per_position = model.logits_bytes_per_position
        return {"none": 0, "last": per_position, "all": seq_len * per_position}[self.return_logits]


@lru_cache(maxsize=1)
def _preset_table() -> dict[str, dict[str, Any]]:
    path = Path(str(resources.files("djinnsim.sim") / "data" / "backends.yaml"))
    return load_bundled_yaml(path.read_text())


def _resolve(name: str, table: dict[str, dict[str, Any]], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise DjinnsimError(f"backend {name!r}: circular base chain {' -> '.join((*seen, name))}")
    if name not in table:
        raise DjinnsimError(f"unknown backend {name!r}; known backends: {', '.join(sorted(table))}")
    fields = dict(table[name])
    if "name" in fields:
        raise DjinnsimError(f"backend {name!r}: a backend is named by its key; drop its field name")
    base = fields.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise DjinnsimError(f"backend {name!r}: field base must be a backend's name, not {type(base).__name__}")
    if base is not None:
        merged = _resolve(base, table, (*seen, name))
        merged.pop("description", None)
        merged.update(fields)
        fields = merged
    return fields


def preset_names() -> list[str]:
    return list(_preset_table())


def get_backend(name: str, custom: dict[str, dict[str, Any]] | None = None) -> Backend:
    """A preset by name, or a scenario-defined backend (which may take a preset as `base`)."""
    table = {**_preset_table(), **(custom or {})}
    fields = _resolve(name, table)
    try:
        return Backend.model_validate({"name": name, **fields})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise DjinnsimError(f"backend {name!r}: field {where}: {err['msg']}") from None
