"""Where the cached-context prefill fit's error lies, and which form predicts another calibration best.

    python docs/calibration/cached_prefill_cv.py [--quick]

Reads the committed H200 calibrations' samples only (docs/calibration/h200-run{2..13}/*.csv, the
stage `cached_prefill`: new tokens x cached context x batch, the median of each point's timed
passes, as `calibrate.refit.cached_prefill_points` takes them). No real run (validate, kv-costs)
is read. Prints, on the 2-core CPU machine in about 4 minutes (--quick: the first two tables):

1. Each run's own fit (calibrate's form), its points split by the side of its floor
   (`calibrate.fitting.floor_split_stats`).
2. Candidate forms, each scored two ways: leave-one-calibration-out (fit on the other 11 runs'
   points pooled, scored on the held-out run's) and one run's fit scored on each other run (what a
   calibration's own profile faces). "shape-bound": points whose median over the 12 runs is above
   45 ms (GPU work well over every run's launch floor); "oracle": each point predicted by its own
   median over the other runs, the spread between calibrations that no form can remove.
3. Context extrapolation: forms fitted on contexts <= 512 (other runs pooled), scored at 1024 (the
   same 2x step as 1024 -> 2048).
4. Thinned grids (calibrate's form), scored against the full grid of the held-out runs.
5. The stage's wall time for a grid from the per-point times: 3 passes a point (warm-up and two
   timed) at the point's median over the runs (2048 from the pooled fit), the rest per point
   measured per run (stage time less its passes: the warm-up's new-shape cost, cutting the cache
   back, ids, the cache builds), and the cache builds at 2048 (a prefill of batch x 2048 tokens).

Candidate features beyond calibrate's (`attn` = batch x tokens x (context + tokens), `ctx_sq` =
batch x context^2, a floor linear in batch or log2 batch) are defined here only. The fitting
mirrors `calibrate.fitting.fit_floor_max` (splits by measured time, then refined), generalised to a
floor that is itself linear in named features; for calibrate's form the result is checked against
`fit_floor_max` itself. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from djinnsim.calibrate.bench_cached import CACHED_PREFILL_FEATURES, fit_cached_prefill
from djinnsim.calibrate.fitting import describe_floor_split, floor_split_stats, predict, solve_relative
from djinnsim.calibrate.refit import cached_prefill_points, read_samples
from djinnsim.sim.profile import load_profile, samples_path

HERE = Path(__file__).resolve().parent
RUNS = tuple(range(2, 14))
SHAPE_BOUND_S = 0.045
F0 = list(CACHED_PREFILL_FEATURES)


def feature(name: str, x: np.ndarray) -> np.ndarray:
    b, c, p = x[:, 0], x[:, 1], x[:, 2]
    return {"1": np.ones_like(b), "batch": b, "log_batch": np.log2(b), "tokens": b * p, "tokens_sq": b * p * p,
            "tokens_ctx": b * p * c, "sum_context": b * c, "attn": b * p * (c + p), "ctx_sq": b * c * c}[name]


def design(names, x):
    return np.column_stack([feature(n, x) for n in names])


class FloorFit:
    """max(floor . floor_features, coef . features); no floor: the plain sum."""

    def __init__(self, features, coef, floor_features=None, floor_coef=None):
        self.features, self.coef, self.floor_features, self.floor_coef = features, coef, floor_features, floor_coef

    def predict(self, x):
        work = design(self.features, x) @ self.coef
        return work if self.floor_coef is None else np.maximum(work, design(self.floor_features, x) @ self.floor_coef)


def _rsse(pred, y):
    return float(np.sum(((pred - y) / y) ** 2))


def fit_floor(x, y, features, floor_features=("1",), max_rounds=20):
    a, fa = design(features, x), design(floor_features, x)
    plain = solve_relative(a, y)
    best = (_rsse(a @ plain, y), plain, None)
    need = len(features) + 1

    def split(at):
        if (~at).sum() < need or at.sum() < len(floor_features):
            return None
        coef, floor = solve_relative(a[~at], y[~at]), solve_relative(fa[at], y[at])
        return _rsse(np.maximum(a @ coef, fa @ floor), y), coef, floor

    order = np.argsort(y, kind="stable")
    for k in range(1, len(y) - need + 1):
        at = np.zeros(len(y), dtype=bool)
        at[order[:k]] = True
        tried = split(at)
        if tried and tried[0] < best[0]:
            best = tried
    for _ in range(max_rounds):
        if best[2] is None:
            break
        tried = split(a @ best[1] < fa @ best[2])
        if tried is None or tried[0] >= best[0]:
            break
        best = tried
    return FloorFit(list(features), best[1], list(floor_features), best[2])


def fit_additive(x, y, features):
    return FloorFit(list(features), solve_relative(design(features, x), y))


class ByBatch:
    """Two pieces split on batch, each calibrate's form."""

    def __init__(self, x, y, features, cut):
        low = x[:, 0] <= cut
        self.cut, self.low, self.high = cut, fit_floor(x[low], y[low], features), fit_floor(x[~low], y[~low], features)

    def predict(self, x):
        low = x[:, 0] <= self.cut
        out = np.empty(len(x))
        out[low], out[~low] = self.low.predict(x[low]), self.high.predict(x[~low])
        return out


FORMS = {
    "calibrate's: max(floor, 1, tokens, tokens_sq, tokens_ctx, sum_context)": lambda x, y: fit_floor(x, y, F0),
    "the same, additive (no floor)": lambda x, y: fit_additive(x, y, F0),
    "attention b*p*(c+p): max(floor, 1, tokens, attn, sum_context)": lambda x, y: fit_floor(x, y, ["1", "tokens", "attn", "sum_context"]),
    "calibrate's + batch*context^2": lambda x, y: fit_floor(x, y, F0 + ["ctx_sq"]),
    "attention + batch*context^2": lambda x, y: fit_floor(x, y, ["1", "tokens", "attn", "sum_context", "ctx_sq"]),
    "calibrate's, floor per batch (f0 + f1 batch)": lambda x, y: fit_floor(x, y, F0, ("1", "batch")),
    "calibrate's, floor per batch (f0 + f1 log2 batch)": lambda x, y: fit_floor(x, y, F0, ("1", "log_batch")),
    "calibrate's, two pieces: batch <= 4 | >= 8": lambda x, y: ByBatch(x, y, F0, 4),
}


def load(run: int):
    profile = HERE / f"h200-run{run}" / "h200-llama-2-7b.json"
    points = cached_prefill_points(read_samples(samples_path(load_profile(profile), profile)))
    x = np.array([[p.inputs["batch"], p.inputs["context"], p.inputs["prompt_tokens"]] for p in points])
    return x, np.array([p.value for p in points]), points


def summary(e: np.ndarray) -> str:
    return (f"{100 * np.median(e):5.1f} {100 * np.sqrt(np.mean(e**2)):5.1f} {100 * np.percentile(e, 95):5.1f} "
            f"{100 * e.max():5.1f}")


HEAD = "median   rms   p95   max"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only tables 1 and 2")
    args = parser.parse_args(argv)
    data = {r: load(r) for r in RUNS}
    keys = {r: [tuple(int(v) for v in row) for row in data[r][0]] for r in RUNS}
    by_key = {r: dict(zip(keys[r], data[r][1])) for r in RUNS}
    every = sorted(set().union(*keys.values()))
    median = {k: float(np.median([by_key[r][k] for r in RUNS if k in by_key[r]])) for k in every}

    def shape_bound(r):
        return np.array([median[k] > SHAPE_BOUND_S for k in keys[r]])

    def pooled(runs, keep=None):
        x = np.vstack([data[q][0] for q in runs])
        y = np.concatenate([data[q][1] for q in runs])
        mask = np.ones(len(y), dtype=bool) if keep is None else keep(x)
        return x[mask], y[mask]

    print("1. each run's own fit (calibrate's form), by the side of its floor")
    for r in RUNS:
        x, y, points = data[r]
        fit = fit_cached_prefill(points)
        mine = fit_floor(x, y, F0)
        assert np.allclose(mine.predict(x), [predict(fit, p.inputs) for p in points], rtol=1e-6), r
        print(f"  run {r:2d}: {len(points)} points, worst {100 * fit.max_rel_err:.1f}%: "
              f"{describe_floor_split(floor_split_stats(fit, points))}")

    def score(form, keep=None, test=None):
        loco, loco_b, single, single_b = [], [], [], []
        for r in RUNS:
            x, y, _ = data[r]
            sel = np.ones(len(y), dtype=bool) if test is None else test(x)
            others = [q for q in RUNS if q != r]
            e = np.abs(form(*pooled(others, keep)).predict(x[sel]) - y[sel]) / y[sel]
            loco.append(e)
            loco_b.append(e[shape_bound(r)[sel]])
            if test is None:
                own = form(*pooled([r], keep))
                for q in others:
                    xq, yq, _ = data[q]
                    e = np.abs(own.predict(xq) - yq) / yq
                    single.append(e)
                    single_b.append(e[shape_bound(q)])
        cat = np.concatenate
        return cat(loco), cat(loco_b), (cat(single) if single else None), (cat(single_b) if single_b else None)

    print("\n2. relative error (%), " + HEAD + "; all points | shape-bound points")
    oracle, oracle_b = [], []
    for r in RUNS:
        for k, v in by_key[r].items():
            other = [by_key[q][k] for q in RUNS if q != r and k in by_key[q]]
            oracle.append(abs(np.median(other) - v) / v)
            if median[k] > SHAPE_BOUND_S:
                oracle_b.append(oracle[-1])
    print(f"  oracle (each point's median over the other runs): {summary(np.array(oracle))} | {summary(np.array(oracle_b))}")
    for name, form in FORMS.items():
        loco, loco_b, single, single_b = score(form)
        print(f"  {name}\n    leave one out: {summary(loco)} | {summary(loco_b)}\n    one run -> each other: {summary(single)} | {summary(single_b)}")
    if args.quick:
        return

    print("\n3. fitted on contexts <= 512 (other runs pooled), scored at context 1024: " + HEAD + "; all | shape-bound")
    for name, form in FORMS.items():
        if "pieces" in name:
            continue
        loco, loco_b, _, _ = score(form, keep=lambda x: x[:, 1] <= 512, test=lambda x: x[:, 1] == 1024)
        print(f"  {name}: {summary(loco)} | {summary(loco_b)}")

    print("\n4. thinned grids (calibrate's form): " + HEAD + "; all | shape-bound")
    thinned = {
        "full grid": None,
        "without 8 and 24 new tokens": lambda x: ~np.isin(x[:, 2], (8, 24)),
        "without batch 2": lambda x: x[:, 0] != 2,
        "without context 64": lambda x: x[:, 1] != 64,
    }
    for name, keep in thinned.items():
        loco, loco_b, single, single_b = score(FORMS[next(iter(FORMS))], keep=keep)
        print(f"  {name}\n    leave one out: {summary(loco)} | {summary(loco_b)}\n    one run -> each other: {summary(single)} | {summary(single_b)}")

    print("\n5. the stage's wall time")
    fit = fit_floor(*pooled(RUNS), F0)

    def pass_s(b, c, p):
        return median.get((b, c, p)) or float(fit.predict(np.array([[b, c, p]], dtype=float))[0])

    rests = []
    for r in RUNS:
        log = (HERE / f"h200-run{r}" / "calibrate.log").read_text()
        n, took = re.search(r"cached_prefill: (\d+) points .* in ([\d.]+) s", log).groups()
        rests.append((float(took) - sum(3 * v for v in by_key[r].values())) / int(n))
    rest = float(np.median(rests))
    print(f"  rest per point: median {1e3 * rest:.0f} ms over the runs ({1e3 * min(rests):.0f}-{1e3 * max(rests):.0f})")
    batches = (1, 2, 4, 8, 16, 32)
    for name, tokens, contexts in [
        ("runs 2-13's grid", (1, 8, 16, 24, 32, 64, 128), (0, 64, 128, 256, 512, 1024)),
        ("that grid + context 2048", (1, 8, 16, 24, 32, 64, 128), (0, 64, 128, 256, 512, 1024, 2048)),
        ("new tokens 1, 16, 32, 64, 128 x contexts to 2048", (1, 16, 32, 64, 128), (0, 64, 128, 256, 512, 1024, 2048)),
    ]:
        grid = [(b, c, p) for b in batches for c in contexts for p in tokens]
        passes = sum(3 * pass_s(*g) for g in grid)
        builds = sum(pass_s(b, 0, 128) / 128 * 2048 for b in batches) if 2048 in contexts else 0.0
        print(f"  {name}: {len(grid)} points, {passes + len(grid) * rest + builds:.0f} s "
              f"(passes {passes:.1f} s, rest {len(grid) * rest:.1f} s, cache builds at 2048 {builds:.1f} s)")
    for b in batches:
        row = [pass_s(b, 2048, p) for p in (1, 16, 32, 64, 128)]
        print(f"  batch {b:2d} at context 2048, a pass (ms) at 1/16/32/64/128 new tokens: "
              + " ".join(f"{1e3 * v:.0f}" for v in row))


if __name__ == "__main__":
    main()
