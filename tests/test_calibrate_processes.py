"""The multi-process stages (loads_mp, timeslice_mp) and cached_prefill, for real on the CPU with the
tiny model: separate processes, their timings, their failure modes; the worker pool never hangs."""

from __future__ import annotations

import os
import time

import pytest
from djinnsim.calibrate.plan import plan_for
from djinnsim.calibrate.samples import SampleLog
from djinnsim.calibrate.session import Session
from djinnsim.calibrate.workers import WorkerPool
from djinnsim.errors import DjinnsimError
from djinnsim.sim.profile import TimeslicePoint
from djinnsim.sim.specs import get_model

TINY = get_model("tiny-llama")
WORKER = "djinnsim.calibrate.bench_processes:ProcessWorker"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    import torch
    from djinnsim.calibrate.bench_weights import run_weight_loads
    from djinnsim.calibrate.modeling import build_model

    s = Session(spec=TINY, device="cpu", dtype=torch.float32, plan=plan_for("cpu", quick=True),
                log=SampleLog(tmp_path_factory.mktemp("samples") / "s.csv"), say=lambda msg: None)
    s.model = build_model(TINY, "cpu", torch.float32)
    s.results.update({"weight_bytes": sum(p.numel() * 4 for p in s.model.parameters()), "memory_start": {"context_bytes": 0}})
    run_weight_loads(s)
    yield s
    s.remove_scratch()


def test_loads_mp_runs_k_separate_processes_per_tier(session):
    from djinnsim.calibrate.bench_processes import run_loads_mp

    loads = run_loads_mp(session)
    assert set(loads) == {"disk", "pageable"}  # no pinned memory, no cold cache on the CPU plan
    for tier, measured in loads.items():
        assert sorted(measured.aggregate_gbps) == [1, 2], tier
        assert all(v > 0 for v in measured.aggregate_gbps.values())
        (run,) = measured.runs[2]
        assert len(run.started_s) == len(run.finished_s) == 2
        assert min(run.started_s) == 0.0 and all(f > s for s, f in zip(run.started_s, run.finished_s))
        assert measured.nbytes == session.weight_file.stat().st_size
    rows = [r for r in session.log.rows if r["stage"] == "loads_mp_disk" and r["point"] == "k2"]
    assert len(rows) == 2 and all(r["concurrent"] == 2 for r in rows)


def test_workers_are_separate_processes_and_an_error_is_one_line_that_stops_them_all():
    with WorkerPool(2, WORKER, {"device": "cpu"}) as pool:
        procs = list(pool.procs)
        pids = {info["pid"] for info in pool.info}
        assert len(pids) == 2 and os.getpid() not in pids  # processes, not threads of this one
        with pytest.raises(DjinnsimError, match=r"worker 0 failed in 'load': ValueError: unknown load tier"):
            pool.call([0, 1], "load", 30.0, tier="no-such-tier", start_at=0.0)
    assert not any(p.is_alive() for p in procs)


def test_a_worker_that_does_not_answer_in_time_is_killed_not_waited_for():
    with WorkerPool(1, WORKER, {"device": "cpu"}) as pool:
        procs = list(pool.procs)
        started = time.monotonic()
        with pytest.raises(DjinnsimError, match="did not answer 'load' within 1 s"):
            pool.call([0], "load", 1.0, tier="disk", start_at=time.monotonic() + 60.0)
        assert time.monotonic() - started < 15
    assert not any(p.is_alive() for p in procs)


def test_a_worker_that_dies_is_reported():
    with WorkerPool(1, WORKER, {"device": "cpu"}) as pool:
        os.kill(pool.info[0]["pid"], 9)
        pool.procs[0].join(10)
        with pytest.raises(DjinnsimError, match="worker 0"):
            pool.call([0], "prepare", 10.0, tier="none")


def test_a_worker_that_cannot_start_or_build_is_one_line():
    with pytest.raises(DjinnsimError, match="worker 0 failed in 'start'"):
        with WorkerPool(1, WORKER, {"device": "cpu", "no_such_option": 1}):
            pass
    with WorkerPool(1, WORKER, {"device": "cpu"}) as pool:
        with pytest.raises(DjinnsimError, match="worker 0 failed in 'build': DjinnsimError: unknown model"):
            pool.call([0], "build", 30.0, model_id="no/such-model", dtype="float32")
        assert not pool.open


def test_timeslice_mp_measures_slowdown_against_one_process(session):
    from djinnsim.calibrate.bench_processes import run_timeslice_mp

    measured = run_timeslice_mp(session)
    assert [p.processes for p in measured.points] == [1, 2]
    one, two = measured.points
    assert one.slowdown_p50 == pytest.approx(1.0)
    assert two.slowdown_p50 == pytest.approx(two.step_s_p50 / one.step_s_p50)
    assert len(two.per_process_step_s_p50) == 2 and two.n_steps >= 2
    assert measured.context_tokens == (72, 103)
    assert 0 < measured.gpu_busy_fraction <= 1
    assert measured.slowdown(1) == pytest.approx(1.0)


def test_busy_fraction_fit_recovers_a_saturated_gpu():
    from djinnsim.calibrate.bench_processes import fit_busy_fraction

    def point(k: int, slowdown: float) -> TimeslicePoint:
        return TimeslicePoint(processes=k, step_s_p10=0.02, step_s_p50=0.02 * slowdown, step_s_p90=0.03,
                              slowdown_p10=slowdown, slowdown_p50=slowdown, slowdown_p90=slowdown)

    f, err = fit_busy_fraction([point(1, 1.0), point(2, 1.0), point(4, 1.2), point(8, 2.4)])
    assert f == pytest.approx(0.3, abs=0.002) and err < 0.01
    f, _ = fit_busy_fraction([point(1, 1.0), point(2, 1.0)])  # no contention seen: the most f allows
    assert f == pytest.approx(0.5, abs=0.002)


def test_page_cache_residency_is_read_and_a_drop_is_only_claimed_when_it_took(tmp_path):
    from djinnsim.calibrate.bench_processes import _read_through, drop_page_cache, resident_fraction

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(4 * 2**20))
    _read_through(path)
    before = resident_fraction(path)
    assert before is not None and 0.0 <= before <= 1.0
    method, after = drop_page_cache(path)
    assert method in (None, "drop_caches", "posix_fadvise")
    if method is not None and after is not None:
        assert after <= 0.5


def test_cached_prefill_stage_fits_the_grid(session):
    import torch
    from djinnsim.calibrate.bench_cached import cached_prefill_points, run_cached_prefill
    from djinnsim.calibrate.modeling import build_model

    session.model = build_model(TINY, "cpu", torch.float32)
    try:
        out = run_cached_prefill(session)
    finally:
        session.model = None
    grid = cached_prefill_points(session.plan, TINY.max_position_embeddings)
    assert len(out["points"]) == len(grid)
    fit = out["fit"]
    pieces = getattr(fit, "pieces", [fit])
    assert min(p.domain["context"][0] for p in pieces) == 0 and max(p.domain["context"][1] for p in pieces) == 128
    rows = [r for r in session.log.rows if r["stage"] == "cached_prefill"]
    assert {(r["batch"], r["context"], r["prompt_tokens"]) for r in rows} == set(grid)
