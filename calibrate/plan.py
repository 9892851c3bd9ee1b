"""What a calibration measures: the grids and repetition counts for a device and a mode.

The full GPU plan is sized to finish in well under 10 minutes for a 7B model on one H100 or H200
(eager decode at batch 1 is launch bound, ~20-30 ms a step): 294 s on an H100 before the stages
cached_prefill, loads_mp and timeslice_mp, which add at most their budgets (65 + 150 s, and about
40 s: four 4 s runs after spawning 8 workers that build a model each). --quick keeps every stage
but thins each grid.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB, MIB, GIB = 2**10, 2**20, 2**30


@dataclass(frozen=True)
class Plan:
    prefill_prompts: tuple[int, ...]
    prefill_batches: tuple[int, ...]
    prefill_max_tokens: int  # batch * prompt cap: time and memory
    prefill_repeat: int
    decode_contexts: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_max_sum_context: int
    decode_warmup_steps: int
    decode_steps: int
    exp21_runs: int
    exp21_discard: int
    copy_sizes: tuple[int, ...]
    serde_sizes: tuple[int, ...]
    net_sizes: tuple[int, ...]
    net_rtt_repeat: int
    net_connect_repeat: int
    composition_contexts: tuple[int, ...]
    composition_repeat: int
    weight_load_max_bytes: int | None  # None: the whole model; else a prefix of its tensors
    weight_load_concurrency: tuple[int, ...]
    weight_load_repeat: int
    weight_load_cold: bool  # also a load after dropping the file from the page cache
    repeat: int  # primitives (copies, serde)
    net_repeat: int = 8  # timed round trips of each net size (after one warm-up), each way
    grid_passes: int = 1  # interleaved walks over the prefill and decode grids
    decode_discard_passes: int = 0  # leading decode passes kept as warm-up only
    warmup_s: float = 1.0  # untimed decoding before the grids
    # cached_prefill: new tokens x cached context x batch, one warm-up pass then `repeat` timed
    # composition, partially_aware again through validate's own client and server process (spawned
    # with its own model: about 15-25 s more on the H200, estimated, after H200 run 14), paced by
    # its link emulator at these line rates, at these contexts: network.paced_path. Below the loopback cap the host
    # path's time partly hides under the pacing (docs/validation/h200/linklow-drift.md); at and above
    # it the Pacer's chunked sends are still not the unpaced stage's one sendall (H200 run 12). The
    # rates validate's scenarios pace: link-low, Exp 2.1, the link sweep. One context, near Exp 2.1's
    # mean (72 + 25 tokens): since each paced sample is a prompt, an untimed step and the timed step
    # through validate's client (after H200 run 13), two contexts would add about 15 s to a full
    # calibration, which had 8 s to spare in run 13; loopback_path gives the shape over sizes.
    composition_paced_gbps: tuple[float, ...] = (2.0, 4.0, 10.0, 25.0, 100.0)
    composition_paced_contexts: tuple[int, ...] = (104,)
    cached_prefill_tokens: tuple[int, ...] = (1, 16, 32)
    cached_prefill_contexts: tuple[int, ...] = (0, 64, 128)
    cached_prefill_batches: tuple[int, ...] = (1, 2)
    cached_prefill_repeat: int = 2
    cached_prefill_budget_s: float = 30.0
    # kv_swaps: a session's whole KV (2 x layers tensors) swapped out and in, at these contexts
    kv_swap_contexts: tuple[int, ...] = (64, 256, 1024)
    # loads_mp: whole-model loads by k worker processes at once, per tier
    loads_mp_k: tuple[int, ...] = (1, 2)
    loads_mp_repeat: int = 1
    loads_mp_disk_repeat: int = 0  # runs at each k from the page cache (the tier serverless loads from); 0: loads_mp_repeat
    loads_mp_cold: bool = False  # also after dropping the page cache (disk_cold)
    loads_mp_budget_s: float = 60.0  # no further tier is started past it
    # timeslice_mp: k worker processes decoding at once, each its own model copy
    timeslice_k: tuple[int, ...] = (1, 2)
    timeslice_duration_s: float = 1.5  # each k's run; steps in [settle, duration] are kept
    timeslice_settle_s: float = 0.3
    timeslice_warmup_s: float = 0.5  # all workers at once, at least one cache cycle (new shapes)
    workers_start_timeout_s: float = 300.0  # spawning the worker processes, or building their model copies


EXP21_PROMPT_TOKENS = 72
EXP21_NEW_TOKENS = 50

_GPU_FULL = Plan(
    prefill_prompts=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    prefill_batches=(1, 2, 4, 8, 16, 32),
    prefill_max_tokens=32768,
    prefill_repeat=2,
    decode_contexts=(64, 256, 512, 1024, 2048, 4096),
    decode_batches=(1, 2, 4, 8, 16, 32, 64),
    decode_max_sum_context=98304,
    decode_warmup_steps=2,
    decode_steps=5,
    exp21_runs=12,
    exp21_discard=2,
    # 32 and 64 MiB bracket the knee where fresh host buffers start to page-fault (seen at 16-256 MiB).
    copy_sizes=(4 * KIB, 64 * KIB, MIB, 16 * MIB, 32 * MIB, 64 * MIB, 256 * MIB, GIB),
    serde_sizes=(4 * KIB, 64 * KIB, MIB, 16 * MIB, 32 * MIB, 64 * MIB, 256 * MIB),
    net_sizes=(64 * KIB, MIB, 16 * MIB, 64 * MIB),
    net_rtt_repeat=500,
    net_connect_repeat=200,
    # 16 and 64: messages of 8 and 32 MiB, below 128's 64 MiB; 80 and 104 (40 and 52 MiB): inside Exp 2.1's
    # KV messages (36-61 MB), where H200 run 7's time per MB each way (wire at the loopback cap and host path) rose from
    # about 1.1 ms (32 MiB) to 1.7 ms (64 MiB) and the real runs paid 1.7-1.8, which interpolation missed.
    composition_contexts=(16, 64, 80, 104, 128, 512, 2048),
    composition_repeat=3,
    weight_load_max_bytes=None,
    weight_load_concurrency=(),  # concurrency is the loads_mp stage's, with processes
    weight_load_repeat=2,
    weight_load_cold=True,
    repeat=7,
    grid_passes=3,
    decode_discard_passes=1,
    warmup_s=5.0,
    # covers djinn's REFLECT (16-24 new tokens after ~122 cached) up to the batch of 32 agents32_batching asks,
    # and contexts to 2048 (the KV-costs table's longest session, long agent sessions). 8 and 24 new tokens
    # are gone to pay for 2048: about 70% of the grid sits at the host's launch floor, where they add no
    # information (leave-one-calibration-out over H200 runs 2-13 is the same without them), and 16 and 32
    # bracket REFLECT's 24. 210 points, about 52 s on the H200 from those runs' per-point times (3 passes
    # plus ~106 ms each, and ~5 s more of cache builds at 2048; docs/calibration/README.md), as long as
    # the 252 before. The budget, 5 s over the old one, leaves a slow host (run 3: 132 ms a point, ~60 s
    # here) batch 32 at 2048, the grid's last points, without eating into the 600 s a full H200
    # calibration has (run 13 ended at 570 s).
    cached_prefill_tokens=(1, 16, 32, 64, 128),
    cached_prefill_contexts=(0, 64, 128, 256, 512, 1024, 2048),
    cached_prefill_batches=(1, 2, 4, 8, 16, 32),
    cached_prefill_repeat=2,
    cached_prefill_budget_s=65.0,
    kv_swap_contexts=(64, 256, 1024, 2048),
    loads_mp_k=(1, 2, 4, 8),
    loads_mp_repeat=1,
    # the 8-process load from the page cache moved 19-26 GB/s between calibrations (H200 runs 2-6),
    # one run each: three runs a calibration show how much of that is within one
    loads_mp_disk_repeat=3,
    loads_mp_cold=True,
    loads_mp_budget_s=150.0,
    timeslice_k=(1, 2, 4, 8),
    timeslice_duration_s=4.0,
    timeslice_settle_s=0.5,
    timeslice_warmup_s=3.0,
)

_GPU_QUICK = Plan(
    prefill_prompts=(16, 64, 256, 1024, 4096),
    prefill_batches=(1, 4, 16),
    prefill_max_tokens=16384,
    prefill_repeat=2,
    decode_contexts=(64, 512, 2048, 4096),
    decode_batches=(1, 8, 32),
    decode_max_sum_context=65536,
    decode_warmup_steps=2,
    decode_steps=3,
    exp21_runs=4,
    exp21_discard=1,
    copy_sizes=(4 * KIB, 256 * KIB, 16 * MIB, 256 * MIB),
    serde_sizes=(4 * KIB, 256 * KIB, 16 * MIB, 64 * MIB),
    net_sizes=(64 * KIB, 4 * MIB, 64 * MIB),
    net_repeat=5,
    net_rtt_repeat=200,
    net_connect_repeat=50,
    composition_contexts=(128, 1024),
    composition_repeat=2,
    weight_load_max_bytes=4 * GIB,
    weight_load_concurrency=(),
    weight_load_repeat=1,
    weight_load_cold=False,
    repeat=4,
    grid_passes=2,
    decode_discard_passes=1,
    warmup_s=3.0,
    cached_prefill_tokens=(1, 16, 32, 128),
    cached_prefill_contexts=(0, 128, 512, 1024, 2048),
    cached_prefill_batches=(1, 4, 32),
    cached_prefill_repeat=2,
    cached_prefill_budget_s=30.0,
    kv_swap_contexts=(128, 1024),
    loads_mp_k=(1, 2, 4),
    loads_mp_repeat=1,
    loads_mp_cold=False,
    loads_mp_budget_s=45.0,
    timeslice_k=(1, 2, 4),
    timeslice_duration_s=2.5,
    timeslice_settle_s=0.4,
    timeslice_warmup_s=2.0,
)

# CPU calibration is for small models (CI's tiny model): grids that finish in seconds on 2 cores.
_CPU_FULL = Plan(
    prefill_prompts=(16, 64, 256, 1024),
    prefill_batches=(1, 4, 16),
    prefill_max_tokens=8192,
    prefill_repeat=3,
    decode_contexts=(64, 256, 1024),
    decode_batches=(1, 4, 16),
    decode_max_sum_context=16384,
    decode_warmup_steps=1,
    decode_steps=6,
    exp21_runs=4,
    exp21_discard=1,
    copy_sizes=(4 * KIB, 256 * KIB, 16 * MIB, 64 * MIB),
    serde_sizes=(4 * KIB, 256 * KIB, 16 * MIB),
    net_sizes=(64 * KIB, 4 * MIB, 32 * MIB),
    net_repeat=5,
    net_rtt_repeat=200,
    net_connect_repeat=50,
    composition_contexts=(128, 512),
    composition_repeat=3,
    weight_load_max_bytes=None,
    weight_load_concurrency=(),
    weight_load_repeat=2,
    weight_load_cold=False,
    repeat=5,
    cached_prefill_tokens=(1, 8, 16, 32, 64),
    cached_prefill_contexts=(0, 64, 128, 256),
    cached_prefill_batches=(1, 2, 4),
)

_CPU_QUICK = Plan(
    prefill_prompts=(16, 64, 256, 1024),
    prefill_batches=(1, 4),
    prefill_max_tokens=2048,
    prefill_repeat=2,
    decode_contexts=(64, 256, 1024),
    decode_batches=(1, 4),
    decode_max_sum_context=4096,
    decode_warmup_steps=1,
    decode_steps=3,
    exp21_runs=2,
    exp21_discard=1,
    copy_sizes=(4 * KIB, 256 * KIB, 8 * MIB),
    serde_sizes=(4 * KIB, 256 * KIB, 8 * MIB),
    net_sizes=(64 * KIB, 2 * MIB, 16 * MIB),
    net_repeat=3,
    net_rtt_repeat=100,
    net_connect_repeat=30,
    composition_contexts=(128, 512),
    composition_repeat=2,
    weight_load_max_bytes=None,
    weight_load_concurrency=(),
    weight_load_repeat=1,
    weight_load_cold=False,
    repeat=3,
    warmup_s=0.3,
    cached_prefill_tokens=(1, 16, 32),
    cached_prefill_contexts=(0, 128),
    cached_prefill_repeat=1,
    kv_swap_contexts=(64, 256),
    timeslice_duration_s=0.6,
    timeslice_settle_s=0.1,
    timeslice_warmup_s=0.0,
)


def plan_for(device: str, quick: bool) -> Plan:
    if device.startswith("cuda"):
        return _GPU_QUICK if quick else _GPU_FULL
    return _CPU_QUICK if quick else _CPU_FULL


def prefill_points(plan: Plan, max_position: int) -> list[tuple[int, int]]:
    """(batch, prompt) pairs, smallest work first, within the token cap and the model's positions."""
    pts = [
        (b, p)
        for b in plan.prefill_batches
        for p in plan.prefill_prompts
        if b * p <= plan.prefill_max_tokens and p <= max_position
    ]
    return sorted(pts, key=lambda bp: (bp[0], bp[1]))


def decode_points(plan: Plan, max_position: int, max_sum_context: int) -> list[tuple[int, int]]:
    """(batch, context) pairs whose KV cache fits `max_sum_context` tokens."""
    cap = min(plan.decode_max_sum_context, max_sum_context)
    return [
        (b, c)
        for b in plan.decode_batches
        for c in plan.decode_contexts
        if b * c <= cap and c + plan.decode_warmup_steps + plan.decode_steps < max_position
    ]
