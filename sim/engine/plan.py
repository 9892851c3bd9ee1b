"""The typed plan of a backend: the engine follows it and never reads a backend's toggles.

A backend (sim/backends.py, data over toggles) resolves once into a `ServingPlan` (where the model
runs, what stays resident, what happens when memory is full) and, per generate call, into a
`GeneratePlan`: the requests it sends, each a `RequestPlan` of forward passes, payload bytes each
way, messages, and what it does to the KV cache. The KV rules live here and only here
(`_kv_tokens`): which context is already cached, what a request adds to a session's KV, and what it
holds only while it runs. A session whose KV the server dropped during ACT (the KV policy's discard,
an idle eviction) is planned with fewer `resident` tokens: the first forward re-prefills the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..server_rules import KvPolicySpec

if TYPE_CHECKING:
    from ..backends import Backend
    from ..specs import ModelSpec

Pass = tuple  # ("prefill", tokens, cached_context) | ("decode", cached_context)


@dataclass(frozen=True, slots=True)
class ServingPlan:
    """A backend's serving path, resolved once per point."""

    remote: bool  # client <-> link <-> server; False: the client owns the GPU, nothing crosses a link
    connect_per_request: bool  # a new connection (1 RTT + setup) for every request
    keep_connection: bool  # once opened, a session's connection stays open
    shared_weights: bool  # one resident copy, allocated when the server starts
    process_per_agent: bool  # each session starts its own GPU process (weights + CUDA context)
    load_per_request: bool  # every request loads the weights from `weight_tier` and frees them after
    weight_tier: str
    wait_for_memory: bool  # an allocation that does not fit waits; False: it fails (an OOM)
    session_kv: bool  # the KV cache stays on the GPU across requests (so it can be swapped out when idle)
    per_token: bool  # one request per generated token (False: one per generate call)
    scheduler: str  # the executor policy (a key of executors.EXECUTORS)
    kv_cache: bool  # the model keeps a KV cache at all (in a session, for a request, or at the client)
    kv_policy: KvPolicySpec  # what a session KV does during ACT (sim/engine/kvpolicy.py)
    hold_request_kv: bool  # a request-scoped KV stays on the GPU until the session's next request starts


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """One request: the GPU work it asks, the payload it moves, and its KV changes (all times `batch`)."""

    passes: tuple[Pass, ...]
    batch: int
    bytes_up: int
    bytes_down: int
    messages: int
    kv_grow_tokens: int  # KV tokens the session keeps after the request
    kv_transient_tokens: int  # KV tokens held only while the request runs
    workspace_tokens: int  # tokens of its largest prefill (1 when it has none): sizes the workspace


@dataclass(frozen=True, slots=True)
class GeneratePlan:
    """A generate call of `new_tokens` after `context_tokens` + `input_tokens`: one request, or one per token."""

    requests: tuple[RequestPlan, ...]
    per_token: bool


def serving_plan(backend: "Backend", scheduler: str | None = None, kv_policy: KvPolicySpec | None = None) -> ServingPlan:
    """`scheduler` and `kv_policy` override the backend's own (the scenario's `server.scheduler`,
    `server.kv_policy`)."""
    return ServingPlan(
        remote=backend.location == "remote",
        connect_per_request=backend.connection == "per_request",
        keep_connection=backend.connection == "persistent",
        shared_weights=backend.weights == "shared",
        process_per_agent=backend.weights == "per_agent",
        load_per_request=backend.weights == "per_request",
        weight_tier=backend.weight_tier,
        wait_for_memory=backend.memory_full == "wait",
        session_kv=backend.kv == "session",
        per_token=backend.round_trip != "phase",
        scheduler=scheduler or backend.scheduler,
        kv_cache=backend.kv != "none",
        kv_policy=kv_policy or backend.kv_policy,
        hold_request_kv=backend.kv == "request" and backend.kv_between_phases == "keep",
    )


def _kv_tokens(backend: "Backend", per_token: bool, context: int, fed: int, n: int,
               resident: int | None = None) -> tuple[int, int, int]:
    """The KV rules: (cached, grow, transient) tokens of one request, batch aside.

    `context` tokens came before this generate call; `fed` is the call's input in a per-phase
    request, the whole prompt (context + input) in a per-token one; `n` is the number of tokens a
    per-phase request generates, the generated-token index t of a per-token request.
    - cached: context whose KV the server already has (session KV; a client-held KV that comes
      back up with the step), so the first forward skips it. A per-phase request reuses only a
      session KV; a step that recomputes the full context reuses nothing. `resident` (None: all of
      `context`) is what the session KV still holds: the server may have dropped it during ACT.
    - grow: what a session KV keeps after the request: the phase's input and output, plus any
      context re-prefilled; per token, the uncached prompt at t = 0 and one token after.
    - transient: a request-scoped KV (the whole conversation, for one phase), or the client KV
      that is on the GPU for one step (L_t = prompt + t tokens).
    """
    kv = backend.kv
    held = context if resident is None or kv != "session" else min(resident, context)
    if per_token:
        reuses = kv in ("session", "client") and backend.step_compute == "incremental"
        cached = held if reuses else 0
        grow = ((fed - cached) if n == 0 else 1) if kv == "session" else 0
        transient = (fed + n) if kv == "client" else 0
        return cached, grow, transient
    cached = held if kv == "session" else 0
    grow = context - cached + fed + n if kv == "session" else 0
    transient = context + fed + n if kv == "request" else 0
    return cached, grow, transient


def phase_passes(backend: "Backend", context: int, input_tokens: int, new_tokens: int,
                 resident: int | None = None) -> list[Pass]:
    """Forward passes of one generate call of `new_tokens` after `context` + `input_tokens`."""
    cached, _, _ = _kv_tokens(backend, False, context, input_tokens, new_tokens, resident)
    fed = context + input_tokens - cached
    if backend.step_compute == "full_context":
        return [("prefill", cached + fed + t, 0) for t in range(new_tokens)]
    if backend.step_compute == "last_token":
        return [("prefill", fed, 0)] + [("prefill", 1, 0)] * (new_tokens - 1)
    return [("prefill", fed, cached)] + [("decode", cached + fed + t) for t in range(new_tokens - 1)]


def token_pass(backend: "Backend", prompt_tokens: int, t: int, cached_tokens: int = 0) -> Pass:
    """The forward pass of generated token t in a per-token decode (L_t = prompt + t), where
    `cached_tokens` of the prompt already have a KV cache (session or client) from earlier phases."""
    seq_len = prompt_tokens + t
    if backend.step_compute == "full_context":
        return ("prefill", seq_len, 0)
    if backend.step_compute == "last_token":
        return ("prefill", 1, 0)
    if t == 0:
        return ("prefill", prompt_tokens - cached_tokens, cached_tokens)
    return ("decode", seq_len - 1)  # kv=client: the client sent the cache of L_t - 1 tokens


def _workspace_tokens(passes: tuple[Pass, ...]) -> int:
    return max((p[1] for p in passes if p[0] == "prefill"), default=1)


def generate_plan(backend: "Backend", model: "ModelSpec", serving: ServingPlan, context: int, input_tokens: int,
                  new_tokens: int, batch: int = 1, resident: int | None = None) -> GeneratePlan:
    """The requests of one generate call, in order. `resident`: context tokens the session KV still
    holds (None: all). The server keeps a session's token ids, so a re-prefill moves no more bytes."""
    if not serving.per_token:
        up, down = backend.phase_bytes(model, context, input_tokens, new_tokens)
        _, grow, transient = _kv_tokens(backend, False, context, input_tokens, new_tokens, resident)
        passes = tuple(phase_passes(backend, context, input_tokens, new_tokens, resident))
        request = RequestPlan(passes, batch, up * batch, down * batch, 1, grow * batch, transient * batch,
                              _workspace_tokens(passes))
        return GeneratePlan((request,), False)
    prompt = context + input_tokens
    # round_trip: op has a request/reply message per operator
    messages = backend.ops_per_layer * model.num_layers if backend.round_trip == "op" else 1
    requests = []
    for t in range(new_tokens):
        cached, grow, transient = _kv_tokens(backend, True, context, prompt, t, resident)
        up, down = backend.step_bytes(model, t, prompt, cached)
        passes = (token_pass(backend, prompt, t, cached),)
        requests.append(RequestPlan(passes, batch, up * batch, down * batch, messages,
                                    grow * batch, transient * batch, _workspace_tokens(passes)))
    return GeneratePlan(tuple(requests), True)


class Planner:
    """A backend's plans for one point's model, memoized (every agent asks the same few)."""

    def __init__(self, backend: "Backend", model: "ModelSpec", scheduler: str | None = None,
                 kv_policy: KvPolicySpec | None = None) -> None:
        self.backend = backend
        self.model = model
        self.serving = serving_plan(backend, scheduler, kv_policy)
        self._plans: dict[tuple[int, int, int, int, int | None], GeneratePlan] = {}

    def generate(self, context: int, input_tokens: int, new_tokens: int, batch: int = 1,
                 resident: int | None = None) -> GeneratePlan:
        """`resident`: context tokens whose KV the session still holds (None: all of them)."""
        if resident is not None and resident >= context:
            resident = None
        key = (context, input_tokens, new_tokens, batch, resident)
        plan = self._plans.get(key)
        if plan is None:
            plan = generate_plan(self.backend, self.model, self.serving, context, input_tokens, new_tokens, batch,
                                 resident)
            self._plans[key] = plan
        return plan


def session_kv_tokens(iterations: int, phases) -> int:
    """KV tokens one agent's session holds at its end: every phase's input and output, each iteration."""
    return iterations * sum(p.input_tokens + p.new_tokens for p in phases)
