"""Requests between the validation client and its GPU server processes (over calibrate.wire).

A request's JSON header carries the backend's toggles (kv, step_compute, return_logits, ...), so
one server implementation serves every backend: what differs between backends is data.
Token ids and logits travel as tensors (payload); timings and bookkeeping travel in the header
(framing), so the payload is exactly what reference.md's byte formulas count.
"""

from __future__ import annotations

import enum


class Op(enum.IntEnum):
    STEP = 1  # one generated token of a per-token remote backend
    GENERATE = 2  # one generate call (an agent phase): prefill + new_tokens greedy steps
    LOCAL_DECODE = 3  # native_pytorch: a whole greedy decode on the server's own GPU, timed there
    END_SESSION = 4
    RESET = 5  # drop sessions, free cached allocator blocks, reset peak-memory counters
    SAVE_WEIGHTS = 6  # write the resident weights to a safetensors file (serverless source)
    SHUTDOWN = 7
    PACE = 8  # the downlink paced at header["link_gbps"] from the next reply on (calibrate's paced rows)
    REPLY = 64
    ERROR = 65


# Reply header keys (all times from time.perf_counter(), CLOCK_MONOTONIC on Linux, shared by processes)
RECEIVED_AT = "received_at"
STARTED_AT = "started_at"
FIRST_TOKEN_AT = "first_token_at"
DONE_AT = "done_at"
QUEUE_S = "queue_s"
LOAD_S = "load_s"
COPY_S = "copy_s"
COMPUTE_S = "compute_s"
H2D_BYTES = "h2d_bytes"
D2H_BYTES = "d2h_bytes"
MEM_BYTES = "gpu_mem_bytes"
MEM_PEAK_BYTES = "gpu_mem_peak_bytes"
