"""Recompute a profile's fits from its samples CSV, with no device: the fitting stage on its own.

Everything fitted (prefill, cached-context prefill, decode, workspace, copy, serde and loopback
bandwidths, new-shape costs) is redone from the raw samples; measured facts (memory, weight loads,
loads and decoding by k processes, jitter, connection costs) are kept; the
predictions stored beside measurements (Exp 2.1, the composition check) are recomputed.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from djinnsim.errors import DjinnsimError
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.profile import (SAMPLES_GZIP_SUFFIX, KvSwaps, LoadsSource, Profile, fit_gpu_step_s, load_profile,
                                  open_samples, samples_path, samples_sha256, save_profile)
from djinnsim.sim.specs import get_model

from .fitting import (
    DECODE_FEATURES,
    DECODE_SCALE,
    PREFILL_FEATURES,
    PREFILL_SCALE,
    FitPoint,
    fit_bandwidth,
    loopback_cap_gbps,
)
from .bench_cached import fit_cached_prefill
from .bench_shapes import fit_cold_shapes
from .spread import with_spread
from .profile_builder import decode_anchor_points, exp21_prediction, fit_decode, fit_prefill, fit_workspace


def read_samples(path: Path) -> list[dict[str, str]]:
    """The samples file's rows; one that is not a finite number, or a time (unit s) not above 0,
    is refused in one line naming the file, its line and stage (no fit takes it as a point)."""
    if not path.is_file():
        raise DjinnsimError(f"samples file not found: {path}")
    try:
        with open_samples(path) as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DjinnsimError(f"{path}: cannot read the samples file ({exc})") from None
    for line, row in enumerate(rows, start=2):
        value = _number(row.get("value"))
        if value is None or (row.get("unit") == "s" and value <= 0):
            raise DjinnsimError(f"{path.name} line {line} (stage {row.get('stage')}): value {row.get('value')!r} is not "
                                + ("a time > 0 s" if row.get("unit") == "s" else "a finite number"))
    return rows


def _num(row: dict[str, str], key: str) -> float:
    return float(row[key]) if row.get(key) not in (None, "") else 0.0


def _timed(rows: list[dict[str, str]], stage: str) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        if row["stage"] == stage and row["unit"] == "s":
            grouped[row["point"]].append(row)
    return grouped


def prefill_points(rows) -> list[FitPoint]:
    points = []
    for group in _timed(rows, "prefill").values():
        inputs = {"prompt_tokens": _num(group[0], "prompt_tokens"), "batch": _num(group[0], "batch"), "context": 0.0}
        points.append(FitPoint(inputs, float(np.median([_num(r, "value") for r in group]))))
    return points


def decode_points(rows) -> list[FitPoint]:
    """The decode grid's points, then the batch-1 level anchors (decode_anchor_points)."""
    return decode_grid_points(rows) + decode_anchor_points(rows)


def decode_grid_points(rows) -> list[FitPoint]:
    points = []
    for group in _timed(rows, "decode").values():
        batch = _num(group[0], "batch")
        context = float(np.median([_num(r, "context") for r in group]))
        inputs = {"batch": batch, "context": context, "sum_context": batch * context}
        points.append(FitPoint(inputs, float(np.median([_num(r, "value") for r in group]))))
    return points


def cached_prefill_points(rows) -> list[FitPoint]:
    points = []
    for group in _timed(rows, "cached_prefill").values():
        inputs = {k: _num(group[0], k) for k in ("prompt_tokens", "batch", "context")}
        points.append(FitPoint(inputs, float(np.median([_num(r, "value") for r in group]))))
    return points


def workspace_points(rows, stage: str) -> list[FitPoint]:
    """A decode point's workspace sits at the median context its steps ran at, as calibrate fits it
    (the workspace row records the grid's nominal context)."""
    steps = _timed(rows, "decode")
    points = []
    for row in rows:
        if row["stage"] != stage:
            continue
        batch = _num(row, "batch")
        if stage == "prefill_workspace":
            inputs = {"prompt_tokens": _num(row, "prompt_tokens"), "batch": batch, "context": 0.0}
        else:
            group = steps.get(row["point"])
            context = float(np.median([_num(r, "context") for r in group])) if group else _num(row, "context")
            inputs = {"batch": batch, "context": context, "sum_context": batch * context}
        points.append(FitPoint(inputs, _num(row, "value")))
    return points


def medians_by_size(rows, stage: str) -> list[tuple[float, float]]:
    """(bytes, median seconds) of a stage's timed samples, smallest size first."""
    by_size: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        if row["stage"] == stage and row["unit"] == "s":
            by_size[_num(row, "nbytes")].append(_num(row, "value"))
    return [(n, float(np.median(by_size[n]))) for n in sorted(by_size)]


def bandwidth_from(rows, stage: str):
    points = medians_by_size(rows, stage)
    if len(points) < 2:
        return None
    return fit_bandwidth(*zip(*points))[0]


def _copy_fits(rows, prefix: str, extra: tuple[str, ...] = ()) -> dict:
    """{direction_kind: Bandwidth} from the samples of stages `prefix` + h2d_pinned etc. (and the
    `extra` keys); on a CPU device only the pageable kind (host memcpy) was measured and stands for
    pinned too."""
    fits = {}
    for key in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", *extra):
        bw = bandwidth_from(rows, f"{prefix}{key}")
        if bw is None and key.endswith("pinned"):
            bw = bandwidth_from(rows, f"{prefix}{key.replace('pinned', 'pageable')}")
        if bw is not None:
            fits[key] = bw
    return fits


def timeslice_steps(rows: list[dict[str, str]]) -> dict[int, list[float]]:
    """timeslice_mp's decode steps by k (processes decoding at once), every process's together."""
    out: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if row["stage"] == "timeslice_mp" and row["unit"] == "s":
            k, value = _number(row.get("concurrent")), _number(row.get("value"))
            if k is None or k < 1 or k != int(k):
                raise DjinnsimError(f"samples: a timeslice_mp row's concurrent is {row.get('concurrent')!r}, "
                                    "not a whole number of processes >= 1")
            if value is None or value <= 0:  # read_samples refuses these; rows may come from elsewhere
                raise DjinnsimError(f"samples: a timeslice_mp row's value is {row.get('value')!r}, not a step time > 0 s")
            out[int(k)].append(value)
    return dict(out)


def _number(text: str | None) -> float | None:
    """A finite number from a samples cell, else None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


POINT_NOTE = ", the point at the spells' median level (passes x "
# The profile sections `--loads-from` may take from another calibration, each with the prefix of its
# samples' stages: whole-model loads, loads by k processes at once, k processes decoding at once.
LOAD_SECTIONS = {"weight_load": "weights_load_", "loads_mp": "loads_mp", "timeslice_mp": "timeslice_mp"}
LOAD_STAGES = tuple(LOAD_SECTIONS.values())


def missing_load_sections(profile: Profile) -> list[str]:
    """The load sections a calibration did not measure (it stopped before them)."""
    return [name for name in LOAD_SECTIONS if not getattr(profile, name)]


def _other_calibration(profile: Profile, path: Path, flag: str, what: str) -> tuple[Profile, Path]:
    """Another calibration (`flag` PATH) of `profile`'s GPU, model and dtype, and its samples file,
    which must be beside it (`what`: what the samples are read for, in the refusal)."""
    other = load_profile(path)
    mine, theirs = profile.metadata, other.metadata
    if (theirs.gpu_key, theirs.model_id, theirs.dtype) != (mine.gpu_key, mine.model_id, mine.dtype):
        raise DjinnsimError(f"{flag} {path}: a calibration of {theirs.gpu_key} / {theirs.model_id} / "
                            f"{theirs.dtype}, not of {mine.gpu_key} / {mine.model_id} / {mine.dtype}")
    file = samples_path(other, path)
    if file is None:
        raise DjinnsimError(f"{flag} {path}: no samples file beside it{what}")
    return other, file


def loads_source(profile: Profile, path: Path, sections: list[str],
                 expected: str | None = None) -> tuple[str, str, Profile, list]:
    """The calibration `path` whose load `sections` `profile` is to carry: (path, samples sha256,
    profile, samples). Same GPU, model and dtype; it must have measured each section; its samples
    file must be beside it (with `expected`, the sha256 recorded when first taken)."""
    other, file = _other_calibration(profile, path, "--loads-from", "")
    lacking = [name for name in sections if not getattr(other, name)]
    if lacking:
        raise DjinnsimError(f"--loads-from {path}: that calibration measured no {', '.join(lacking)} either")
    sha = samples_sha256(file)
    if expected is not None and sha != expected:
        raise DjinnsimError(f"--loads-from {path}: its samples file changed since the profile took its loads "
                            f"(sha256 {sha[:12]}, recorded {expected[:12]})")
    return Path(path).as_posix(), sha, other, read_samples(file)


def refit(profile: Profile, rows: list[dict[str, str]], note: str, left_out: tuple[str, ...] = (),
          level_from: list[tuple[str, str, Profile, list]] = (), level_point: str = "fit",
          with_path: bool = False, loads: tuple[str, str, Profile, list] | None = None,
          load_sections: tuple[str, ...] = ()) -> Profile:
    """`loads`: (path, samples sha256, profile, samples) of the calibration whose `load_sections`
    (of LOAD_SECTIONS) the profile carries because its own calibration stopped before them: they are
    copied, and their samples join the rows the timeslice fit and the spread read.
    `left_out`: sample stages no fit (nor the spread) may use, e.g. ("exp21_step",) to hold
    calibrate's own Exp 2.1 runs out of the decode fit; the measured jitter sequence stays.
    `level_point` "median": the point at the median batch-1 level the bands draw (spread.at_median_level),
    before the predictions and the serial host time are taken from it."""
    from .composition import (loopback_path, loopback_serial_gbps, paced_path, paced_path_bytes, paced_rows_from_end_to_end,
                               rows_from_end_to_end)

    spec = get_model(profile.metadata.model_id)
    rows = [row for row in rows if row["stage"] not in left_out]
    if loads is not None:
        path, sha, other, other_rows = loads
        prefixes = tuple(LOAD_SECTIONS[name] for name in load_sections)
        rows = [row for row in rows if not row["stage"].startswith(prefixes)]
        rows += [row for row in other_rows if row["stage"].startswith(prefixes)]
        source = LoadsSource(path=path, samples_sha256=sha, date=other.metadata.date, sections=list(load_sections))
        profile = profile.model_copy(update={
            **{name: getattr(other, name) for name in load_sections},
            "metadata": profile.metadata.model_copy(update={"loads_from": source})})
    update: dict = {}
    prefill, grid, anchors = prefill_points(rows), decode_grid_points(rows), decode_anchor_points(rows)
    if len(prefill) < len(PREFILL_FEATURES) or len(grid) + len(anchors) < len(DECODE_FEATURES):
        raise DjinnsimError("the samples hold too few prefill or decode points to fit")
    update["prefill"] = fit_prefill(prefill)
    update["decode_step"] = fit_decode(grid, anchors)
    cached = fit_cached_prefill(cached_prefill_points(rows))
    if cached is not None:
        update["cached_prefill"] = cached
    update.update(_copy_fits(rows, "copy_"))
    swaps = _copy_fits(rows, "kv_swap_", extra=("d2h_pageable_cycle",))
    if swaps:
        update["kv_swaps"] = KvSwaps(tensors=2 * spec.num_layers, fits=swaps)
    for field in ("serialize", "deserialize"):
        bw = bandwidth_from(rows, field)
        if bw is not None:
            update[field] = bw
    steps = [float(row["value"]) for row in rows if row["stage"] == "exp21_step" and row["unit"] == "s"]
    if steps:  # the samples file keeps Exp 2.1's steps in the order they ran
        median = float(np.median(steps))
        update["jitter_decode_sequence"] = [v / median for v in steps]
    cold = fit_cold_shapes(rows)
    if cold is not None:
        update["cold_shapes"] = cold
    steps_by_k = timeslice_steps(rows)
    if profile.timeslice_mp is not None and steps_by_k:
        g, saturated = fit_gpu_step_s([(k, float(np.median(v))) for k, v in steps_by_k.items()])
        update["timeslice_mp"] = profile.timeslice_mp.model_copy(update={"gpu_step_s": g, "saturated_k": saturated})
    tcp = medians_by_size(rows, "tcp_send")
    if len(tcp) >= 2:
        update["network"] = profile.network.model_copy(update={"loopback_gbps": loopback_cap_gbps(*zip(*tcp))})
    update["memory"] = profile.memory.model_copy(update={
        "prefill_workspace": fit_workspace(workspace_points(rows, "prefill_workspace"), PREFILL_FEATURES, PREFILL_SCALE, ["prompt_tokens", "batch"]),
        "decode_workspace": fit_workspace(workspace_points(rows, "decode_workspace"), DECODE_FEATURES, DECODE_SCALE, ["batch", "context", "sum_context"]),
    })
    notes = [n for n in profile.metadata.notes if n.split(POINT_NOTE)[0] != note]  # refitting twice notes it once
    update["metadata"] = profile.metadata.model_copy(update={"notes": [*notes, note]})
    new = with_spread(profile.model_copy(update=update), rows, left_out, level_from, level_point)
    if new.spread is not None and new.spread.point_level is not None:  # the note names the factor
        noted = [*notes, f"{note}{POINT_NOTE}{new.spread.point_level:.4f})"]
        new = new.model_copy(update={"metadata": new.metadata.model_copy(update={"notes": noted})})
    serial_rows = rows_from_end_to_end(new.end_to_end, ProfileCostModel(new, spec), new.network.loopback_gbps, spec)
    if serial_rows:  # the host time beyond the link parts, against the refitted cap and serialize
        # loopback_path: recomputed when the profile has one (calibrate made it) or when asked
        # (`with_path`), so a refit of an earlier calibration keeps the link model it was judged with.
        path = loopback_path(serial_rows) if with_path or new.network.loopback_path is not None else None
        # paced_path: from the paced rows calibrate keeps (composition_paced), beside a path
        paced_rows = paced_rows_from_end_to_end(new.end_to_end, spec)
        paced = paced_path(paced_rows, ProfileCostModel(new, spec)) if path is not None and paced_rows else None
        network = new.network.model_copy(update={"loopback_serial_gbps": loopback_serial_gbps(serial_rows),
                                                  "loopback_path": path, "paced_path": paced,
                                                  # kept off where the profile was made without it (H200 run 12:
                                                  # a refit keeps the link model its runs were judged with)
                                                  "paced_path_bytes": paced_path_bytes(paced_rows)
                                                  if paced and new.network.paced_path_bytes is not None else None})
        new = new.model_copy(update={"network": network})
    Profile.model_validate(new.model_dump())  # the refit must still be a valid profile
    return new.model_copy(update={"end_to_end": _predictions(new, spec)})


def _predictions(profile: Profile, spec) -> dict[str, float]:
    """Recompute the predictions stored next to measurements with the new fits."""
    from .composition import predict_step_s

    e = dict(profile.end_to_end)
    cost = ProfileCostModel(profile, spec)
    if "exp21.total_s.p50" in e:
        predicted = exp21_prediction(cost)
        e["exp21.predicted.total_s"] = predicted["total_s"]
        e["exp21.predicted.prefill_s"] = predicted["prefill_s"]
        e["exp21.predicted.step_s_mean"] = predicted["step_s_mean"]
    link_gbps = profile.network.loopback_gbps
    for key in [k for k in e if k.startswith("composition.") and k.endswith(".measured_s")]:
        _, backend, length, _ = key.split(".")
        parts = predict_step_s(cost, link_gbps, backend, spec, int(length[1:]))
        e[f"composition.{backend}.{length}.predicted_s"] = parts["total"]
        e[f"composition.{backend}.{length}.predicted_compute_s"] = parts["compute"]
    return e


def level_sources(profile: Profile, own_samples: Path, paths: tuple[Path, ...],
                  expected: dict[str, str] | None = None) -> list[tuple[str, str, Profile, list]]:
    """Other calibrations whose batch-1 spells join this profile's decode_level: (path, samples
    sha256, profile, samples) for each. Each must be of the same GPU, model and dtype, with its own
    samples file beside it (sha256 checked), and none may be this calibration or another source
    again (the same spells counted twice). `expected`: path -> the samples sha256 recorded when the
    spells were first read (a refit applying them again), which the file must still have."""
    out, seen = [], {samples_sha256(own_samples): "the profile refitted"}
    for path in paths:
        other, file = _other_calibration(profile, path, "--level-from", " to read its spells from")
        sha = samples_sha256(file)
        if sha in seen:
            raise DjinnsimError(f"--level-from {path}: its samples are those of {seen[sha]} (the same spells twice)")
        want = (expected or {}).get(Path(path).as_posix())
        if want is not None and want != sha:
            raise DjinnsimError(f"--level-from {path}: its samples file changed since the profile pooled it "
                                f"(sha256 {sha[:12]}, recorded {want[:12]})")
        seen[sha] = str(path)
        out.append((Path(path).as_posix(), sha, other, read_samples(file)))
    return out


def _same_calibration(profile: Profile, rows: list[dict[str, str]], path: Path, samples_file: Path) -> None:
    """A profile older than the samples sha256: its samples file must at least give back a figure
    the profile stored as measured, not fitted (Exp 2.1's median total, the same whatever the fitting
    code of the day), or it is another calibration's file left beside it. Without that figure
    nothing can be told."""
    stored = profile.end_to_end.get("exp21.total_s.p50")
    totals = [float(row["value"]) for row in rows if row["stage"] == "exp21_total" and row.get("unit", "s") == "s"]
    if stored is None or not totals:
        return
    again = float(np.median(totals))
    if abs(again - stored) > 1e-6 * abs(stored):
        raise DjinnsimError(f"{samples_file}: not the samples file of {Path(path).name} (its Exp 2.1 median "
                            f"total is {again:.6g} s, the profile's {stored:.6g} s: another calibration's samples?)")


def refit_file(path: Path, out: Path | None = None, command: str | None = None,
               left_out: tuple[str, ...] = (), level_from: tuple[Path, ...] = (),
               level_point: str | None = None, with_path: bool = False,
               loads_from: Path | None = None) -> tuple[Profile, Path]:
    """Refit `path` from its samples (into `out`, else in place). A pooled profile's earlier
    --level-from sources are applied again (they must still be there, unchanged), with any new ones;
    so is its point at the median level (`level_point` None: as the profile had it), and the load
    stages of `loads_from` (a profile whose calibration stopped before its loads; refitted again,
    it takes them from the same calibration unless given another)."""
    from .spread import LEVEL_POINTS

    if level_point is not None and level_point not in LEVEL_POINTS:
        raise DjinnsimError(f"--level-point {level_point!r}: not one of {', '.join(LEVEL_POINTS)}")
    profile = load_profile(path)
    if level_point is None:
        level_point = "median" if profile.spread is not None and profile.spread.point_level is not None else "fit"
    if not profile.samples_file:
        raise DjinnsimError(f"{path}: the profile names no samples file to refit from")
    samples_file = samples_path(profile, path) or Path(path).parent / profile.samples_file
    rows = read_samples(samples_file)
    if profile.samples_sha256 is None:
        _same_calibration(profile, rows, path, samples_file)
    stages = {row["stage"] for row in rows}
    unknown = [stage for stage in left_out if stage not in stages]
    if unknown:
        raise DjinnsimError(f"{profile.samples_file} holds no samples of stage {', '.join(unknown)} to leave out")
    earlier = {s.path: s.samples_sha256 for s in (profile.spread.level_sources if profile.spread else [])}
    sources = [*earlier, *(Path(p).as_posix() for p in level_from if Path(p).as_posix() not in earlier)]
    note = f"fits recomputed from {profile.samples_file}" + (f" by `{command}`" if command else "")
    if left_out:
        note += f", leaving out {', '.join(left_out)}"
    if sources:
        note += f", batch-1 spells also from {', '.join(sources)}"
    pooled = level_sources(profile, samples_file, tuple(Path(p) for p in sources), earlier)
    if with_path:
        note += ", with the loopback host path"
    if loads_from is not None and not Path(loads_from).is_file():
        raise DjinnsimError(f"--loads-from {loads_from}: no such profile")
    taken = profile.metadata.loads_from
    sections = list(taken.sections) if taken is not None else missing_load_sections(profile)
    if loads_from is not None and not sections:
        raise DjinnsimError(f"--loads-from {loads_from}: {Path(path).name} measured every load stage itself")
    loads = None
    if loads_from is not None or taken is not None:
        again = taken is not None and (loads_from is None or Path(loads_from).as_posix() == taken.path)
        loads = loads_source(profile, Path(loads_from if loads_from is not None else taken.path), sections,
                             taken.samples_sha256 if again else None)
        note += f", {', '.join(sections)} from {loads[0]}"
    new = refit(profile, rows, note, left_out, pooled, level_point, with_path, loads, tuple(sections))
    target = Path(out) if out is not None else Path(path)
    samples = target.with_suffix(".csv")
    if target.resolve() != Path(path).resolve():  # the samples travel with the profile
        import shutil

        target.parent.mkdir(parents=True, exist_ok=True)
        if samples.resolve() != samples_file.resolve():
            if samples_file.suffix == SAMPLES_GZIP_SUFFIX:  # written plain beside the new profile
                import gzip

                with gzip.open(samples_file, "rb") as src, samples.open("wb") as dst:  # bytes: the same sha256
                    shutil.copyfileobj(src, dst)
            else:
                shutil.copyfile(samples_file, samples)
        new = new.model_copy(update={"samples_file": samples.name})
    if new.samples_sha256 is None:  # a profile older than the check gets it from the file it was refitted from
        new = new.model_copy(update={"samples_sha256": samples_sha256(samples_file)})
    save_profile(new, target)
    return new, target
