"""One immutable record per finished request (a decode step, or an agent phase).

Every metric, figure and table is computed afterwards from the table of records. A point's records
are stored column-wise (`RecordTable`: a numpy column per field, fields equal for the whole point
kept once); iterating it gives immutable `Record` rows. The duration
fields of a record add up to its latency: connect, uplink, queue (waiting for the GPU or for
memory), load (weights), copy (host<->device), compute, downlink.
"""

from __future__ import annotations

import functools
import struct
from array import array
from collections import namedtuple
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, Callable, Iterable, Iterator

import numpy as np

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
    status: str  # ok | oom (no GPU memory) | rejected (over the server's admission limit)
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
    gpu_mem_bytes: int  # memory in use on its GPU when the request finished executing
    gpu_mem_peak_bytes: int  # highest memory in use on its GPU in the point so far
    # What the request found of its session's KV after ACT (KV_STATES): none (no session KV carried
    # over), resident, swapped (restored over PCIe in copy_s), discarded (by the KV policy) or
    # evicted (idle eviction); the last two re-prefill `recomputed_tokens` of context.
    kv_state: str = "none"
    recomputed_tokens: int = 0
    # Time the GPU ran this request's kernels (a pass's launch-bound host share and a new shape's
    # plan building left out; a batched step's kernel time split among its sequences, so the sum
    # over records is the time the GPU was busy). 0 where not known (a real run that did not time it).
    gpu_busy_s: float = 0.0
    node: int = 0  # the pool node whose GPU served it (scenario `cluster`)
    gpu_index: int = 0  # that GPU's index within its node

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.issued_at


RECORD_COLUMNS = tuple(f.name for f in fields(Record))


class RecordRow(namedtuple("RecordRow", RECORD_COLUMNS)):
    """A Record's values as a tuple, read by the same names (and `latency_s`): made by one C call,
    where a frozen Record sets its fields one Python call each (a 20,000-record trace reads
    this many rows; `RecordTable.take(..., light=True)`)."""

    __slots__ = ()

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.issued_at


_new_row = functools.partial(tuple.__new__, RecordRow)  # a RecordRow from the tuple of its values


POINT_COLUMNS = ("point", "backend", "model", "gpu", "link_gbps", "n_agents")  # one value per point
ROW_COLUMNS = tuple(c for c in RECORD_COLUMNS if c not in POINT_COLUMNS)
PHASES = ("decode", "reason", "reflect")
STATUSES = ("ok", "oom", "rejected")
KV_STATES = ("none", "resident", "swapped", "discarded", "evicted")
CODED_COLUMNS = {"phase": PHASES, "status": STATUSES, "kv_state": KV_STATES}  # stored as small integer codes
_FLOAT_COLUMNS = frozenset(f.name for f in fields(Record) if f.type == "float")
_BOOL_COLUMNS = frozenset({"warmup"})
_TEXT_COLUMNS = frozenset({"backend", "model", "gpu", *CODED_COLUMNS})


def _array_type(name: str) -> str:
    return "d" if name in _FLOAT_COLUMNS else "q"


def _compact(values: np.ndarray) -> np.ndarray | Any:
    """A column in the least memory that keeps every value exactly: one scalar when all are equal
    (no row varies), else the narrowest integer type that holds it (floats stay float64)."""
    bits = values.view(np.int64) if values.dtype == np.float64 else values  # -0.0 stays -0.0
    if len(values) and (bits == bits[0]).all():
        return values[0].item()
    if values.dtype.kind == "i" and len(values):
        low, high = int(values.min()), int(values.max())
        for dtype in (np.int8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return values.astype(dtype)
    return values.copy() if values.base is not None else values


_AGENT = ROW_COLUMNS.index("agent")
_ROW_DTYPE = np.dtype([(name, np.float64 if _array_type(name) == "d" else np.int64) for name in ROW_COLUMNS])
# One record's values as the bytes of one _ROW_DTYPE element (native order, no padding: both pack
# float64 and int64 fields back to back)
_ROW_STRUCT = struct.Struct("=" + "".join(_array_type(name) for name in ROW_COLUMNS))
assert _ROW_STRUCT.size == _ROW_DTYPE.itemsize
_pack_row = _ROW_STRUCT.pack  # a module global: read per record without an attribute lookup


class RecordBuilder:
    """Collects one point's records as they finish, a typed array per column (no object per record
    kept): the last few thousand wait as the bytes of a row each and move into the columns together."""

    flush_rows = 4096  # records held as rows before they go into the columns

    def __init__(self, point: int, backend: str, model: str, gpu: str, link_gbps: float, n_agents: int,
                 on_flush: Callable[["RecordBuilder"], None] | None = None) -> None:
        """`on_flush(builder)`: called each time records have moved into the columns (`rows_since`
        gives them), e.g. to write them out while the run goes on."""
        self.constants = {"point": point, "backend": backend, "model": model, "gpu": gpu,
                          "link_gbps": link_gbps, "n_agents": n_agents}
        self._columns = [array(_array_type(name)) for name in ROW_COLUMNS]
        self._rows: list[bytes] = []
        self._flush_at = self.flush_rows  # read per record: an instance attribute is the faster read
        self.on_flush = on_flush
        self.complete_agents = 0  # agents 0 .. complete_agents - 1 have all their records here
        self._finished_ahead: set[int] = set()  # agents done past that prefix

    def add(self, *values: float | int) -> None:
        """One record: the values of ROW_COLUMNS in order; phase, status and kv_state as codes
        (PHASES, STATUSES, KV_STATES)."""
        rows = self._rows
        try:
            # packed at once: the row's Python numbers are freed now, not a flush later
            rows.append(_pack_row(*values))
        except struct.error:  # a value struct does not take as it is (a float count): numpy's conversion
            rows.append(np.array([values], dtype=_ROW_DTYPE).tobytes())
        if len(rows) >= self._flush_at:
            self._flush()

    def finished(self, agent: int) -> None:
        """No more records of `agent` will come (its process ended): what `complete_agents` counts."""
        if agent != self.complete_agents:
            self._finished_ahead.add(agent)
            return
        agent += 1
        ahead = self._finished_ahead
        while agent in ahead:
            ahead.remove(agent)
            agent += 1
        self.complete_agents = agent

    def _flush(self) -> None:
        """The rows waiting, into the columns: one numpy record array over their bytes, then each
        field's bytes appended to its column."""
        if self._rows:
            block = np.frombuffer(b"".join(self._rows), dtype=_ROW_DTYPE)
            for column, name in zip(self._columns, ROW_COLUMNS):
                column.frombytes(block[name].tobytes())
            self._rows = []
            if self.on_flush is not None:
                self.on_flush(self)

    def __len__(self) -> int:
        return len(self._columns[0]) + len(self._rows)

    @property
    def flushed(self) -> int:
        """Records in the columns (the others wait as tuples)."""
        return len(self._columns[0]) if self._columns else 0

    def rows_since(self, start: int) -> "RecordTable":
        """The records in the columns from `start` on, as a table of their own (the point's
        constants, a copy of each column's part, not compacted: a short-lived table)."""
        columns = {name: np.frombuffer(column[start:], dtype=np.float64 if column.typecode == "d" else np.int64)
                   for name, column in zip(ROW_COLUMNS, self._columns)}
        return RecordTable(self.flushed - start, {**self.constants, **columns})

    def count_agents_below(self, agents: int) -> int:
        """How many records in the columns are of agents 0 .. `agents` - 1."""
        return int(np.count_nonzero(np.frombuffer(self._columns[_AGENT], dtype=np.int64) < agents))

    def agents_below(self, agents: int) -> "RecordTable":
        """The records in the columns of agents 0 .. `agents` - 1, in the order they came (a copy)."""
        table = self.rows_since(0)
        keep = table.column("agent") < agents
        return RecordTable(int(np.count_nonzero(keep)), {name: value[keep] if isinstance(value, np.ndarray) else value
                                                         for name, value in table._columns.items()})

    def table(self) -> "RecordTable":
        self._flush()
        columns = {}
        for name, column in zip(ROW_COLUMNS, self._columns):
            values = np.frombuffer(column, dtype=np.float64 if column.typecode == "d" else np.int64)
            columns[name] = _compact(values)
        self._columns = [array(c.typecode) for c in self._columns]
        return RecordTable(len(values) if ROW_COLUMNS else 0, {**self.constants, **columns})


class RecordTable:
    """A point's records, column-wise and immutable. `column(name)` is a numpy array (a field equal
    on every row is kept as one value and broadcast), `frame()` the pandas table; iteration and
    indexing give `Record` rows."""

    def __init__(self, length: int, columns: dict[str, Any]) -> None:
        self._length = length
        self._columns = columns

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> "RecordTable":
        rows = list(records)
        columns: dict[str, Any] = {}
        for name in RECORD_COLUMNS:
            values = [getattr(r, name) for r in rows]
            if name in CODED_COLUMNS:
                values = [CODED_COLUMNS[name].index(v) for v in values]
            if name in POINT_COLUMNS and values and all(v == values[0] for v in values):
                columns[name] = values[0]
            elif name in ("backend", "model", "gpu"):
                columns[name] = np.array(values, dtype=object)
            else:
                columns[name] = _compact(np.array(values, dtype=np.float64 if name in _FLOAT_COLUMNS else np.int64))
        return cls(len(rows), columns)

    def __len__(self) -> int:
        return self._length

    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A column as a numpy array (codes decoded to strings, integers as int64); rows
        start..stop only when given (only those rows are converted)."""
        value = self._columns[name]
        stop = self._length if stop is None else min(stop, self._length)
        length = max(stop - start, 0)
        if isinstance(value, np.ndarray) and (start or stop != self._length):
            value = value[start:stop]
        if name in CODED_COLUMNS:
            labels = np.array(CODED_COLUMNS[name], dtype=object)
            return labels[np.broadcast_to(np.asarray(value), (length,))]
        if not isinstance(value, np.ndarray):
            dtype = bool if name in _BOOL_COLUMNS else None
            return np.full(length, value, dtype=dtype if dtype else (object if isinstance(value, str) else None))
        if name in _BOOL_COLUMNS:
            return value.astype(bool)
        if value.dtype.kind == "i":
            return value.astype(np.int64)
        return value

    def constant(self, name: str) -> Any:
        """The value of a column equal on every row (decoded), else None."""
        value = self._columns[name]
        if isinstance(value, np.ndarray) or not self._length:
            return None
        if name in CODED_COLUMNS:
            return CODED_COLUMNS[name][value]
        return bool(value) if name in _BOOL_COLUMNS else value

    def codes(self, name: str) -> np.ndarray:
        """A coded column (phase, status, kv_state) as its integer codes."""
        return np.broadcast_to(np.asarray(self._columns[name], dtype=np.int64), (self._length,))

    def frame(self, columns: Iterable[str] | None = None):
        """The table as a pandas DataFrame, RECORD_COLUMNS then latency_s (pandas imported only here);
        only `columns` (in RECORD_COLUMNS' order, latency_s last) when given."""
        import pandas as pd

        wanted = RECORD_COLUMNS if columns is None else frozenset(columns)
        frame = pd.DataFrame({name: pd.Series(self.column(name), dtype=object) if name in _TEXT_COLUMNS
                              else self.column(name) for name in RECORD_COLUMNS if name in wanted}, copy=False)
        if columns is None or "latency_s" in wanted:
            frame["latency_s"] = frame["finished_at"] - frame["issued_at"]
        return frame

    def rows(self) -> Iterator[Record]:
        columns = [self.column(name).tolist() for name in RECORD_COLUMNS]
        for values in zip(*columns):
            yield Record(*values)

    def take(self, indices: np.ndarray, block: int = 2048, light: bool = False) -> Iterator[Record | RecordRow]:
        """The rows at `indices`, in that order: each column indexed once per `block` rows, not a
        row at a time (and not all of them at once: a column list of Python values per field).
        `light`: as RecordRow tuples (the same values), not Records."""
        indices = np.asarray(indices, dtype=np.int64)
        for start in range(0, len(indices), block):
            part = indices[start:start + block]
            columns = []
            for name in RECORD_COLUMNS:
                value = self._columns[name]
                if isinstance(value, np.ndarray):
                    value = value[part]
                columns.append(RecordTable(len(part), {name: value}).column(name).tolist())
            if light:
                yield from map(_new_row, zip(*columns))
                continue
            for values in zip(*columns):
                yield Record(*values)

    def __iter__(self) -> Iterator[Record]:
        return self.rows()

    def __getitem__(self, index: int) -> Record:
        if not -self._length <= index < self._length:
            raise IndexError(index)
        index %= self._length
        values = []
        for name in RECORD_COLUMNS:
            value = self._columns[name]
            if isinstance(value, np.ndarray):
                value = value[index].item()
            if name in CODED_COLUMNS:
                value = CODED_COLUMNS[name][value]
            elif name in _BOOL_COLUMNS:
                value = bool(value)
            values.append(value)
        return Record(*values)

    def __bool__(self) -> bool:
        return self._length > 0

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self._columns.values() if isinstance(v, np.ndarray))


def records_frame(records: "list[Record] | RecordTable", columns: Iterable[str] | None = None):
    """The table of records as a pandas DataFrame (pandas imported only here); only `columns` (and
    latency_s when named) of a RecordTable when given."""
    if isinstance(records, RecordTable):
        return records.frame(columns)
    import pandas as pd

    row = attrgetter(*RECORD_COLUMNS)
    frame = pd.DataFrame.from_records([row(r) for r in records], columns=list(RECORD_COLUMNS))
    frame["latency_s"] = frame["finished_at"] - frame["issued_at"]
    return frame
