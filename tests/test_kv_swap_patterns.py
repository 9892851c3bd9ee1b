"""The kv_swaps stage's pageable swap-out in its two patterns (calibrate/bench_copies.py) and the
sequence it shares with validate.kv_costs (calibrate/kv_cycle.py), on the CPU with tiny-llama.
No timed assertions: what is checked is what is recorded, counted and fitted."""

from __future__ import annotations

import dataclasses

import pytest

from djinnsim.calibrate import bench_copies, kv_cycle
from djinnsim.calibrate.modeling import build_model, resolve_dtype
from djinnsim.calibrate.plan import plan_for
from djinnsim.calibrate.refit import _copy_fits
from djinnsim.calibrate.samples import SampleLog
from djinnsim.calibrate.session import Session
from djinnsim.sim.profile import KvSwaps
from djinnsim.sim.specs import get_model
from djinnsim.validate import kv_costs

TINY = get_model("tiny-llama")


@pytest.fixture(scope="module")
def stage():
    dtype = resolve_dtype(TINY, None, "cpu")
    plan = dataclasses.replace(plan_for("cpu", quick=True), kv_swap_contexts=(64, 256), repeat=3)
    s = Session(spec=TINY, device="cpu", dtype=dtype, plan=plan, log=SampleLog(), say=lambda line: None)
    s.model = build_model(TINY, "cpu", dtype)
    result = bench_copies.run_kv_swaps(s)
    assert "d2h_pageable_cycle" not in result["fits"]  # its own stage since the review of the change
    cycle = bench_copies.run_kv_cycle(s)  # as calibrate's runner merges the kv_cycle stage's fit
    return s, {**result, "fits": {**result["fits"], **cycle}}


def _rows(s, stage_name):
    return [row for row in s.log.rows if row["stage"] == stage_name]


def test_stage_records_the_pageable_swap_out_in_both_patterns(stage):
    s, result = stage
    fits = result["fits"]
    assert {"d2h_pageable", "d2h_pageable_cycle", "h2d_pageable"} <= set(fits)
    KvSwaps(**result)  # the profile's section takes the new key
    for context in s.plan.kv_swap_contexts:
        kv_bytes = context * TINY.kv_bytes_per_token
        for name in ("kv_swap_d2h_pageable", "kv_swap_d2h_pageable_cycle"):
            timed = [r for r in _rows(s, name) if r["point"] == f"{context}"]
            counted = [r for r in _rows(s, f"{name}_faults") if r["point"] == f"{context}"]
            # one fault count per timed swap-out (warm-ups dropped from both), of the whole set's bytes
            assert len(timed) == len(counted) == s.plan.repeat, name
            assert all(r["unit"] == "s" and r["value"] > 0 and r["nbytes"] == kv_bytes for r in timed)
            assert all(r["unit"] == "count" and r["value"] >= 0 and r["value"] == int(r["value"]) for r in counted)
    # a refit from the samples finds the cycle's fit again, and the fault counts are no timing
    refit = _copy_fits(s.log.rows, "kv_swap_", extra=("d2h_pageable_cycle",))
    assert refit["d2h_pageable_cycle"] == pytest.approx(fits["d2h_pageable_cycle"])
    assert "d2h_pageable_cycle" not in _copy_fits(s.log.rows, "kv_swap_")


def test_cycle_counts_faults_per_recorded_swap_out_and_is_validate_s_sequence():
    """validate.kv_costs runs calibrate.kv_cycle's loop (the stage times the same one), and each
    recorded swap-out carries its page-fault count."""
    assert issubclass(kv_costs.RealSession, kv_cycle.KvCycle)
    assert kv_costs.REFLECT_TOKENS == kv_cycle.REFLECT_TOKENS
    dtype = resolve_dtype(TINY, None, "cpu")
    cycle = kv_cycle.KvCycle(build_model(TINY, "cpu", dtype), TINY, "cpu", seed=0)
    samples, facts = cycle.measure(128, ("pageable",), repeats=3, warmups=0)
    faults = facts["swap_out_faults"]["pageable"]
    assert len(faults) == len(samples[("swap_out", "pageable")]) == 3
    assert all(isinstance(f, int) and f >= 0 for f in faults)
    assert facts["kv_bytes"] == 128 * TINY.kv_bytes_per_token and facts["usable"]["swap_pageable"]["usable"]


def test_minor_faults_count_first_touches():
    import torch
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: a first touch may map 2 MiB at once")

    before = kv_cycle.minor_faults()
    buf = torch.empty(64 * 2**20, dtype=torch.uint8)  # above glibc's mmap threshold: a new mapping
    buf.fill_(1)
    assert kv_cycle.minor_faults() - before >= 64 * 2**20 // 4096 // 2  # 2 MiB pages would fault far fewer
