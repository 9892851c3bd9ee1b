"""A run that cannot progress stops with an error naming the cost or field that stalled it.

`CountingEnvironment` (sim/engine/world.py) refuses any delay that is negative, NaN or infinite
(SimPy would take a NaN and corrupt its event queue, or jump the clock to infinity) and, every
`progress_window` events, checks that the simulated clock has moved since the last check. A
legitimate run schedules only a bounded number of events at one instant (a few per client:
arrivals, requests joining a queue), so the window grows with the number of clients and is never
reached by a run that progresses. When either check trips, `diagnose` looks for the culprit among
the cost model's costs at the point's sizes and the point's link.
"""

from __future__ import annotations

import math
from typing import Callable

PROGRESS_WINDOW = 2**19  # events between two checks of the clock, plus EVENTS_PER_CLIENT per client
EVENTS_PER_CLIENT = 64


class ClockStalled(Exception):
    """The simulated clock cannot advance (raised inside the engine; World turns it into a DjinnsimError)."""


def progress_window(clients: int) -> int:
    return PROGRESS_WINDOW + EVENTS_PER_CLIENT * max(clients, 0)


def check_delay(delay: float) -> None:
    if not 0 <= delay < math.inf:  # NaN fails both comparisons
        raise ClockStalled(f"a simulated step of {delay!r} s (time cannot run backwards, stand still at NaN or "
                           "jump to infinity)")


def diagnose(cost, point, prompt_tokens: int) -> str:
    """The first of the point's costs (at its sizes) or link fields that is not a finite duration >= 0."""
    model = point.model
    kv_bytes = model.kv_bytes_per_token * max(prompt_tokens, 1)
    checks: list[tuple[str, Callable[[], float]]] = [
        ("link.gbps", lambda: point.link.gbps),
        ("link.rtt_ms", lambda: point.link.rtt_ms),
        (f"the decode step at batch 1, context {prompt_tokens} (profile field decode_step)",
         lambda: cost.decode_step_s(1, prompt_tokens)),
        (f"the prefill of {prompt_tokens} tokens (profile field prefill)", lambda: cost.prefill_s(prompt_tokens)),
        ("a host-to-device copy of the KV (profile field h2d_pinned)", lambda: cost.copy_s(kv_bytes, "h2d", True)),
        ("a device-to-host copy of the KV (profile field d2h_pinned)", lambda: cost.copy_s(kv_bytes, "d2h", True)),
        ("serialization of 1 MB (profile field serialize)", lambda: cost.serialize_s(1e6)),
        ("deserialization of 1 MB (profile field deserialize)", lambda: cost.deserialize_s(1e6)),
        ("the loopback host time of 1 MB (profile field network.loopback_serial_gbps)", lambda: cost.stream_serial_s(1e6)),
        ("the loopback host path of 1 MB (profile field network.loopback_path)", lambda: cost.stream_path_s(1e6) or 0.0),
        ("the per-message host cost (profile field network.per_message_s)", cost.per_message_s),
        ("the connection set-up cost (profile field network.connect_s)", cost.connect_s),
    ]
    for name, value in checks:
        try:
            got = float(value())
        except (ArithmeticError, ValueError) as exc:
            return f"{name} cannot be computed ({exc})"
        if not 0 <= got < math.inf or (name.startswith("link.gbps") and got == 0):
            return f"{name} is {got!r}"
    return ("every cost at the point's sizes is a finite duration; the stall comes from the combination of the "
            "scenario's fields: please report the scenario")
