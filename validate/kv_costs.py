"""What a session's KV costs during ACT, real against simulated: swap out and in, re-prefill, reuse.

    python -m djinnsim.validate.kv_costs --device cuda|cpu --profile PROFILE --out DIR
                                         [--contexts 128,512,1024,2048] [--repeats 12] [--warmups 3]
    python -m djinnsim.validate.kv_costs --rejudge REAL/kv_costs.json --profile PROFILE --out DIR

The real side builds the profile's model from its bundled config with random weights, prefills a
session of C tokens (batch 1) and, for each KV policy of `server.kv_policy`, times what the engine
charges for it (host wall clock around synchronized calls, warm-ups dropped, as calibrate times),
in calibrate/kv_cycle.py's sequence (calibrate's kv_swaps stage times its pageable swap-out in the same
one, `d2h_pageable_cycle`):

- swap_out / swap_in: the session's per-layer K and V tensors copied to host memory and back
  (pinned: into buffers allocated once, as a swap pool holds them; pageable: `tensor.to("cpu")` and
  back, as calibrate measures pageable copies); on a CPU device both are memcpy, as in calibrate;
  every swap-out's minor page faults are counted too (facts `swap_out_faults`: how many host pages
  it met fresh, the regime a pageable swap-out ran in);
- reflect_after_swap: swap_in, then a REFLECT of 16 new tokens on the restored cache up to its first
  new token (the swap-out happened during ACT, off the REFLECT's path);
- reflect_discard: the KV freed, the REFLECT re-prefills the whole context (C + 16 tokens) up to its
  first new token;
- reflect_preserve: the REFLECT on the resident cache.

The first new token's logits after a swap and after a re-prefill are checked against those on the
resident cache (usable: cosine similarity >= 0.999, and the same top-1 token unless the two
candidates are tied within the logits' difference: a model with random weights has near-flat logits,
and a re-prefill takes another numerical path than decoding on a cache).

The simulated side is what the engine charges, taken from the engine itself: a one-agent Djinn
scenario (REASON of C - 1 tokens + 1 new, so the session holds C tokens; ACT; REFLECT of 16 tokens
+ 1 new) simulated under preserve, swap (pinned and pageable host KV) and discard, `--sim-draws`
times each with its own step-time jitter draws: reflect_* is the REFLECT record's compute_s (plus,
after a swap, the restore: its copy_s less the preserve record's, which is the same payload copy);
swap_out, which no record holds (it happens during ACT), is the session's KV copied alone over the
engine's own PCIe link (sim/engine/pcie.py) at the profile's device->host bandwidth.

The profile is held out: given, never fitted here, its sha256 recorded before the first real run and
checked after the last. Verdict per row (TARGET): the simulated cost must be within 10% of the real
one: PASS when it lies in the real mean's 95% bootstrap interval widened by 10% on each side and that
interval is at most 20% of the mean wide; FAIL outside the widened interval; UNSURE inside it when the
real runs spread too widely to judge to 10%.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import typer

from djinnsim.calibrate.kv_cycle import PAGE_BYTES, REFLECT_TOKENS, KvCycle
from djinnsim.errors import DjinnsimError
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.outputs import write_json
from djinnsim.sim.profile import Profile, load_profile
from djinnsim.sim.provenance import file_sha256, simulator
from djinnsim.sim.specs import ModelSpec, get_model

TOLERANCE = 0.10  # the target: the simulated cost within 10% of the real one
TARGET = (f"the simulated cost within {TOLERANCE:.0%} of the real one: PASS when it lies in the real mean's 95% "
          f"bootstrap interval widened by {TOLERANCE:.0%} on each side and that interval is at most "
          f"{2 * TOLERANCE:.0%} of the mean wide; FAIL when it lies outside the widened interval; UNSURE when it "
          "lies inside but the real runs spread too widely to judge to that tolerance")
VERDICTS = ("PASS", "FAIL", "UNSURE")
OPS = ("swap_out", "swap_in", "reflect_after_swap", "reflect_discard", "reflect_preserve")


@dataclass(frozen=True)
class Row:
    op: str  # one of OPS
    host: str | None  # pinned | pageable for the swap ops
    context_tokens: int
    real_mean_s: float
    real_ci_s: tuple[float, float]
    real_n: int
    sim_s: float
    error_pct: float  # (sim - real mean) / real mean
    verdict: str  # one of VERDICTS
    # a pageable swap-out's simulated range (warm pages, fresh pages: CostModel.kv_swap_out_range_s)
    # and whether it meets the real interval widened by TOLERANCE; None for every other row
    sim_range_s: tuple[float, float] | None = None
    in_range: bool | None = None

    @property
    def label(self) -> str:
        return f"{self.op} ({self.host})" if self.host else self.op


def bootstrap_ci(samples: list[float], seed: int) -> tuple[float, float]:
    """The 95% bootstrap interval of the mean (scipy.stats.bootstrap, percentile method)."""
    from scipy.stats import bootstrap

    data = np.asarray(samples, dtype=float)
    if np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    res = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def judged(op: str, host: str | None, context: int, mean: float, ci: tuple[float, float], n: int, sim_s: float,
           sim_range: tuple[float, float] | None) -> Row:
    """One row: the point's error and verdict (TARGET), and for a pageable swap-out whether the range
    between its warm-page and fresh-page charges meets the real interval widened by TOLERANCE (a
    report beside the verdict, which judges the point alone)."""
    lo, hi = ci
    met = None if sim_range is None else bool(sim_range[0] <= hi * (1 + TOLERANCE) and sim_range[1] >= lo * (1 - TOLERANCE))
    return Row(op, host, context, mean, ci, n, sim_s, 100 * (sim_s - mean) / mean, verdict(sim_s, mean, ci),
               sim_range, met)


def _row_json(r: Row) -> dict:
    return {**asdict(r), "real_ci_s": list(r.real_ci_s),
            "sim_range_s": None if r.sim_range_s is None else list(r.sim_range_s)}


def verdict(sim_s: float, mean_s: float, ci: tuple[float, float]) -> str:
    """TARGET, from the simulated value against the real interval."""
    lo, hi = ci
    if not lo * (1 - TOLERANCE) <= sim_s <= hi * (1 + TOLERANCE):
        return "FAIL"
    return "PASS" if hi - lo <= 2 * TOLERANCE * mean_s else "UNSURE"


# --- the simulated side: what the engine charges --------------------------------------------------

def _scenario(spec: ModelSpec, context: int, policy: str, pinned: bool):
    from djinnsim.sim.scenario import parse_scenario

    return parse_scenario({
        "name": "kv_costs", "model": spec.key, "backends": ["djinn"],
        "server": {"kv_policy": policy, "pinned_host_kv": pinned},
        "workload": {"kind": "agents", "agents": [1],
                     "reason": {"input_tokens": context - 1, "new_tokens": 1},
                     "act": {"kind": "fixed", "seconds": 60.0},
                     "reflect": {"input_tokens": REFLECT_TOKENS, "new_tokens": 1}},
    })


def _reflects(cost: ProfileCostModel, spec: ModelSpec, context: int, policy: str, pinned: bool,
              seeds: list[np.random.SeedSequence]) -> list:
    """The REFLECT record of the one-agent scenario, one per seed (its own jitter draws)."""
    from djinnsim.sim.scenario import expand_points
    from djinnsim.sim.simulate import World

    scenario = _scenario(spec, context, policy, pinned)
    point = expand_points(scenario)[0]
    out = []
    for seed in seeds:
        (reflect,) = [r for r in World(scenario, point, cost, seed).run() if r.phase == "reflect"]
        if reflect.status != "ok":
            raise DjinnsimError(f"the simulated REFLECT at C = {context} under {policy} ended {reflect.status}")
        out.append(reflect)
    return out


def engine_swap_out_s(cost: ProfileCostModel, nbytes: int, pinned: bool) -> float:
    """A session's KV leaving the GPU alone on the engine's PCIe link (server.py's swap-out:
    `Pcie.swap("d2h", ...)`, at `cost.kv_swap_bandwidth`), with no other session's KV on the host
    (the one-agent scenario: `lone`): the simulated time."""
    import simpy

    from djinnsim.sim.engine.pcie import Pcie

    env = simpy.Environment()
    env.run(Pcie(env, cost).swap("d2h", nbytes, pinned, lone=True))
    return env.now


def simulated_costs(cost: ProfileCostModel, spec: ModelSpec, context: int, hosts: tuple[str, ...],
                    draws: int, seed: int) -> dict[tuple[str, str | None], float]:
    """{(op, host): simulated seconds}, each a mean over `draws` jitter draws (the same draws for
    every policy: common random numbers)."""
    seeds = np.random.SeedSequence([seed, context]).spawn(draws)
    preserve = _reflects(cost, spec, context, "preserve", True, seeds)
    discard = _reflects(cost, spec, context, "discard", True, seeds)
    if any(r.kv_state != "discarded" or r.recomputed_tokens != context for r in discard):
        raise DjinnsimError(f"the simulated discard at C = {context} did not re-prefill {context} tokens")
    out = {("reflect_preserve", None): float(np.mean([r.compute_s for r in preserve])),
           ("reflect_discard", None): float(np.mean([r.compute_s for r in discard]))}
    for host in hosts:
        pinned = host == "pinned"
        swapped = _reflects(cost, spec, context, "swap", pinned, seeds)
        if any(r.kv_state != "swapped" for r in swapped):
            raise DjinnsimError(f"the simulated swap at C = {context} did not restore a swapped KV")
        restore = [s.copy_s - p.copy_s for s, p in zip(swapped, preserve)]
        out[("swap_in", host)] = float(np.mean(restore))
        out[("reflect_after_swap", host)] = float(np.mean([r + s.compute_s for r, s in zip(restore, swapped)]))
        out[("swap_out", host)] = engine_swap_out_s(cost, context * cost.kv_bytes_per_token, pinned)
    return out


def swap_out_range_s(cost: ProfileCostModel, context: int, host: str | None) -> tuple[float, float] | None:
    """A pageable swap-out's range at `context` tokens, the one agent's (lone: no other KV on the host):
    (every tensor into warm pages, every tensor into fresh pages), widened to hold the charge."""
    return cost.kv_swap_out_range_s(context * cost.kv_bytes_per_token, lone=True) if host == "pageable" else None


# --- the real side --------------------------------------------------------------------------------

class RealSession(KvCycle):
    """The profile's model on `device` (random weights from its bundled config) and one session's KV
    of C tokens, put through calibrate.kv_cycle's sequence (the kv_swaps stage runs the same one)."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str | None, seed: int) -> None:
        import torch

        from djinnsim.calibrate.modeling import build_model, resolve_dtype

        self.dtype = resolve_dtype(spec, dtype, device)
        torch.manual_seed(seed)
        super().__init__(build_model(spec, device, self.dtype), spec, device, seed)


# --- the comparison -------------------------------------------------------------------------------

def _check_profile(profile: Profile, path: Path, device: str, gpu: int) -> ModelSpec:
    from .pipeline import check_profile, this_machine
    from .points import CPU_MODEL

    spec = get_model(profile.metadata.model_id)
    if device == "cpu" and spec.key != get_model(CPU_MODEL).key:
        raise DjinnsimError(f"--device cpu runs only {CPU_MODEL}; profile {path} is of {spec.model_id}")
    check_profile(profile, path, this_machine(device, gpu), spec, None,
                  hint="calibrate this machine first (djinnsim calibrate) and pass that profile")
    return spec


def run(profile_path: Path, out_dir: Path, device: str = "cuda", gpu: int = 0,
        contexts: tuple[int, ...] = (128, 512, 1024, 2048), repeats: int = 12, warmups: int = 3,
        sim_draws: int = 64, seed: int = 0, say: Callable[[str], None] = print) -> dict:
    """Measure, simulate, compare; writes kv_costs.json and kv_costs.md under `out_dir`."""
    if repeats < 2 or warmups < 0 or sim_draws < 1 or not contexts or min(contexts) < 2:
        raise DjinnsimError("kv_costs needs --repeats >= 2, --warmups >= 0, --sim-draws >= 1 and contexts of >= 2 tokens")
    profile_path = Path(profile_path)
    if not profile_path.is_file():
        raise DjinnsimError(f"profile not found: {profile_path}")
    frozen_sha256 = file_sha256(profile_path)
    profile = load_profile(profile_path)
    device_name = "cpu" if device == "cpu" else f"cuda:{gpu}"
    spec = _check_profile(profile, profile_path, device, gpu)
    too_long = [c for c in contexts if c + REFLECT_TOKENS > spec.max_position_embeddings]
    if too_long:
        raise DjinnsimError(f"contexts {too_long} + {REFLECT_TOKENS} exceed {spec.key}'s {spec.max_position_embeddings} positions")
    cost = ProfileCostModel(profile, spec)
    hosts = ("pinned", "pageable") if device == "cuda" else ("pageable",)
    say(f"profile {profile_path} sha256 {frozen_sha256[:16]} frozen before the real runs; {cost.describe()}")
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    session = RealSession(spec, device_name, profile.metadata.dtype, seed)
    rows: list[Row] = []
    facts: dict[int, dict] = {}
    for context in contexts:
        t0 = time.perf_counter()
        samples, facts[context] = session.measure(context, hosts, repeats, warmups)
        cost.out_of_range.clear()
        sim = simulated_costs(cost, spec, context, hosts, sim_draws, seed)
        facts[context]["sim_kv_bytes"] = context * cost.kv_bytes_per_token
        facts[context]["out_of_range"] = sorted(cost.out_of_range)
        for (op, host), values in samples.items():
            mean = float(np.mean(values))
            ci = bootstrap_ci(values, seed + context)
            rows.append(judged(op, host, context, mean, ci, len(values), sim[(op, host)],
                               swap_out_range_s(cost, context, host) if op == "swap_out" else None))
        say(f"C = {context}: measured and simulated in {time.perf_counter() - t0:.1f} s")
    if file_sha256(profile_path) != frozen_sha256:
        raise DjinnsimError(f"profile {profile_path} changed during the real runs; its figures are not held out")
    rows.sort(key=lambda r: (OPS.index(r.op), r.host or "", r.context_tokens))
    doc = {
        "meta": {
            "started_at": started_at, "device": device_name, "model": spec.model_id, "dtype": str(session.dtype),
            "profile": {"path": str(profile_path), "sha256": frozen_sha256, "frozen_before_real_runs": True,
                        "source": profile.metadata.source, "gpu_name": profile.metadata.gpu_name},
            "cost_model": cost.describe(), "simulator": simulator(), "contexts": list(contexts),
            "reflect_tokens": REFLECT_TOKENS, "repeats": repeats, "warmups": warmups, "sim_draws": sim_draws,
            "seed": seed, "target": TARGET, "kv_bytes_per_token_profile": cost.kv_bytes_per_token,
            "sample": "held-out: the profile was given, frozen (sha256) before the first real run and unchanged "
                      "after the last; nothing here is fitted",
        },
        "facts": {str(c): f for c, f in facts.items()},
        "rows": [_row_json(r) for r in rows],
        "summary": {**_tally(rows), "all_usable": all(u["usable"] for f in facts.values() for u in f["usable"].values())},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "kv_costs.json", doc, indent=2)  # null where a figure is not finite (a zero mean)
    (out_dir / "kv_costs.md").write_text(markdown(doc, rows))
    return doc


# --- a re-comparison: committed real rows against another profile, no device ----------------------

def _committed(doc: dict, where: Path) -> None:
    """A kv_costs.json's fields that a re-comparison reads, each checked: one line naming the first
    that is missing or not what a run writes (DjinnsimError)."""
    def bad(field: str, what: str):
        raise DjinnsimError(f"{where}: not a kv_costs.json result: {field} must be {what}")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    meta = doc["meta"]
    if not isinstance(meta.get("model"), str):
        bad("meta.model", "a model's name")
    if not isinstance(meta.get("profile"), dict) or not isinstance(meta["profile"].get("sha256"), str):
        bad("meta.profile.sha256", "the frozen profile's sha256")
    if not integer(meta.get("sim_draws")) or not 1 <= meta["sim_draws"] <= 100_000:
        bad("meta.sim_draws", "a whole number of draws, 1 to 100,000")
    if not integer(meta.get("seed")) or meta["seed"] < 0:
        bad("meta.seed", "a whole number >= 0")
    for i, r in enumerate(doc["rows"]):
        if not isinstance(r, dict):
            bad(f"rows[{i}]", "an object")
        if r.get("op") not in OPS:
            bad(f"rows[{i}].op", f"one of {', '.join(OPS)}")
        swap = r["op"] in ("swap_out", "swap_in", "reflect_after_swap")
        if r.get("host") not in (("pinned", "pageable") if swap else (None,)):
            bad(f"rows[{i}].host", "pinned or pageable" if swap else "null")
        if not integer(r.get("context_tokens")) or not 1 <= r["context_tokens"] <= 10**7:
            bad(f"rows[{i}].context_tokens", "a whole number of tokens, 1 to 10^7")
        if not number(r.get("real_mean_s")) or r["real_mean_s"] <= 0:
            bad(f"rows[{i}].real_mean_s", "a finite number of seconds > 0")
        ci = r.get("real_ci_s")
        if not isinstance(ci, list) or len(ci) != 2 or not all(number(v) for v in ci):
            bad(f"rows[{i}].real_ci_s", "two finite numbers of seconds")
        if not integer(r.get("real_n")) or r["real_n"] < 1:
            bad(f"rows[{i}].real_n", "a whole number >= 1")


def rejudge_file(real_json: Path, profile_path: Path, out_dir: Path, say: Callable[[str], None] = print) -> dict:
    """The real rows of a committed kv_costs.json (their means and 95% intervals, as measured) judged
    again against `profile_path`'s simulated costs, computed now as `run` computes them (its contexts,
    sim draws and seed). Nothing is measured. Unless the profile is the one the runs froze (same
    sha256), the result is IN-SAMPLE for any change made after those runs, and labelled so."""
    from djinnsim.sim.safeyaml import parse_json, read_input_text

    real_json, profile_path = Path(real_json), Path(profile_path)
    doc = parse_json(read_input_text(real_json, "kv_costs result"), str(real_json), "kv_costs result")
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not isinstance(doc.get("meta"), dict):
        raise DjinnsimError(f"{real_json}: not a kv_costs.json (no meta and rows)")
    _committed(doc, real_json)
    if not profile_path.is_file():
        raise DjinnsimError(f"profile not found: {profile_path}")
    profile = load_profile(profile_path)
    spec = get_model(profile.metadata.model_id)
    meta = doc["meta"]
    if get_model(meta["model"]).key != spec.key:
        raise DjinnsimError(f"{real_json} measured {meta['model']}; profile {profile_path} is of {spec.model_id}")
    cost = ProfileCostModel(profile, spec)
    sha256 = file_sha256(profile_path)
    held_out = sha256 == meta["profile"]["sha256"]
    rows = []
    by_context: dict[int, list[dict]] = {}
    for r in doc["rows"]:
        by_context.setdefault(int(r["context_tokens"]), []).append(r)
    hosts = tuple(sorted({r["host"] for r in doc["rows"] if r["host"]}, key=("pinned", "pageable").index))
    facts = {}
    for context, real_rows in by_context.items():
        cost.out_of_range.clear()
        sim = simulated_costs(cost, spec, context, hosts, int(meta["sim_draws"]), int(meta["seed"]))
        facts[str(context)] = {**doc.get("facts", {}).get(str(context), {}), "sim_kv_bytes": context * cost.kv_bytes_per_token,
                               "out_of_range": sorted(cost.out_of_range)}
        for r in real_rows:
            mean, ci = float(r["real_mean_s"]), (float(r["real_ci_s"][0]), float(r["real_ci_s"][1]))
            rows.append(judged(r["op"], r["host"], context, mean, ci, int(r["real_n"]), sim[(r["op"], r["host"])],
                               swap_out_range_s(cost, context, r["host"]) if r["op"] == "swap_out" else None))
    rows.sort(key=lambda r: (OPS.index(r.op), r.host or "", r.context_tokens))
    sample = (f"re-comparison, no device: the real rows of {real_json} (held out when measured, against profile "
              f"sha256 {meta['profile']['sha256'][:16]}) judged against profile {profile_path} (sha256 {sha256[:16]}), "
              + ("the same profile: held out for the simulator the runs used; where a charge changed since, IN-SAMPLE "
                 "for that change" if held_out else "another profile: IN-SAMPLE for any change made after those runs"))
    out = {
        "meta": {**meta, "profile": {"path": str(profile_path), "sha256": sha256, "frozen_before_real_runs": held_out,
                                     "source": profile.metadata.source, "gpu_name": profile.metadata.gpu_name},
                 "cost_model": cost.describe(), "simulator": simulator(), "sample": sample,
                 "rejudged_from": {"path": str(real_json), "profile_sha256": meta["profile"]["sha256"]}},
        "facts": facts,
        "rows": [_row_json(r) for r in rows],
        "summary": {**_tally(rows), "all_usable": doc.get("summary", {}).get("all_usable")},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "kv_costs.json", out, indent=2)
    (out_dir / "kv_costs.md").write_text(markdown(out, rows))
    say(f"re-judged {len(rows)} rows of {real_json} against {profile_path}: {_counts(out['summary'])}"
        + ("" if held_out else " (IN-SAMPLE)"))
    return out


def _tally(rows: list[Row]) -> dict:
    """Rows per verdict, and of the rows with a range, how many meet the widened real interval."""
    ranged = [r for r in rows if r.in_range is not None]
    return {**{v: sum(r.verdict == v for r in rows) for v in VERDICTS},
            "ranges": len(ranged), "ranges_meet": sum(r.in_range for r in ranged)}


def _counts(summary: dict) -> str:
    text = ", ".join(f"{summary[v]} {v}" for v in VERDICTS)
    if summary.get("ranges"):
        text += f"; pageable swap-out ranges meeting the real interval: {summary['ranges_meet']} of {summary['ranges']}"
    return text


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def table(rows: list[Row]) -> str:
    lines = ["| op | C | real mean ms [95% CI] | sim ms | error % | verdict | sim range ms (warm - fresh pages) |",
             "|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        span = "" if r.sim_range_s is None else (f"{_ms(r.sim_range_s[0])} - {_ms(r.sim_range_s[1])}: "
                                                 + ("meets" if r.in_range else "MISSES") + " the widened interval")
        lines.append(f"| {r.label} | {r.context_tokens} | {_ms(r.real_mean_s)} [{_ms(r.real_ci_s[0])}, "
                     f"{_ms(r.real_ci_s[1])}] | {_ms(r.sim_s)} | {r.error_pct:+.1f} | {r.verdict} | {span} |")
    return "\n".join(lines) + "\n"


def _faults(facts: dict) -> str:
    """Minor page faults per real swap-out by host kind, the median over the repeats, beside the KV's
    pages (how many pages the swap-out met fresh); runs before they were counted: n/a."""
    counted = facts.get("swap_out_faults")
    if not counted:
        return "n/a"
    pages = facts["kv_bytes"] // PAGE_BYTES
    return ", ".join(f"{host} {int(np.median(values))}" for host, values in counted.items() if values) + f" ({pages})"


def markdown(doc: dict, rows: list[Row]) -> str:
    meta = doc["meta"]
    out = [f"# KV costs during ACT: real against simulated ({meta['device']}, {meta['model']})", "",
           f"- Cost model: {meta['cost_model']}, profile `{meta['profile']['path']}` "
           f"sha256 `{meta['profile']['sha256']}` ({meta['sample']}).",
           f"- Real: {meta['repeats']} repeats after {meta['warmups']} warm-ups, batch 1, {meta['dtype']}; "
           f"REFLECT of {meta['reflect_tokens']} tokens to its first new token. Sim: mean of {meta['sim_draws']} "
           "jitter draws of a one-agent Djinn scenario under each KV policy.",
           f"- Target: {meta['target']}.", f"- Started {meta['started_at']}.", "", table(rows),
           "| C | KV bytes real | KV bytes sim | tensors | usable after swap / discard | outside the calibrated range "
           "| swap-out page faults, median (of pages) |",
           "|---:|---:|---:|---:|---|---|---|"]
    for c, f in doc["facts"].items():
        usable = ", ".join(f"{k}: {'yes' if u['usable'] else 'NO'} (cos {u['cosine']:.5f})" for k, u in f["usable"].items())
        out.append(f"| {c} | {f['kv_bytes']} | {f['sim_kv_bytes']} | {f['kv_tensors']} | {usable} | "
                   f"{len(f['out_of_range'])} queries | {_faults(f)} |")
    s = doc["summary"]
    out += ["", f"{_counts(s)}; every swapped and re-prefilled cache usable: {s['all_usable']}.", ""]
    return "\n".join(out)


def main(
    *,
    profile: Annotated[Path, typer.Option(help="profile of THIS machine and model (calibrated minutes before); frozen, never refitted")],
    out: Annotated[Path, typer.Option(help="folder for kv_costs.json and kv_costs.md")],
    device: Annotated[str, typer.Option(help="cuda, or cpu (the tiny model in CI)")] = "cuda",
    gpu: Annotated[int, typer.Option(help="CUDA device index")] = 0,
    contexts: Annotated[str, typer.Option(help="session contexts C in tokens, comma-separated")] = "128,512,1024,2048",
    repeats: Annotated[int, typer.Option(help="timed repeats of each operation (the 95% bootstrap interval is over them)")] = 12,
    warmups: Annotated[int, typer.Option(help="untimed repeats first")] = 3,
    sim_draws: Annotated[int, typer.Option(help="simulated jitter draws averaged per operation")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the ids, weights, bootstrap and simulated draws")] = 0,
    rejudge: Annotated[Path | None, typer.Option(help="measure nothing: judge the real rows of this kv_costs.json again against --profile (IN-SAMPLE unless it is the profile those runs froze)")] = None,
) -> None:
    """Time real KV swaps, re-prefills and reuse, and compare them with what the simulator charges."""
    import sys

    try:
        sizes = tuple(int(c) for c in contexts.split(","))
    except ValueError:
        sizes = ()
    try:
        if not sizes:
            raise DjinnsimError(f"--contexts must be comma-separated token counts, not {contexts!r}")
        if device not in ("cuda", "cpu"):
            raise DjinnsimError(f"--device must be cuda or cpu, not {device!r}")
        if rejudge is not None:
            doc = rejudge_file(rejudge, profile, out)
        else:
            doc = run(profile, out, device, gpu, sizes, repeats, warmups, sim_draws, seed)
    except DjinnsimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    rows = [Row(**{**r, "real_ci_s": tuple(r["real_ci_s"])}) for r in doc["rows"]]
    print(f"wrote {Path(out) / 'kv_costs.json'} and kv_costs.md")
    print(f"{doc['meta']['cost_model']}; target: {TARGET}")
    print(table(rows), end="")
    s = doc["summary"]
    print(f"{_counts(s)}; caches usable after swap and re-prefill: {s['all_usable']}")


if __name__ == "__main__":
    typer.run(main)
