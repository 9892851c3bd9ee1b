"""The calibration profile: a versioned file written by `djinnsim calibrate`, read by the cost model.

A profile holds fitted cost functions (each a linear model over named features, with its error
and the domain it was measured on), primitive bandwidths, memory facts, the empirical step-time
jitter and metadata saying where and with what it was measured. Raw samples live in a CSV beside it.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import IO, Annotated, Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer,
                      model_validator)

from djinnsim.errors import DjinnsimError

from .outputs import os_error_line
from .provenance import file_sha256
from .safeyaml import describe_path, parse_json, read_input_text, strict_json

SCHEMA_VERSION = 2
# Version 1 lacks the optional sections version 2 added (loads_mp, timeslice_mp, cached_prefill, kv_swaps): it
# still reads, and the cost model falls back where a section is absent.
READABLE_VERSIONS = (1, 2)

# How each fit feature scales when a profile is moved to another GPU (sim.costmodel.transfer_profile).
ScaleClass = Literal["host", "compute", "memory", "pcie", "mixed"]


# The named regressors a fit may use (their values: sim.costmodel.feature_value).
FIT_FEATURES = ("1", "batch", "tokens", "tokens_sq", "tokens_ctx", "sum_context")
MAX_COEF = 1e6  # |coefficient| of a fit; seconds (or bytes) per unit of its feature
MAX_FACTOR = 1e6  # a jitter or spread factor (time over the median or a fit), measured as far as 1.4e3 on a CPU


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _without_unset(out: dict, field: str) -> dict:
    """A serialized model without `field` where it is None (a field added later, left unset)."""
    if out.get(field, 0) is None:
        del out[field]
    return out


class LinearFit(_Strict):
    """time_s = sum(coef[i] * feature_i(inputs)) over `features`; valid on `domain`.

    With `floor_s`, time_s = max(floor_s, that sum): a pass whose host launches its kernels while
    the GPU runs earlier ones takes the longer of the two, not their sum (the floor is the host's
    launch time, the sum the GPU's work)."""

    features: list[str]
    coef: list[float]
    scale: list[ScaleClass] = Field(description="scaling class of each feature, for transfer")
    domain: dict[str, tuple[float, float]] = Field(default_factory=dict)
    floor_s: float | None = Field(default=None, ge=0, le=MAX_COEF, strict=True,
                                  description="host launch floor: time_s = max(floor_s, the sum)")
    r2: float | None = None
    rmse_s: float | None = None
    max_rel_err: float | None = None
    n_samples: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "LinearFit":
        unknown = [name for name in self.features if name not in FIT_FEATURES]
        if unknown:
            raise ValueError(f"unknown fit feature {unknown[0]!r} (known: {', '.join(FIT_FEATURES)})")
        if not len(self.features) == len(self.coef) == len(self.scale):
            raise ValueError(f"features, coef and scale must be as long as each other, not "
                             f"{len(self.features)}, {len(self.coef)} and {len(self.scale)}")
        if any(abs(k) > MAX_COEF for k in self.coef):
            raise ValueError(f"a coefficient beyond +-{MAX_COEF:g} is not a measured cost")
        if any(not lo <= hi for lo, hi in self.domain.values()):
            raise ValueError("a domain's low end must not exceed its high end")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_floor(self, handler):
        """A fit without a floor is written as before the field existed (profiles stay byte-identical)."""
        return _without_unset(handler(self), "floor_s")


class PiecewiseFit(_Strict):
    """Pieces tried in order; the first whose domain holds the point is used."""

    pieces: list[LinearFit] = Field(min_length=1)


class Bandwidth(_Strict):
    """time_s = latency_s + bytes / (gbps * 1e9).

    Optionally a second rate for buffers above `large_from_bytes` (for example host buffers large
    enough to be freshly mapped, whose first touch page-faults): those take bytes / large_gbps.
    """

    latency_s: float = Field(ge=0)
    gbps: float = Field(gt=0)
    large_from_bytes: int | None = Field(default=None, gt=0)
    large_gbps: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _regimes_paired(self) -> "Bandwidth":
        # the second rate is one regime: its size and its rate, both or neither (a pageable KV
        # swap-out is charged by it, ProfileCostModel.pageable_regimes)
        if (self.large_from_bytes is None) != (self.large_gbps is None):
            raise ValueError("large_from_bytes and large_gbps go together: both or neither")
        return self

    def rate_gbps(self, nbytes_each: float) -> float:
        """The rate for buffers of `nbytes_each` bytes: `large_gbps` above `large_from_bytes`."""
        if self.large_from_bytes is not None and self.large_gbps is not None and nbytes_each > self.large_from_bytes:
            return self.large_gbps
        return self.gbps

    def time_s(self, nbytes: float, pieces: int = 1) -> float:
        """`nbytes` moved as `pieces` equal buffers, one after another (a KV cache is one K and one
        V tensor per layer): the latency is paid per buffer, the rate is that of one buffer's size."""
        pieces = max(int(pieces), 1)
        return pieces * self.latency_s + nbytes / (self.rate_gbps(nbytes / pieces) * 1e9)


KvSwapKey = Literal["d2h_pinned", "h2d_pinned", "d2h_pageable", "h2d_pageable", "d2h_pageable_cycle"]


class KvSwaps(_Strict):
    """A session's whole KV cache (`tensors` K and V buffers) moved the way a swap moves it (stage
    kv_swaps): time = latency + bytes / rate for the whole set, per direction and host-memory kind.
    Pinned: non_blocking copies into (out of) a pool, queued on one stream; pageable: `.to("cpu")`
    into freshly allocated host memory, and back: `d2h_pageable` right after the previous set was
    freed, `d2h_pageable_cycle` (profiles since the stage ran it; absent before) inside
    validate.kv_costs's loop (calibrate/kv_cycle.py), where the host allocator's state, and so
    whether the pages are warm or fresh, is the one that loop leaves."""

    tensors: int = Field(gt=0)
    fits: dict[KvSwapKey, Bandwidth]


class WeightLoad(_Strict):
    """Loading the whole model to the GPU from one tier; aggregate throughput with k loads at once."""

    fixed_s: float = Field(ge=0, description="per-load overhead (allocation, file open, framework)")
    gbps: float = Field(gt=0, description="throughput of one load alone")
    aggregate_gbps: dict[int, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="total throughput with k concurrent loads (contention)"
    )


class Network(_Strict):
    """Host-side costs of the wire protocol. Link bandwidth and RTT come from the scenario."""

    connect_s: float = Field(ge=0, description="software cost of opening a connection, beyond 1 RTT")
    per_message_s: float = Field(ge=0, description="software cost per framed message")
    loopback_rtt_s: float | None = Field(default=None, ge=0)
    loopback_gbps: float | None = Field(default=None, gt=0)
    loopback_serial_gbps: float | None = Field(
        default=None, gt=0, description="validate's real host path per byte each way beyond serialize, "
        "deserialize and the loopback cap, in series with the link (the composition stage's partially_aware "
        "steps); None: not measured, nothing charged. Superseded by loopback_path when that is set")
    loopback_path: list[tuple[int, float]] | None = Field(
        default=None, description="validate's real host path over loopback, seconds per byte each way beyond "
        "the connection, the loopback cap and deserialize, serialization included, against the message's "
        "bytes (the composition stage's partially_aware steps, one point per context, sorted by bytes); "
        "charged in series with the link instead of serialize and loopback_serial_gbps, interpolated "
        "linearly in log bytes and flat beyond the points; None: not measured")
    paced_path: list[tuple[float, float]] | None = Field(
        default=None, description="validate's real host path in series with a link paced by its link "
        "emulator, seconds per byte each way beyond the connection, the paced wire (or the loopback cap, "
        "where slower) and deserialize, serialization included, against the link's rate in Gbps (the "
        "composition stage's paced partially_aware steps, one point per rate, the median over its contexts). "
        "A loopback link is charged this instead of loopback_path, interpolated linearly in log rate and flat "
        "beyond the rates measured (flagged in the run's warnings); where no rate measured reaches the cap, "
        "it runs up to loopback_path's value at the cap and a link at or above the cap is charged "
        "loopback_path. None: not measured, loopback_path is charged at every rate")
    paced_path_bytes: int | None = Field(
        default=None, gt=0, description="the message size (each way, the geometric mean over the paced rows) at "
        "which paced_path was measured: where set, a message of another size is charged paced_path x "
        "loopback_path(size) / loopback_path(this), loopback_path giving the shape over sizes and the paced rows "
        "the level at each rate; None (profiles before it): paced_path at every size")

    @field_validator("loopback_path", "paced_path")
    @classmethod
    def _path_points(cls, v: list[tuple[float, float]] | None, info) -> list[tuple[float, float]] | None:
        if v is None:
            return v
        unit = "bytes" if info.field_name == "loopback_path" else "Gbps"
        if not v or any(not math.isfinite(x) or x <= 0 or not math.isfinite(s) or s <= 0 for x, s in v):
            raise ValueError(f"{info.field_name} needs points of positive {unit} and positive, finite seconds per byte")
        if any(a[0] >= b[0] for a, b in zip(v, v[1:])):
            raise ValueError(f"{info.field_name}'s points must be sorted by {unit}, each once")
        return v

    @model_serializer(mode="wrap")
    def _without_unset_path(self, handler):
        """A network without the paths is written as before the fields existed (profiles stay byte-identical)."""
        out = handler(self)
        for field in ("loopback_path", "paced_path", "paced_path_bytes"):
            out = _without_unset(out, field)
        return out


class Memory(_Strict):
    total_bytes: int = Field(gt=0)
    free_at_start_bytes: int | None = None
    weight_bytes: int = Field(gt=0)
    kv_bytes_per_token: int = Field(gt=0)
    context_bytes_per_process: int = Field(ge=0, description="CUDA context + allocator overhead")
    prefill_workspace: LinearFit | None = None  # bytes, features over tokens
    decode_workspace: LinearFit | None = None  # bytes, features over batch / context
    oom_probe_copies: int | None = None


class ColdShapes(_Strict):
    """Extra host time of a forward pass whose attention shapes its process has never run.

    PyTorch's cuDNN attention (the SDPA backend it picks on Hopper) builds an execution plan for
    every new (batch, query length, key length) and caches it in the process: the first decode
    step at a new context length, or the first prefill of a new prompt length, pays for the build.
    Measured as cold minus warm time of the same pass in one process.
    """

    decode_extra_s: float = Field(ge=0, description="added to a decode step at a new context length")
    prefill_extra_s: float = Field(default=0.0, ge=0, description="added to a prefill at new shapes: fixed part")
    prefill_extra_per_token_s: float = Field(default=0.0, ge=0, description="... and per prompt token")
    first_forward_s: float | None = Field(
        default=None, ge=0, description="a process's first forward beyond a warm one (library set-up; "
        "for the record: the simulated processes are warmed up at start, as servers are)")
    n_samples: int = 0
    source: str = Field(default="", description="how it was measured")

    def extra_s(self, kind: str, tokens: int) -> float:
        if kind == "decode":
            return self.decode_extra_s
        return self.prefill_extra_s + self.prefill_extra_per_token_s * tokens


def _factors(value: list[float]) -> list[float]:
    if any(not 0 < v <= MAX_FACTOR for v in value):
        raise ValueError(f"spread factors must lie in (0, {MAX_FACTOR:g}]")
    return value


class LevelSource(_Strict):
    """One earlier calibration whose batch-1 spells joined a spread's decode level."""

    path: str = Field(description="its profile, as given to --level-from")
    samples_sha256: str = Field(description="sha256 of its samples file when its spells were read")
    spells: int = Field(ge=0, description="batch-1 spells it gave")


class Spread(_Strict):
    """The spread calibration saw, as multiplicative factors (measured / the profile's own
    prediction of the same thing), for prediction bands (`djinnsim run --bands K`, sim.bands).

    Each list is a sample to draw from; an empty one leaves its cost category unscaled.
    """

    decode_level: list[float] = Field(
        default_factory=list, description="decode step level in separate spells: each batch-1 spell "
        "calibrate ran (decode grid point at batch 1, cold_shapes' warm passes, Exp 2.1 run, timeslice_mp's "
        "lone process), its median step over the decode fit (x point_level where set) at its median context")
    decode_residual: list[float] = Field(
        default_factory=list, description="each decode grid point's median step over the decode fit")
    prefill_residual: list[float] = Field(
        default_factory=list, description="each prefill grid point's median over the prefill fit")
    weight_load: list[float] = Field(
        default_factory=list, description="each lone whole-model load over the fitted load time of its tier")
    copies: list[float] = Field(
        default_factory=list, description="each host<->device copy over its fitted bandwidth's time")
    left_out: list[str] = Field(
        default_factory=list, description="sample stages left out of every fit and of this spread "
        "(held out for a validation of the same workload)")
    source: str = Field(default="", description="how it was computed")
    level_sources: list[LevelSource] = Field(
        default_factory=list, description="other calibrations of the same GPU, model and dtype whose batch-1 "
        "spells joined decode_level (`calibrate --refit --level-from`); every later refit applies them again "
        "(checked by sha256); empty: this calibration's spells only")
    loads_mp: dict[str, list[float]] | None = Field(
        default=None, description="k processes loading at once (k >= 2), per tier: each run's wall over the "
        "median wall at its k, and each --level-from calibration's aggregate at the same tier and k over "
        "this one's (so the bands span the spread between calibrations, not one calibration's); a band "
        "draw scales that tier's k-process aggregates by one of them, in place of the lone load's factor. "
        "None: not computed (older profiles), the lone load's factor scales them")
    loopback_path: list[float] | None = Field(
        default=None, description="calibrate's composition stage (partially_aware over loopback, a fresh "
        "connection each), its time beyond the server's compute and copies: each repeat's over the median "
        "repeat's at each message size, and each --level-from calibration's median over this one's; a band "
        "draw makes the loopback link that many times slower (network.loopback_path or the series rate, and "
        "the loopback cap). None: not computed (older profiles), the link unscaled")
    timeslice_gpu: list[float] | None = Field(
        default=None, description="the GPU's own seconds per step once k processes saturate it (timeslice_mp's "
        "g): each process's median step at a saturated k over k g, and each --level-from calibration's g over "
        "this one's; a band draw scales g by one of them. None: not computed (older profiles, or no "
        "timeslice_mp stage), g unscaled")
    point_level: float | None = Field(
        default=None, gt=0, le=MAX_FACTOR, strict=True,
        description="`calibrate --refit --level-point median`: the median of the batch-1 spell factors over "
        "the decode fit, by which the point's passes were scaled (sim.bands.level_scaled); every factor here "
        "is over the scaled point, so the point sits at the median level the bands draw and the bands stay "
        "where they were in absolute terms; a later refit takes the median again. None (older profiles "
        "too): the point at the decode fit")

    @field_validator("decode_level", "decode_residual", "prefill_residual", "weight_load", "copies")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        return _factors(value)

    @field_validator("loopback_path", "timeslice_gpu")
    @classmethod
    def _positive_path(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else _factors(value)

    @field_validator("loads_mp")
    @classmethod
    def _positive_loads(cls, value: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        if value is not None:
            for tier, factors in value.items():
                if tier not in PROCESS_LOAD_TIERS:
                    raise ValueError(f"loads_mp: {tier!r} is not a tier ({', '.join(PROCESS_LOAD_TIERS)})")
                _factors(factors)
        return value

    @model_serializer(mode="wrap")
    def _without_unset_point_level(self, handler):
        """A spread whose point is at the fit, or without the fields added later, is written as
        before those fields existed (profiles stay byte-identical)."""
        out = handler(self)
        for field in ("point_level", "loads_mp", "loopback_path", "timeslice_gpu"):
            out = _without_unset(out, field)
        return out


ProcessLoadTier = Literal["disk", "disk_cold", "pageable", "pinned"]
PROCESS_LOAD_TIERS = ("disk", "disk_cold", "pageable", "pinned")


class ProcessRun(_Strict):
    """One run of k processes loading at once: each one's start and finish, seconds after the first start."""

    started_s: list[float]
    finished_s: list[float]

    @property
    def wall_s(self) -> float:
        return max(self.finished_s) - min(self.started_s)


class ProcessLoads(_Strict):
    """Whole-model loads by k separate worker processes at once (each its own CUDA context) from one tier.

    `aggregate_gbps[k]` is k * nbytes / (last finish - first start), the median over the runs at k,
    fixed per-load costs included (the cost model takes `weight_load[tier].fixed_s` back out)."""

    nbytes: int = Field(gt=0, description="bytes each process loads")
    aggregate_gbps: dict[int, Annotated[float, Field(gt=0)]] = Field(min_length=1)
    runs: dict[int, list[ProcessRun]] = Field(default_factory=dict)
    limit: str = Field(default="", description="why no larger k was measured")
    note: str = Field(default="", description="e.g. how the page cache was dropped before each run")

    @property
    def max_k(self) -> int:
        return max(self.aggregate_gbps)


class TimeslicePoint(_Strict):
    """k processes decoding at once on one GPU, each with its own model copy: their step times."""

    processes: int = Field(ge=1)
    step_s_p10: float = Field(gt=0)
    step_s_p50: float = Field(gt=0)
    step_s_p90: float = Field(gt=0)
    slowdown_p10: float = Field(gt=0, description="step time p10 / the median step time at k=1")
    slowdown_p50: float = Field(gt=0)
    slowdown_p90: float = Field(gt=0)
    per_process_step_s_p50: list[float] = Field(default_factory=list)
    n_steps: int = 0
    gpu_busy_share: float | None = Field(
        default=None, description="share of the window the GPU ran kernels (NVML utilization), absent without NVML")


def fit_gpu_step_s(steps: list[tuple[int, float]]) -> tuple[float, list[int]]:
    """g and the saturated k of the time-sliced model in absolute GPU time: k processes decoding at
    once each step in max(L, k g), L the lone step (the launches' host time, which processes overlap),
    g the GPU's own time per step. `steps`: (k, median per-process step) with k = 1 among them or not.

    The data say where the GPU is saturated: for each split, the k >= 2 from some k_s on are on the
    k g line (g: geometric mean of their step / k) and the points below it at the level L (geometric
    mean of theirs); the split whose max(L, k g) has the least squared log error wins (ties: more
    points on the line). The largest k is always on it (the most contention measured). Without any
    k >= 2 the lone step stands for g (nothing says the GPU was ever shared)."""
    pts = sorted((int(k), float(y)) for k, y in steps)
    shared = [k for k, _ in pts if k >= 2]
    if not shared:
        return pts[0][1] / pts[0][0], []
    best = None
    for start in sorted(set(shared)):
        line = [(k, y) for k, y in pts if k >= start]
        flat = [y for k, y in pts if k < start]
        g = float(np.exp(np.mean([np.log(y / k) for k, y in line])))
        level = float(np.exp(np.mean(np.log(flat)))) if flat else 0.0
        error = sum(np.log(y / max(level, k * g)) ** 2 for k, y in pts)
        if best is None or error < best[0] - 1e-12:
            best = (error, g, sorted({k for k, _ in line}))
    return best[1], best[2]


class Timeslice(_Strict):
    """GPU sharing between processes without MPS: the driver time-slices their contexts."""

    points: list[TimeslicePoint] = Field(min_length=1)
    context_tokens: tuple[int, int] = Field(description="the cached contexts the decode steps ran at")
    gpu_busy_fraction: float = Field(
        gt=0, le=1, description="f of the relative time-sliced model, slowdown(k) = max(1, k * f), fitted to the "
        "points (kept for the record: the simulator charges gpu_step_s)")
    fit_max_rel_err: float | None = None
    limit: str = Field(default="", description="why no larger k was measured")
    gpu_step_s: float | None = Field(
        default=None, gt=0, le=MAX_COEF, strict=True, description="g: GPU seconds of one step once the GPU is saturated, so k processes step in "
        "max(lone step, k g) each (fit_gpu_step_s); absent in older profiles: fitted from the points on load")
    saturated_k: list[Annotated[int, Field(strict=True)]] = Field(
        default_factory=list, description="the k whose points g was fitted to")

    @field_validator("saturated_k")
    @classmethod
    def _saturated_measured(cls, ks: list[int], info: ValidationInfo) -> list[int]:
        """Each one of the stage's k >= 2, once; only beside the g fitted to them."""
        measured = sorted({p.processes for p in info.data.get("points", []) if p.processes >= 2})
        for k in ks:
            if k not in measured:
                raise ValueError(f"k = {k} is not a measured k >= 2 (measured: {measured or 'none'})")
        if len(set(ks)) != len(ks):
            raise ValueError("a k listed twice")
        if ks and info.data.get("gpu_step_s", 0) is None:
            raise ValueError("given without gpu_step_s, which they were fitted to")
        return ks

    @model_validator(mode="after")
    def _gpu_step(self) -> "Timeslice":
        if self.gpu_step_s is None:
            self.gpu_step_s, self.saturated_k = fit_gpu_step_s([(p.processes, p.step_s_p50) for p in self.points])
        return self

    def slowdown(self, processes: float) -> float:
        """Median step-time slowdown at `processes`, interpolated; past the largest k measured the
        GPU is taken as saturated (the slowdown grows in proportion to k)."""
        ks = [1.0, *(float(p.processes) for p in self.points if p.processes > 1)]
        ys = [1.0, *(p.slowdown_p50 for p in self.points if p.processes > 1)]
        if processes <= ks[-1]:
            return float(np.interp(processes, ks, ys))
        return ys[-1] * processes / ks[-1]

    @property
    def max_k(self) -> int:
        return max(p.processes for p in self.points)


class LoadsSource(_Strict):
    """Another calibration of the same GPU, model and dtype whose load `sections` (of weight_load,
    loads_mp, timeslice_mp; with their samples for the fits and the spread) a profile carries because
    its own calibration stopped before them (`calibrate --refit --loads-from`)."""
    path: str
    samples_sha256: str
    date: str | None = None
    sections: list[Literal["weight_load", "loads_mp", "timeslice_mp"]] = Field(
        default_factory=lambda: ["weight_load", "loads_mp", "timeslice_mp"], min_length=1)


class Metadata(_Strict):
    source: Literal["measured", "roofline", "transferred"]
    gpu_name: str
    gpu_key: str | None = None
    gpu_memory_bytes: int | None = None
    driver: str | None = None
    cuda: str | None = None
    torch: str | None = None
    transformers: str | None = None
    python: str | None = None
    host_cpu: str | None = None
    device: str = "cuda"
    date: str | None = None
    model_id: str
    dtype: str
    weights: str = "random"
    command: str | None = None
    duration_s: float | None = None
    quick: bool = False
    notes: list[str] = Field(default_factory=list)
    loads_from: LoadsSource | None = Field(
        default=None, description="the calibration the load stages come from, when not this one")

    @model_serializer(mode="wrap")
    def _without_unset_loads_from(self, handler):
        """Metadata whose loads are its own is written as before the field existed (profiles stay byte-identical)."""
        return _without_unset(handler(self), "loads_from")


class Profile(_Strict):
    schema_version: int
    metadata: Metadata
    prefill: LinearFit | PiecewiseFit
    decode_step: LinearFit | PiecewiseFit
    jitter_decode: list[float] = Field(min_length=1, description="step time / median, empirical")
    jitter_prefill: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    jitter_decode_sequence: list[float] = Field(
        default_factory=list,
        description="step time / median in the order measured (consecutive Exp 2.1 runs): slow and fast "
        "spells last many steps, so the simulator draws runs of consecutive factors from it",
    )
    h2d_pinned: Bandwidth
    h2d_pageable: Bandwidth
    d2h_pinned: Bandwidth
    d2h_pageable: Bandwidth
    serialize: Bandwidth
    deserialize: Bandwidth
    weight_load: dict[Literal["disk", "pageable", "pinned"], WeightLoad]
    network: Network
    memory: Memory
    end_to_end: dict[str, float] = Field(
        default_factory=dict, description="e.g. measured Exp 2.1 run percentiles, for the record"
    )
    cold_shapes: ColdShapes | None = Field(
        default=None, description="first-run cost of new attention shapes in a process; absent: not measured")
    spread: Spread | None = Field(
        default=None, description="the spread calibration saw, for prediction bands; absent: not computed")
    loads_mp: dict[ProcessLoadTier, ProcessLoads] = Field(
        default_factory=dict, description="whole-model loads by k processes at once, per tier (stage loads_mp)")
    timeslice_mp: Timeslice | None = Field(
        default=None, description="k processes decoding at once on the GPU (stage timeslice_mp); absent: not measured")
    cached_prefill: LinearFit | PiecewiseFit | None = Field(
        default=None, description="prefill of new tokens on top of a cached context (stage cached_prefill)")
    kv_swaps: KvSwaps | None = Field(
        default=None, description="a session's whole KV swapped out and in (stage kv_swaps); absent: not measured")
    samples_file: str | None = None
    samples_sha256: str | None = Field(
        default=None, description="sha256 of samples_file as written with this profile; a refit or a band "
        "computed from another file is refused (absent in profiles older than the check)")

    @field_validator("jitter_decode", "jitter_prefill", "jitter_decode_sequence")
    @classmethod
    def _factors(cls, value: list[float]) -> list[float]:
        if any(not 0 < v <= MAX_FACTOR for v in value):
            raise ValueError(f"jitter factors (time over the median) must lie in (0, {MAX_FACTOR:g}]")
        return value


SAMPLES_GZIP_SUFFIX = ".gz"


def open_samples(file: str | Path) -> IO[str]:
    """A samples file opened for the csv module; one stored gzipped (`NAME.csv.gz`, as the committed
    calibrations under docs/ are: the tree that travels to the GPU machine is capped) decompressed."""
    file = Path(file)
    if file.suffix == SAMPLES_GZIP_SUFFIX:
        return gzip.open(file, "rt", newline="")
    return file.open(newline="")


def samples_sha256(file: str | Path) -> str:
    """The sha256 of a samples file's content, the one its profile records: of the decompressed
    bytes for a gzipped copy, so gzipping a committed samples file keeps it its profile's."""
    file = Path(file)
    if file.suffix != SAMPLES_GZIP_SUFFIX:
        return file_sha256(file)
    digest = hashlib.sha256()
    with gzip.open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def samples_path(profile: Profile, path: str | Path) -> Path | None:
    """The samples file beside the profile at `path` (the name it records, or that name + `.gz`
    where only a gzipped copy lies there), or None when it names none or the file is absent. A
    file whose sha256 (of its content) is not the one recorded with the profile is another
    calibration's samples (a profile copied over an older folder): refused, so no refit or band
    mixes the two."""
    if not profile.samples_file:
        return None
    file = Path(path).parent / profile.samples_file
    if not file.is_file():
        file = file.with_name(file.name + SAMPLES_GZIP_SUFFIX)
        if not file.is_file():
            return None
    try:
        content_sha256 = samples_sha256(file) if profile.samples_sha256 is not None else None
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; damaged deflate data a zlib.error
        raise DjinnsimError(f"{file}: cannot read the samples file ({exc})") from None
    if profile.samples_sha256 is not None and content_sha256 != profile.samples_sha256:
        raise DjinnsimError(f"{file}: not the samples file of {Path(path).name} (sha256 differs from the one the "
                            f"profile records: it belongs to another calibration; copy the profile with its own "
                            f"{profile.samples_file})")
    return file


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; every failure is a one-line DjinnsimError naming the file."""
    path = Path(path)
    shown = describe_path(path)
    raw = parse_json(read_input_text(path, "calibration profile"), shown, "profile")
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in READABLE_VERSIONS:
        raise DjinnsimError(
            f"{shown}: unknown profile schema_version {version!r} (this djinnsim reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        # a union (LinearFit | PiecewiseFit) reports each member's error: the member the input was
        # meant as is the one with an error about a value (the other only finds fields missing or
        # not its own), and the deepest of those
        err = max(exc.errors(), key=lambda e: (e["type"] not in ("missing", "extra_forbidden"), len(e["loc"])))
        where = ".".join(str(p) for p in err["loc"]  # not the names pydantic gives a union's members
                         if not (isinstance(p, str) and (p in ("LinearFit", "PiecewiseFit") or "[" in p)))
        msg = err["msg"].removeprefix("Value error, ")
        raise DjinnsimError(f"{shown}: invalid profile field {where}: {msg}") from None


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write `path` whole or not at all: into `.NAME.partial-PID` beside it, renamed into place."""
    path = Path(path)
    text = strict_json(profile.model_dump(mode="json"), indent=1, sort_keys=False) + "\n"
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DjinnsimError(os_error_line(exc, "write the profile")) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
