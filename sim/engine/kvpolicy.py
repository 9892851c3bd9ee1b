"""What a session's KV does while its agent is in ACT: policies in a registry keyed by their YAML tag.

At the start of each ACT the server asks the session's policy for a `KvDecision`: what to do now
(preserve, swap, discard) and, optionally, what to do after `after_s` seconds if the agent is still
in ACT. The server carries it out (sim/engine/server.py); the next phase's plan re-prefills whatever
KV is gone (sim/engine/plan.py), so a policy never touches the plan.

min_waste (InferCept) compares, in GPU byte-seconds, for a KV of M bytes (the session's context of
C tokens) and an expected ACT of T seconds (the mean of the workload's ACT distribution):

    preserve  M x T                                  memory held idle through ACT
    swap      M x (t_out + t_in)                     memory held while it is copied out and back,
                                                     t = M / PCIe bandwidth (+ latency) each way
    discard   t_recompute x (M + M_others)           the re-prefill of C tokens holds its KV as it is
                                                     rebuilt and stalls the other sessions' KV
                                                     resident on the GPU at the decision (M_others)

t_recompute is what the engine charges a discard beyond what preserve costs (`recompute_s`): the
next phase (REFLECT, input I tokens) then runs one prefill of C + I tokens with no cache where it
would have run a prefill of I tokens after C cached ones; t_recompute is the difference of the cost
model's times of those two passes (no jitter), so the policy and the engine count the same tokens.

and picks the smallest (ties: preserve, then swap, then discard). InferCept pipelines swaps and
chunks recomputes; here a swap moves over the server's PCIe pipes and a recompute is one prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..server_rules import KvPolicySpec

if TYPE_CHECKING:
    from ..costmodel import CostModel

ACTIONS = ("preserve", "swap", "discard")


@dataclass(frozen=True, slots=True)
class IdleKv:
    """The facts of one session going idle, as a policy sees them."""

    kv_bytes: int  # M: the session's KV on the GPU
    expected_act_s: float  # T: the mean of the workload's ACT distribution
    swap_out_s: float  # M over device->host PCIe
    swap_in_s: float  # M over host->device PCIe
    recompute_s: float  # what re-prefilling the session's context adds to the next phase (recompute_s)
    others_resident_bytes: int  # the other sessions' KV on the GPU now


@dataclass(frozen=True, slots=True)
class KvDecision:
    now: str  # one of ACTIONS
    after_s: float | None = None  # then, if the agent is still in ACT this long after it began
    then: str | None = None


def recompute_s(cost: "CostModel", context_tokens: int, next_input_tokens: int) -> float:
    """What re-prefilling a discarded KV of `context_tokens` adds to the next phase (fed
    `next_input_tokens`): the plan's two first passes, discarded less preserved (never below 0)."""
    rebuilt = cost.prefill_s(context_tokens + next_input_tokens, 1, 0)
    kept = cost.prefill_s(next_input_tokens, 1, context_tokens) if next_input_tokens else 0.0
    return max(rebuilt - kept, 0.0)


def wastes(idle: IdleKv) -> dict[str, float]:
    """GPU byte-seconds each action wastes (the formula of the module docstring)."""
    m = idle.kv_bytes
    return {
        "preserve": m * idle.expected_act_s,
        "swap": m * (idle.swap_out_s + idle.swap_in_s),
        "discard": idle.recompute_s * (m + idle.others_resident_bytes),
    }


def _min_waste(spec: KvPolicySpec, idle: IdleKv) -> KvDecision:
    cost = wastes(idle)
    return KvDecision(min(ACTIONS, key=lambda action: (cost[action], ACTIONS.index(action))))


# The registry, keyed by `kv_policy.kind`: each maps (its spec, the idle session) to a decision.
# A fixed policy's decision is one constant (a decision is immutable): none is built per ACT.
_FIXED = {action: KvDecision(action) for action in ACTIONS}
KV_POLICIES: dict[str, Callable[[KvPolicySpec, IdleKv], KvDecision]] = {
    "preserve": lambda spec, idle: _FIXED["preserve"],
    "swap": lambda spec, idle: _FIXED["swap"],
    "discard": lambda spec, idle: _FIXED["discard"],
    "ttl": lambda spec, idle: KvDecision("preserve", spec.ttl_s, spec.then),
    "min_waste": _min_waste,
}


def decide(spec: KvPolicySpec, idle: IdleKv | None) -> KvDecision:
    """`idle` may be None for a policy that does not weigh it (all but min_waste)."""
    return KV_POLICIES[spec.kind](spec, idle)
