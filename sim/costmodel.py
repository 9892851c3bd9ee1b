"""The cost-model seam: everything the simulator knows about GPU, PCIe and host costs.

`CostModel` is the interface. `ProfileCostModel` evaluates a calibration profile (measured,
or transferred from another GPU by `transfer_profile`); `RooflineCostModel` derives costs from
datasheet figures for GPUs that were never calibrated. Link bandwidth and RTT are not here:
they belong to the scenario.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from statistics import NormalDist
from typing import Callable, Literal

import numpy as np

from djinnsim.errors import DjinnsimError

from .notices import fit_inputs
from .profile import Bandwidth, LinearFit, PiecewiseFit, Profile, WeightLoad
from .specs import GpuSpec, ModelSpec

LoadTier = Literal["disk", "pageable", "pinned"]
GB = 1e9


def feature_value(name: str, inputs: dict[str, float]) -> float:
    """Named regressors of the fitted cost functions (shared with calibrate's fitting code)."""
    b = inputs.get("batch", 1.0)
    p = inputs.get("prompt_tokens", 0.0)
    c = inputs.get("context", 0.0)
    s = inputs.get("sum_context", b * c)
    table = {
        "1": 1.0,
        "batch": b,
        "tokens": b * p,
        "tokens_sq": b * p * p,
        "tokens_ctx": b * p * c,
        "sum_context": s,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown fit feature {name!r}") from None


def _in_domain(fit: LinearFit, inputs: dict[str, float]) -> bool:
    return _held(fit, inputs) == len(fit.domain)


def _distance(fit: LinearFit, inputs: dict[str, float]) -> float:
    """How far the inputs lie outside the fit's domain, each variable relative to the bound it passed."""
    total = 0.0
    for var, (lo, hi) in fit.domain.items():
        x = inputs.get(var, lo)
        if x < lo:
            total += (lo - x) / max(abs(lo), 1.0)
        elif x > hi:
            total += (x - hi) / max(abs(hi), 1.0)
    return total


def _held(fit: LinearFit, inputs: dict[str, float]) -> int:
    """How many of the fit's domain variables hold the inputs' values."""
    return sum(lo <= inputs.get(var, lo) <= hi for var, (lo, hi) in fit.domain.items())


def _piece(fit: LinearFit | PiecewiseFit, inputs: dict[str, float]) -> tuple[LinearFit, bool]:
    """The linear fit that values `inputs`, and whether they lie inside its domain. Outside every
    piece: the piece whose domain holds the most of the inputs, then the one nearest in the others,
    so a point off the grid in one variable keeps the piece of the rest."""
    if isinstance(fit, PiecewiseFit):
        for piece in fit.pieces:
            if _in_domain(piece, inputs):
                return piece, True
        return min(fit.pieces, key=lambda piece: (-_held(piece, inputs), _distance(piece, inputs))), False
    return fit, _in_domain(fit, inputs)


def _sum(fit: LinearFit, inputs: dict[str, float]) -> float:
    return sum(k * feature_value(f, inputs) for k, f in zip(fit.coef, fit.features))


def evaluate_fit(fit: LinearFit | PiecewiseFit, inputs: dict[str, float]) -> tuple[float, bool]:
    """Return (value, inside_domain). Outside every piece, the nearest piece extrapolates (`_piece`)."""
    piece, inside = _piece(fit, inputs)
    value = _sum(piece, inputs)
    if piece.floor_s is not None:
        value = max(value, piece.floor_s)
    return value, inside


def gpu_work_s(fit: LinearFit | PiecewiseFit, inputs: dict[str, float]) -> float | None:
    """The GPU's work in a max(floor, sum) fit at `inputs`: its sum, without the host's launch floor
    (at least 0). None for an additive fit (no `floor_s`), whose terms mix host and GPU time."""
    piece, _ = _piece(fit, inputs)
    return None if piece.floor_s is None else max(_sum(piece, inputs), 0.0)


_DECODE_FEATURES = {"1": 0, "batch": 1, "sum_context": 2}  # a decode step's regressors, by position
_DECODE_INPUTS = {"batch": 0, "sum_context": 1, "context": 2}


def _decode_terms(fit: LinearFit | PiecewiseFit) -> Callable[[int, int, float], float | None] | None:
    """A linear decode-step fit as a function of (batch, sum_context, context) (a partial of a
    module function: a cost model that holds it still pickles), for
    `ProfileCostModel.decode_step_s`, which runs once per batched decode iteration: evaluate_fit's
    arithmetic (the same products, added by sum() in the same order) where the point lies inside
    the fit's domain, None outside it (the general path flags it). None where the general
    `evaluate_fit` must do it (a piecewise fit, another feature, a bound on another variable)."""
    if not isinstance(fit, LinearFit) or fit.floor_s is not None or not all(f in _DECODE_FEATURES for f in fit.features):
        return None
    if not all(var in _DECODE_INPUTS for var in fit.domain):
        return None
    terms = tuple((k, _DECODE_FEATURES[f]) for k, f in zip(fit.coef, fit.features))
    bounds = tuple((_DECODE_INPUTS[var], lo, hi) for var, (lo, hi) in fit.domain.items())
    if len(terms) == 3 and sorted(i for i, _, _ in bounds) == [0, 1, 2]:
        # the usual fit (a constant, batch and sum_context, bounded on all three inputs), unrolled
        limits = [(lo, hi) for _, lo, hi in sorted(bounds)]
        return functools.partial(_three_term_step_s, *terms, *limits)
    return functools.partial(_step_s, terms, bounds)


def _three_term_step_s(term0: tuple, term1: tuple, term2: tuple, batch_limits: tuple, sum_limits: tuple,
                       context_limits: tuple, batch: int, sum_context: int, context: float) -> float | None:
    """`_step_s` of three terms and a bound on each input, unrolled (its arithmetic, step by step)."""
    if (batch_limits[0] <= batch <= batch_limits[1] and sum_limits[0] <= sum_context <= sum_limits[1]
            and context_limits[0] <= context <= context_limits[1]):
        values = (1.0, batch, sum_context)
        return max(sum((term0[0] * values[term0[1]], term1[0] * values[term1[1]], term2[0] * values[term2[1]])), 0.0)
    return None


def _step_s(terms: tuple, bounds: tuple, batch: int, sum_context: int, context: float) -> float | None:
    """A linear decode step from its positional terms, None outside its bounds (`_decode_terms`)."""
    inputs = (batch, sum_context, context)
    for i, lo, hi in bounds:
        if not lo <= inputs[i] <= hi:
            return None
    values = (1.0, batch, sum_context)
    return max(sum([k * values[i] for k, i in terms]), 0.0)


class CostModel(ABC):
    """What the simulator may ask about costs. Times in seconds, sizes in bytes."""

    model: ModelSpec
    gpu_name: str
    source: str

    def __init__(self) -> None:
        self.out_of_range: set[str] = set()

    # --- GPU compute -------------------------------------------------------------------
    @abstractmethod
    def prefill_s(self, prompt_tokens: int, batch: int = 1, context_tokens: int = 0) -> float:
        """Forward over `prompt_tokens` new tokens per sequence, after `context_tokens` cached."""

    @abstractmethod
    def decode_step_s(self, batch: int, sum_context: int) -> float:
        """One decode step for `batch` sequences whose cached contexts add up to `sum_context`."""

    @abstractmethod
    def jitter_samples(self, kind: Literal["decode", "prefill"]) -> np.ndarray:
        """Empirical multiplicative step-time factors (median 1)."""

    def jitter(self, rng: np.random.Generator, kind: Literal["decode", "prefill"], size: int) -> np.ndarray:
        """`size` factors in the order steps will use them. With a measured step sequence, decode
        factors come as runs of consecutive measured steps from random starting points (a block
        bootstrap), so a slow spell slows a whole generation as it did on the GPU."""
        sequence = self.jitter_sequence() if kind == "decode" else None
        if sequence is None or len(sequence) < 2:
            return rng.choice(self.jitter_samples(kind), size=size)
        block = min(self.jitter_block_steps, len(sequence))
        starts = rng.integers(0, len(sequence), size=-(-size // block))
        offsets = (starts[:, None] + np.arange(block)[None, :]).ravel()[:size]
        return np.take(sequence, offsets, mode="wrap")

    jitter_block_steps = 128

    def cold_shape_s(self, kind: Literal["decode", "prefill"], tokens: int) -> float:
        """Extra time of a pass whose attention shapes its process has never run (`tokens`: the
        pass's new tokens over the batch). Zero where not measured."""
        return 0.0

    def jitter_sequence(self) -> np.ndarray | None:
        """Measured decode factors in time order, when the cost model has them."""
        return None

    # --- weights, PCIe, host -------------------------------------------------------------
    @abstractmethod
    def weight_load(self, tier: LoadTier) -> WeightLoad:
        """Fixed overhead, lone throughput and contention of a whole-model load from `tier`."""

    def load_aggregate_gbps(self, tier: LoadTier, concurrent: int) -> float:
        """Total transfer throughput shared by `concurrent` simultaneous loads from `tier`, interpolated
        over the concurrencies measured; past the largest one it stays flat."""
        spec = self.weight_load(tier)
        if concurrent <= 1 or not spec.aggregate_gbps:
            return spec.gbps
        ks = sorted(spec.aggregate_gbps)
        return float(np.interp(concurrent, [1, *ks], [spec.gbps, *(spec.aggregate_gbps[k] for k in ks)]))

    @abstractmethod
    def copy_bandwidth(self, direction: Literal["h2d", "d2h"], pinned: bool) -> Bandwidth: ...

    def copy_s(self, nbytes: float, direction: Literal["h2d", "d2h"] = "h2d", pinned: bool = True) -> float:
        return self.copy_bandwidth(direction, pinned).time_s(nbytes) if nbytes > 0 else 0.0

    def kv_swap_bandwidth(self, direction: Literal["h2d", "d2h"], pinned: bool,
                          lone: bool = False) -> tuple[Bandwidth, int]:
        """How a session's KV cache (`kv_tensors` buffers) crosses PCIe in a swap: the bandwidth and
        how many buffers pay its fixed latency one after another. Without a measured kv_swaps stage:
        pinned copies are issued non_blocking into a pool and queue on one stream, so their
        latencies overlap (paid once for the set); pageable copies are synchronous, one per buffer
        (each at the rate of its size: Bandwidth.rate_gbps). `lone`: no other session's KV is held
        in host memory at the swap (ProfileCostModel.kv_swap_bandwidth); no difference here."""
        bandwidth = self.copy_bandwidth(direction, pinned)
        return bandwidth, 1 if pinned else self.kv_tensors

    def kv_swap_s(self, nbytes: float, direction: Literal["h2d", "d2h"], pinned: bool, lone: bool = False) -> float:
        """A swap of `nbytes` of one session's KV, alone on the bus (`lone`: kv_swap_bandwidth)."""
        if nbytes <= 0:
            return 0.0
        bandwidth, pieces = self.kv_swap_bandwidth(direction, pinned, lone)
        return bandwidth.time_s(nbytes, pieces)

    def kv_swap_out_range_s(self, nbytes: float, lone: bool = False) -> tuple[float, float]:
        """A pageable swap-out of `nbytes` of one session's KV, alone on the bus, with the host pages
        warm and with them fresh (page-faulting): (the lower, the upper end), the charge inside.
        Equal where the cost model knows one regime only (CostModel: the charge twice)."""
        charged = self.kv_swap_s(nbytes, "d2h", False, lone)
        return charged, charged

    @abstractmethod
    def serde_bandwidth(self, which: Literal["serialize", "deserialize"]) -> Bandwidth: ...

    def serialize_s(self, nbytes: float) -> float:
        return self.serde_bandwidth("serialize").time_s(nbytes) if nbytes > 0 else 0.0

    def deserialize_s(self, nbytes: float) -> float:
        return self.serde_bandwidth("deserialize").time_s(nbytes) if nbytes > 0 else 0.0

    @abstractmethod
    def connect_s(self) -> float:
        """Software cost of opening a connection (the handshake's RTT is the link's)."""

    @abstractmethod
    def per_message_s(self) -> float: ...

    def stream_gbps(self) -> float | None:
        """Most GB/s one connection's host socket stack moves (None: no cap beyond the link)."""
        return None

    def stream_serial_s(self, nbytes: float) -> float:
        """Host time per message over the loopback stack that the cap does not hide: paid in series
        with the link, beyond (de)serialization (0: not measured)."""
        return 0.0

    def stream_path_s(self, nbytes: float, gbps: float | None = None) -> float | None:
        """Host time of a message of `nbytes` over the loopback stack, serialization included, that
        the cap does not hide: paid in series with the link instead of serialize_s and
        stream_serial_s (None: not measured; those two are charged). `gbps`: the link's rate, where
        a paced link has its own measured path (None: the unpaced path)."""
        return None

    def gpu_busy_fraction(self) -> float:
        """Share of a decode pass during which the GPU itself is busy; the rest is host time
        (kernel launches) that another process can overlap with its own GPU work."""
        return 1.0

    def decode_gpu_s(self, batch: int, sum_context: int) -> float | None:
        """GPU seconds of one decode pass, absolute: what processes sharing the GPU take in turns
        (the rest of the pass is host time they overlap). None: not measured, and the pass's GPU
        time is `gpu_busy_fraction()` of its duration."""
        return None

    def prefill_gpu_s(self, prompt_tokens: int, batch: int = 1, context_tokens: int = 0) -> float | None:
        """GPU seconds of a prefill pass, absolute (the rest is the host's launches, which processes
        sharing the GPU overlap). None: not given, and the pass launches as much as a decode step at
        its batch and context (PassTimer.host_s)."""
        return None

    def timeslice_processes(self, processes: int) -> None:
        """`processes` processes share the GPU at once, time-sliced: a profile flags more than its
        timeslice_mp stage measured in the run's warnings (nothing to flag here)."""

    def timeslice_step_s(self, processes: int, context: int) -> float:
        """Each process's batch-1 decode step at `context` with `processes` processes decoding at
        once, as the time-sliced executors charge it in steady state: max(lone step, k g), g the
        pass's GPU seconds (`decode_gpu_s`); without them (no timeslice_mp stage) the pass's GPU time
        is f of it (`gpu_busy_fraction`): the lone step x max(1, k f)."""
        self.timeslice_processes(processes)
        lone = self.decode_step_s(1, context)
        gpu = self.decode_gpu_s(1, context)
        if gpu is None:
            return lone * max(1.0, processes * self.gpu_busy_fraction())
        return max(lone, processes * min(gpu, lone))

    def timeslice_slowdown(self, processes: int) -> float:
        """Median decode-step time with `processes` processes decoding at once on the GPU (each its
        own CUDA context and model copy), relative to one alone. Without a measurement: the
        time-sliced model over `gpu_busy_fraction()`, max(1, k * f)."""
        return max(1.0, processes * self.gpu_busy_fraction())

    # --- memory ------------------------------------------------------------------------
    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abstractmethod
    def weight_bytes(self) -> int: ...

    @property
    @abstractmethod
    def kv_bytes_per_token(self) -> int: ...

    @property
    def kv_tensors(self) -> int:
        """Buffers a session's KV cache is made of: one K and one V tensor per layer (a swap copies
        each on its own)."""
        return 2 * self.model.num_layers

    @property
    @abstractmethod
    def context_bytes_per_process(self) -> int: ...

    @abstractmethod
    def workspace_bytes(self, tokens: int, batch: int = 1) -> int:
        """Transient scratch of one execution over `tokens` tokens per sequence."""

    def describe(self) -> str:
        return f"{self.source} cost model: {self.model.model_id} on {self.gpu_name}"


class ProfileCostModel(CostModel):
    """Costs read from a calibration profile."""

    def __init__(self, profile: Profile, model: ModelSpec,
                 pageable_swap_out: Literal["expected", "fresh"] = "expected") -> None:
        super().__init__()
        self.profile = profile
        self.model = model
        # which regime a pageable swap-out's host pages are in where the size leaves it open
        # (kv_swap_bandwidth): the one the copies stage saw for the size, or fresh (a band draw)
        self.pageable_swap_out = pageable_swap_out
        self._decode_compiled: tuple | None = None  # (the decode fit, _decode_terms of it)
        self._lone_step: tuple | None = None  # (the decode fit, timeslice_mp, its batch-1 step at the stage's context)
        self.gpu_name = profile.metadata.gpu_name
        self.source = profile.metadata.source
        self._jitter = {
            "decode": np.asarray(profile.jitter_decode, dtype=float),
            "prefill": np.asarray(profile.jitter_prefill, dtype=float),
        }
        self._sequence = np.asarray(profile.jitter_decode_sequence, dtype=float) if profile.jitter_decode_sequence else None

    def describe(self) -> str:
        """Its kind, model and GPU, and for a moved or CPU profile the hardware it was measured on."""
        text = super().describe()
        meta = self.profile.metadata
        moved = [note for note in meta.notes if note.startswith("transferred from ")]
        if moved:
            return f"{text} ({moved[-1]})"
        if meta.device == "cpu":
            return f"{text} (measured on a CPU: not a prediction for any GPU)"
        return text

    def _eval(self, name: str, fit: LinearFit | PiecewiseFit, inputs: dict[str, float]) -> float:
        value, inside = evaluate_fit(fit, inputs)
        if not inside:
            self.out_of_range.add(f"{name} at {fit_inputs(inputs)}")
        return max(value, 0.0)

    def _prefill_fit(self, context_tokens: int) -> tuple[str, LinearFit | PiecewiseFit]:
        """The fit that times a prefill after `context_tokens` cached: cached_prefill when there is
        a cached context and the profile has the stage; else prefill (outside its domain then)."""
        if context_tokens > 0 and self.profile.cached_prefill is not None:
            return "cached_prefill", self.profile.cached_prefill
        return "prefill", self.profile.prefill

    def prefill_gpu_s(self, prompt_tokens: int, batch: int = 1, context_tokens: int = 0) -> float | None:
        """The GPU term of the prefill (or cached_prefill) fit, max(floor_s, GPU work): its GPU work,
        the rest of the pass being the host's launches. None for an additive fit (no floor_s)."""
        _, fit = self._prefill_fit(context_tokens)
        return gpu_work_s(fit, {"prompt_tokens": prompt_tokens, "batch": batch, "context": context_tokens,
                                "tokens": batch * prompt_tokens})

    def prefill_s(self, prompt_tokens: int, batch: int = 1, context_tokens: int = 0) -> float:
        """The prefill fit, floored at a decode step of the same batch and context: a prefill pass
        launches at least the kernels of a decode step, and where both are launch bound (short
        prompts on a host-bound machine) a fit over prompts up to thousands of tokens can undershoot
        that floor (on the H100 it gave 17 ms at 100 tokens, where every measured prompt up to 512
        tokens took 21-27 ms)."""
        inputs = {"prompt_tokens": prompt_tokens, "batch": batch, "context": context_tokens,
                  "tokens": batch * prompt_tokens}
        # without the cached_prefill stage a cached context lies outside the prefill fit's domain
        fitted = self._eval(*self._prefill_fit(context_tokens), inputs)
        step = {"batch": batch, "sum_context": batch * context_tokens, "context": context_tokens}
        floor, _ = evaluate_fit(self.profile.decode_step, step)  # a bound, not a query: never flagged
        return max(fitted, floor)

    def decode_step_s(self, batch: int, sum_context: int) -> float:
        fit = self.profile.decode_step
        compiled = self._decode_compiled
        if compiled is None or compiled[0] is not fit:
            compiled = self._decode_compiled = (fit, _decode_terms(fit))
        context = sum_context / max(batch, 1)
        if compiled[1] is not None:
            step_s = compiled[1](batch, sum_context, context)
            if step_s is not None:
                return step_s
        inputs = {"batch": batch, "sum_context": sum_context, "context": context}
        return self._eval("decode_step", fit, inputs)

    def jitter_samples(self, kind: Literal["decode", "prefill"]) -> np.ndarray:
        return self._jitter[kind]

    def jitter_sequence(self) -> np.ndarray | None:
        return self._sequence

    def cold_shape_s(self, kind: Literal["decode", "prefill"], tokens: int) -> float:
        cold = self.profile.cold_shapes
        return cold.extra_s(kind, tokens) if cold is not None else 0.0

    def weight_load(self, tier: LoadTier) -> WeightLoad:
        """The lone-load fit; with the loads_mp stage, its aggregates are the processes' (threads'
        otherwise), turned into transfer rates: k loads of B bytes took wall W = k B / aggregate,
        of which each load's fixed part is paid once in parallel, so the pipe moves k B in W - fixed."""
        lone = self.profile.weight_load.get(tier)
        if lone is None:
            raise DjinnsimError(
                f"the profile has no whole-model load from {tier} (its calibration stopped before the weights "
                "stage?): refit it with `djinnsim calibrate --refit PROFILE --loads-from` an earlier full calibration")
        measured = self.profile.loads_mp.get(tier)
        if measured is None:
            return lone
        aggregate = {}
        for k, gbps in measured.aggregate_gbps.items():
            if k <= 1:
                continue
            wall_s = k * measured.nbytes / (gbps * GB)
            aggregate[k] = k * measured.nbytes / max(wall_s - lone.fixed_s, 1e-3 * wall_s) / GB
        return lone.model_copy(update={"aggregate_gbps": aggregate})

    def copy_bandwidth(self, direction: Literal["h2d", "d2h"], pinned: bool) -> Bandwidth:
        return getattr(self.profile, f"{direction}_{'pinned' if pinned else 'pageable'}")

    def pageable_regimes(self) -> Bandwidth | None:
        """The copies stage's pageable device-to-host fit when it saw two regimes (a GPU profile whose
        `d2h_pageable` has `large_from_bytes` and `large_gbps`): `tensor.to("cpu")` of buffers up to
        `large_from_bytes` ran into warm host pages (glibc serves them from its heap, below its
        dynamic mmap threshold, at most 32 MiB), larger ones into freshly mapped pages that fault on
        first touch. None otherwise (a CPU profile, or one regime seen): the swap is charged as before."""
        copy = self.profile.d2h_pageable
        if self.profile.metadata.device == "cpu" or copy.large_from_bytes is None or copy.large_gbps is None:
            return None
        return copy

    def _fresh(self, copy: Bandwidth) -> Bandwidth:
        return Bandwidth(latency_s=copy.latency_s, gbps=copy.large_gbps)

    def _swap_fit(self, key: str) -> Bandwidth | None:
        """The kv_swaps stage's fit `key` for the whole set, where the profile has it for this model's layout."""
        swaps = self.profile.kv_swaps
        if swaps is not None and swaps.tensors == self.kv_tensors and key in swaps.fits:
            return swaps.fits[key]
        return None

    def kv_swap_bandwidth(self, direction: Literal["h2d", "d2h"], pinned: bool,
                          lone: bool = False) -> tuple[Bandwidth, int]:
        """A pageable swap-out's host pages are warm (glibc's heap) or fresh (trimmed back to the
        kernel and faulted again), as the host allocator's state leaves them (calibrate/kv_cycle.py):

        - a band draw of the fresh regime (`pageable_swap_out="fresh"`, where the copies stage saw two
          regimes): every tensor into fresh pages, whatever the size;
        - `lone` (no other session's KV held in host memory: one agent, or validate.kv_costs's loop),
          where the profile has the kv_swaps stage's `d2h_pageable_cycle` fit: that fit for the whole
          set, the stage having timed validate's own loop on the calibrated machine;
        - otherwise, where the copies stage saw two regimes (`pageable_regimes`): every K and V tensor
          `.to("cpu")` on its own at the regime its size falls in (Bandwidth.rate_gbps: warm up to
          `large_from_bytes`, fresh pages above). The default for a server swapping several
          sessions: the set a swap-in frees lies below sets still held, which glibc's trim (only of
          the heap's top) cannot reach, so the next swap-out reuses its pages warm (on the 2-core CPU
          machine, 4 sessions round robin: a median of 0-2.3% of the pages fresh).

        Otherwise the kv_swaps stage's fit for the whole set, when the profile has it for this
        model's layout; else the copies stage's bandwidth (CostModel.kv_swap_bandwidth). Profiles
        without `d2h_pageable_cycle` (before the stage ran it) are charged as before, lone or not."""
        if direction == "d2h" and not pinned:
            copy = self.pageable_regimes()
            if copy is not None and self.pageable_swap_out == "fresh":
                return self._fresh(copy), self.kv_tensors
            cycle = self._swap_fit("d2h_pageable_cycle") if lone else None
            if cycle is not None:
                return cycle, 1
            if copy is not None:
                return copy, self.kv_tensors
        fit = self._swap_fit(f"{direction}_{'pinned' if pinned else 'pageable'}")
        if fit is not None:
            return fit, 1
        return super().kv_swap_bandwidth(direction, pinned)

    def kv_swap_out_range_s(self, nbytes: float, lone: bool = False) -> tuple[float, float]:
        """(lower, upper): the range a pageable swap-out may take where the copies stage saw two
        regimes, from every tensor into warm pages to every tensor into fresh ones, widened to hold
        the charge (a lone swap-out's cycle fit may lie outside); the charge twice otherwise."""
        charged = self.kv_swap_s(nbytes, "d2h", False, lone)
        copy = self.pageable_regimes()
        if copy is None or nbytes <= 0:
            return charged, charged
        warm = copy.time_s(nbytes, self.kv_tensors) if self.pageable_swap_out != "fresh" else charged
        return min(charged, warm), max(charged, self._fresh(copy).time_s(nbytes, self.kv_tensors))

    def serde_bandwidth(self, which: Literal["serialize", "deserialize"]) -> Bandwidth:
        return getattr(self.profile, which)

    def connect_s(self) -> float:
        return self.profile.network.connect_s

    def per_message_s(self) -> float:
        return self.profile.network.per_message_s

    def stream_gbps(self) -> float | None:
        return self.profile.network.loopback_gbps

    def stream_serial_s(self, nbytes: float) -> float:
        gbps = self.profile.network.loopback_serial_gbps
        return nbytes / (gbps * GB) if gbps and nbytes > 0 else 0.0

    def stream_path_s(self, nbytes: float, gbps: float | None = None) -> float | None:
        """loopback_path in log bytes; on a paced link, paced_path in log rate. Where the paced rows
        reach the loopback cap, they alone give the curve (flat beyond its ends, flagged); where they
        stop below it, they run up to loopback_path's value at the cap, and a link at or above the
        cap is charged loopback_path (a rate below the slowest measured: flagged)."""
        network = self.profile.network
        points = network.loopback_path
        if points is None:
            return None
        if nbytes <= 0:
            return 0.0
        sizes, values = [math.log(b) for b, _ in points], [s for _, s in points]
        per_byte = float(np.interp(math.log(nbytes), sizes, values))
        paced = network.paced_path
        if not paced or gbps is None:
            return nbytes * per_byte
        if network.paced_path_bytes is not None:  # the paced rows' level, loopback_path's shape over sizes
            shape = per_byte / float(np.interp(math.log(network.paced_path_bytes), sizes, values))
            paced = [(g, s * shape) for g, s in paced]
        cap_gbps = (network.loopback_gbps or 0.0) * 8  # loopback_gbps is in GB/s
        if paced[-1][0] < cap_gbps:  # measured below the cap only: up to the unpaced path at the cap
            if gbps >= cap_gbps:
                return nbytes * per_byte
            paced = [*paced, (cap_gbps, per_byte)]
        elif gbps > paced[-1][0]:
            self.out_of_range.add(f"a loopback link paced above {paced[-1][0]:g} Gbps (its host path taken as at {paced[-1][0]:g})")
        if gbps < paced[0][0]:
            self.out_of_range.add(f"a loopback link paced below {paced[0][0]:g} Gbps (its host path taken as at {paced[0][0]:g})")
        per_byte = float(np.interp(math.log(gbps), [math.log(g) for g, _ in paced], [s for _, s in paced]))
        return nbytes * per_byte

    def gpu_busy_fraction(self) -> float:
        """From the timeslice_mp stage when measured: the f that makes the relative time-sliced
        model's slowdown max(1, k * f) fit the measured one (the executors charge `decode_gpu_s`
        instead, whose g is absolute); else the GPU's NVML utilization in Exp 2.1."""
        if self.profile.timeslice_mp is not None:
            return self.profile.timeslice_mp.gpu_busy_fraction
        util = self.profile.end_to_end.get("nvml.exp21.sm_util_pct.p50")
        return min(max(util / 100.0, 0.01), 1.0) if util else 1.0

    def decode_gpu_s(self, batch: int, sum_context: int) -> float | None:
        """With the timeslice_mp stage: its g (the GPU's time per batch-1 step at the stage's context,
        absolute, so a moved launch-bound level leaves it where it is) plus what the decode fit adds
        at this batch and context over its batch-1 step at the stage's context (a longer pass
        launches the same kernels: the extra is the GPU's). Without the stage: None."""
        measured = self.profile.timeslice_mp
        if measured is None:
            return None
        fit = self.profile.decode_step
        cached = self._lone_step
        if cached is None or cached[0] is not fit or cached[1] is not measured:
            context = float(np.mean(measured.context_tokens))
            lone = {"batch": 1, "sum_context": context, "context": context}
            cached = self._lone_step = (fit, measured, evaluate_fit(fit, lone)[0])
        at = {"batch": batch, "sum_context": sum_context, "context": sum_context / max(batch, 1)}
        # bounds, not queries: never flagged as outside the calibrated range
        extra = evaluate_fit(fit, at)[0] - cached[2]
        return measured.gpu_step_s + max(extra, 0.0)

    def load_aggregate_gbps(self, tier: LoadTier, concurrent: int) -> float:
        """As measured; a concurrency past the largest measured one is flagged in the run's warnings."""
        largest = max(self.weight_load(tier).aggregate_gbps, default=1)
        if concurrent > largest:
            self.out_of_range.add(f"weight loads from {tier} with more than {largest} at once")
        return super().load_aggregate_gbps(tier, concurrent)

    def timeslice_processes(self, processes: int) -> None:
        """More processes at once than the timeslice_mp stage measured: flagged in the run's warnings
        (g, fitted to the k measured, is taken to hold beyond them)."""
        measured = self.profile.timeslice_mp
        if measured is None and processes > 1:  # max(1, k f) over the busy fraction, never measured
            self.out_of_range.add("time-sliced decoding by several processes at once (no timeslice_mp stage)")
        elif measured is not None and processes > measured.max_k:
            self.out_of_range.add(f"time-sliced decoding with more than {measured.max_k} processes")

    def timeslice_slowdown(self, processes: int) -> float:
        measured = self.profile.timeslice_mp
        self.timeslice_processes(processes)
        if measured is None:
            return super().timeslice_slowdown(processes)
        return measured.slowdown(processes)

    @property
    def capacity_bytes(self) -> int:
        return self.profile.memory.total_bytes

    @property
    def weight_bytes(self) -> int:
        return self.profile.memory.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.profile.memory.kv_bytes_per_token

    @property
    def context_bytes_per_process(self) -> int:
        return self.profile.memory.context_bytes_per_process

    def workspace_bytes(self, tokens: int, batch: int = 1) -> int:
        fit = self.profile.memory.prefill_workspace
        if fit is None:
            return 0
        value, _ = evaluate_fit(fit, {"prompt_tokens": tokens, "batch": batch})
        return int(max(value, 0.0))


class RooflineCostModel(CostModel):
    """Analytic costs from a GPU datasheet: max(compute, memory) plus host-side overheads.

    The host-side constants are assumptions, not measurements (documented in the README);
    a measured profile replaces them.
    """

    compute_efficiency = 0.6
    memory_efficiency = 0.8
    host_overhead_per_layer_s = 2.0e-4  # eager PyTorch kernel launches per decoder layer
    host_overhead_fixed_s = 1.0e-3
    context_bytes = 512 * 2**20
    serde_gbps = 5.0
    connect_overhead_s = 1.0e-4
    per_message_overhead_s = 5.0e-5
    load_fixed_s = 0.5
    jitter_sigma = 0.03

    def __init__(self, gpu: GpuSpec, model: ModelSpec) -> None:
        super().__init__()
        self.gpu = gpu
        self.model = model
        self.gpu_name = gpu.name
        self.source = "roofline"
        normal = NormalDist()
        self._jitter = np.exp([self.jitter_sigma * normal.inv_cdf((i + 0.5) / 256) for i in range(256)])

    def describe(self) -> str:
        return f"{super().describe()} (analytic, from its datasheet; host costs assumed, not measured)"

    def _roof(self, flops: float, nbytes: float) -> float:
        compute = flops / (self.gpu.peak_tflops_fp16 * 1e12 * self.compute_efficiency)
        memory = nbytes / (self.gpu.hbm_gbps * GB * self.memory_efficiency)
        host = self.host_overhead_fixed_s + self.model.num_layers * self.host_overhead_per_layer_s
        return host + max(compute, memory)

    def prefill_s(self, prompt_tokens: int, batch: int = 1, context_tokens: int = 0) -> float:
        m = self.model
        avg_ctx = context_tokens + prompt_tokens / 2
        flops = batch * prompt_tokens * m.flops_per_token(int(avg_ctx))
        nbytes = m.weight_bytes + batch * (context_tokens + prompt_tokens) * m.kv_bytes_per_token
        return self._roof(flops, nbytes)

    def decode_step_s(self, batch: int, sum_context: int) -> float:
        m = self.model
        flops = batch * 2.0 * m.parameters + 4.0 * m.num_layers * m.hidden_size * sum_context
        nbytes = m.weight_bytes + sum_context * m.kv_bytes_per_token
        return self._roof(flops, nbytes)

    def jitter_samples(self, kind: Literal["decode", "prefill"]) -> np.ndarray:
        return self._jitter

    def weight_load(self, tier: LoadTier) -> WeightLoad:
        gbps = {"disk": self.gpu.disk_gbps, "pageable": self.gpu.pcie_pageable_gbps, "pinned": self.gpu.pcie_gbps}[tier]
        return WeightLoad(fixed_s=self.load_fixed_s, gbps=gbps, aggregate_gbps={})

    def copy_bandwidth(self, direction: Literal["h2d", "d2h"], pinned: bool) -> Bandwidth:
        gbps = self.gpu.pcie_gbps if pinned else self.gpu.pcie_pageable_gbps
        return Bandwidth(latency_s=1.0e-5, gbps=gbps)

    def serde_bandwidth(self, which: Literal["serialize", "deserialize"]) -> Bandwidth:
        return Bandwidth(latency_s=2.0e-5, gbps=self.serde_gbps)

    def connect_s(self) -> float:
        return self.connect_overhead_s

    def per_message_s(self) -> float:
        return self.per_message_overhead_s

    def gpu_busy_fraction(self) -> float:
        """The roof's share of a batch-1 decode step at a short context; the rest is host time."""
        step_s = self.decode_step_s(1, 128)
        host_s = self.host_overhead_fixed_s + self.model.num_layers * self.host_overhead_per_layer_s
        return (step_s - host_s) / step_s

    @property
    def capacity_bytes(self) -> int:
        return self.gpu.memory_bytes

    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    @property
    def context_bytes_per_process(self) -> int:
        return self.context_bytes

    def workspace_bytes(self, tokens: int, batch: int = 1) -> int:
        m = self.model
        per_token = (4 * m.hidden_size + 2 * m.intermediate_size) * m.dtype_bytes
        return int(batch * (tokens * per_token + m.vocab_size * 4))


def transfer_profile(profile: Profile, source: GpuSpec, target: GpuSpec, model: ModelSpec) -> Profile:
    """Move a measured profile to another GPU by the ratios of their datasheet figures.

    Compute-bound terms scale by peak FLOP/s, memory-bound terms by HBM bandwidth, PCIe terms by
    PCIe bandwidth; host-side terms stay. A 'mixed' intercept (decode) is split into the HBM time
    for reading the weights once, which scales, and the rest, which is host time and stays. A
    fit's `floor_s` (max(floor, GPU work): the host's launch time) stays; the time-sliced model's
    g (`timeslice_mp.gpu_step_s`, the GPU's time of a batch-1 step) moves by the HBM ratio, and
    the stage's measured points stay as measured. The profile's notes say so.
    """
    compute = source.peak_tflops_fp16 / target.peak_tflops_fp16
    memory = source.hbm_gbps / target.hbm_gbps
    weight_read_s = model.weight_bytes / (source.hbm_gbps * GB)

    def move(fit: LinearFit | PiecewiseFit) -> LinearFit | PiecewiseFit:
        if isinstance(fit, PiecewiseFit):
            return PiecewiseFit(pieces=[move(p) for p in fit.pieces])
        coef = []
        for k, cls in zip(fit.coef, fit.scale):
            if cls == "compute":
                coef.append(k * compute)
            elif cls == "memory":
                coef.append(k * memory)
            elif cls == "mixed":
                mem_part = min(max(k, 0.0), weight_read_s)
                coef.append(k - mem_part + mem_part * memory)
            else:
                coef.append(k)
        return fit.model_copy(update={"coef": coef})

    pcie = source.pcie_gbps / target.pcie_gbps

    def move_bw(bw: Bandwidth) -> Bandwidth:
        # The large-buffer rate is bound by host page faults, not PCIe: it stays.
        return bw.model_copy(update={"gbps": bw.gbps / pcie})

    loads = {}
    for tier, spec in profile.weight_load.items():
        ratio = 1.0 if tier == "disk" else 1 / pcie
        loads[tier] = WeightLoad(
            fixed_s=spec.fixed_s,
            gbps=spec.gbps * ratio,
            aggregate_gbps={k: v * ratio for k, v in spec.aggregate_gbps.items()},
        )
    loads_mp = {tier: spec.model_copy(update={"aggregate_gbps": {
                    k: v * (1.0 if tier.startswith("disk") else 1 / pcie) for k, v in spec.aggregate_gbps.items()}})
                for tier, spec in profile.loads_mp.items()}
    meta = profile.metadata.model_copy(
        update={
            "source": "transferred",
            "gpu_name": target.name,
            "gpu_key": target.key,
            "gpu_memory_bytes": target.memory_bytes,
            "notes": [*profile.metadata.notes, f"transferred from {source.name} by datasheet ratios",
                      "transfer kept each fit's floor_s (the host's launch time) and moved timeslice_mp.gpu_step_s "
                      f"(the GPU's time per step) x{memory:.3g} (HBM bandwidth)"],
        }
    )
    mem = profile.memory.model_copy(
        update={"total_bytes": target.memory_bytes, "free_at_start_bytes": None, "oom_probe_copies": None}
    )
    return profile.model_copy(
        update={
            "metadata": meta,
            "prefill": move(profile.prefill),
            "decode_step": move(profile.decode_step),
            "h2d_pinned": move_bw(profile.h2d_pinned),
            "h2d_pageable": move_bw(profile.h2d_pageable),
            "d2h_pinned": move_bw(profile.d2h_pinned),
            "d2h_pageable": move_bw(profile.d2h_pageable),
            "weight_load": loads,
            "loads_mp": loads_mp,
            "cached_prefill": move(profile.cached_prefill) if profile.cached_prefill is not None else None,
            "kv_swaps": profile.kv_swaps.model_copy(update={"fits": {k: move_bw(v) for k, v in profile.kv_swaps.fits.items()}})
            if profile.kv_swaps is not None else None,
            # g is the GPU's own time of a batch-1 step, reading the weights: memory bound
            "timeslice_mp": profile.timeslice_mp.model_copy(update={"gpu_step_s": profile.timeslice_mp.gpu_step_s * memory})
            if profile.timeslice_mp is not None else None,
            "memory": mem,
        }
    )

