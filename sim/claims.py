"""Table 2 and the seed's claims, checked on per-point summaries (see report.point_summary).

Everything here is plain arithmetic over the summaries, so each verdict can be tested on crafted
numbers. Points are compared only within one group (model, GPU, link rate): a scenario that
sweeps those gets one Table 2 section and one line per claim for each group.

The seed's thresholds (EvaluationPlan, Experiment 2.1 / 2.2 README):
- density: Djinn max agents / keep-alive OOM N >= 20
- latency: serverless P99 @ N=32 / Djinn P99 @ N=32 >= 10
- Exp 2.1 latency: semantic_blind / full_djinn mean per-token latency in 30..57 (PASS if >= 30)
- Exp 2.1 bytes: semantic_blind / full_djinn bytes moved in 1e3..1e5 (PASS if >= 1e3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TABLE2_NS = (1, 8, 32)
LATENCY_N = 32

# Backend names the claims are about (the presets in sim/data/backends.yaml).
KEEPALIVE, SERVERLESS, DJINN = "ray_keepalive", "ray_serverless", "djinn"
BLIND, FULL = "semantic_blind", "full_djinn"
BLIND_VARIANTS = ("op_remoting",)

# The plan's expected values (reference.md, "The plan's expected values"); never measured.
EXPECTED_PER_TOKEN_MS = {"native_pytorch": 3.0, "semantic_blind": 850.0, "partially_aware": 110.0, "full_djinn": 15.0}
EXPECTED_MB_PER_RUN = {"semantic_blind": 60e3, "partially_aware": 4e3, "full_djinn": 0.8}
EXPECTED_AGENTS = {
    KEEPALIVE: "flat ~100 ms, OOM at N = 2-3",
    SERVERLESS: "~5 s at N=1, ~10 s at N=32",
    DJINN: "~120 ms at N=1, ~180 ms at N=32",
}


@dataclass(frozen=True)
class Claim:
    name: str
    group: str
    verdict: str  # PASS | FAIL | N/A
    value: float | None
    threshold: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "verdict": self.verdict,
                "value": self.value, "threshold": self.threshold, "detail": self.detail}


# --- grouping ------------------------------------------------------------------------------------


def group_key(summary: dict[str, Any]) -> tuple[str, str, float]:
    return (summary["model"], summary["gpu"], float(summary["link_gbps"]))


def group_label(key: tuple[str, str, float]) -> str:
    model, gpu, gbps = key
    return f"{model} / {gpu} / {gbps:g} Gbps"


def groups(summaries: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    """Summaries by (model, GPU, link), in order of first appearance."""
    found: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for summary in summaries:
        found.setdefault(group_key(summary), []).append(summary)
    return found


def by_backend(summaries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        found.setdefault(summary["backend"], []).append(summary)
    for points in found.values():
        points.sort(key=lambda s: s["n_agents"] or 0)
    return found


# --- agent sweeps --------------------------------------------------------------------------------


def p99_ms(summary: dict[str, Any]) -> float | None:
    """Pooled REASON+REFLECT P99 of a point; None when the point OOMed or has no phase."""
    if summary["oom"]:
        return None
    return summary["agents"]["pooled"]["p99_ms"]


def oom_n(points: list[dict[str, Any]]) -> int | None:
    """The smallest N with an OOM record."""
    return min((p["n_agents"] for p in points if p["oom"]), default=None)


def max_agents_without_oom(points: list[dict[str, Any]]) -> int | None:
    return max((p["n_agents"] for p in points if not p["oom"]), default=None)


def memory_bound_agents(points: list[dict[str, Any]]) -> int | None:
    bounds = [p["memory_bound_agents"] for p in points if p.get("memory_bound_agents") is not None]
    return max(bounds) if bounds else None


def nearest_point(points: list[dict[str, Any]], n: int) -> dict[str, Any] | None:
    """The point whose N is closest to n (the smaller one on a tie)."""
    return min(points, key=lambda p: (abs(p["n_agents"] - n), p["n_agents"]), default=None)


def density_claim(group: str, points: dict[str, list[dict[str, Any]]]) -> Claim:
    name, threshold = "density (Djinn max agents / keep-alive OOM N)", ">= 20"
    if DJINN not in points or KEEPALIVE not in points:
        return Claim(name, group, "N/A", None, threshold, f"needs backends {DJINN} and {KEEPALIVE}")
    djinn_max = memory_bound_agents(points[DJINN])
    djinn_note = "memory bound"
    if djinn_max is None:
        djinn_max = max_agents_without_oom(points[DJINN])
        djinn_note = "largest N run without OOM (no memory bound reported)"
    keep_n = oom_n(points[KEEPALIVE])
    keep_note = "first OOM in the sweep"
    bound = memory_bound_agents(points[KEEPALIVE])
    if keep_n is None:
        if bound is None:
            return Claim(name, group, "N/A", None, threshold, "keep-alive never OOMed and reports no memory bound")
        keep_n, keep_note = bound + 1, "no OOM in the sweep; memory bound + 1"
    elif bound is not None and bound + 1 < keep_n:
        # Both sides by the same memory definition: the sweep may jump past the first N that OOMs.
        keep_n, keep_note = bound + 1, f"memory bound + 1; the sweep's first OOM is at N = {keep_n}"
    if not djinn_max:
        return Claim(name, group, "N/A", None, threshold, "Djinn ran no N without OOM")
    ratio = djinn_max / keep_n
    detail = f"Djinn max agents {djinn_max} ({djinn_note}) / keep-alive OOM at N = {keep_n} ({keep_note})"
    return Claim(name, group, _verdict(ratio >= 20), ratio, threshold, detail)


def latency_claim(group: str, points: dict[str, list[dict[str, Any]]]) -> Claim:
    name, threshold = f"latency (serverless P99 / Djinn P99 at N = {LATENCY_N})", ">= 10"
    if DJINN not in points or SERVERLESS not in points:
        return Claim(name, group, "N/A", None, threshold, f"needs backends {DJINN} and {SERVERLESS}")
    serverless = {p["n_agents"]: p99_ms(p) for p in points[SERVERLESS]}
    djinn = {p["n_agents"]: p99_ms(p) for p in points[DJINN]}
    common = sorted(n for n in serverless if n in djinn and serverless[n] and djinn[n])
    if not common:
        return Claim(name, group, "N/A", None, threshold, "no N where both ran without OOM")
    n = LATENCY_N if LATENCY_N in common else common[-1]
    ratio = serverless[n] / djinn[n]
    detail = f"at N = {n}: serverless {_ms(serverless[n])} / Djinn {_ms(djinn[n])}"
    if n != LATENCY_N:
        detail += f" (N = {LATENCY_N} not available to both; largest common N used)"
    return Claim(name, group, _verdict(ratio >= 10), ratio, threshold, detail)


# --- decode points (Exp 2.1) ---------------------------------------------------------------------


def mean_per_token_ms(summary: dict[str, Any]) -> float | None:
    return summary["decode"]["mean_per_token_ms"]


def mean_mb_per_run(summary: dict[str, Any]) -> float | None:
    """Payload both ways per measured run, MB."""
    up, down = summary["decode"]["mean_bytes_up"], summary["decode"]["mean_bytes_down"]
    if up is None or down is None:
        return None
    return (up + down) / 1e6


def decode_latency_claim(group: str, points: dict[str, list[dict[str, Any]]], blind_name: str = BLIND) -> Claim:
    name, threshold = f"Exp 2.1 latency ({blind_name} / full_djinn mean per-token)", ">= 30 (seed: 30-57)"
    if blind_name not in points or FULL not in points:
        return Claim(name, group, "N/A", None, threshold, f"needs backends {blind_name} and {FULL}")
    blind, full = mean_per_token_ms(points[blind_name][0]), mean_per_token_ms(points[FULL][0])
    if not blind or not full:
        return Claim(name, group, "N/A", None, threshold, "a backend has no OOM-free run")
    ratio = blind / full
    within = "inside" if 30 <= ratio <= 57 else "outside"
    detail = f"{_ms(blind)} / {_ms(full)} per token; {within} the seed's 30-57 range"
    return Claim(name, group, _verdict(ratio >= 30), ratio, threshold, detail)


def decode_bytes_claim(group: str, points: dict[str, list[dict[str, Any]]], blind_name: str = BLIND) -> Claim:
    name, threshold = f"Exp 2.1 bytes ({blind_name} / full_djinn payload per run)", ">= 1e3 (seed: 1e3-1e5)"
    if blind_name not in points or FULL not in points:
        return Claim(name, group, "N/A", None, threshold, f"needs backends {blind_name} and {FULL}")
    blind, full = mean_mb_per_run(points[blind_name][0]), mean_mb_per_run(points[FULL][0])
    if blind is None or not full:
        return Claim(name, group, "N/A", None, threshold, "a backend has no OOM-free run or moved no bytes")
    ratio = blind / full
    within = "inside" if 1e3 <= ratio <= 1e5 else "outside"
    detail = f"{_mb(blind)} / {_mb(full)} per run (up + down); {within} the seed's 1e3-1e5 range"
    return Claim(name, group, _verdict(ratio >= 1e3), ratio, threshold, detail)


def evaluate_claims(summaries: list[dict[str, Any]], workload: str) -> list[Claim]:
    """Every claim, for every (model, GPU, link) group; claims of the other experiment are N/A."""
    claims: list[Claim] = []
    for key, members in groups(summaries).items():
        label, points = group_label(key), by_backend(members)
        if workload == "agents":
            claims += [density_claim(label, points), latency_claim(label, points)]
            claims += [Claim(c, label, "N/A", None, t, "needs a decode workload (Exp 2.1)") for c, t in (
                ("Exp 2.1 latency (semantic_blind / full_djinn mean per-token)", ">= 30 (seed: 30-57)"),
                ("Exp 2.1 bytes (semantic_blind / full_djinn payload per run)", ">= 1e3 (seed: 1e3-1e5)"))]
        else:
            claims += [Claim(c, label, "N/A", None, t, "needs an agents workload (Exp 2.2)") for c, t in (
                ("density (Djinn max agents / keep-alive OOM N)", ">= 20"),
                (f"latency (serverless P99 / Djinn P99 at N = {LATENCY_N})", ">= 10"))]
            claims += [decode_latency_claim(label, points), decode_bytes_claim(label, points)]
            # Which "blind" the seed meant changes its ratios: op-by-op remoting is judged too when run.
            for variant in BLIND_VARIANTS:
                if variant in points:
                    claims += [decode_latency_claim(label, points, variant), decode_bytes_claim(label, points, variant)]
    return claims


# --- Markdown ------------------------------------------------------------------------------------


def table2_markdown(summaries: list[dict[str, Any]]) -> str:
    lines = ["# Table 2: agent scaling", "",
             "P99 pools the REASON and REFLECT latencies of all agents (ms, at the client, queueing included).",
             "A cell shows the nearest N swept when the column's N was not; `OOM` when that point had an OOM",
             "record (in brackets: the P99 of the phases that did finish).", ""]
    for key, members in groups(summaries).items():
        lines += [f"## {group_label(key)}", ""]
        header = ["backend", "max agents (no OOM in sweep)", "max agents (memory bound)",
                  *(f"P99 @ N={n}" for n in TABLE2_NS), "OOM at N"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for backend, points in by_backend(members).items():
            row = [backend, _opt(max_agents_without_oom(points), "none"), _opt(memory_bound_agents(points), "-")]
            row += [_p99_cell(nearest_point(points, n), n) for n in TABLE2_NS]
            row.append(_opt(oom_n(points), "none"))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def claims_markdown(summaries: list[dict[str, Any]], workload: str, claims: list[Claim]) -> str:
    lines = ["# Claims", "",
             "Each claim of the seed, checked on the simulated points of one model / GPU / link group.",
             "PASS or FAIL against the seed's threshold; N/A when the scenario lacks what it needs.", "",
             "| group | claim | value | threshold | verdict | numbers |", "|---|---|---|---|---|---|"]
    for c in claims:
        value = "-" if c.value is None else _ratio(c.value)
        lines.append(f"| {c.group} | {c.name} | {value} | {c.threshold} | **{c.verdict}** | {c.detail} |")
    lines += ["", "## Simulated vs the plan's expected values", "",
              "The expected values are the plan's hypotheses (reference.md); none was ever measured.", ""]
    for key, members in groups(summaries).items():
        points = by_backend(members)
        lines += [f"### {group_label(key)}", ""]
        if workload == "agents":
            lines += ["| backend | P99 @ N=1 | P99 @ N=32 | OOM at N | expected |", "|---|---|---|---|---|"]
            for backend, pts in points.items():
                lines.append(f"| {backend} | {_p99_cell(nearest_point(pts, 1), 1)} | "
                             f"{_p99_cell(nearest_point(pts, 32), 32)} | {_opt(oom_n(pts), 'none')} | "
                             f"{EXPECTED_AGENTS.get(backend, '-')} |")
        else:
            lines += ["| backend | mean per-token | expected per-token | MB per run (up + down) | expected MB |",
                      "|---|---|---|---|---|"]
            for backend, pts in points.items():
                expected_ms = EXPECTED_PER_TOKEN_MS.get(backend)
                expected_mb = EXPECTED_MB_PER_RUN.get(backend)
                mb = mean_mb_per_run(pts[0])
                lines.append(f"| {backend} | {_ms(mean_per_token_ms(pts[0]))} | "
                             f"{'-' if expected_ms is None else _ms(expected_ms)} | "
                             f"{'-' if mb is None else _mb(mb)} | {'-' if expected_mb is None else _mb(expected_mb)} |")
        lines.append("")
    return "\n".join(lines)


def _p99_cell(point: dict[str, Any] | None, n: int) -> str:
    if point is None:
        return "-"
    where = "" if point["n_agents"] == n else f" (N={point['n_agents']})"
    if point["oom"]:
        survivors = point["agents"]["pooled"]["p99_ms"]
        return "OOM" + ("" if survivors is None else f" [{_ms(survivors)}]") + where
    value = point["agents"]["pooled"]["p99_ms"]
    return ("-" if value is None else _ms(value)) + where


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _opt(value: Any, missing: str) -> str:
    return missing if value is None else str(value)


def _num(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{_num(x)} ms"


def _mb(x: float) -> str:
    return f"{_num(x)} MB"


def _ratio(x: float) -> str:
    return f"{x:.3g}x" if x < 1e4 else f"{x:.3e}x"
