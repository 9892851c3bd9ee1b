"""Outputs from hand-built results: the seed's schema, Table 2 and claims verdicts, the trace,
byte-identical rewrites, Figure 6."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from djinnsim.errors import DjinnsimError
from djinnsim.sim import claims as claims_mod
from djinnsim.sim import report, trace
from djinnsim.sim.records import DURATION_FIELDS, RECORD_COLUMNS, Record, RecordTable
from djinnsim.sim.scenario import expand_points, parse_scenario

SEED_TOP_KEYS = ["baseline", "model_id", "prompt_tokens", "new_tokens", "batch_size", "runs", "aggregates"]
SEED_RUN_KEYS = ["run_id", "total_ms", "per_token_ms", "tokens_generated", "gpu_util_pct", "memory_bw_gbps",
                 "host_to_device_mb", "device_to_host_mb"]
SEED_AGGREGATE_KEYS = ["mean_total_ms", "p95_total_ms", "mean_per_token_ms"]


@dataclass
class FakePointResult:  # the attributes of sim.simulate.PointResult that outputs read
    point: object
    records: list[Record]
    cost_model: str = "roofline"
    events: int = 0
    peak_mem_bytes: int = 0
    capacity_bytes: int = 80 * 10**9
    memory_bound_agents: int | None = None


@dataclass
class FakeResult:  # sim.run.SimulationResult
    scenario: object
    points: list[FakePointResult]
    warnings: list[str] = field(default_factory=list)

    @property
    def records(self) -> list[Record]:
        return [r for p in self.points for r in p.records]


def _record(point, **fields) -> Record:
    d = {k: fields.pop(k, 0.0) for k in DURATION_FIELDS}
    issued_at = fields.pop("issued_at")
    base = dict(point=point.index, backend=point.backend.name, model=point.model.key, gpu=point.gpu.key,
                link_gbps=point.link.gbps, n_agents=point.n_agents or 1, agent=0, run=0, step=-1, status="ok",
                warmup=False, context_tokens=0, input_tokens=1, new_tokens=1, bytes_up=8, bytes_down=64_000,
                wire_bytes_up=145, wire_bytes_down=64_137, h2d_bytes=0, d2h_bytes=0, gpu_mem_bytes=14 * 10**9,
                gpu_mem_peak_bytes=14 * 10**9)
    started_at = issued_at + d["connect_s"] + d["uplink_s"] + d["queue_s"]
    return Record(**{**base, **fields, **d, "issued_at": issued_at, "started_at": started_at,
                     "finished_at": issued_at + sum(d.values())})


# --- a tiny decode scenario: 3 runs (1 warm-up) of 4 tokens, blind vs full Djinn ---------------------

STEP_S = {"semantic_blind": 0.400, "full_djinn": 0.010}
DOWN_BYTES = {"semantic_blind": 80_000_000, "full_djinn": 64_000}


def decode_result() -> FakeResult:
    scenario = parse_scenario({
        "name": "tiny_decode", "backends": ["semantic_blind", "full_djinn"], "model": "llama-2-7b",
        "gpu": "a100-80gb", "workload": {"kind": "decode", "prompt_tokens": 5, "new_tokens": 4, "runs": 3,
                                         "warmup_runs": 1}})
    points = []
    for point in expand_points(scenario):
        step_s, clock, records = STEP_S[point.backend.name], 0.0, []
        for run in range(3):
            for t in range(4):
                jitter = 0.001 * ((run * 4 + t) % 3)
                rec = _record(point, issued_at=clock, run=run, step=t, phase="decode", warmup=run == 0,
                              connect_s=0.0002, uplink_s=0.0001, queue_s=0.0, compute_s=step_s / 2 + jitter,
                              downlink_s=step_s / 2 - 0.0003, bytes_down=DOWN_BYTES[point.backend.name],
                              gpu_busy_s=0.6 * (step_s / 2 + jitter))  # kernels: 60% of each pass
                records.append(rec)
                clock = rec.finished_at
        points.append(FakePointResult(point, records, events=len(records) * 5))
    return FakeResult(scenario, points)


# --- a tiny agents sweep: N = 1, 2, 4; keep-alive OOMs at N = 2 ------------------------------------

PHASE_S = {"ray_keepalive": (0.10, 0.10), "ray_serverless": (5.0, 5.0), "djinn": (0.12, 0.02)}


def agents_result(ns=(1, 2, 4), backends=("ray_keepalive", "ray_serverless", "djinn")) -> FakeResult:
    scenario = parse_scenario({
        "name": "tiny_agents", "backends": list(backends), "model": "llama-2-7b", "gpu": "h100-80gb",
        "workload": {"kind": "agents", "agents": list(ns)}})
    points = []
    for point in expand_points(scenario):
        name, n, records = point.backend.name, point.n_agents, []
        reason_s, reflect_s = PHASE_S[name]
        for agent in range(n):
            if name == "ray_keepalive" and agent >= 1:  # the second actor's weights do not fit
                records.append(_record(point, issued_at=0.0, agent=agent, phase="reason", status="oom",
                                       new_tokens=0, bytes_down=0))
                continue
            wait = reason_s * agent if name == "djinn" else 0.0  # serial FCFS: k-th waits k-1 services
            reason = _record(point, issued_at=0.0, agent=agent, phase="reason", queue_s=wait,
                             load_s=reason_s * 0.5 if name == "ray_serverless" else 0.0,
                             compute_s=reason_s * (0.5 if name == "ray_serverless" else 1.0) - 0.001,
                             uplink_s=0.0005, downlink_s=0.0005, new_tokens=50, bytes_up=72 * 8, bytes_down=400)
            reflect = _record(point, issued_at=reason.finished_at + 10.0, agent=agent, phase="reflect",
                              compute_s=reflect_s - 0.001, uplink_s=0.0005, downlink_s=0.0005,
                              new_tokens=50, bytes_up=16 * 8, bytes_down=400)
            records += [reason, reflect]
        bound = {"ray_keepalive": 1, "ray_serverless": 4, "djinn": 120}[name]
        points.append(FakePointResult(point, records, events=len(records) * 7, memory_bound_agents=bound,
                                      peak_mem_bytes=14 * 10**9 * (1 if name != "ray_keepalive" else 2)))
    return FakeResult(scenario, points)


# --- baseline JSON -------------------------------------------------------------------------------


def test_decode_baseline_json_has_the_seed_schema_and_per_token_math(tmp_path):
    report.write_outputs(decode_result(), tmp_path)
    doc = json.loads((tmp_path / "baselines" / "full_djinn__llama-2-7b-hf__a100-80gb__25gbps.json").read_text())
    assert list(doc)[:7] == SEED_TOP_KEYS
    assert set(doc) - set(SEED_TOP_KEYS) == {"simulation"}
    assert doc["baseline"] == "full_djinn" and doc["model_id"] == "meta-llama/Llama-2-7b-hf"
    assert (doc["prompt_tokens"], doc["new_tokens"], doc["batch_size"]) == (5, 4, 1)
    assert [r["run_id"] for r in doc["runs"]] == [2, 3]  # warm-up run 1 discarded, as in the seed
    for run in doc["runs"]:
        assert list(run) == SEED_RUN_KEYS
        assert run["tokens_generated"] == 4
        assert run["per_token_ms"] == pytest.approx(run["total_ms"] / 4, abs=1e-3)
        assert run["device_to_host_mb"] == pytest.approx(4 * 0.064)
        assert run["host_to_device_mb"] == pytest.approx(4 * 8e-6)
    # steps of run_id 2 (records 4..7): 10 ms + jitter (1, 2, 0, 1) ms, half of the 10 ms computing;
    # the GPU runs kernels 60% of the compute time (gpu_busy_s), which is what gpu_util_pct counts
    assert doc["runs"][0]["total_ms"] == pytest.approx(44.0, abs=1e-3)
    assert doc["runs"][0]["gpu_util_pct"] == pytest.approx(100 * 0.6 * (4 * 5 + 4) / 44.0, abs=1e-2)
    # weight-read floor: 4 forwards x 13.48 GB in 44 ms
    assert doc["runs"][0]["memory_bw_gbps"] == pytest.approx(4 * 13.48e9 / 0.044 / 1e9, rel=1e-3)
    agg = doc["aggregates"]
    assert list(agg)[:3] == SEED_AGGREGATE_KEYS
    assert {"p50_total_ms", "p99_total_ms", "p50_per_token_ms", "p99_per_token_ms"} <= set(agg)
    totals = [r["total_ms"] for r in doc["runs"]]
    assert agg["mean_total_ms"] == pytest.approx(sum(totals) / 2, abs=1e-3)
    assert agg["p95_total_ms"] == pytest.approx(min(totals) + 0.95 * abs(totals[1] - totals[0]), abs=1e-3)


def test_agents_baseline_json_runs_are_agent_iterations_with_phase_figures(tmp_path):
    report.write_outputs(agents_result(), tmp_path)
    doc = json.loads((tmp_path / "baselines" / "djinn__llama-2-7b-hf__h100-80gb__25gbps__n4.json").read_text())
    assert list(doc)[:7] == SEED_TOP_KEYS
    assert len(doc["runs"]) == 4 and all(list(r) == SEED_RUN_KEYS for r in doc["runs"])
    assert doc["new_tokens"] == 100 and doc["runs"][0]["tokens_generated"] == 100
    phases = doc["agent_phases"]
    assert phases["n_agents"] == 4 and phases["oom"] is False and phases["memory_bound_agents"] == 120
    # REASON latencies: 120 ms + k x 120 ms of queueing, k = 0..3
    assert phases["reason"]["mean_ms"] == pytest.approx(120 * 2.5, abs=1e-3)
    assert phases["reflect"]["p50_ms"] == pytest.approx(20.0, abs=1e-3)
    # pooled sorted: 20, 20, 20, 20, 120, 240, 360, 480; rank 0.99 x 7 = 6.93
    assert phases["p99_pooled_ms"] == pytest.approx(360 + 0.93 * 120, abs=1e-3)
    keep = json.loads((tmp_path / "baselines" / "ray_keepalive__llama-2-7b-hf__h100-80gb__25gbps__n2.json").read_text())
    assert keep["agent_phases"]["oom"] is True and keep["agent_phases"]["oom_agents"] == 1
    assert len(keep["runs"]) == 1 and keep["simulation"]["runs_oom"] == 1


@pytest.mark.parametrize("chunk", [1, 3, 20_000])
def test_baseline_written_a_chunk_of_runs_at_a_time_is_the_document_formatted_whole(tmp_path, monkeypatch, chunk):
    from djinnsim.sim.safeyaml import strict_json

    monkeypatch.setattr(report.RunEntries, "CHUNK", chunk)
    result = agents_result(ns=(7,), backends=("djinn",))
    point = result.points[0]
    frame = report._frame(point)
    document = report.baseline_document(point, result.scenario, frame, report.point_summary(point, "agents", frame))
    runs = document["runs"]
    for entries in (runs, report.RunEntries(runs.runs.iloc[:0], [])):  # 7 runs, then none
        document["runs"] = entries
        report._write_baseline(tmp_path / "baseline.json", document)
        whole = strict_json({**document, "runs": [e for c in entries.chunks() for e in c]}, indent=2) + "\n"
        assert (tmp_path / "baseline.json").read_text() == whole
        assert len(json.loads(whole)["runs"]) == len(entries)
    assert len(runs) == 7


_EDGES = [0.0, -0.0, 1e-4, 9.99995e-05, 9.9999949e-05, 5e-07, 1.5e-06, 0.5, 1.5, 2.5, 0.00015, 0.12345,
          99999999.99995, 1e10, 1e13, 1e15, 1e17, 123456789.123456789]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(_EDGES)
                | st.floats(-1e6, 1e6) | st.floats(-1e-3, 1e-3), max_size=40),
       st.integers(0, 9))
def test_rounded_reprs_are_the_reprs_of_the_rounded_numbers(values, decimals):
    import numpy as np

    numbers = np.asarray(values, dtype=float)
    assert report.rounded_reprs(numbers, decimals) == [repr(round(x, decimals)) for x in values]


def test_rounded_reprs_of_every_short_decimal_and_its_neighbours():
    """Every decimal of up to 6 places below 0.1 (a grid the rounding lands on), and its neighbours
    half a step away, where a rounding to fewer places is decided."""
    import numpy as np

    grid = np.arange(0, 100_000) / 1e6
    for numbers in (grid, grid + 5e-7, -grid, grid * 1000 + 5e-4):
        for decimals in (3, 4, 6):
            assert report.rounded_reprs(numbers, decimals) == [repr(round(x, decimals)) for x in numbers.tolist()]


# --- records.csv, trace, determinism, figure -----------------------------------------------------


def _forks(monkeypatch) -> list[int]:
    """Every point's rows and baseline written in children (RecordsCsv.aside_rows = 1); the forks
    made are counted."""
    import os

    monkeypatch.setattr(report.RecordsCsv, "aside_rows", 1)
    made = []
    fork = os.fork

    def counted_fork():
        made.append(1)
        return fork()

    monkeypatch.setattr(report.os, "fork", counted_fork)
    return made


def test_records_csv_written_in_a_child_process_is_the_file_written_here(tmp_path, monkeypatch):
    result = agents_result()
    report.write_outputs(result, tmp_path / "here")
    made = _forks(monkeypatch)
    report.write_outputs(result, tmp_path / "aside")
    assert len(made) == 2 * len(result.points) + 1  # each point's rows and its baseline, the trace point's trace
    for name in ("records.csv", "trace.json",
                 *(f"baselines/{p.name}" for p in (tmp_path / "here" / "baselines").iterdir())):
        assert (tmp_path / "aside" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


def test_trace_whose_child_fails_is_written_again_here(tmp_path, monkeypatch):
    """The trace point's trace.json written by a child that finds the disk full: written again
    here, the same file as one written here from the start."""
    import os

    result = agents_result()
    report.write_outputs(result, tmp_path / "here")
    made = _forks(monkeypatch)
    parent, write_trace = os.getpid(), report.write_trace
    failed = []

    def fails_in_a_child(records, path, **kwargs):
        if os.getpid() != parent:
            path.write_text('{"traceEvents": [')
            raise OSError("No space left on device")
        failed.append(1)  # reached here only after the child failed
        return write_trace(records, path, **kwargs)

    monkeypatch.setattr(report, "write_trace", fails_in_a_child)
    report.write_outputs(result, tmp_path / "aside")
    assert len(made) == 2 * len(result.points) + 1 and failed == [1]
    assert (tmp_path / "aside" / "trace.json").read_bytes() == (tmp_path / "here" / "trace.json").read_bytes()


def _csv_rows_fail_in_children(monkeypatch) -> None:
    """RecordsCsv.write in a child process writes half a row, then finds the disk full."""
    import os

    parent, write = os.getpid(), report.RecordsCsv.write

    def fails_in_a_child(self, records):
        if os.getpid() != parent:
            self._file.write("0,djinn,half a row")
            self._file.flush()
            raise OSError("No space left on device")
        write(self, records)

    monkeypatch.setattr(report.RecordsCsv, "write", fails_in_a_child)


STREAMED = json.dumps({  # JSON is YAML
    "name": "streamed", "seed": 3, "backends": ["djinn", "ray_serverless"],
    "workload": {"kind": "agents", "agents": [3, 7], "reason": {"input_tokens": 16, "new_tokens": 6},
                 "act": {"kind": "exponential", "mean_s": 0.5}, "reflect": {"input_tokens": 8, "new_tokens": 6},
                 "arrival": {"kind": "poisson", "rate_per_s": 4}}})


def _run_streamed(tmp_path, name: str, monkeypatch=None, stream: bool = False):
    from djinnsim.sim.run import run_scenario_file

    path = tmp_path / "streamed.yaml"
    path.write_text(STREAMED)
    if stream:  # every point's rows go to a child from its first flush on, 5 records at a time
        monkeypatch.setattr(report.RecordsCsv, "aside_rows", 1)
        monkeypatch.setattr(report.RecordBuilder, "flush_rows", 5)
    return run_scenario_file(path, out=tmp_path / name, quiet=True)


def test_records_csv_streamed_to_a_child_while_simulating_is_the_file_written_after(tmp_path, monkeypatch):
    expected = _run_streamed(tmp_path, "after")
    started, start = [], report.RowStream._start
    monkeypatch.setattr(report.RowStream, "_start", lambda self: started.append(1) or start(self))
    drawn, call = [], report.WarmChild.call
    monkeypatch.setattr(report.WarmChild, "call", lambda self, *a: drawn.append(call(self, *a)) or drawn[-1])
    streamed = _run_streamed(tmp_path, "streamed", monkeypatch, stream=True)
    assert len(started) == 4  # each point's rows
    assert len(drawn) == 1 and drawn[0] is not None  # the figure, by the child that prepared matplotlib
    for name in ("records.csv", "summary.json", "trace.json", "figure6.png", "figure6.svg"):
        assert (streamed / name).read_bytes() == (expected / name).read_bytes(), name


def _streamed_outputs(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != "provenance.json"}


def test_summary_and_baselines_digested_while_simulating_are_those_computed_after(tmp_path, monkeypatch):
    """Each streamed point's summary and baseline come from the child that writes its rows, which
    groups the agents that are done at each flush (batch_rows = 1): every file is the one the run
    writes without a child, and this process computes no summary."""
    from djinnsim.sim import point_digest

    expected = _run_streamed(tmp_path, "after")
    monkeypatch.setattr(point_digest.PointDigest, "batch_rows", 1)
    computed, point_summary = [], report.point_summary
    monkeypatch.setattr(report, "point_summary", lambda *a, **k: computed.append(1) or point_summary(*a, **k))
    streamed = _run_streamed(tmp_path, "streamed", monkeypatch, stream=True)
    assert computed == []  # in this process: every summary came from a child
    assert _streamed_outputs(streamed) == _streamed_outputs(expected)


@pytest.mark.parametrize("failing", ["summary", "finish_baseline", "add"])
def test_digest_whose_child_fails_is_computed_again_here(tmp_path, monkeypatch, failing):
    """The child's digest fails before the summary, after it (the baseline half written) or while
    the records come: the summary and baseline are computed here, the same files."""
    import os

    from djinnsim.sim import point_digest

    expected = _run_streamed(tmp_path, "after")
    parent, method = os.getpid(), getattr(point_digest.PointDigest, failing)

    def fails_in_a_child(self, *args):
        if os.getpid() != parent:
            if self._file is not None:
                self._file.write('{"half')
                self._file.flush()
            raise OSError("No space left on device")
        return method(self, *args)

    monkeypatch.setattr(point_digest.PointDigest, failing, fails_in_a_child)
    streamed = _run_streamed(tmp_path, "streamed", monkeypatch, stream=True)
    assert _streamed_outputs(streamed) == _streamed_outputs(expected)


def test_digest_of_an_agent_already_grouped_gives_no_summary(tmp_path):
    """A record of an agent whose records were grouped already (not expected from the engine):
    the digest says it is not valid, so the whole table's summary is computed instead."""
    from djinnsim.sim.point_digest import PointDigest
    from djinnsim.sim.records import ROW_COLUMNS, RecordBuilder

    result = agents_result()
    digest = PointDigest(result.scenario, result.points[0].point, tmp_path / "b.json")
    digest.batch_rows = 1
    builder = RecordBuilder(0, "djinn", "m", "g", 25.0, 4)
    for agent in (0, 1, 0):
        builder.add(agent, *[0] * (len(ROW_COLUMNS) - 1))
        builder._flush()
        digest.add(builder.rows_since(builder.flushed - 1), 1)
    assert not digest.valid and digest.summary(result.points[0]) is None


def _early_traces(monkeypatch) -> list:
    """A trace of 4 records (so that the streamed points' first agents hold it early); the early
    traces started are listed."""
    monkeypatch.setattr(report, "TRACE_MAX_RECORDS", 4)
    started, early = [], report.PointWriter._early_trace

    def counted(self, point):
        start = early(self, point)
        return lambda builder: started.append(start(builder)) or started[-1]

    monkeypatch.setattr(report.PointWriter, "_early_trace", counted)
    return started


def test_trace_begun_during_the_run_is_the_trace_written_after(tmp_path, monkeypatch):
    """Once its first agents are done and hold the trace's records, the trace point's trace.json is
    written by a child during its run: the same file as the one written after it."""
    monkeypatch.setattr(report, "TRACE_MAX_RECORDS", 4)
    expected = _run_streamed(tmp_path, "after")
    started = _early_traces(monkeypatch)
    streamed = _run_streamed(tmp_path, "streamed", monkeypatch, stream=True)
    assert started and started[-1] is not None  # begun before the end of the run
    assert (streamed / "trace.json").read_bytes() == (expected / "trace.json").read_bytes()


def test_trace_whose_early_child_fails_is_written_again_here(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(report, "TRACE_MAX_RECORDS", 4)
    expected = _run_streamed(tmp_path, "after")
    started = _early_traces(monkeypatch)
    parent, write_trace = os.getpid(), report.write_trace

    def fails_in_a_child(records, path, **kwargs):
        if os.getpid() != parent:
            path.write_text('{"traceEvents": [')
            raise OSError("No space left on device")
        return write_trace(records, path, **kwargs)

    monkeypatch.setattr(report, "write_trace", fails_in_a_child)
    streamed = _run_streamed(tmp_path, "streamed", monkeypatch, stream=True)
    assert started and started[-1] is not None
    assert (streamed / "trace.json").read_bytes() == (expected / "trace.json").read_bytes()


def test_complete_agents_counts_the_agents_done_from_the_first_on():
    from djinnsim.sim.records import ROW_COLUMNS, RecordBuilder

    builder = RecordBuilder(0, "djinn", "m", "g", 25.0, 4)
    for agent in (0, 2, 1, 3, 2, 0):  # records of the agents, in the order they finish phases
        builder.add(agent, *[0] * (len(ROW_COLUMNS) - 1))
    builder._flush()
    assert builder.complete_agents == 0
    builder.finished(2)
    assert builder.complete_agents == 0
    builder.finished(0)
    assert builder.complete_agents == 1 and builder.count_agents_below(1) == 2
    builder.finished(1)
    assert builder.complete_agents == 3 and builder.count_agents_below(3) == 5
    assert [r.agent for r in builder.agents_below(3)] == [0, 2, 1, 2, 0]


def test_figure_whose_child_fails_is_drawn_again_here(tmp_path, monkeypatch):
    import os

    from djinnsim.sim import figures

    expected = _run_streamed(tmp_path, "after")
    parent = os.getpid()

    def fails_in_a_child():
        if os.getpid() != parent:
            raise MemoryError("matplotlib did not fit")

    monkeypatch.setattr(figures, "prepare", fails_in_a_child)
    streamed = _run_streamed(tmp_path, "streamed", monkeypatch, stream=True)
    for name in ("figure6.png", "figure6.svg"):
        assert (streamed / name).read_bytes() == (expected / name).read_bytes(), name


def test_records_csv_whose_streaming_child_fails_is_written_again_here(tmp_path, monkeypatch):
    expected = _run_streamed(tmp_path, "after")
    _csv_rows_fail_in_children(monkeypatch)
    streamed = _run_streamed(tmp_path, "streamed", monkeypatch, stream=True)
    assert (streamed / "records.csv").read_bytes() == (expected / "records.csv").read_bytes()


def test_baseline_whose_child_fails_is_written_again_here(tmp_path, monkeypatch):
    import os

    result = agents_result()
    report.write_outputs(result, tmp_path / "here")
    made = _forks(monkeypatch)
    parent, write = os.getpid(), report._write_baseline

    def fails_in_a_child(path, document):
        if os.getpid() != parent:  # a part of the file, then the disk is full
            path.write_text("{")
            raise OSError("No space left on device")
        return write(path, document)

    monkeypatch.setattr(report, "_write_baseline", fails_in_a_child)
    report.write_outputs(result, tmp_path / "aside")
    assert made
    for path in (tmp_path / "here" / "baselines").iterdir():
        assert (tmp_path / "aside" / "baselines" / path.name).read_bytes() == path.read_bytes()


def test_records_csv_whose_child_fails_is_written_again_here(tmp_path, monkeypatch):
    result = agents_result()
    report.write_outputs(result, tmp_path / "here")
    made = _forks(monkeypatch)
    _csv_rows_fail_in_children(monkeypatch)
    report.write_outputs(result, tmp_path / "aside")
    assert made
    assert (tmp_path / "aside" / "records.csv").read_bytes() == (tmp_path / "here" / "records.csv").read_bytes()


def test_records_csv_one_row_per_record_in_stable_columns(tmp_path):
    result = agents_result()
    report.write_outputs(result, tmp_path)
    rows = list(csv.reader(io.StringIO((tmp_path / "records.csv").read_text())))
    assert rows[0] == [*RECORD_COLUMNS, "latency_s"]
    assert len(rows) - 1 == len(result.records)
    assert rows[1][rows[0].index("issued_at")] == "0.000000000"


def test_trace_children_tile_each_record_and_sum_to_its_latency(tmp_path):
    result = agents_result()
    report.write_outputs(result, tmp_path)
    doc = json.loads((tmp_path / "trace.json").read_text())
    events = doc["traceEvents"]
    traced = result.points[-1]  # trace_point -1: djinn, N = 4
    meta = [e for e in events if e["ph"] == "M"]
    assert {e["name"] for e in meta} == {"process_name", "thread_name"}
    assert len([e for e in meta if e["name"] == "thread_name"]) == 4
    complete = [e for e in events if e["ph"] == "X"]
    parents = [e for e in complete if "/" in e["name"]]
    assert len(parents) == len(traced.records)
    for parent in parents:
        children = [e for e in complete if "/" not in e["name"] and e["tid"] == parent["tid"]
                    and parent["ts"] <= e["ts"] < parent["ts"] + parent["dur"]]
        assert [c["name"] for c in children] == [f.removesuffix("_s") for f in DURATION_FIELDS
                                                 if f.removesuffix("_s") in {c["name"] for c in children}]
        assert sum(c["dur"] for c in children) == pytest.approx(parent["dur"], abs=2e-3)
        assert children[0]["ts"] == parent["ts"]
        for a, b in zip(children, children[1:]):
            assert b["ts"] == pytest.approx(a["ts"] + a["dur"], abs=2e-3)
    latency_us = sorted(round(r.latency_s * 1e6, 3) for r in traced.records)
    assert sorted(p["dur"] for p in parents) == pytest.approx(latency_us)


def test_oom_record_is_an_instant_event(tmp_path):
    result = agents_result()
    result.scenario = result.scenario.model_copy(update={"trace_point": 1})  # keep-alive, N = 2
    report.write_outputs(result, tmp_path)
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert [e["name"] for e in events if e["ph"] == "i"] == ["OOM reason/-1"]


def _refuse_constant(name: str):
    raise AssertionError(f"{name} is not standard JSON")


def test_trace_json_is_strict_json_with_null_where_a_value_is_not_finite(tmp_path):
    """A record or label that is not finite (a bug upstream, or a figure that does not exist) is
    written as null: the file stays standard JSON, so Perfetto and other readers can open it."""
    traced = agents_result().points[-1]
    first = traced.records[0]
    broken = dataclasses.replace(first, issued_at=math.inf)
    path = trace.write_trace([broken, *traced.records[1:]], tmp_path / "trace.json", pid=1, process_name="p",
                             metadata={"p99_ms": math.nan, "n": 4})
    doc = json.loads(path.read_text(), parse_constant=_refuse_constant)
    assert doc["otherData"] == {"p99_ms": None, "n": 4}
    unplaced = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["ts"] is None]
    assert len(unplaced) == len(trace.record_events(broken, 1))  # the record's parent and children
    assert [e["dur"] for e in unplaced][:1] == [None]  # its latency (finished_at - issued_at) is -inf
    assert [p for p in tmp_path.iterdir()] == [path]  # the temporary file was renamed into place


@pytest.mark.parametrize("block", [1, 3, 1000])
def test_trace_json_encoded_a_block_of_records_at_a_time_is_the_document_encoded_whole(tmp_path, monkeypatch, block):
    monkeypatch.setattr(trace, "_BLOCK", block)
    records = list(agents_result().points[-1].records)
    assert len(records) > 3
    path = trace.write_trace(records, tmp_path / "trace.json", pid=2, process_name="p", metadata={"n": 4})
    whole = {"traceEvents": trace.trace_events(records, 2, "p"), "displayTimeUnit": "ms", "otherData": {"n": 4}}
    assert path.read_text() == json.dumps(whole, sort_keys=True, separators=(",", ":")) + "\n"


def test_trace_point_out_of_range_is_a_one_line_error(tmp_path):
    result = agents_result()
    result.scenario = result.scenario.model_copy(update={"trace_point": 99})
    with pytest.raises(DjinnsimError, match="trace_point 99 is out of range"):
        report.write_outputs(result, tmp_path)


@pytest.mark.parametrize("build", [decode_result, agents_result])
def test_identical_records_give_byte_identical_files(tmp_path, build):
    first = report.write_outputs(build(), tmp_path / "a")
    second = report.write_outputs(build(), tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_figure6_written_for_agents_only(tmp_path):
    written = report.write_outputs(agents_result(), tmp_path / "agents")
    figure = tmp_path / "agents" / "figure6.png"
    assert figure in written and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    names = {p.name for p in report.write_outputs(decode_result(), tmp_path / "decode")}
    assert "figure6.png" not in names and "table2.md" not in names and "claims.md" in names


# --- Table 2 and claims --------------------------------------------------------------------------


def test_table2_rows_from_the_sweep(tmp_path):
    """The seed's Table 2: per backend max agents and the OOM threshold, then mean, p50 and P99 per N."""
    report.write_outputs(agents_result(), tmp_path)
    table = (tmp_path / "table2.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith(("| ray", "| djinn"))]
    summary = {row[0]: row for row in cells if len(row) == 4}  # backend | max agents | memory bound | OOM N
    assert summary["ray_keepalive"][1:] == ["1", "1", "2"]
    assert summary["djinn"][1:] == ["4", "120", "none"]
    stats = {(row[0], int(row[1])): row for row in cells if len(row) == 6}  # backend | N | mean | p50 | p99 | OOM
    assert stats[("djinn", 1)][2:5] == ["70.0 ms", "70.0 ms", "119.0 ms"]  # phases of 120 and 20 ms
    assert stats[("ray_keepalive", 2)][5] == "OOM" and stats[("djinn", 4)][5] == ""
    assert stats[("ray_serverless", 1)][4] == "5,000 ms"
    assert "(roofline)" in table  # each group names its cost model


def test_table2_csv_matches_the_markdown(tmp_path):
    report.write_outputs(agents_result(), tmp_path)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "table2.csv").read_text())))
    assert list(rows[0]) == list(claims_mod.TABLE2_COLUMNS)
    djinn1 = next(r for r in rows if r["backend"] == "djinn" and r["n_agents"] == "1")
    assert float(djinn1["mean_ms"]) == pytest.approx(70.0) and float(djinn1["p99_ms"]) == pytest.approx(119.0)
    assert djinn1["oom"] == "0" and djinn1["oom_threshold_n"] == "" and djinn1["memory_bound_agents"] == "120"
    keep2 = next(r for r in rows if r["backend"] == "ray_keepalive" and r["n_agents"] == "2")
    assert keep2["oom"] == "1" and keep2["oom_threshold_n"] == "2" and keep2["max_agents_no_oom"] == "1"
    assert {r["cost_model"] for r in rows} == {"roofline"}


def _agents_summary(backend, n, p99_ms, oom=False, bound=None, model="llama-2-7b", gbps=25.0):
    return {"backend": backend, "model": model, "gpu": "h100-80gb", "link_gbps": gbps, "n_agents": n, "oom": oom,
            "memory_bound_agents": bound, "agents": {"pooled": {"p99_ms": p99_ms}}}


def _decode_summary(backend, per_token_ms, bytes_up, bytes_down, gpu="a100-80gb"):
    return {"backend": backend, "model": "llama-2-7b", "gpu": gpu, "link_gbps": 25.0, "n_agents": None,
            "oom": False, "memory_bound_agents": None,
            "decode": {"mean_per_token_ms": per_token_ms, "mean_bytes_up": bytes_up, "mean_bytes_down": bytes_down}}


def _verdicts(summaries, workload):
    return {c.name.split(" (")[0]: c for c in claims_mod.evaluate_claims(summaries, workload)}


def test_density_memory_bound_is_shown_never_judged():
    """The memory bound is a closed form: its verdict is "bound" whatever its value (the searched
    density claim is tests/test_claims.py's)."""
    keep = [_agents_summary("ray_keepalive", 1, 100), _agents_summary("ray_keepalive", 2, None, oom=True)]
    shown = _verdicts(keep + [_agents_summary("djinn", 32, 180, bound=40)], "agents")["density, memory bound"]
    assert shown.verdict == "bound" and shown.value == pytest.approx(20.0)
    # the sweep jumps from N = 4 to 8, past the N that first runs out of memory (bound 5 -> OOM at 6)
    jumped = [_agents_summary("ray_keepalive", 4, 100, bound=5), _agents_summary("ray_keepalive", 8, None, oom=True, bound=5),
              _agents_summary("djinn", 8, 120, bound=120)]
    claim = _verdicts(jumped, "agents")["density, memory bound"]
    assert claim.verdict == "bound" and claim.value == pytest.approx(20.0) and "memory bound + 1" in claim.detail
    assert _verdicts([_agents_summary("djinn", 1, 120, bound=90)], "agents")["density, memory bound"].verdict == "N/A"
    # without the simulation's cost models nothing is searched: the searched density is N/A
    assert _verdicts(keep + [_agents_summary("djinn", 32, 180, bound=40)], "agents")["density"].verdict == "N/A"


def test_latency_claim_uses_n32_or_the_largest_common_n():
    at32 = [_agents_summary("ray_serverless", 32, 10_000), _agents_summary("djinn", 32, 999),
            _agents_summary("ray_serverless", 16, 1), _agents_summary("djinn", 16, 1)]
    claim = _verdicts(at32, "agents")["latency"]
    assert claim.verdict == "PASS" and claim.value == pytest.approx(10_000 / 999)
    no32 = [_agents_summary("ray_serverless", 16, 5_000), _agents_summary("djinn", 16, 600),
            _agents_summary("ray_serverless", 8, 1), _agents_summary("djinn", 8, 1)]
    claim = _verdicts(no32, "agents")["latency"]
    assert claim.verdict == "FAIL" and claim.value == pytest.approx(5_000 / 600)
    assert "at N = 16" in claim.detail and "largest common N" in claim.detail
    assert _verdicts(no32, "agents")["Exp 2.1 latency"].verdict == "N/A"


def test_decode_claims_thresholds_and_seed_ranges():
    base = [_decode_summary("full_djinn", 15.0, 0, 4_000_000)]
    claim = _verdicts(base + [_decode_summary("semantic_blind", 450.0, 0, 4_000_000_000)], "decode")
    assert claim["Exp 2.1 latency"].verdict == "PASS" and claim["Exp 2.1 latency"].value == pytest.approx(30.0)
    assert claim["Exp 2.1 bytes"].verdict == "PASS" and claim["Exp 2.1 bytes"].value == pytest.approx(1000.0)
    claim = _verdicts(base + [_decode_summary("semantic_blind", 900.0, 0, 3_999_000_000)], "decode")
    assert claim["Exp 2.1 latency"].verdict == "PASS" and "outside" in claim["Exp 2.1 latency"].detail
    assert claim["Exp 2.1 bytes"].verdict == "FAIL"
    claim = _verdicts(base + [_decode_summary("semantic_blind", 449.0, 0, 4e12)], "decode")
    assert claim["Exp 2.1 latency"].verdict == "FAIL" and claim["Exp 2.1 bytes"].verdict == "PASS"
    assert claim["density"].verdict == "N/A" and claim["latency"].verdict == "N/A"
    assert _verdicts(base, "decode")["Exp 2.1 bytes"].verdict == "N/A"


def test_claims_one_line_per_gpu_group(tmp_path):
    summaries = [_decode_summary("full_djinn", 15.0, 600, 3_200_000, gpu=g) for g in ("a100-80gb", "h100-80gb")]
    summaries += [_decode_summary("semantic_blind", 900.0, 0, 3e10, gpu=g) for g in ("a100-80gb", "h100-80gb")]
    claims = [c for c in claims_mod.evaluate_claims(summaries, "decode") if c.name.startswith("Exp 2.1 latency")]
    assert [c.group for c in claims] == ["llama-2-7b / a100-80gb / 25 Gbps", "llama-2-7b / h100-80gb / 25 Gbps"]
    text = claims_mod.claims_markdown(summaries, "decode", claims)
    assert "| semantic_blind | 900.0 ms | 850.0 ms |" in text


def test_claims_report_from_a_written_sweep(tmp_path):
    report.write_outputs(agents_result(), tmp_path)
    text = (tmp_path / "claims.md").read_text()
    # djinn memory bound 120 / keep-alive OOM at N = 2 = 60, shown, not judged; serverless 5000 /
    # djinn P99 at N = 4; a hand-built result has no cost models to search with
    assert "| density, memory bound (Djinn agents that fit / keep-alive OOM N) | 60x | not judged | **bound** |" in text
    assert "largest common N used" in text and "flat ~100 ms, OOM at N = 2-3" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["verdict"] for c in summary["claims"]][:3] == ["N/A", "bound", "PASS"]
    assert "PASS" not in [c["verdict"] for c in summary["claims"] if "bound" in c["name"]]
    assert len(summary["points"]) == 9 and summary["points"][0]["label"].startswith("ray_keepalive")


def test_summary_rows_and_printed_table():
    result = decode_result()
    rows = report.summary_rows(result)
    assert [r["label"] for r in rows] == [p.point.label for p in result.points]
    assert rows[1]["mean_ms"] == pytest.approx((44.0 + 45.0) / 8, abs=1e-3)  # full_djinn, runs 2 and 3
    assert rows[0]["mb_down"] == pytest.approx(4 * 80.0) and rows[0]["oom"] is False
    console = Console(record=True, width=100)
    report.print_summary(result, console)
    out = console.export_text()
    assert "semantic_blind" in out and "llama-2-7b-hf, a100-80gb, 25 Gbps" in out and "per-token" in out
    assert " N " not in out  # a decode point has no N


def test_printed_table_shows_the_columns_that_vary():
    console = Console(record=True, width=100)
    report.print_summary(agents_result(), console)
    out = console.export_text()
    assert "llama-2-7b-hf, h100-80gb, 25 Gbps" in out and "OOM" in out
    header = next(line for line in out.splitlines() if "backend" in line)
    assert " N " in header and "GPU" not in header


def test_fast_frame_equals_records_frame():
    import pandas.testing
    from djinnsim.sim.records import records_frame

    for point in agents_result().points + decode_result().points:
        pandas.testing.assert_frame_equal(report._frame(point), records_frame(point.records))
        some = ["agent", "status", "finished_at", "issued_at", "latency_s"]  # taken in RECORD_COLUMNS' order
        table = RecordTable.from_records(point.records)
        pandas.testing.assert_frame_equal(table.frame(some),
                                          table.frame()[["agent", "status", "issued_at", "finished_at", "latency_s"]])


@settings(max_examples=60, deadline=None)
@given(issued_at=st.floats(0, 1e4), durations=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 30.0)),
                                                       min_size=len(DURATION_FIELDS), max_size=len(DURATION_FIELDS)))
def test_trace_segments_follow_each_other_and_add_up_to_the_latency(issued_at, durations):
    point = expand_points(parse_scenario({"name": "p", "backends": ["djinn"],
                                          "workload": {"kind": "agents", "agents": [1]}}))[0]
    record = _record(point, issued_at=issued_at, phase="reason", **dict(zip(DURATION_FIELDS, durations)))
    parent, *children = trace.record_events(record, pid=1)
    assert [c["name"] for c in children] == [f.removesuffix("_s") for f, d in zip(DURATION_FIELDS, durations) if d > 0]
    assert parent["dur"] == pytest.approx(record.latency_s * 1e6, abs=1e-3 + 1e-9 * record.finished_at * 1e6)
    assert sum(c["dur"] for c in children) == pytest.approx(parent["dur"], abs=1e-3 * (len(children) + 1)
                                                            + 1e-9 * record.finished_at * 1e6)
    cursor = parent["ts"]
    for child in children:
        assert child["ts"] == pytest.approx(cursor, abs=1e-3 * len(children) + 1e-9 * record.finished_at * 1e6)
        cursor = child["ts"] + child["dur"]


def test_the_commit_recorded_is_this_checkouts_or_none(tmp_path, monkeypatch):
    """In this checkout the simulator's commit is its HEAD; installed under another git checkout (a
    site-packages inside pyenv's own git tree) it records none rather than that tree's HEAD."""
    import subprocess

    from djinnsim.sim import provenance

    here = provenance.simulator()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.ROOT, capture_output=True, text=True)
    if head.returncode == 0 and (provenance.ROOT / ".git").exists():
        assert here["commit"] == head.stdout.strip()
    other = tmp_path / "other"
    (other / "site-packages").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setattr(provenance, "ROOT", other / "site-packages")
    installed = provenance.simulator()
    assert installed["commit"] is None and installed["model_commit"] is None and installed["package"]
