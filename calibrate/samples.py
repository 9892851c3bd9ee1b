"""Raw calibration samples: one row per timed repetition (or telemetry reading), written as CSV.

The profile keeps fits and summaries; this file keeps every number they came from, so a fit can be
redone or questioned later. It is rewritten after every stage, so an interrupted run keeps its data.
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = [
    "stage",
    "point",
    "rep",
    "batch",
    "prompt_tokens",
    "context",
    "sum_context",
    "nbytes",
    "concurrent",
    "value",
    "unit",
]


class SampleLog:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, object]] = []

    def add(self, stage: str, point: str, value: float, unit: str = "s", rep: int = 0, **params: float) -> None:
        unknown = set(params) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown sample columns {sorted(unknown)}")
        self.rows.append({"stage": stage, "point": point, "rep": rep, "value": value, "unit": unit, **params})

    def add_timing(self, stage: str, point: str, samples_s: list[float], **params: float) -> None:
        for rep, value in enumerate(samples_s):
            self.add(stage, point, value, "s", rep, **params)

    def flush(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})
        tmp.replace(self.path)
