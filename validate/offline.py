"""`djinnsim validate --from-real DIR`: compare a finished validation's real runs, read back from
its folder, with the simulator as it is now, on any machine (no GPU, no torch).

A validation folder holds everything the real side of the comparison needs: the validation
scenario as run (scenario.yaml), every real record with its repeat (records_real.csv, or
records_real.csv.gz as committed under docs/validation/), and in
validation.json the figures no record carries (NVML peak memory and utilization, the servers'
first-token stamps, the keep-alive OOM probe, the machine, the real runs' notes). They are put
back together as the RealResult the real runner returned, and the comparison and report code of a
live validation runs on it unchanged.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import IO

import numpy as np

from djinnsim.errors import DjinnsimError
from djinnsim.sim import notices
from djinnsim.sim.outputs import OutputFolder
from djinnsim.sim.profile import load_profile
from djinnsim.sim.provenance import simulator
from djinnsim.sim.records import RECORD_COLUMNS, Record
from djinnsim.sim.scenario import (
    AgentsWorkload,
    Point,
    Scenario,
    expand_points,
    load_scenario,
)
from djinnsim.sim.specs import get_model

from .pipeline import (
    OUT_OF_RANGE_NOTE,
    Machine,
    _say,
    _write_records,
    check_profile,
    compare_and_report,
    device_notes,
    profile_meta,
)
from .points import as_run_for_real
from .realrun import OomProbe, RealPointResult, RealResult, RepeatResult

FOLDER_FILES = ("scenario.yaml", "records_real.csv", "validation.json")
GZIP_SUFFIX = ".gz"  # committed reports keep their records gzipped: the tree sent to the GPU machine is capped


def records_file(folder: Path, name: str = "records_real.csv") -> Path | None:
    """A validation folder's records file `name`, plain or gzipped (`name`.gz); None when neither is there.
    Both at once is refused: one of them may be stale."""
    folder = Path(folder)
    found = [path for path in (folder / name, folder / f"{name}{GZIP_SUFFIX}") if path.is_file()]
    if len(found) > 1:
        raise DjinnsimError(f"{folder} holds both {name} and {name}{GZIP_SUFFIX}; keep one")
    return found[0] if found else None


def open_records(path: Path, binary: bool = False) -> IO:
    """A records file opened for the csv module (text, newline="") or as bytes, a gzipped one decompressed."""
    if Path(path).suffix == GZIP_SUFFIX:
        return gzip.open(path, "rb") if binary else gzip.open(path, "rt", newline="")
    return open(path, "rb") if binary else open(path, newline="")


@dataclass(frozen=True)
class OfflineRequest:
    from_real: Path
    calibration: Path | None = None
    out: Path | None = None
    quiet: bool = False
    command: str = "djinnsim validate --from-real"
    force: bool = False  # replace a non-empty --out holding an earlier djinnsim output
    bands: int = 10
    also_real: tuple[Path, ...] = ()  # more repeats of the same validation, run by later commands
    condition_on_level: bool = False  # in-sample diagnostic: the profile's passes scaled to the real runs' level


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DjinnsimError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or not all(key in doc for key in ("meta", "points", "oom")):
        raise DjinnsimError(f"{path} is not a validation report (no meta, points or oom)")
    return doc


# Record fields with a default, added after reports were written (older records_real.csv lack them).
_OPTIONAL = frozenset(f.name for f in fields(Record) if f.default is not MISSING)


def read_real_records(path: Path) -> dict[tuple[int, int], list[Record]]:
    """records_real.csv (or .csv.gz) back into Records, by (point index, repeat), in file order."""
    # The csv module and float(): every float comes back bit for bit (pandas' parser is exact
    # only from pandas 3), so latencies and means are the ones measured.
    types = {f.name: f.type for f in fields(Record)}
    casts = {"int": int, "float": float, "str": str, "bool": lambda v: v == "True"}
    out: dict[tuple[int, int], list[Record]] = {}
    try:
        with open_records(path) as handle:
            reader = csv.DictReader(handle)
            present = set(reader.fieldnames or [])
            missing = [c for c in ("repeat", *RECORD_COLUMNS) if c not in present and c not in _OPTIONAL]
            if missing:
                raise DjinnsimError(f"{path} lacks the columns {', '.join(missing)}")
            columns = [c for c in RECORD_COLUMNS if c in present]
            for row in reader:
                record = Record(**{name: casts[types[name]](row[name]) for name in columns})
                out.setdefault((record.point, int(row["repeat"])), []).append(record)
    except (OSError, EOFError, ValueError, csv.Error) as exc:  # gzip: BadGzipFile is an OSError, truncation EOFError
        raise DjinnsimError(f"cannot read {path}: {exc}") from None
    return out


def _real_values(point: dict, metric: str) -> list[float]:
    return list(point["metrics"].get(metric, {}).get("real_values") or [])


def real_result(doc: dict, scenario_v: Scenario, records: dict[tuple[int, int], list[Record]]) -> RealResult:
    """The real runs as the real runner returned them, from a validation folder's contents."""
    meta = doc["meta"]
    agents = isinstance(scenario_v.workload, AgentsWorkload)
    cuda = meta["machine"]["device"] == "cuda"
    by_index = {p.index: p for p in expand_points(scenario_v)}
    # Figures no record carries; the comparison judges their list of values, so the order within
    # a point is all that has to be kept.
    extra = ["peak_gpu_mem_bytes"] + (["gpu_util"] if cuda else []) + (["ttft_s"] if agents else [])
    points = []
    for row in doc["points"]:
        point: Point | None = by_index.get(row["index"])
        if point is None or point.label != row["label"]:
            raise DjinnsimError(f"point {row['index']} ({row['label']}) of validation.json is not a point of "
                                "scenario.yaml as this simulator expands it")
        run = sorted(repeat for (index, repeat) in records if index == point.index)
        columns = {name: _real_values(row, name) for name in extra}
        n_repeats = max([run[-1] + 1 if run else 0] + [len(v) for v in columns.values()])
        repeats = [RepeatResult(records.get((point.index, i), []), 0.0, 0.0) for i in range(n_repeats)]
        for i, repeat in enumerate(repeats):
            take = {name: values[i] if i < len(values) else None for name, values in columns.items()}
            repeat.peak_mem_bytes = take["peak_gpu_mem_bytes"]
            repeat.gpu_util = take.get("gpu_util")
            repeat.ttft_s = take.get("ttft_s")
        errors = [n for n in row.get("notes", []) if not n.startswith(OUT_OF_RANGE_NOTE)]
        if errors and repeats:
            repeats[0].errors = errors  # the report lists a point's errors flattened over its repeats
        probe = (doc.get("level_probes") or {}).get(str(point.index))  # validate --level-probe
        points.append(RealPointResult(point, repeats, row.get("skipped"), probe))
    probes = [OomProbe(row["backend"], row["real_loaded"], row["real_oom_n"], row["probe_max"] or 0,
                       row.get("message", "")) for row in doc["oom"]]
    ours = set(device_notes(scenario_v, meta["machine"]["device"], meta["model"]))  # and the profile's: re-made
    notes = [n for n in doc.get("notes", []) if n not in ours and not notices.is_loads_from(n)]
    return RealResult(points, probes, notes, float(meta.get("real_wall_s") or 0.0))


def _profile_path(req: OfflineRequest, folder: Path, meta: dict) -> tuple[Path, str]:
    if req.calibration is not None:
        if not Path(req.calibration).is_file():
            raise DjinnsimError(f"calibration profile not found: {req.calibration}")
        return Path(req.calibration), "given with --calibration"
    named = Path(meta["profile"]["path"])
    # A validation that calibrated keeps its profile under calibration/; the folder may have moved.
    for candidate in (named, folder / "calibration" / named.name):
        if candidate.is_file():
            return candidate, f"the real runs' profile ({meta['profile']['how']})"
    raise DjinnsimError(f"the profile {named} named in {folder / 'validation.json'} no longer exists; "
                        "pass --calibration PROFILE (the real machine's profile)")


def _finished_folder(folder: Path, flag: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise DjinnsimError(f"{flag} {folder} is not a folder")
    missing = [name for name in FOLDER_FILES if not (folder / name).is_file()
               and not (name == "records_real.csv" and records_file(folder, name))]  # or gzipped
    if missing:
        raise DjinnsimError(f"{flag} {folder} is not a finished validation: no {', '.join(missing)}")
    return folder


# What must agree for repeats of two commands to be one validation's repeats.
SAME_RUN_KEYS = ("model", "workload", "seed")
SAME_MACHINE_KEYS = ("device", "name", "driver", "torch", "transformers")


def _run_meta(doc: dict, folder: Path, flag: str) -> dict:
    """A report's meta as made right after its real runs: a re-comparison or a merge of several
    commands is refused (their records are copies; merge again from the folders the runs wrote)."""
    meta = doc["meta"]
    if not isinstance(meta, dict) or not isinstance(meta.get("machine"), dict) or not meta.get("started_at"):
        raise DjinnsimError(f"{flag} {folder}: validation.json has no meta.machine or meta.started_at")
    if "parts" in meta or "offline" in meta:
        made = "a merge of " + ", ".join(p.get("folder", "?") for p in meta.get("parts", [])) if "parts" in meta \
            else f"a re-comparison of {meta['offline'].get('from_real', '?')}"
        raise DjinnsimError(f"{flag} {folder} is {made}, not the report of real runs: give the folders the runs wrote")
    return meta


def merge_real(folder: Path, doc: dict, scenario_v: Scenario, real: RealResult, others: tuple[Path, ...]) -> dict:
    """Append to `real` (from `folder`) the repeats of `others`: later commands of the same
    validation (same scenario, machine, workload and frozen profile), each one's repeats after the
    previous ones' with its own `part`. Returns the merged report meta; refuses anything that differs."""
    meta = _run_meta(doc, folder, "--from-real")
    frozen = meta.get("profile", {}).get("frozen_sha256")
    if frozen is None:
        raise DjinnsimError(f"--also-real: {folder} records no profile frozen before its runs; repeats of "
                            "different commands join only on one frozen profile")
    parts = [{"folder": str(folder), "started_at": meta["started_at"], "command": meta.get("command")}]
    seen = {Path(folder).resolve(): str(folder)}
    point_set = sorted((p["index"], p["label"]) for p in doc["points"])
    by_index = {rp.point.index: rp for rp in real.points}
    for part, other in enumerate(others, start=1):
        other = _finished_folder(other, "--also-real")
        if other.resolve() in seen:
            raise DjinnsimError(f"--also-real {other}: the same folder as {seen[other.resolve()]} (its repeats twice)")
        seen[other.resolve()] = str(other)
        other_doc = _read_json(other / "validation.json")
        om = _run_meta(other_doc, other, "--also-real")
        if om["started_at"] in {p["started_at"] for p in parts}:
            raise DjinnsimError(f"--also-real {other}: its real runs started at {om['started_at']}, as another "
                                "folder's did: the same runs, copied (a re-comparison?)")
        other_v = as_run_for_real(load_scenario(other / "scenario.yaml"))
        differ = [key for key in SAME_RUN_KEYS if om.get(key) != meta.get(key)]
        differ += [f"machine {key}" for key in SAME_MACHINE_KEYS if om["machine"].get(key) != meta["machine"].get(key)]
        if other_v.model_dump() != scenario_v.model_dump():
            differ.append("scenario.yaml")
        if sorted((p["index"], p["label"]) for p in other_doc["points"]) != point_set:
            differ.append("the points run")
        if om.get("profile", {}).get("frozen_sha256") != frozen:
            differ.append("the profile frozen before the runs")
        if differ:
            raise DjinnsimError(f"--also-real {other} is not more repeats of {folder}: {', '.join(differ)} differ")
        more = real_result(other_doc, scenario_v, read_real_records(records_file(other)))
        for rp in more.points:
            for repeat in rp.repeats:
                repeat.part = part
            if rp.point.index in by_index:
                by_index[rp.point.index].repeats.extend(rp.repeats)
            else:
                by_index[rp.point.index] = rp
                real.points.append(rp)
        real.oom_probes.extend(more.oom_probes)
        real.notes.extend(n for n in more.notes if n not in real.notes)
        real.wall_s += more.wall_s
        parts.append({"folder": str(other), "started_at": om["started_at"], "command": om.get("command")})
    real.points.sort(key=lambda rp: rp.point.index)
    return {**meta, "repeats": max((len(rp.repeats) for rp in real.points), default=0),
            "real_wall_s": real.wall_s, "parts": parts}


def run_offline(req: OfflineRequest) -> Path:
    """Re-simulate a finished validation's points and compare them with its real runs; returns OUT."""
    say = _say(req.quiet)
    folder = _finished_folder(req.from_real, "--from-real")
    out_dir = Path(req.out) if req.out is not None else folder.parent / f"{folder.name}-resim"
    if out_dir.resolve() == folder.resolve():
        raise DjinnsimError(f"--out {out_dir} is the folder read with --from-real; write the re-comparison elsewhere")
    # the default -resim folder is this command's own: replaced when run again, as before
    output = OutputFolder(out_dir, out_dir, force=req.force or req.out is None)
    doc = _read_json(folder / "validation.json")
    real_meta = doc["meta"]
    if isinstance(real_meta, dict) and "parts" in real_meta:  # its records no longer say which command ran them
        raise DjinnsimError(f"--from-real {folder} merges the repeats of several commands: re-compare from those "
                            f"folders (--from-real A --also-real B: {', '.join(p.get('folder', '?') for p in real_meta['parts'])})")
    scenario_v = as_run_for_real(load_scenario(folder / "scenario.yaml"))
    profile_path, how = _profile_path(req, folder, real_meta)
    profile = load_profile(profile_path)
    spec = get_model(scenario_v.model)
    if spec.model_id != real_meta["model"]:
        raise DjinnsimError(f"scenario.yaml's model {spec.model_id} is not validation.json's {real_meta['model']}")
    # The real servers ran in the profile's dtype, which validation.json does not record: not checked.
    check_profile(profile, profile_path, Machine(**real_meta["machine"]), spec, None,
                  hint=f"pass --calibration with a profile of the machine the real runs in {folder} used")
    real = real_result(doc, scenario_v, read_real_records(records_file(folder)))
    if req.also_real:
        real_meta = merge_real(folder, doc, scenario_v, real, tuple(req.also_real))
    say(f"offline re-comparison of {folder}{f' and {len(req.also_real)} more' if req.also_real else ''}: "
        f"{len(real.points)} points, real runs of {real_meta['started_at']}")

    with output as staging:
        if req.condition_on_level:
            profile_path, how, profile = _conditioned(staging, scenario_v, real, profile_path, profile, say)
        _recompare_into(staging, req, folder, scenario_v, real, real_meta, profile_path, how, profile, say,
                        moved=(staging, output.path))
    if not req.quiet:
        print(f"report: {output.path / 'validation.md'}")
    return output.path


def _conditioned(out_dir: Path, scenario_v: Scenario, real: RealResult, profile_path: Path, profile, say):
    """The profile with its decode, prefill and cached-prefill passes scaled by one factor: the real
    repeats' GPU compute per generated token (each repeat's median, averaged over repeats) over the
    simulated repeats' (same order, same processes). Judged on it, a report says whether the rest of
    the model (queues, bytes, links, scheduling) predicts the runs once the launch-bound level they
    met is given: in-sample by construction (the factor comes from the runs judged), and labelled so."""
    from .anchored import at_given_level
    from .heldout import CONDITIONED_NOTE
    from .pipeline import _repeat_figures, real_order, real_parts, simulate

    sims = simulate(scenario_v, profile_path, profile, max(len(rp.repeats) for rp in real.points), real_order(real),
                    parts=real_parts(real))
    # The level is read where one process has the GPU: Exp 2.1's points, Djinn's shared server. Keep-alive
    # and serverless workers share it, and their compute per token carries that sharing; they get the same factor.
    alone = [rp for rp in real.points
             if not isinstance(scenario_v.workload, AgentsWorkload) or rp.point.backend.weights == "shared"]
    real_tok = [_repeat_figures(rep.records)[1] for rp in alone for rep in rp.repeats if rep.records]
    sim_tok = [_repeat_figures(run.records)[1] for rp in alone for run in sims.get(rp.point.index, []) if run is not None]
    real_tok, sim_tok = [v for v in real_tok if v], [v for v in sim_tok if v]
    if not real_tok or not sim_tok:
        raise DjinnsimError("--condition-on-level: no point where one process has the GPU (Exp 2.1, Djinn's "
                            "server) generated tokens to take the level from")
    factor = float(np.mean(real_tok) / np.mean(sim_tok))  # each repeat met its own level: the repeats' mean
    path = out_dir / "calibration" / f"{Path(profile_path).stem}-level-conditioned.json"
    scaled = at_given_level(profile, factor, f"{CONDITIONED_NOTE}: decode, prefill and cached prefill x {factor:.4f} "
                            f"(real compute per token {np.mean(real_tok) * 1e3:.2f} ms, simulated "
                            f"{np.mean(sim_tok) * 1e3:.2f} ms: each repeat's median, averaged over repeats); IN-SAMPLE", path)
    say(f"conditioned on the real runs' level: passes x {factor:.4f}")
    return path, f"{Path(profile_path).name} conditioned on the real runs' level (passes x {factor:.4f}; IN-SAMPLE)", scaled


def _recompare_into(out_dir: Path, req: OfflineRequest, folder: Path, scenario_v, real, real_meta: dict,
                    profile_path: Path, how: str, profile, say, moved: tuple[Path, Path] | None = None) -> None:
    """`moved` (staging, final): where a profile written into the staging folder will be recorded."""
    from djinnsim.calibrate.environment import host_cpu

    shutil.copyfile(folder / "scenario.yaml", out_dir / "scenario.yaml")
    if "parts" in real_meta:  # repeats of several commands: renumbered, one file
        merged = [(i, r) for rp in real.points for i, rep in enumerate(rp.repeats) for r in rep.records]
        _write_records(out_dir / "records_real.csv", [r for _, r in merged], [i for i, _ in merged])
    else:  # the runs' file as written, plain like every output of validate (a gzipped one decompressed)
        with open_records(records_file(folder), binary=True) as source, (out_dir / "records_real.csv").open("wb") as target:
            shutil.copyfileobj(source, target)
    # No clock time or wall seconds of this run: the same folder, profile and simulator give the same bytes.
    # The hash frozen before the real runs (recorded since issue 9) stays; the profile used now is hashed anew.
    frozen = {k: real_meta["profile"][k] for k in ("frozen_sha256", "frozen_at") if k in real_meta.get("profile", {})}
    meta = {**real_meta, "profile": {**profile_meta(profile_path, how, profile, moved), **frozen},
            "runs_started_at": real_meta.get("runs_started_at") or real_meta["started_at"],
            "bands": req.bands,
            "offline": {"from_real": str(folder), "command": req.command, "simulator": simulator(),
                        "real_runs_simulator": real_meta.get("simulator"), "host_cpu": host_cpu()}}
    points = sorted((rp.point for rp in real.points), key=lambda p: p.index)
    compare_and_report(out_dir, scenario_v, points, real, profile_path, profile, meta, say, req.quiet)
