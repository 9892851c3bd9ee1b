"""Held out or in-sample: whether a validation's figures are predictions or fits.

A figure is held out when nothing that produced its simulated side saw the real runs it is judged
on: the profile was frozen (its sha256 recorded) before the first real run, its fits hold none of
those runs nor calibrate's own runs of the same workload, and the simulator's model code is not
newer than the runs. Otherwise it is in-sample, and the report says why:

- `workload`: the decode fit holds calibrate's own Exp 2.1 runs (`exp21_step` samples: batch-1
  decode of the 72-token prompt, 50 tokens, on the same machine minutes before) and the point is
  that workload. A live validation of it therefore judges with the profile refitted without those
  samples (`held_out_profile`), which leaves its measured step-time distribution (median-normalized
  shape, not level) as it is.
- `profile`: the profile's sha256 was not recorded before the real runs started, or the profile
  now used is not that one (a refit, another calibration).
- `simulator`: an offline re-comparison whose model code (sim.provenance.MODEL_PATHS) was committed
  after the real runs started, or whose commit is unknown: its cost models and mechanisms may have
  been designed on these very runs.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from djinnsim.sim.profile import LinearFit, Profile, samples_path
from djinnsim.sim.scenario import DecodeWorkload, Scenario

from .compare import HELD_OUT, IN_SAMPLE

EXP21_STAGE = "exp21_step"
EXP21_PROMPT_TOKENS = 72  # calibrate.plan's Exp 2.1 workload (batch 1); calibrate.plan is not imported: torch-free


def is_exp21_workload(scenario: Scenario) -> bool:
    w = scenario.workload
    return isinstance(w, DecodeWorkload) and w.batch == 1 and w.prompt_tokens == EXP21_PROMPT_TOKENS


def _samples(profile: Profile, path: Path) -> list[dict[str, str]] | None:
    file = samples_path(profile, path)
    if file is None:
        return None
    from djinnsim.calibrate.refit import read_samples  # one line for an unreadable or damaged file

    return read_samples(file)


def has_samples(profile: Profile, path: Path) -> bool:
    """Whether the profile's own samples file lies beside it (another calibration's is refused)."""
    return samples_path(profile, path) is not None


def decode_fit_holds_exp21(profile: Profile, path: Path) -> bool:
    """Whether the profile's decode fit used calibrate's own Exp 2.1 runs. Recorded in the spread
    section when there is one; else the fit's sample count beside the decode grid's points tells;
    with neither, the answer is yes if the profile measured Exp 2.1 at all (the cautious reading)."""
    rows = _samples(profile, path)
    if rows is not None and not any(r["stage"] == EXP21_STAGE for r in rows):
        return False
    if profile.spread is not None:
        return EXP21_STAGE not in profile.spread.left_out
    if rows is not None:
        fit = profile.decode_step
        pieces = [fit] if isinstance(fit, LinearFit) else fit.pieces
        grid = {r["point"] for r in rows if r["stage"] == "decode" and r["unit"] == "s"}
        return sum(p.n_samples for p in pieces) > len(grid)
    return "exp21.runs" in profile.end_to_end


def held_out_profile(path: Path, out_dir: Path) -> Path:
    """The profile refitted from its samples with calibrate's Exp 2.1 runs left out of every fit
    (and of its spread), written to out_dir/<stem>-heldout.json beside a copy of the samples."""
    from djinnsim.calibrate.refit import refit_file

    target = Path(out_dir) / f"{Path(path).stem}-heldout.json"
    refit_file(Path(path), target, command="djinnsim validate (held out for Exp 2.1)", left_out=(EXP21_STAGE,))
    return target


def _parse(stamp: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp) if stamp else None
    except ValueError:
        return None


CONDITIONED_NOTE = "conditioned on the real runs' level"


def reasons(scenario: Scenario, profile: Profile, profile_path: Path, profile_sha256: str,
            frozen_sha256: str | None, runs_started_at: str | None, simulator: dict | None) -> list[str]:
    """Why the figures of this validation are in-sample (empty: held out). `frozen_sha256`: the
    profile hash recorded before the real runs (None: not recorded); `simulator`: the offline
    re-comparison's sim.provenance.simulator() (None: a live validation, whose code ran as it was)."""
    out = []
    if is_exp21_workload(scenario) and decode_fit_holds_exp21(profile, profile_path):
        out.append("workload: the decode fit holds calibrate's own Exp 2.1 runs of this workload "
                   "(same machine, minutes before the scored runs)")
    if frozen_sha256 is None:
        out.append("profile: no hash of the profile was recorded before the real runs")
    elif frozen_sha256 != profile_sha256:
        out.append("profile: not the profile frozen before the real runs (a refit or another calibration)")
    if any(note.startswith(CONDITIONED_NOTE) for note in profile.metadata.notes):
        out.append("profile: its passes were scaled to the level the runs judged here met (--condition-on-level)")
    if simulator is not None:
        committed, started = _parse(simulator.get("model_commit_at")), _parse(runs_started_at)
        if committed is None or started is None:
            out.append("simulator: the model code's commit time is unknown, so it may postdate the runs")
        elif committed > started or simulator.get("dirty"):
            out.append(f"simulator: its model code ({(simulator.get('model_commit') or '')[:10]}, "
                       f"{simulator.get('model_commit_at')}{', plus uncommitted changes' if simulator.get('dirty') else ''})"
                       " is newer than these runs and may have been shaped by them")
    return out


def label(why: list[str]) -> str:
    return IN_SAMPLE if why else HELD_OUT
