"""`validate --level-probe`: every probed point judged a second time, on the profile moved to the
launch-bound level a short probe measured on the point's own process just before its first repeat.

Eager decode at batch 1 is CPU-launch-bound, and its level moves by tens of percent between runs
minutes apart; no profile frozen before a validation can say where it will sit. The probe (a
40-token batch-1 greedy decode after a 32-token prompt, `clients.level_probe`) runs on the process
that serves the point, outside the scored repeats, before them; its median step over the step the
profile predicts for the same shape is the factor m. The point is simulated again with every pass
the level sets (decode step, prefill and cached-prefill host floors) x m (`sim.bands.level_scaled`),
the bands drawing no level on top of it. The scored runs fix nothing here, so the anchored figures
are as held out as the main ones; they are counted apart, never into the main verdicts. The probe
after the last repeat is reported beside it: how far the level moved during the point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from djinnsim.sim.profile import Profile

from . import compare

ANCHORED_NOTE = "anchored to the level probe before the point"


def probe_factor(probe: dict, cost) -> float | None:
    """The probe's median decode step over the cost model's for the same steps (batch 1, the
    context each step ran at); None for a probe with no steps."""
    steps = [float(s) for s in probe.get("step_s") or [] if np.isfinite(s) and s > 0]
    if not steps:
        return None
    prompt = int(probe["prompt_tokens"])
    predicted = [cost.decode_step_s(1, prompt + i) for i in range(len(steps))]
    return float(np.median(steps) / np.median(predicted))


def at_given_level(profile: Profile, factor: float, note: str, path: Path) -> Profile:
    """The profile with its level-bound passes x `factor` (`sim.bands.level_scaled`), no level drawn
    by its bands on top of it (fit residuals stay), `note` added; saved at `path` and returned.
    Used by `--level-probe` here and by `--from-real --condition-on-level` (validate.offline)."""
    from djinnsim.sim.bands import level_scaled
    from djinnsim.sim.profile import save_profile

    scaled = level_scaled(profile, factor)
    if scaled.spread is not None:
        scaled = scaled.model_copy(update={"spread": scaled.spread.model_copy(update={"decode_level": [], "level_sources": []})})
    scaled = scaled.model_copy(update={"samples_file": None, "samples_sha256": None, "metadata": scaled.metadata.model_copy(
        update={"notes": [*scaled.metadata.notes, note]})})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(scaled, path)
    return scaled


def anchored(out_dir: Path, scenario_v, real, profile_path: Path, profile: Profile, n_repeats: int, draws: int,
             agents: bool, cuda: bool, sample: str, say: Callable[[str], None]) -> dict | None:
    """The anchored comparison of every point with a probe before it: {"rows": [...], "points":
    [PointComparison.to_dict()], "summary": compare.summarize(...), "comparisons": [PointComparison]};
    None when no point was probed. `sample`: the main comparison's label (the probe adds no run judged)."""
    from .pipeline import _real_repeat_metrics, cost_for, real_order, real_parts, simulate, simulate_bands  # pipeline imports this module

    probed = [rp for rp in real.points if rp.level_probe and rp.level_probe.get("before") and rp.repeats]
    if not probed:
        return None
    order, parts = real_order(real), real_parts(real)
    cost_of = cost_for(scenario_v, profile_path, profile)
    rows, comparisons = [], []
    for rp in probed:
        p = rp.point
        cost = cost_of(p)
        before = rp.level_probe["before"]
        after = rp.level_probe.get("after")
        m = probe_factor(before, cost)
        row = {"index": p.index, "label": p.label, "factor": m,
               "probe_before_step_s": float(np.median(before["step_s"])) if before.get("step_s") else None,
               "probe_after_step_s": float(np.median(after["step_s"])) if after and after.get("step_s") else None,
               "factor_after": probe_factor(after, cost) if after else None,
               "error": rp.level_probe.get("error")}
        rows.append(row)
        if m is None:
            continue
        path = out_dir / "anchored" / f"{Path(profile_path).stem}-p{p.index}.json"
        scaled = at_given_level(profile, m, f"{ANCHORED_NOTE} (point {p.index}): decode, prefill and cached prefill "
                                f"x {m:.4f}", path)
        say(f"anchored: {p.label}: level probe x {m:.3f}")
        sims = simulate(scenario_v, path, scaled, n_repeats, order, parts=parts)
        twins = sims[p.index][:len(rp.repeats)]
        sim_repeats = [compare.sim_repeat_metrics(pr.records, pr.peak_mem_bytes, agents) for pr in twins]
        band_repeats = None
        if draws and scaled.spread is not None:
            band_sims = simulate_bands(scenario_v, path, scaled, scaled.spread, n_repeats, order, draws, parts)
            band_repeats = [compare.sim_repeat_metrics(pr.records, pr.peak_mem_bytes, agents)
                            for draw in band_sims.get(p.index, []) for pr in draw[:len(twins)]]
        real_repeats = [_real_repeat_metrics(rep, agents, cuda) for rep in rp.repeats]
        all_sim = [r for pr in twins for r in pr.records]
        all_real = [r for rep in rp.repeats for r in rep.records]
        pc = compare.compare_point(p.index, p.label, p.backend.name, p.n_agents, p.link.gbps, sim_repeats,
                                   compare.stage_means(all_sim), real_repeats, compare.stage_means(all_real), band_repeats)
        pc.sample = sample
        pc.skipped = rp.skipped
        row["profile"] = str(path.relative_to(out_dir))
        comparisons.append(pc)
    return {"rows": rows, "points": [pc.to_dict() for pc in comparisons], "summary": compare.summarize(comparisons),
            "comparisons": comparisons}


def probes_of(real) -> dict[str, dict]:
    """Point index (as a string, for JSON) -> its level probes, for validation.json."""
    return {str(rp.point.index): rp.level_probe for rp in real.points if rp.level_probe}
