"""One immutable record per finished request (a decode step, or an agent phase).

Every metric, figure and table is computed afterwards from the table of records. The duration
fields of a record add up to its latency: connect, uplink, queue (waiting for the GPU or for
memory), load (weights), copy (host<->device), compute, downlink.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter

DURATION_FIELDS = ("connect_s", "uplink_s", "queue_s", "load_s", "copy_s", "compute_s", "downlink_s")


@dataclass(frozen=True, slots=True)
class Record:
    point: int  # index of the sweep point (sim.scenario.Point.index)
    backend: str
    model: str
    gpu: str
    link_gbps: float
    n_agents: int  # 1 for a decode workload
    agent: int
    run: int  # decode: run number; agents: iteration
    phase: str  # decode | reason | reflect
    step: int  # decode: generated-token index t; -1 for a whole generate call
    status: str  # ok | oom
    warmup: bool
    issued_at: float  # the client sends the request
    started_at: float  # the GPU starts executing it
    finished_at: float  # the reply is at the client
    connect_s: float
    uplink_s: float
    queue_s: float
    load_s: float
    copy_s: float
    compute_s: float
    downlink_s: float
    context_tokens: int  # tokens already cached (or known) before this request
    input_tokens: int  # tokens this request feeds in
    new_tokens: int  # tokens it generates
    bytes_up: int  # payload, framing aside
    bytes_down: int
    wire_bytes_up: int  # payload + framing, as the link carried it
    wire_bytes_down: int
    h2d_bytes: int
    d2h_bytes: int
    gpu_mem_bytes: int  # GPU memory in use when the request finished executing
    gpu_mem_peak_bytes: int  # highest GPU memory in use of the point so far

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.issued_at


RECORD_COLUMNS = tuple(f.name for f in fields(Record))


def records_frame(records: list[Record]):
    """The table of records as a pandas DataFrame (pandas imported only here)."""
    import pandas as pd

    row = attrgetter(*RECORD_COLUMNS)
    frame = pd.DataFrame.from_records([row(r) for r in records], columns=list(RECORD_COLUMNS))
    frame["latency_s"] = frame["finished_at"] - frame["issued_at"]
    return frame
