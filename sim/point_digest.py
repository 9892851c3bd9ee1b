"""A large agents point's summary and baseline computed while it is simulated, in the child that
writes its records.csv (report.RowStream): what is left after its last event is the agents that
were still running, not the whole table.

Each (agent, iteration) row of the baseline and each (agent, iteration, phase) row of the summary's
phase table depends on that agent's records alone. At a flush of the point's records, agents
0 .. complete_agents - 1 have every record in the columns (RecordBuilder.finished), so their phases
and baseline runs are final: they are grouped (metrics.agent_phases, agent_iterations) and their
runs' entries written, a batch of agents at a time. The groups are those of the whole table (a
group's rows in the same order), so the summary and baseline are the same text as the parent
computes from the whole table (report.PointWriter.write_point's fall-back).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import metrics
from .records import _FLOAT_COLUMNS, ROW_COLUMNS, RecordTable

if TYPE_CHECKING:
    from .simulate import PointResult

# The columns kept of each record: what the summary and the baseline read (latency_s is derived)
_KEPT = tuple(name for name in ROW_COLUMNS if name in metrics.SUMMARY_COLUMNS)


class PointDigest:
    """Takes a point's records a table at a time (`add`), in the order of its RecordTable, with how
    many agents are complete; `summary(point_result)` at the end gives report.point_summary's
    dict, after which `finish_baseline(summary)` completes the baseline JSON at `path`. `valid` is
    False when a record came for an agent already digested (the summary must then come from the
    whole table)."""

    batch_rows = 8_192  # records of complete agents grouped at once

    def __init__(self, scenario: Any, point: Any, path: Path) -> None:
        self.scenario, self.point, self.path = scenario, point, Path(path)
        self.valid = True
        self._parts: dict[str, list[np.ndarray]] = {name: [] for name in _KEPT}  # every record so far
        self._pending: dict[str, np.ndarray] | None = None  # records of agents not yet digested
        self._digested = 0  # agents 0 .. _digested - 1 are grouped and their runs written
        self._phases: list[Any] = []  # agent_phases of each batch
        self._totals: list[Any] = []  # each batch's runs, the columns the aggregates read
        self._runs = 0  # runs (agent, iteration) so far, failed ones included
        self._listed = 0  # runs written to the baseline (no OOM, no rejection)
        self._file = None

    def add(self, table: RecordTable, complete_agents: int) -> None:
        if not self.valid or not len(table):
            return
        columns = {name: table.column(name) if name != "phase" and name != "status" else table.codes(name).copy()
                   for name in _KEPT}
        if int(columns["agent"].min()) < self._digested:
            self.valid = False
            self._close()
            return
        for name, values in columns.items():
            self._parts[name].append(values)
        pending = columns if self._pending is None else {
            name: np.concatenate([self._pending[name], values]) for name, values in columns.items()}
        done = pending["agent"] < complete_agents
        if np.count_nonzero(done) < self.batch_rows:
            self._pending = pending
            return
        self._pending = {name: values[~done] for name, values in pending.items()}
        self._digest({name: values[done] for name, values in pending.items()})
        self._digested = complete_agents

    def _digest(self, columns: dict[str, np.ndarray]) -> None:
        """Groups the records of a batch of complete agents and writes their runs."""
        from . import report

        frame = _table(columns).frame(metrics.SUMMARY_COLUMNS)
        phases = metrics.agent_phases(frame)
        if phases.empty:
            return
        runs = metrics.agent_iterations(frame, getattr(self.point.model, "weight_bytes", None), phases)
        ok_runs, ok_ids = report.ok_run_entries(runs, list(range(self._runs + 1, self._runs + len(runs) + 1)))
        if self._file is None:
            self._file = self.path.open("w")
            self._file.write(report.baseline_before_runs(report.baseline_head(self.point, self.scenario)))
        if ok_ids:
            self._file.write(("," if self._listed else "") + report._runs_json(ok_runs, ok_ids))
        self._phases.append(phases[list(metrics.AGENT_SUMMARY_PHASE_COLUMNS)])
        self._totals.append(runs[["total_ms", "per_token_ms", "oom", "rejected"]])
        self._runs += len(runs)
        self._listed += len(ok_ids)

    def summary(self, point_result: "PointResult") -> dict[str, Any] | None:
        """The point's summary once every record is added (None when not `valid`): the agents left
        are digested, then report.point_summary over the whole frame and the phases of every batch."""
        import pandas as pd

        from . import report

        if not self.valid:
            return None
        if self._pending is not None and len(self._pending["agent"]):
            self._digest(self._pending)
        self._pending = None
        columns = {}
        for name in _KEPT:  # a column at a time, its parts dropped as it is joined
            parts = self._parts.pop(name)
            if parts:
                columns[name] = np.concatenate(parts)
            del parts
        frame = _table(columns).frame(metrics.SUMMARY_COLUMNS)
        del columns
        if not self._phases:  # no phase at all: the whole table's (empty) table of phases
            phases = metrics.agent_phases(frame)
        else:
            phases = self._phases[0] if len(self._phases) == 1 else pd.concat(self._phases, ignore_index=True)
        self._phases = []
        return report.point_summary(point_result, "agents", frame, phases)

    def finish_baseline(self, point_result: "PointResult", summary: dict[str, Any]) -> None:
        """The baseline JSON completed: its aggregates and the blocks that quote the summary."""
        import pandas as pd

        from . import report

        if self._file is None:
            self._file = self.path.open("w")
            self._file.write(report.baseline_before_runs(report.baseline_head(self.point, self.scenario)))
        if self._totals:
            totals = self._totals[0] if len(self._totals) == 1 else pd.concat(self._totals, ignore_index=True)
        else:
            totals = metrics.agent_iterations(metrics.agent_phases(_table({}).frame(metrics.SUMMARY_COLUMNS)))
        entries = report.RunEntries(None, [], runs_measured=self._runs, runs_oom=self._runs - self._listed)
        document = {**report.baseline_head(self.point, self.scenario), "runs": entries,
                    "aggregates": report._aggregates(totals)}
        document = report.with_summary(document, point_result, self.scenario, summary)
        self._file.write(report.baseline_after_runs(document, self._listed > 0))
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _table(columns: dict[str, np.ndarray]) -> RecordTable:
    """Kept columns as a RecordTable (phase and status as codes), empty ones where none came."""
    length = len(columns["agent"]) if columns else 0
    return RecordTable(length, {name: columns.get(name, np.zeros(0, np.float64 if name in _FLOAT_COLUMNS else np.int64))
                                for name in _KEPT})
