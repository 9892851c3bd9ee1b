"""What one request cost, stage by stage, filled in by the client and the server as it goes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Outcome:
    """Stage durations (seconds) and bytes moved of one request; they become its record."""

    issued_at: float
    started_at: float = 0.0
    finished_at: float = 0.0
    status: str = "ok"
    connect_s: float = 0.0
    uplink_s: float = 0.0
    queue_s: float = 0.0
    load_s: float = 0.0
    copy_s: float = 0.0
    compute_s: float = 0.0
    downlink_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    wire_bytes_up: int = 0
    wire_bytes_down: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    gpu_mem_bytes: int = 0
    gpu_busy_s: float = 0.0


_SUMMED = ("connect_s", "uplink_s", "queue_s", "load_s", "copy_s", "compute_s", "downlink_s",
           "bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down", "h2d_bytes", "d2h_bytes", "gpu_busy_s")


def merge(outcomes: list[Outcome]) -> Outcome:
    """One generate call's requests as one: first issue to last reply, stages and bytes summed."""
    if len(outcomes) == 1:
        return outcomes[0]
    merged = Outcome(issued_at=outcomes[0].issued_at, started_at=outcomes[0].started_at,
                     finished_at=outcomes[-1].finished_at, status=outcomes[-1].status)
    for name in _SUMMED:
        setattr(merged, name, sum(getattr(o, name) for o in outcomes))
    merged.gpu_mem_bytes = max(o.gpu_mem_bytes for o in outcomes)
    return merged
