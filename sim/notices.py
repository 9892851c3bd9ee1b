"""Warnings in plain words: what happened and what it means for the result, each said once.

The simulator collects warnings as sentences (never a Python dict or repr); `emit` prints each one
once, on stderr, so stdout keeps only what a command answers (a table, `--json`).
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

_WORDS = {"prompt_tokens": "prompt tokens", "context": "context tokens", "tokens": "tokens in the pass",
          "batch": "batch", "processes": "processes"}


def fit_inputs(inputs: dict[str, float]) -> str:
    """`{'prompt_tokens': 16, 'batch': 1}` as `16 prompt tokens, batch 1`."""
    parts = []
    for key, value in inputs.items():
        number = f"{value:g}" if isinstance(value, float) else str(value)
        words = _WORDS.get(key, key.replace("_", " "))
        parts.append(f"{words} {number}" if key == "batch" else f"{number} {words}")
    return ", ".join(parts)


def outside_calibration(item: str, where: str) -> str:
    return (f"the profile never measured {item}, so the cost there is extrapolated from its fit and carries an "
            f"error the calibration did not measure ({where})")


def roofline_fallback(model_id: str, gpu_name: str) -> str:
    return (f"no calibration profile was measured for {model_id}: its points use the analytic roofline model of "
            f"the {gpu_name} (datasheet peaks and assumed host costs), so their times are estimates, not "
            "predictions from measurements; compare them only with other roofline points")


def cpu_profile(path: str) -> str:
    return (f"the profile {path} was measured on a CPU: it tests the pipeline, and its times are not "
            "predictions for any GPU")


def once(warnings: Iterable[str]) -> list[str]:
    """Each warning once, in the order first given."""
    return list(dict.fromkeys(warnings))


def emit(warnings: Iterable[str], stream: TextIO | None = None) -> None:
    """Print each warning once, on stderr (or `stream`), as `warning: ...`."""
    stream = stream or sys.stderr
    for warning in once(warnings):
        print(f"warning: {warning}", file=stream)
