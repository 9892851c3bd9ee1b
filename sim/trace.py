"""A Chrome trace (Trace Event Format, opens in Perfetto / chrome://tracing) of one point's records.

Per record: one complete event ("ph": "X") named `phase/step` spanning the request, with one
nested child per non-zero duration field, in the order connect, uplink, queue, load, copy,
compute, downlink, starting at `issued_at`. The fields add up to the latency by construction,
so the children tile their parent. OOM records get an instant event ("ph": "i") instead.
Processes are backends (pid = the point index + 1, named by process_name metadata); threads are
agents (tid = agent + 1, named "agent k"). Times are microseconds rounded to nanoseconds so the
file is byte-identical for identical records.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Iterable

from .outputs import write_json, write_text_whole
from .records import DURATION_FIELDS, Record

US_PER_S = 1e6
_DECIMALS = 3  # of a microsecond: 1 ns


def _us(seconds: float) -> float:
    return round(seconds * US_PER_S, _DECIMALS)


def record_events(record: Record, pid: int) -> list[dict[str, Any]]:
    tid = record.agent + 1
    name = f"{record.phase}/{record.step}"
    args = {
        "run": record.run,
        "status": record.status,
        "context_tokens": record.context_tokens,
        "input_tokens": record.input_tokens,
        "new_tokens": record.new_tokens,
        "bytes_up": record.bytes_up,
        "bytes_down": record.bytes_down,
        "gpu_mem_bytes": record.gpu_mem_bytes,
    }
    if record.status == "oom":
        return [{"name": f"OOM {name}", "ph": "i", "s": "t", "ts": _us(record.finished_at),
                 "pid": pid, "tid": tid, "cat": record.phase, "args": args}]
    children = []
    cursor_s = 0.0
    for field in DURATION_FIELDS:
        duration_s = getattr(record, field)
        if duration_s <= 0:
            continue
        children.append({"name": field.removesuffix("_s"), "ph": "X", "ts": _us(record.issued_at + cursor_s),
                         "dur": _us(duration_s), "pid": pid, "tid": tid, "cat": record.phase})
        cursor_s += duration_s
    parent = {"name": name, "ph": "X", "ts": _us(record.issued_at), "dur": _us(record.latency_s),
              "pid": pid, "tid": tid, "cat": record.phase, "args": args}
    return [parent, *children]


def _in_order(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (r.agent, r.issued_at, r.run, r.step, r.phase))


def _head_events(records: list[Record], pid: int, process_name: str) -> list[dict[str, Any]]:
    """The process's and each agent's name (metadata events), before the records' events."""
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": process_name}}
    ]
    for agent in sorted({r.agent for r in records}):
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": agent + 1,
                       "args": {"name": f"agent {agent}"}})
    return events


def trace_events(records: Iterable[Record], pid: int, process_name: str) -> list[dict[str, Any]]:
    records = _in_order(records)
    events = _head_events(records, pid, process_name)
    for record in records:
        events.extend(record_events(record, pid))
    return events


_JSON = {"sort_keys": True, "separators": (",", ":")}
_EVENTS_MARK = "\x00events\x00"  # stands for the event list while the rest of the document is encoded
_BLOCK = 1000  # records whose events are encoded at once


# One record's events as json.dumps(record_events(...), **_JSON) writes them (keys sorted, ints and
# floats as repr), for a record that finished (an OOM goes through record_events and json.dumps)
_PARENT_JSON = ('{"args":{"bytes_down":%r,"bytes_up":%r,"context_tokens":%r,"gpu_mem_bytes":%r,"input_tokens":%r,'
                '"new_tokens":%r,"run":%r,"status":%s},"cat":%s,"dur":%r,"name":%s,"ph":"X","pid":%r,"tid":%r,"ts":%r}')
_CHILD_JSON = '{"cat":%s,"dur":%r,"name":%s,"ph":"X","pid":%r,"tid":%r,"ts":%r}'
_CHILD_NAMES = tuple((field, json.dumps(field.removesuffix("_s"))) for field in DURATION_FIELDS)
_json_text = functools.lru_cache(maxsize=4096)(json.dumps)


def _events_json(records: list[Record], pid: int) -> str:
    """The records' events as json.dumps(their record_events, **_JSON) writes the list, brackets
    left out, from one %-format per event instead of a dict each; ValueError for a value that is
    not finite (as json.dumps with allow_nan=False), TypeError for one that is not a plain number."""
    parts = []
    for record in records:
        if record.status == "oom":
            parts.append(json.dumps(record_events(record, pid), allow_nan=False, **_JSON)[1:-1])
            continue
        ints = (record.bytes_down, record.bytes_up, record.context_tokens, record.gpu_mem_bytes, record.input_tokens,
                record.new_tokens, record.run, pid, record.agent)
        if not all(type(value) is int for value in ints):
            raise TypeError("a trace field is not an int")
        tid = record.agent + 1
        issued_at = record.issued_at
        cat = _json_text(record.phase)
        floats = [round(issued_at * US_PER_S, _DECIMALS), round(record.latency_s * US_PER_S, _DECIMALS)]  # _us
        events = [_PARENT_JSON % (*ints[:7], _json_text(record.status), cat, floats[1],
                                  _json_text(f"{record.phase}/{record.step}"), pid, tid, floats[0])]
        cursor_s = 0.0
        for field, name in _CHILD_NAMES:
            duration_s = getattr(record, field)
            if duration_s <= 0:
                continue
            ts, dur = round((issued_at + cursor_s) * US_PER_S, _DECIMALS), round(duration_s * US_PER_S, _DECIMALS)
            floats += (ts, dur)
            events.append(_CHILD_JSON % (cat, dur, name, pid, tid, ts))
            cursor_s += duration_s
        if not all(type(value) is float for value in floats):
            raise TypeError("a trace time is not a float")
        if not all(map(math.isfinite, floats)):
            raise ValueError("a trace time is not finite")
        parts.append(",".join(events))
    return ",".join(parts)


def write_trace(records: Iterable[Record], path: Path, *, pid: int, process_name: str,
                metadata: dict[str, Any] | None = None) -> Path:
    """The trace document ({"traceEvents": [...], "displayTimeUnit": "ms", "otherData": metadata})
    as write_json writes it, its events encoded _BLOCK records at a time: the text is the same,
    without every event's dict held at once (the largest memory of a run with a 20,000-record
    trace). A document with a NaN or an infinity goes through write_json whole (null for them)."""
    records = _in_order(records)
    document = {"traceEvents": _EVENTS_MARK, "displayTimeUnit": "ms", "otherData": metadata or {}}
    try:
        parts = [json.dumps(_head_events(records, pid, process_name), allow_nan=False, **_JSON)[1:-1]]
        for start in range(0, len(records), _BLOCK):
            parts.append(_events_json(records[start:start + _BLOCK], pid))
        head, tail = json.dumps(document, allow_nan=False, **_JSON).split(json.dumps(_EVENTS_MARK))
    except (ValueError, TypeError):
        document["traceEvents"] = trace_events(records, pid, process_name)
        return write_json(path, document, **_JSON)
    return write_text_whole(path, head + "[" + ",".join(part for part in parts if part) + "]" + tail + "\n")
