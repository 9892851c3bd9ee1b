"""Where a result came from: the simulator's version and the profile's path and content hash.

Written beside every run (provenance.json) and into every validation report, so a figure can be
traced to the exact code and calibration that produced it, and a validation can show that its
profile was frozen before its real runs started.
"""

from __future__ import annotations

import hashlib
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The code whose changes move simulated figures.
MODEL_PATHS = ("sim", "calibrate/fitting.py", "calibrate/profile_builder.py", "calibrate/refit.py",
               "calibrate/spread.py")
ROOT = Path(__file__).resolve().parent.parent


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def package_version() -> str:
    try:
        return version("djinnsim")
    except PackageNotFoundError:
        return "not installed"


def simulator() -> dict:
    """{"package", "commit", "commit_at", "model_commit", "model_commit_at", "dirty"}: the package
    version and, in a git checkout, HEAD and the last commit that changed the model's code
    (MODEL_PATHS) with their commit times; without git only the package version."""
    out: dict = {"package": package_version(), "commit": None, "commit_at": None, "model_commit": None,
                 "model_commit_at": None, "dirty": None}
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != ROOT:  # installed: a git checkout above site-packages is not ours
        return out
    head = _git("log", "-1", "--format=%H %cI")
    if head is None:
        return out
    out["commit"], out["commit_at"] = head.split(" ", 1)
    model = _git("log", "-1", "--format=%H %cI", "--", *MODEL_PATHS)
    if model is not None:
        out["model_commit"], out["model_commit_at"] = model.split(" ", 1)
    out["dirty"] = bool(_git("status", "--porcelain", "--", *MODEL_PATHS))
    return out


def describe_simulator(sim: dict) -> str:
    """One line: 'djinnsim 0.1.0, model code as of commit abc1234 (2026-...)' (+ uncommitted changes)."""
    text = f"djinnsim {sim['package']}"
    if sim.get("model_commit"):
        text += f", model code as of commit {sim['model_commit'][:10]} ({sim['model_commit_at']})"
        if sim.get("dirty"):
            text += " plus uncommitted changes"
    return text


def profile_record(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    return {"path": str(path), "sha256": file_sha256(path)}


def provenance(profile_paths: list[str | Path], cost_models: list[str] | None = None) -> dict:
    """What provenance.json holds: the simulator, every profile the run read, the cost models used."""
    return {"simulator": simulator(), "profiles": [profile_record(p) for p in profile_paths],
            "cost_models": sorted(set(cost_models or []))}
