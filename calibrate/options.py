"""The calibrate command line as options, for the profile's record of how it was made."""

from __future__ import annotations

from pathlib import Path

DEFAULTS = {"gpu": 0, "device": "cuda", "model": "llama-2-7b", "dtype": None, "weights": "random",
            "quick": False, "oom_probe": False, "out": None, "refit": None,
            "leave_out": None, "level_from": None, "level_point": None, "loopback_path": False,
            "loads_from": None}


CPU_MODEL = "tiny-llama"  # the only bundled model a CPU calibrates in minutes
CPU_PROFILE_NOTE = ("measured on a CPU (--device cpu): a profile for testing the calibrate and validate pipeline; "
                    "its times are not predictions for any GPU")


def default_model(device: str) -> str:
    """--model's default: tiny-llama on the CPU, llama-2-7b on a GPU."""
    return CPU_MODEL if device == "cpu" else DEFAULTS["model"]


def command_line(**options: object) -> str:
    """`djinnsim calibrate` with every option that differs from its default (flags as flags)."""
    parts = ["djinnsim", "calibrate"]
    if options.get("refit") is not None:  # a refit measures nothing: the other options do not apply
        options = {k: options.get(k) for k in ("refit", "out", "leave_out", "level_from", "level_point", "loopback_path",
                                            "loads_from")}
    for name, value in options.items():
        if value == DEFAULTS.get(name, object()) and name not in ("gpu", "model"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                parts.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                parts += [flag, str(item)]
        elif value is not None:
            parts += [flag, str(value) if not isinstance(value, Path) else value.as_posix()]
    return " ".join(parts)
