"""Warnings in plain words: what happened and what it means for the result, each said once.

The simulator collects warnings as sentences (never a Python dict or repr); `emit` prints each one
once, on stderr, so stdout keeps only what a command answers (a table, `--json`).
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

_WORDS = {"prompt_tokens": "prompt tokens", "context": "context tokens", "tokens": "tokens in the pass",
          "sum_context": "context tokens over the batch",
          "batch": "batch", "processes": "processes"}


def fit_inputs(inputs: dict[str, float]) -> str:
    """`{'prompt_tokens': 16, 'batch': 1}` as `16 prompt tokens, batch 1`."""
    parts = []
    for key, value in inputs.items():
        number = f"{value:g}" if isinstance(value, float) else str(value)
        words = _WORDS.get(key, key.replace("_", " "))
        parts.append(f"{words} {number}" if key == "batch" else f"{number} {words}")
    return ", ".join(parts)


_COSTS = {"decode_step": "a decode step", "prefill": "a prefill", "cached_prefill": "a prefill after cached context"}


def outside_calibration(outside: dict[str, list[str]]) -> list[str]:
    """One warning per kind of cost asked outside what the profile measured. `outside` maps each
    query (`<cost> at <inputs>`, as CostModel.out_of_range holds it) to the points that asked it."""
    kinds: dict[str, list[str]] = {}
    for item in outside:
        kinds.setdefault(item.split(" at ", 1)[0], []).append(item)
    found = []
    for kind, items in kinds.items():
        labels = list(dict.fromkeys(label for item in items for label in outside[item]))
        where = labels[0] if len(labels) == 1 else f"{len(labels)} points, first {labels[0]}"
        first = items[0]
        if kind in _COSTS:
            first = f"{_COSTS[kind]} at {first.split(' at ', 1)[1]}" if " at " in first else _COSTS[kind]
        asked = first if len(items) == 1 else f"{first} and {len(items) - 1} more such queries"
        found.append(f"the profile never measured {asked}, so these costs are extrapolated from its fits and carry "
                     f"an error the calibration did not measure ({where})")
    return found


def roofline_fallback(model_id: str, gpu_name: str) -> str:
    return (f"no calibration profile was measured for {model_id}: its points use the analytic roofline model of "
            f"the {gpu_name} (datasheet peaks and assumed host costs), so their times are estimates, not "
            "predictions from measurements; compare them only with other roofline points")


def scheduler_across_processes(backend: str, own: str, override: str) -> str:
    return (f"server.scheduler: {override} replaces {backend}'s {own}, though its agents run in separate "
            "processes, each with its own model copy: no real GPU batches or queues separate processes as one "
            f"server does, so {backend}'s times here are not that design's")


def cpu_profile(path: str) -> str:
    return (f"the profile {path} was measured on a CPU: it tests the pipeline, and its times are not "
            "predictions for any GPU")


_LOADS_FROM_TAIL = ": its own stopped before them"


def loads_from(path: str, source: str, date: str | None, sections: list[str]) -> str:
    names = {"weight_load": "whole-model loads", "loads_mp": "k-process loads", "timeslice_mp": "k-process decoding"}
    return (f"the profile {path} carries its {', '.join(names[s] for s in sections)} from another calibration, "
            f"{source}" + (f" ({date})" if date else "") + _LOADS_FROM_TAIL)


def is_loads_from(note: str) -> bool:
    """Whether `note` is a loads_from notice (a report re-made on another profile says its own)."""
    return note.startswith("the profile ") and " from another calibration, " in note and note.endswith(_LOADS_FROM_TAIL)


def once(warnings: Iterable[str]) -> list[str]:
    """Each warning once, in the order first given."""
    return list(dict.fromkeys(warnings))


def emit(warnings: Iterable[str], stream: TextIO | None = None) -> None:
    """Print each warning once, on stderr (or `stream`), as `warning: ...`."""
    stream = stream or sys.stderr
    for warning in once(warnings):
        print(f"warning: {warning}", file=stream)
