"""Write a simulation's outputs: baseline JSONs (the seed's schema), records.csv, Figure 6 or the
Exp 2.1 figure (sim.figures), Table 2 (Markdown and CSV), the claims report, a Chrome trace and
summary.json; and print the terminal summary.

Every figure is computed from the records (sim.metrics) and PointResult's reported fields, never
from engine internals. Files are byte-identical for identical records: fixed key order, floats
rounded to fixed decimals, no timestamps or software versions inside files.
pandas and matplotlib are imported inside the functions that use them (CLI start-up time).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import pickle
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no child processes either (run_aside)
    fcntl = None

import numpy as np

from djinnsim.errors import DjinnsimError

from . import claims as claims_mod
from . import figures
from . import metrics
from .records import CODED_COLUMNS, RECORD_COLUMNS, Record, RecordBuilder, RecordTable, records_frame
from .safeyaml import strict_json
from .trace import write_trace

if TYPE_CHECKING:
    import pandas as pd

    from .records import RecordRow
    from .run import SimulationResult
    from .simulate import PointResult

CSV_FLOAT_FORMAT = "%.9f"  # seconds to the nanosecond
_MS, _MB, _PCT, _GBPS, _FRACTION = 4, 6, 3, 3, 6  # decimals kept in JSON per unit

MEMORY_BW_NOTE = (
    "memory_bw_gbps is not simulated: it is a floor, every generated token's forward reading all weights "
    "once (model weight bytes x tokens / run time); KV and activation traffic come on top"
)
NOTES = {
    "memory_bw_gbps": MEMORY_BW_NOTE,
    "gpu_util_pct": "GPU kernel time / run wall time x 100: the share of the run the GPU runs kernels, a "
                    "launch-bound pass counting only its kernel share, as NVML's utilization (common/gpu_busy.py)",
    "host_to_device_mb": "client -> server payload (framing aside), MB = 1e6 bytes",
    "device_to_host_mb": "server -> client payload (framing aside), MB = 1e6 bytes",
    "percentiles": "numpy.percentile method=linear over the measured (non-warm-up), OOM-free runs",
}
AGENT_NOTES = {
    "runs": "one run per (agent, iteration), in that order; total_ms sums its REASON and REFLECT latencies "
            "(ACT, the tool's sleep, is not GPU work)",
    "agent_phases": "latency at the client, queueing included; pooled pools REASON and REFLECT of all agents",
}


# --- per-point summaries -------------------------------------------------------------------------


def _clean(value: Any, decimals: int) -> Any:
    """A JSON-safe rounded float (None for missing / NaN)."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return None
    return round(value, decimals)


def _clean_ms(mapping: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out[key] = _clean_ms(value)
        elif isinstance(value, (bool, int)):
            out[key] = value
        elif key.endswith("_pct"):
            out[key] = _clean(value, _PCT)
        elif key.startswith(("mean_bytes", "mean_wire_bytes")) or key == "tokens_per_run":
            out[key] = _clean(value, 1)
        else:
            out[key] = _clean(value, _MS)
    return out


def _weight_bytes(point_result: "PointResult") -> int | None:
    model = getattr(point_result.point, "model", None)
    return getattr(model, "weight_bytes", None)


def point_summary(point_result: "PointResult", workload: str, frame: "pd.DataFrame | None" = None,
                  phases: "pd.DataFrame | None" = None) -> dict[str, Any]:
    """Compact, JSON-ready figures of one point; also the input of Table 2 and the claims.
    `phases` may pass metrics.agent_phases(frame) when the caller has it already."""
    frame = frame if frame is not None else _frame(point_result)
    point = point_result.point
    peak = max(int(point_result.peak_mem_bytes or 0), metrics.peak_gpu_mem_bytes(frame))
    oom_records = metrics.oom_records(frame)
    summary: dict[str, Any] = {
        "index": point.index,
        "label": point.label,
        "backend": point.backend.name,
        "model": point.model.key,
        "gpu": point.gpu.key,
        "link_gbps": float(point.link.gbps),
        "n_agents": point.n_agents,
        "cost_model": point_result.cost_model,
        "events": int(point_result.events),
        "records": int(len(frame)),
        "oom": oom_records > 0,
        "oom_records": oom_records,
        "peak_gpu_mem_bytes": peak,
        "capacity_bytes": int(point_result.capacity_bytes),
        "memory_bound_agents": point_result.memory_bound_agents,
        "gpu_utilization": _clean(metrics.gpu_utilization(frame, point.cluster.gpus), _FRACTION),
    }
    cluster = point.cluster
    if cluster != type(cluster)():  # a pool: its size (peak and capacity are per GPU; the bound and utilization pool-wide)
        summary["cluster"] = {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "gpus": cluster.gpus,
                              "router": cluster.router}
    if workload == "agents":
        summary["agents"] = _clean_ms(metrics.agent_summary(frame, phases))
    else:
        summary["decode"] = _clean_ms(metrics.decode_summary(frame, _weight_bytes(point_result)))
    return summary


def point_summaries(result: "SimulationResult", frames: list["pd.DataFrame"] | None = None,
                    phases: list["pd.DataFrame | None"] | None = None) -> list[dict[str, Any]]:
    workload = result.scenario.workload.kind
    frames = frames if frames is not None else [_frame(p) for p in result.points]
    phases = phases if phases is not None else [None] * len(frames)
    return [point_summary(p, workload, f, ph) for p, f, ph in zip(result.points, frames, phases)]


def _frame(point_result: "PointResult") -> "pd.DataFrame":
    """The point's table of records (records_frame: column-wise, no object per record)."""
    return records_frame(point_result.records)


# --- baseline JSON in the seed's schema ----------------------------------------------------------


# A baseline run's fields after its run_id, in order: decimals kept (None: an integer)
_RUN_FIELDS = (("total_ms", _MS), ("per_token_ms", _MS), ("tokens_generated", None), ("gpu_util_pct", _PCT),
               ("memory_bw_gbps", _GBPS), ("host_to_device_mb", _MB), ("device_to_host_mb", _MB))


def _run_entries(runs: "pd.DataFrame", run_ids: list[int]) -> list[dict[str, Any]]:
    entries = []
    for run_id, row in zip(run_ids, runs.itertuples(index=False)):
        entry = {"run_id": int(run_id)}
        for name, decimals in _RUN_FIELDS:
            value = getattr(row, name)
            entry[name] = int(value) if decimals is None else _clean(value, decimals)
        entries.append(entry)
    return entries


def _runs_json(runs: "pd.DataFrame", run_ids: list[int]) -> str:
    """_entries_json(_run_entries(runs, run_ids)), formatted a column at a time: each column's
    numbers as JSON writes them (_clean's rounding), then one %-format per run."""
    columns = [[repr(int(run_id)) for run_id in run_ids]]
    for name, decimals in _RUN_FIELDS:
        values = runs[name].tolist()
        if decimals is None:
            columns.append([repr(int(v)) for v in values])
        elif np.isfinite(numbers := np.asarray(values, dtype=float)).all():
            columns.append(rounded_reprs(numbers, decimals))
        else:
            columns.append([repr(round(v, decimals)) if math.isfinite(v) else "null" for v in map(float, values)])
    entry_format = _entries_json([{"run_id": "%s", **{name: "%s" for name, _ in _RUN_FIELDS}}]).replace('"%s"', "%s")
    return ",".join([entry_format % entry for entry in zip(*columns)])


def rounded_reprs(numbers: "np.ndarray", decimals: int) -> list[str]:
    """[repr(round(x, decimals)) for x in numbers] (finite floats), by one %-format per number where
    that gives the same text: `round` and "%.<decimals>f" round the same binary value to the same
    decimal (both correctly rounded), and a decimal of at most 15 significant digits is its double's
    shortest repr, trailing zeros aside, printed without an exponent from 1e-4 up. So: at least one
    decimal, every |x| below 10**(14 - decimals), and none that rounds to a nonzero value under 1e-4;
    else repr(round())."""
    magnitudes = np.abs(numbers)
    if decimals < 1 or numbers.size and (magnitudes.max() >= 10.0 ** (14 - decimals) or (
            decimals > 4 and ((magnitudes > 0) & (magnitudes < 1e-4)).any())):
        return list(map(repr, map(round, numbers.tolist(), itertools.repeat(decimals))))
    texts = [text.rstrip("0") for text in map(f"%.{decimals}f".__mod__, numbers.tolist())]
    return [text + "0" if text[-1] == "." else text for text in texts]


class RunEntries:
    """A baseline's `runs`: its entries made a chunk at a time as the file is written
    (`_write_baseline`), never one dict per run of a large point all at once."""

    CHUNK = 20_000

    def __init__(self, runs: "pd.DataFrame", run_ids: list[int], runs_measured: int = 0, runs_oom: int = 0) -> None:
        """`runs_measured`, `runs_oom`: every run of the point, and those left out for an OOM or a rejection."""
        self.runs, self.run_ids = runs, run_ids
        self.runs_measured, self.runs_oom = runs_measured, runs_oom

    def __len__(self) -> int:
        return len(self.run_ids)

    def chunks(self) -> Iterator[list[dict[str, Any]]]:
        """The entries as dicts, a chunk at a time."""
        for start in range(0, len(self.run_ids), self.CHUNK):
            stop = start + self.CHUNK
            yield _run_entries(self.runs.iloc[start:stop], self.run_ids[start:stop])

    def chunks_json(self) -> Iterator[str]:
        """The same chunks as _entries_json writes them."""
        for start in range(0, len(self.run_ids), self.CHUNK):
            stop = start + self.CHUNK
            yield _runs_json(self.runs.iloc[start:stop], self.run_ids[start:stop])


def _failed(runs: "pd.DataFrame") -> "pd.Series":
    """Runs with an OOM or a rejected record: left out of runs and aggregates."""
    return runs["oom"].astype(bool) | runs["rejected"].astype(bool)


def _aggregates(runs: "pd.DataFrame") -> dict[str, Any]:
    ok = runs[~_failed(runs)]
    total = metrics.describe_ms(ok["total_ms"], (50, 95, 99))
    per_token = metrics.describe_ms(ok["per_token_ms"], (50, 95, 99))
    return {
        "mean_total_ms": _clean(total["mean_ms"], _MS),
        "p95_total_ms": _clean(total["p95_ms"], _MS),
        "mean_per_token_ms": _clean(per_token["mean_ms"], _MS),
        "p50_total_ms": _clean(total["p50_ms"], _MS),
        "p99_total_ms": _clean(total["p99_ms"], _MS),
        "p50_per_token_ms": _clean(per_token["p50_ms"], _MS),
        "p95_per_token_ms": _clean(per_token["p95_ms"], _MS),
        "p99_per_token_ms": _clean(per_token["p99_ms"], _MS),
    }


def baseline_document(point_result: "PointResult", scenario: Any, frame: "pd.DataFrame",
                      summary: dict[str, Any], phases: "pd.DataFrame | None" = None) -> dict[str, Any]:
    """The seed's raw-run JSON for one point, extended with p50/p99, agent phases and a `simulation` block
    (its `runs` a RunEntries, written by _write_baseline).

    Runs with an OOM or a rejected record are left out of `runs` and `aggregates` (counted in `simulation`).
    Decode: one run per measured run, run_id = the engine's 0-based run number + 1 (warm-up runs
    1..warmup_runs are discarded, as in the seed). Agents: one run per (agent, iteration).
    """
    return with_summary(baseline_runs_document(point_result, scenario, frame, phases), point_result, scenario, summary)


def baseline_runs_document(point_result: "PointResult", scenario: Any, frame: "pd.DataFrame",
                           phases: "pd.DataFrame | None" = None) -> dict[str, Any]:
    """A baseline_document's keys up to its `aggregates`, what needs no summary of the point (its
    runs may be written while the summary is computed; `with_summary` adds the rest)."""
    workload = scenario.workload
    weight_bytes = _weight_bytes(point_result)
    if workload.kind == "agents":
        runs = metrics.agent_iterations(frame, weight_bytes, phases)
    else:
        runs = metrics.decode_runs(frame, weight_bytes)
    run_ids = list(range(1, len(runs) + 1)) if workload.kind == "agents" else [int(r) + 1 for r in runs["run"]]
    ok_runs, ok_ids = ok_run_entries(runs, run_ids)
    return {**baseline_head(point_result.point, scenario),
            "runs": RunEntries(ok_runs, ok_ids, runs_measured=len(runs), runs_oom=len(run_ids) - len(ok_ids)),
            "aggregates": _aggregates(runs)}


def baseline_head(point: Any, scenario: Any) -> dict[str, Any]:
    """A baseline's keys before its runs (what the point's records do not change)."""
    workload = scenario.workload
    if workload.kind == "agents":
        prompt_tokens, new_tokens, batch = (workload.reason.input_tokens,
                                            workload.reason.new_tokens + workload.reflect.new_tokens, 1)
    else:
        prompt_tokens, new_tokens, batch = workload.prompt_tokens, workload.new_tokens, workload.batch
    return {"baseline": point.backend.name, "model_id": point.model.model_id, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "batch_size": batch}


def ok_run_entries(runs: "pd.DataFrame", run_ids: list[int]) -> tuple["pd.DataFrame", list[int]]:
    """The runs a baseline lists (no OOM, no rejection) and their run ids."""
    ok_mask = ~_failed(runs)
    return metrics.rows_where(runs, ok_mask), [rid for rid, ok in zip(run_ids, ok_mask) if ok]


def with_summary(document: dict[str, Any], point_result: "PointResult", scenario: Any,
                 summary: dict[str, Any]) -> dict[str, Any]:
    """A baseline_runs_document completed with the blocks that quote the point's summary."""
    workload = scenario.workload
    point = point_result.point
    runs = document["runs"]
    document = dict(document)
    if workload.kind == "agents":
        agents = summary["agents"]
        document["agent_phases"] = {
            "n_agents": point.n_agents,
            "reason": agents["phases"]["reason"],
            "reflect": agents["phases"]["reflect"],
            "pooled": agents["pooled"],
            "p99_pooled_ms": agents["pooled"]["p99_ms"],
            "breakdown_mean_ms": agents["breakdown_mean_ms"],
            "oom": summary["oom"],
            "oom_agents": agents["oom_agents"],
            "peak_gpu_mem_bytes": summary["peak_gpu_mem_bytes"],
            "capacity_bytes": summary["capacity_bytes"],
            "memory_bound_agents": summary["memory_bound_agents"],
        }
    document["simulation"] = {
        "label": point.label,
        "gpu": point.gpu.key,
        "link_gbps": float(point.link.gbps),
        "cost_model": point_result.cost_model,
        "runs_measured": runs.runs_measured,
        "runs_oom": runs.runs_oom,
        "oom_records": summary["oom_records"],
        "peak_gpu_mem_bytes": summary["peak_gpu_mem_bytes"],
        "notes": {**NOTES, **(AGENT_NOTES if workload.kind == "agents" else {})},
    }
    return document


# --- records, figure, tables ---------------------------------------------------------------------


class RecordsCsv:
    """records.csv written a point at a time, straight from its table of records (no frame): the
    columns RECORD_COLUMNS then latency_s, floats as CSV_FLOAT_FORMAT, as pandas' to_csv writes them."""

    chunk_rows = 8192  # rows formatted at once (bounds the strings held: about 20 MB)
    aside_rows = 50_000  # a point of at least this many records is written in a child (write_aside)
    aside_chunk_rows = 2048  # ... a smaller chunk at a time: the child starts as large as its parent

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = None

    def __enter__(self) -> "RecordsCsv":
        self._file = self.path.open("w", newline="")
        self._file.write(",".join([*RECORD_COLUMNS, "latency_s"]) + "\n")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, records: "RecordTable | list[Record]") -> None:
        table = records if isinstance(records, RecordTable) else RecordTable.from_records(records)
        for start in range(0, len(table), self.chunk_rows):
            stop = min(start + self.chunk_rows, len(table))
            cells = [_csv_cells(table, name, start, stop) for name in RECORD_COLUMNS]
            finished, issued = table.column("finished_at", start, stop), table.column("issued_at", start, stop)
            cells.append(_csv_float_cells(finished - issued))
            # one %-format per row: a column's cells are its format and its values (or one text for all)
            row_format = ",".join(fmt for fmt, _ in cells)
            columns = [values for _, values in cells if values is not None]
            rows = map(row_format.__mod__, zip(*columns)) if columns else [row_format % ()] * (stop - start)
            self._file.write("\n".join(rows) + "\n")


    def write_aside(self, records: "RecordTable | list[Record]") -> Callable[[bool], None]:
        """`write(records)` in a forked child process (`run_aside`; a large point), so that it runs on
        another core while this process computes the point's summaries; returns `done(abandon)`, to
        call before anything else is written: it waits for the child (or, with abandon, ends it). The
        child writes through the same open file, at its offset; if it fails the rows are written
        again here, where a failure is reported as usual. Elsewhere: written now, and `done` does
        nothing."""
        if len(records) < self.aside_rows:
            self.write(records)
            return lambda abandon=False: None
        self._file.flush()
        offset = self._file.tell()

        def write() -> None:
            self.chunk_rows = self.aside_chunk_rows
            self.write(records)
            self._file.flush()

        def again() -> None:
            self._file.seek(offset)
            self._file.truncate()
            self.write(records)

        done = aside_or_again(write, again, nice=AFTER_RUN_NICE)
        if done is None:
            self.write(records)
            return lambda abandon=False: None
        return done


class PipedChild:
    """A forked child process (`run_aside`) that takes what this process sends it through a pipe:
    `serve(sent)` runs in the child over the objects sent (an iterator); `send` pickles one to it,
    `finish` ends them, `abandon` ends the child. Not `started` where it cannot fork."""

    def __init__(self, serve: Callable[[Iterator[Any]], None], nice: int = 0) -> None:
        """`nice`: as `run_aside`'s."""
        source, sink = os.pipe()
        _WRITE_ENDS.add(sink)  # a child forked later closes it: else this reader would never see the end
        _widen(sink)

        def work() -> None:
            serve(_received(source))

        self._child = run_aside(work, nice)
        os.close(source)
        self._pipe = os.fdopen(sink, "wb") if self._child is not None else None
        if self._pipe is None:
            _WRITE_ENDS.discard(sink)
            os.close(sink)

    @property
    def started(self) -> bool:
        return self._child is not None

    def send(self, item: Any) -> bool:
        """False when the child no longer reads (it failed: its exit status says so); what cannot
        be pickled raises before anything is sent."""
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._pipe.write(data)
            return True
        except OSError:
            return False

    def flush(self) -> bool:
        """What is sent so far, out of this process's buffer into the pipe; False as `send`."""
        try:
            self._pipe.flush()
            return True
        except OSError:
            return False

    def finish(self) -> tuple[Callable[[bool], bool], bool]:
        """The end of what is sent: (`done(abandon)` as `run_aside` returns it, whether everything
        sent reached the pipe)."""
        child, self._child = self._child, None
        return child, self._close()

    def abandon(self) -> None:
        if self._child is not None:
            self._child(True)
            self._child = None
        self._close()

    def _close(self) -> bool:
        if self._pipe is None or self._pipe.closed:
            return True
        _WRITE_ENDS.discard(self._pipe.fileno())
        try:
            self._pipe.close()
            return True
        except OSError:
            return False


def _widen(pipe: int) -> None:
    """The pipe's buffer as large as the system allows a process (Linux: pipe-max-size, 1 MiB by
    default, against 64 KiB): a table of records sent at a flush then mostly fits at once."""
    resize = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if resize is not None:
        try:
            fcntl.fcntl(pipe, resize, 1 << 20)
        except OSError:  # not allowed here: the pipe as it is
            pass


_END = object()


def _received(source: int) -> Iterator[Any]:
    """The objects sent through the pipe `source` (a PipedChild's child), unpickled by a thread of
    this process as soon as they come, so the sender does not wait while this process works on an
    earlier one (a flush's table sent while the child still formats the previous)."""
    import queue

    messages: queue.SimpleQueue = queue.SimpleQueue()

    def drain() -> None:
        try:
            with os.fdopen(source, "rb") as reader:
                while True:
                    try:
                        messages.put(pickle.load(reader))
                    except EOFError:
                        break
            messages.put(_END)
        except BaseException as exc:  # raised where the messages are read
            messages.put((_END, exc))

    sys.setswitchinterval(0.001)  # the reader takes its turn soon after a read returns
    threading.Thread(target=drain, daemon=True).start()
    while (message := messages.get()) is not _END:
        if type(message) is tuple and message and message[0] is _END:
            raise message[1]
        yield message


class RowStream:
    """A point's rows of records.csv written by a forked child process while the point is still
    simulated (its RecordBuilder's `on_flush`): from the flush at which it holds
    `RecordsCsv.aside_rows` records (a smaller point is written after its run, as before), each
    flush's records go through a pipe to the child, which formats and writes them as
    `RecordsCsv.write` does the whole table (the same text: a row's cells do not depend on the
    other rows). The other core formats while this one simulates. With a `digest`
    (point_digest.PointDigest, an agents point), the child also groups the records of the agents
    that are done as they come and writes their baseline runs; `summary` then asks it for the
    point's summary after the run, and it completes the baseline."""

    def __init__(self, csv: RecordsCsv, on_start: Callable[[], None] | None = None,
                 early: Callable[["RecordBuilder"], Callable[[bool], bool] | None] | None = None,
                 digest: Any = None) -> None:
        """`on_start()`: called once the child is started (the point is a large one). `early(builder)`:
        tried at each flush once the child is started, until it returns something (`early_done`):
        work started early on what the point holds so far (its trace, PointWriter._early_trace)."""
        self.csv = csv
        self.on_start = on_start
        self.early = early
        self.digest = digest
        self.early_done: Callable[[bool], bool] | None = None
        self.sent = 0  # records handed to the child
        self.offset = 0  # where the point's rows start in records.csv
        self.failed = False  # no child (cannot fork), or it stopped reading: written after the run
        self._child: PipedChild | None = None
        self.digesting = False  # a child with the digest was started
        self._reply: int | None = None  # the pipe the child answers `summary` through

    def __call__(self, builder: "RecordBuilder") -> None:
        if self.failed or (self._child is None and (builder.flushed < self.csv.aside_rows or not self._start())):
            return
        table = builder.rows_since(self.sent)
        self.sent = builder.flushed
        self.failed = not self._child.send(("rows", table, builder.complete_agents))
        if self.early is not None:
            self.early_done = self.early(builder)
            if self.early_done is not None:
                self.early = None

    def _start(self) -> bool:
        csv_file = self.csv._file
        csv_file.flush()
        self.offset = csv_file.tell()
        digest = self.digest
        reply_source, reply_sink = os.pipe() if digest is not None else (None, None)

        def write(messages: Iterator[tuple]) -> None:
            self.csv.chunk_rows = self.csv.aside_chunk_rows
            for kind, *content in messages:
                if kind == "rows":
                    table, complete_agents = content
                    self.csv.write(table)
                    if digest is not None:
                        digest.add(table, complete_agents)
                elif digest is not None:  # ("point", the PointResult without its records): the run is over
                    point_result, = content
                    summary = digest.summary(point_result)
                    with os.fdopen(reply_sink, "wb") as reply:
                        pickle.dump(summary, reply, protocol=pickle.HIGHEST_PROTOCOL)
                    if summary is not None:
                        digest.finish_baseline(point_result, summary)
            csv_file.flush()

        self._child = PipedChild(write, STREAM_NICE)
        if reply_sink is not None:
            os.close(reply_sink)
        if not self._child.started:
            if reply_source is not None:
                os.close(reply_source)
            self._child, self.failed = None, True
            return False
        self._reply = reply_source
        self.digesting = digest is not None
        if self.on_start is not None:
            self.on_start()
        return True

    def summary(self, point_result: "PointResult") -> dict[str, Any] | None:
        """The point's summary from the child's digest, once its run is over (the child then completes
        the baseline); None when there is none (no digest, no child, the child failed or did not
        take every record): the summary and baseline are then this process's to compute."""
        reply, self._reply = self._reply, None
        if reply is None:
            return None
        with os.fdopen(reply, "rb") as reader:
            if (self._child is None or self.failed or self.sent != len(point_result.records)
                    or not self._child.send(("point", dataclasses.replace(point_result, records=RecordTable(0, {}))))
                    or not self._child.flush()):
                return None
            try:
                return pickle.load(reader)
            except (EOFError, pickle.UnpicklingError):
                return None

    def done(self, records: "RecordTable") -> Callable[[bool], bool] | None:
        """For the point's whole `records` (the run is over): `done(abandon)` as
        `RecordsCsv.write_aside` returns it, with the same fall-back, which also says whether the
        child finished its work; None when no child took them."""
        if self._child is None:
            return None
        child, delivered = self._child.finish()
        self._child = None
        complete = delivered and not self.failed and self.sent == len(records)

        def done(abandon: bool = False) -> bool:
            finished = child(abandon)
            if not abandon and not (finished and complete):
                csv_file = self.csv._file
                csv_file.seek(self.offset)
                csv_file.truncate()
                self.csv.write(records)
            return finished

        return done

    def abandon(self) -> None:
        """Ends the child of a point whose run did not finish (and the early work's)."""
        if self._reply is not None:
            os.close(self._reply)
            self._reply = None
        if self._child is not None:
            self._child.abandon()
            self._child = None
        if self.early_done is not None:
            self.early_done(True)
            self.early_done = None


class WarmChild:
    """A child process forked now that does `prepare()` (imports, caches) on a core that is free
    while this process works, then runs the one call handed to it with `call` (a figure drawn
    while this process writes the rest: matplotlib is imported and warmed in the child alone)."""

    def __init__(self, prepare: Callable[[], None], nice: int = 0) -> None:
        """`nice`: as `run_aside`'s."""
        def serve(calls: Iterator[tuple]) -> None:
            prepare()
            for function, args in calls:
                function(*args)
                return

        self._child: PipedChild | None = PipedChild(serve, nice)

    def call(self, function: Callable, *args: Any) -> Callable[[bool], bool] | None:
        """`function(*args)` in the child (both picklable); `done(abandon)` as `run_aside` returns
        it, or None when no child takes it (call it here)."""
        piped, self._child = self._child, None
        if piped is None or not piped.started:
            return None
        try:
            sent = piped.send((function, args))
        except (pickle.PicklingError, AttributeError, TypeError):  # not picklable (a local function)
            sent = False
        child, delivered = piped.finish()
        if not (sent and delivered):
            child(True)
            return None
        return child

    def abandon(self) -> None:
        """Ends the child (its call never came)."""
        if self._child is not None:
            self._child.abandon()
            self._child = None


_WRITE_ENDS: set[int] = set()  # the pipes this process writes to children through (PipedChild)


# The niceness of the children that write a large point's trace and baseline (and its records.csv
# when not streamed during the run): after the run they share the two cores with this process's
# summary and the figure's child, which the command waits for in turn (the summary, then the figure
# drawn from it); at a lower priority they take what those leave. Scheduling only: every file is the
# same.
AFTER_RUN_NICE = 5
# The niceness of the child that streams records.csv and digests the point during its run (RowStream):
# it has most of the other core to itself, and where it meets the run's process on one core the run
# goes first (the run's process no longer waits for it: it reads its pipe from a thread); once the
# run is over the summary it computes is what the command waits for, and only lower ones run beside it.
STREAM_NICE = 5
# The niceness of the child that writes the trace point's trace.json during its run (`_early_trace`):
# it takes what the run's process and the child streaming records.csv leave of the two cores (it
# has the rest of the run to finish in), slowing the run as little as it can.
DURING_RUN_NICE = 19
# The niceness of the child that prepares the figure during a large point's run (WarmChild): its
# imports take what the run's process leaves, and once the run is over that process only waits.
PREPARE_NICE = 10


def run_aside(work: Callable[[], None], nice: int = 0) -> Callable[[bool], bool] | None:
    """`work()` in a forked child process, on another core while this one goes on (POSIX, and no
    other thread: a fork copies only the calling one); None where it cannot fork (nothing run).
    Returns `done(abandon)`: waits for the child (with abandon, ends it first) and says whether
    `work` finished. The child leaves without running anything of the parent's (no exit handlers,
    no buffers of the parent's flushed) and ignores SIGINT: the parent decides what an interrupt does.
    `nice`: added to the child's niceness (os.nice), where the system allows it."""
    if not hasattr(os, "fork") or threading.active_count() > 1:
        return None
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for sink in _WRITE_ENDS:  # the other children's pipes are the parent's to end
                os.close(sink)
            if nice:
                try:
                    os.nice(nice)
                except OSError:  # not allowed here: the same work at the same priority
                    pass
            work()
            code = 0
        finally:
            os._exit(code)

    def done(abandon: bool = False) -> bool:
        try:
            if abandon:
                os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        return status == 0

    return done



def aside_or_again(work: Callable[[], None], again: Callable[[], None] | None = None,
                   nice: int = 0) -> Callable[[bool], None] | None:
    """`work()` in a forked child (`run_aside`); None where it cannot fork (nothing run). Returns
    `done(abandon)`: waits for the child (with abandon, ends it) and, if the child failed and was not
    abandoned, runs `again` (default: `work`) here, where a failure is reported as usual."""
    child = run_aside(work, nice)
    if child is None:
        return None
    redo = work if again is None else again

    def done(abandon: bool = False) -> None:
        if not child(abandon) and not abandon:
            redo()

    return done

def _csv_cells(table: "RecordTable", name: str, start: int, stop: int) -> tuple[str, list | None]:
    """One column's cells of rows start..stop: (its %-format, its values), or (its text, None) for a
    column equal on every row (formatted once)."""
    constant = table.constant(name)
    if constant is not None:
        return _csv_value(constant).replace("%", "%%"), None
    if name in CODED_COLUMNS:  # each label quoted once, then looked up by code
        labels = np.array([_csv_value(label) for label in CODED_COLUMNS[name]], dtype=object)
        return "%s", labels[table.codes(name)[start:stop]].tolist()
    values = table.column(name, start, stop)
    if values.dtype.kind == "f":
        return _csv_float_cells(values)
    if values.dtype.kind in "iu":  # no character to quote
        return "%d", values.tolist()
    if values.dtype.kind == "b":
        return "%s", values.tolist()
    return "%s", [_csv_value(v) for v in values.tolist()]


def _csv_float_cells(values: "np.ndarray") -> tuple[str, list]:
    """CSV_FLOAT_FORMAT, and an empty cell for NaN (the column's cells as text when it has one)."""
    if np.isnan(values).any():
        return "%s", [_csv_value(v) for v in values.tolist()]
    return CSV_FLOAT_FORMAT, values.tolist()


def _csv_value(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else CSV_FLOAT_FORMAT % value
    text = str(value)
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def write_records_csv(tables: "list[RecordTable | list[Record]]", path: Path) -> Path:
    """The points' records, in order, as records.csv."""
    with RecordsCsv(path) as csv_file:
        for table in tables:
            csv_file.write(table)
    return Path(path)


TRACE_MAX_RECORDS = 20_000  # a trace beyond this is too large for a viewer to open


def trace_records(records: "RecordTable | list[Record]") -> "list[Record] | list[RecordRow]":
    """The records trace.json shows: all of them, or past TRACE_MAX_RECORDS the first that many in
    the trace's own order (agent, issued_at, run, step, phase); from a table, as RecordRows."""
    if not isinstance(records, RecordTable):
        if len(records) <= TRACE_MAX_RECORDS:
            return list(records)
        records = RecordTable.from_records(records)
    if len(records) <= TRACE_MAX_RECORDS:
        return list(records.take(np.arange(len(records)), light=True))
    # phase codes sort as the names do (decode < reason < reflect)
    order = np.lexsort([records.column(name) if name != "phase" else records.codes("phase")
                        for name in ("phase", "step", "run", "issued_at", "agent")])
    return list(records.take(order[:TRACE_MAX_RECORDS], light=True))


def write_figure6(summaries: list[dict[str, Any]], backends: list[str], path: Path) -> Path:
    """P99 (REASON + REFLECT pooled) vs N, log y, a line per backend, an X where a backend first OOMs.

    One panel per (model, GPU, link) group. The line stops before the first OOM N; the X sits at
    the P99 of the phases that did finish there, or at the line's last value when none did.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grouped = claims_mod.groups(summaries)
    with matplotlib.rc_context({"svg.hashsalt": "djinnsim", "path.simplify": True}):
        width_in = 6.4 * len(grouped)
        figure = Figure(figsize=(width_in, 4.4), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(grouped), squeeze=False)[0]
        # fixed margins: a layout engine costs ~0.4 s per figure
        figure.subplots_adjust(left=0.8 / width_in, right=1 - 0.2 / width_in, bottom=0.12, top=0.85, wspace=0.3)
        colors = matplotlib.colormaps["tab10"]
        for ax, (key, members) in zip(axes, grouped.items()):
            all_ns: set[int] = set()
            plotted = False
            for backend, points in claims_mod.by_backend(members).items():
                color = colors(backends.index(backend) % 10 if backend in backends else 9)
                first_oom = claims_mod.oom_n(points)
                xs, ys = [], []
                for p in points:
                    all_ns.add(p["n_agents"])
                    value = claims_mod.p99_ms(p)
                    if (first_oom is None or p["n_agents"] < first_oom) and value:
                        xs.append(p["n_agents"])
                        ys.append(value)
                ax.plot(xs, ys, marker="o", color=color, label=backend)
                plotted = plotted or bool(ys)
                if first_oom is not None:
                    at = next(p for p in points if p["n_agents"] == first_oom)
                    survivors = at["agents"]["pooled"]["p99_ms"]
                    y = survivors or (ys[-1] if ys else None)
                    if y:
                        plotted = True
                        ax.plot([first_oom], [y], marker="x", markersize=12, mew=2.5, color=color, linestyle="")
                        ax.annotate(f"OOM @ N={first_oom}", (first_oom, y), textcoords="offset points",
                                    xytext=(6, 6), color=color, fontsize=8)
            if plotted:  # a log axis needs a positive value
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ticks = sorted(all_ns)
                ax.set_xticks(ticks, [str(n) for n in ticks])
            else:
                ax.text(0.5, 0.5, "no phase finished", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel("concurrent agents N")
            ax.set_ylabel("P99 per-phase latency (ms)")
            # a fixed title height: placing it automatically measures every tick label (~0.4 s)
            ax.set_title(claims_mod.group_label(key), fontsize=10, y=1.01)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        figure.suptitle("Figure 6: P99 per-phase latency (REASON + REFLECT) vs N")
        figure.savefig(path, format="png", metadata={"Software": None})
    return path


# --- entry points --------------------------------------------------------------------------------


def _write_json(path: Path, document: Any) -> Path:
    path.write_text(strict_json(document, indent=2) + "\n")  # NaN / Infinity are not JSON
    return path


_RUNS_MARK = "\x00runs\x00"  # stands for the runs while the rest of a baseline is formatted


def _write_baseline(path: Path, document: dict[str, Any],
                    complete: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Path:
    """_write_json of a baseline_document, its runs formatted and written a chunk at a time: the same
    text as the whole document through json.dumps(indent=2), without its millions of small strings.
    With `complete`, `document` holds the keys up to the runs' and `complete(document)` gives the
    whole one once its runs are written (its summary may come meanwhile)."""
    with path.open("w") as file:
        file.write(baseline_before_runs(document))
        separator = ""
        for chunk in document["runs"].chunks_json():
            file.write(separator + chunk)
            separator = ","
        if complete is not None:
            document = complete(document)
        file.write(baseline_after_runs(document, bool(separator)))
    return path


def baseline_before_runs(document: dict[str, Any]) -> str:
    """A baseline's text up to its first run's entry (only the keys before `runs` are read)."""
    return strict_json({**document, "runs": _RUNS_MARK}, indent=2).split(json.dumps(_RUNS_MARK))[0] + "["


def baseline_after_runs(document: dict[str, Any], any_runs: bool) -> str:
    """A whole baseline document's text after its last run's entry (`any_runs`: whether it has one)."""
    tail = strict_json({**document, "runs": _RUNS_MARK}, indent=2).split(json.dumps(_RUNS_MARK))[1]
    return ("\n  ]" if any_runs else "]") + tail + "\n"


def _entries_json(entries: list[dict[str, Any]]) -> str:
    """Flat dicts of numbers as json.dumps(indent=2) writes them in a list under a top-level key, the
    brackets left out: "\n    {\n      KEY: VALUE,...\n    }" joined by commas. (json.dumps with an
    indent formats in pure Python, a string per token: the bulk of a large baseline's time.)"""
    return ",".join(["\n    {\n      " + ",\n      ".join([f"{_json_key(key)}: {_json_number(value)}"
                                                         for key, value in entry.items()]) + "\n    }"
                     for entry in entries])


@functools.cache
def _json_key(key: str) -> str:
    return json.dumps(key)


def _json_number(value: Any) -> str:
    """A number as JSON writes it (int and float repr, None as null); anything else through strict_json."""
    kind = type(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)
    return "null" if value is None else strict_json(value)


def write_outputs(result: "SimulationResult", out_dir: Path,
                  summaries: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write every output but scenario.yaml into out_dir; return the paths written, in order.

    `summaries` may pass point_summaries(result) computed already (print_summary takes them too).
    """
    return write_result(result, out_dir, summaries)[0]


def write_result(result: "SimulationResult", out_dir: Path, summaries: list[dict[str, Any]] | None = None,
                 bands: list[dict[str, Any]] | None = None) -> tuple[list[Path], list[dict[str, Any]]]:
    """write_outputs, and the point summaries it wrote (each with its `bands_p10_p90` from `bands`)."""
    if not result.points:
        raise DjinnsimError(f"scenario {result.scenario.name!r} expanded to no points")
    with PointWriter(result.scenario, out_dir, len(result.points), summaries) as writer:
        for point_result in result.points:
            writer.write_point(point_result)
    return writer.finish(result, bands)


class PointWriter:
    """A scenario's outputs written as its points come, in point order (`djinnsim run` hands each
    point over as soon as it is simulated and then drops its records): a point's table of records
    becomes a frame, its summary, its baseline JSON and its rows of records.csv (and trace.json,
    for the trace point), then the frame is dropped. A large point's rows are written by a child
    process while it is simulated (`row_stream`), its baseline by another while this one computes
    its summary and trace (`run_aside`). `finish` writes what needs every point: the figures,
    Table 2, the claims and summary.json."""

    def __init__(self, scenario: Any, out_dir: Path, points: int,
                 summaries: list[dict[str, Any]] | None = None) -> None:
        if not -points <= scenario.trace_point < points:
            raise DjinnsimError(f"trace_point {scenario.trace_point} is out of range: the scenario has {points} points")
        self.scenario = scenario
        self.out_dir = Path(out_dir)
        self.trace_index = scenario.trace_point % points
        self.points = points
        self.given = summaries
        self.summaries: list[dict[str, Any]] = []
        self.written: list[Path] = []
        self._traced: Path | None = None  # trace.json, once the trace point's is written
        (self.out_dir / "baselines").mkdir(parents=True, exist_ok=True)
        self._csv = RecordsCsv(self.out_dir / "records.csv")
        self._stream: RowStream | None = None  # the rows of the point under way
        self._figure: WarmChild | None = None  # the process that draws the figure, once a point is large
        self._drawn: Callable[[bool], bool] | None = None  # ... once it has the summaries

    def __enter__(self) -> "PointWriter":
        self._csv.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._stream is not None:
            self._stream.abandon()
            self._stream = None
        if exc[0] is not None:  # else the figure's child waits for `finish`
            self.release()
        self._csv.__exit__(*exc)

    def release(self) -> None:
        """Ends the child that waits to draw the figure (or draws it), if `finish` did not come."""
        if self._figure is not None:
            self._figure.abandon()
            self._figure = None
        if self._drawn is not None:
            self._drawn(True)
            self._drawn = None

    def _figure_drawing(self) -> tuple[Callable, Path]:
        """The figure of the scenario's workload: the function that draws it and its PNG."""
        if self.scenario.workload.kind == "agents":
            return figures.write_figure6, self.out_dir / "figure6.png"
        return figures.write_exp21_figure, self.out_dir / "exp21.png"

    def row_stream(self, point: Any) -> RowStream:
        """The next point's RecordBuilder `on_flush`: its rows written while it is simulated (a
        large point; RowStream), handed over with its result to `write_point`."""
        if self._stream is not None:
            self._stream.abandon()
        early = self._early_trace(point) if len(self.summaries) == self.trace_index else None
        digest = None
        if self.scenario.workload.kind == "agents" and self.given is None:
            from .point_digest import PointDigest

            digest = PointDigest(self.scenario, point, self._baseline_path(point))
        self._stream = RowStream(self._csv, self._prepare_figure, early, digest)
        return self._stream

    def _baseline_path(self, point: Any) -> Path:
        return self.out_dir / "baselines" / f"{point.label}.json"

    def _early_trace(self, point: Any) -> Callable[["RecordBuilder"], Callable[[bool], bool] | None]:
        """The trace point's trace.json written during its run, by a forked child (`run_aside`), as
        soon as its records already hold the trace's: the trace shows the first TRACE_MAX_RECORDS
        records in (agent, ...) order, so once agents 0 .. k - 1 are done (no record of theirs is
        still to come) and have that many records, the trace is theirs whatever the run does next.
        At the lowest priority (DURING_RUN_NICE): the run goes on meanwhile.
        Tried at each flush of a streamed (large) point; an agent-less point never qualifies."""
        def start(builder: "RecordBuilder") -> Callable[[bool], bool] | None:
            agents = builder.complete_agents
            if not agents or builder.count_agents_below(agents) < TRACE_MAX_RECORDS:
                return None

            def write() -> None:
                self._write_trace(point, trace_records(builder.agents_below(agents)))

            return run_aside(write, DURING_RUN_NICE)

        return start

    def _prepare_figure(self) -> None:
        """A large scenario: its figure is drawn by a child forked now, which imports and warms
        matplotlib on the other core while the points are simulated (`finish` hands it the summaries)."""
        if self._figure is None:
            self._figure = WarmChild(figures.prepare, PREPARE_NICE)

    def write_point(self, point_result: "PointResult") -> dict[str, Any]:
        """One point's summary (returned), baseline JSON and rows of records.csv (and trace.json, for
        the trace point). A large point's rows and baseline are written by child processes: its
        rows while it is simulated (`row_stream`), its baseline's runs while this process computes
        its summary (handed to the child for the baseline's last blocks) and trace."""
        i = len(self.summaries)
        workload = self.scenario.workload.kind
        records = point_result.records
        baseline = self._baseline_path(point_result.point)
        baseline_child = None
        stream, self._stream = self._stream, None
        early_trace = stream.early_done if stream is not None else None  # its trace, begun during its run
        if early_trace is not None:
            stream.early_done = None
        try:
            # its summary and baseline: digested by the child that wrote its rows while it ran
            digesting = stream is not None and stream.digesting
            digested = stream.summary(point_result) if digesting else None
            # its rows: written while it ran, else now on another core where it can
            csv_done = (stream.done(records) if stream is not None else None) or self._csv.write_aside(records)
        except BaseException:
            if stream is not None:
                stream.abandon()
            if early_trace is not None:
                early_trace(True)
            raise
        trace_done = self._trace_aside(point_result.point, records, early_trace) if i == self.trace_index else None
        try:
            frame = point_phases = None
            if digested is None:
                frame = records_frame(records, metrics.SUMMARY_COLUMNS)  # the columns summaries read
                point_phases = metrics.agent_phases(frame) if workload == "agents" else None
            if digesting:
                pass  # its baseline: the child's; if it failed, written here once it has ended (below)
            elif len(records) >= self._csv.aside_rows:
                def write_baseline(summaries: Iterator[dict[str, Any]], frame=frame, phases=point_phases) -> None:
                    _write_baseline(baseline, baseline_runs_document(point_result, self.scenario, frame, phases),
                                    lambda document: with_summary(document, point_result, self.scenario, next(summaries)))

                baseline_child = PipedChild(write_baseline, AFTER_RUN_NICE)
                del write_baseline  # it holds the frame
                if not baseline_child.started:
                    baseline_child = None
            summary = (digested if digested is not None else self.given[i] if self.given is not None
                       else point_summary(point_result, workload, frame, point_phases))
            if digesting:
                pass
            elif baseline_child is None:
                _write_baseline(baseline, baseline_document(point_result, self.scenario, frame, summary, point_phases))
            else:
                baseline_child.send(summary)  # False: the child failed, and says so when it ends
            if i == self.points - 1:
                self._draw_aside([*self.summaries, summary])
            del frame, point_phases
            if i == self.trace_index and trace_done is None:
                self._write_trace(point_result.point, trace_records(records))
        except BaseException:
            csv_done(True)
            if trace_done is not None:
                trace_done(True)
            if baseline_child is not None:
                baseline_child.abandon()
            raise
        try:
            finished = csv_done(False)
        except BaseException:
            if trace_done is not None:
                trace_done(True)
            raise
        if trace_done is not None:
            trace_done(False)
        if digesting and (digested is None or not finished):
            # the digest failed, or the child after it: the baseline written here, as without one
            frame = records_frame(records, metrics.SUMMARY_COLUMNS)
            point_phases = metrics.agent_phases(frame)
            _write_baseline(baseline, baseline_document(point_result, self.scenario, frame, summary, point_phases))
        if baseline_child is not None:
            child, delivered = baseline_child.finish()
            if not child(False) or not delivered:
                # the child failed: written again here, where a failure is reported as usual
                frame = records_frame(records, metrics.SUMMARY_COLUMNS)
                point_phases = metrics.agent_phases(frame) if workload == "agents" else None
                _write_baseline(baseline, baseline_document(point_result, self.scenario, frame, summary, point_phases))
        self.summaries.append(summary)
        self.written.append(baseline)
        return summary

    def _draw_aside(self, summaries: list[dict[str, Any]]) -> None:
        """Every point's summary is known (bands, added later, are not drawn): the child that
        prepared matplotlib draws the figure now."""
        if self._figure is not None:
            figure, self._figure = self._figure, None
            draw, png = self._figure_drawing()
            self._drawn = figure.call(draw, summaries, list(self.scenario.backends), png)

    def _trace_aside(self, point: Any, records: "RecordTable",
                     early: Callable[[bool], bool] | None = None) -> Callable[[bool], None] | None:
        """trace.json of a large point written by a forked child (`run_aside`) while this process
        computes the point's summary, or by the one `early` started during its run
        (`_early_trace`); `done(abandon)` waits for it (with abandon, ends it) and writes the trace
        here if the child failed, where a failure is reported as usual. None for a small point, or
        where it cannot fork: written here after the summary, as before."""
        def write() -> None:
            self._write_trace(point, trace_records(records))

        if early is not None:
            def done(abandon: bool = False) -> None:
                if not early(abandon) and not abandon:
                    write()
        elif len(records) < self._csv.aside_rows:
            return None
        else:
            done = aside_or_again(write, nice=AFTER_RUN_NICE)
        if done is not None:
            self._traced = self.out_dir / "trace.json"
        return done

    def _write_trace(self, point: Any, records: "list[Record]") -> None:
        self._traced = write_trace(records, self.out_dir / "trace.json", pid=point.index + 1, process_name=point.label,
                                   metadata={"scenario": self.scenario.name, "point": point.label})

    def finish(self, result: "SimulationResult", bands: list[dict[str, Any]] | None = None,
               ) -> tuple[list[Path], list[dict[str, Any]]]:
        """The outputs of the whole scenario (after every point); returns (paths written, summaries)."""
        scenario, summaries, out_dir = self.scenario, self.summaries, self.out_dir
        workload = scenario.workload.kind
        if bands is not None:
            for summary, point_bands in zip(summaries, bands):
                summary["bands_p10_p90"] = point_bands
        written = [*self.written, self._csv.path]
        claims = claims_mod.evaluate_claims(summaries, workload, result)
        draw, png = self._figure_drawing()
        # the figure: by the child that prepared matplotlib while the points ran (a large scenario; it
        # had the summaries with the last point's), else here
        drawn, self._drawn = self._drawn, None
        if drawn is None:
            draw(summaries, list(scenario.backends), png)
        written += figures.saved_paths(png)
        try:
            if workload == "agents":
                written.append(_write_text(out_dir / "table2.md", claims_mod.table2_markdown(summaries)))
                written.append(_write_text(out_dir / "table2.csv", claims_mod.table2_csv(summaries)))
            written.append(_write_text(out_dir / "claims.md", claims_mod.claims_markdown(summaries, workload, claims)))
            written.append(self._traced)
            written.append(_write_json(out_dir / "summary.json", {
                "scenario": scenario.name,
                "workload": workload,
                "seed": scenario.seed,
                "warnings": list(result.warnings),
                "points": summaries,
                "claims": [c.as_dict() for c in claims],
            }))
        except BaseException:
            if drawn is not None:
                drawn(True)
            raise
        if drawn is not None and not drawn(False):  # the child failed: drawn again here, where a failure is reported
            draw(summaries, list(scenario.backends), png)
        return written, summaries


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def summary_rows(result: "SimulationResult", summaries: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per point for the terminal: label, backend, model, gpu, link_gbps, n_agents, latency
    (per-token for decode, per phase for agents: mean_ms and p99_ms), payload mb_up / mb_down (per run
    for decode, per agent phase for agents), oom."""
    summaries = summaries if summaries is not None else point_summaries(result)
    rows = []
    for s in summaries:
        if "decode" in s:
            d = s["decode"]
            mean_ms, p99_ms = d["mean_per_token_ms"], d["p99_per_token_ms"]
            up, down, unit = d["mean_bytes_up"], d["mean_bytes_down"], "per_token"
        else:
            a = s["agents"]
            mean_ms, p99_ms = a["pooled"]["mean_ms"], a["pooled"]["p99_ms"]
            up, down, unit = a["mean_bytes_up"], a["mean_bytes_down"], "per_phase"
        rows.append({
            "label": s["label"], "backend": s["backend"], "model": s["model"], "gpu": s["gpu"],
            "link_gbps": s["link_gbps"], "n_agents": s["n_agents"],
            "latency": unit, "mean_ms": mean_ms, "p99_ms": p99_ms,
            "mb_up": None if up is None else up / metrics.BYTES_PER_MB,
            "mb_down": None if down is None else down / metrics.BYTES_PER_MB,
            "oom": s["oom"], "cost_model": s.get("cost_model", ""),
        })
    return rows


def print_summary(result: "SimulationResult", console: Any, summaries: list[dict[str, Any]] | None = None) -> None:
    """A short rich table, one row per point; a column whose value every point shares goes to the title."""
    from rich.table import Table

    rows = summary_rows(result, summaries)
    decode = result.scenario.workload.kind != "agents"
    shared, varying = [], []
    for key, heading in (("model", "model"), ("gpu", "GPU"), ("link_gbps", "Gbps"), ("n_agents", "N"),
                         ("cost_model", "cost model")):
        values = {row[key] for row in rows}
        if len(values) > 1:
            varying.append((key, heading))
        elif key != "n_agents" or not decode:
            value = next(iter(values), None)
            shared.append(f"{value:g} Gbps" if key == "link_gbps" else f"N={value}" if key == "n_agents"
                          else f"{value} cost model" if key == "cost_model" and "cost model" not in str(value)
                          else str(value))
    what = ("per-token latency, payload MB per run" if decode
            else "per-phase latency (REASON+REFLECT), payload MB per phase")
    table = Table(title=f"{result.scenario.name} ({', '.join(shared)}): {what}")
    table.add_column("backend")
    for _, heading in varying:
        table.add_column(heading, justify="right" if heading in ("Gbps", "N") else "left")
    for heading in ("mean ms", "p99 ms", "MB up", "MB down"):
        table.add_column(heading, justify="right")
    table.add_column("OOM", justify="center")
    # several cost models: a short name in the column (the GPU column tells two measured ones apart),
    # each one's whole description under the table, so the rows stay one line each
    legend = dict.fromkeys(row["cost_model"] for row in rows) if ("cost_model", "cost model") in varying else {}
    for row in rows:
        cells = [row["backend"], *(f"{row[k]:g}" if k == "link_gbps" else _short_cost_model(row[k]) if k == "cost_model"
                                   else str(row[k]) for k, _ in varying)]
        cells += [_cell(row["mean_ms"]), _cell(row["p99_ms"]), _cell(row["mb_up"]), _cell(row["mb_down"])]
        table.add_row(*cells, "[red]OOM[/]" if row["oom"] else "")
    console.print(table)
    for full in legend:
        console.print(full, highlight=False, markup=False)


def _short_cost_model(description: str) -> str:
    """'measured cost model: X on GPU' -> 'measured' (the kind: measured, transferred, roofline)."""
    head, sep, _ = str(description).partition(" cost model")
    return head if sep else str(description)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
