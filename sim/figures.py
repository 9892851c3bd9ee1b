"""Figures a paper would print: Figure 6 (Exp 2.2), the Exp 2.1 figure and the search figure.

Each is a grid of small panels with shared axes, latency in seconds (Figure 6, search) or ms per
token (Exp 2.1) on log axes whose ticks are plain numbers (0.1, 1, 10, not 10^-1), every panel
titled with its group and the group's cost model (measured, transferred, roofline), one legend
for the figure, and a layout engine that keeps every label inside the canvas. Each is written as
PNG at 200 dpi and as SVG. Files are byte-identical for identical inputs (no dates or software
versions inside, a fixed SVG hash salt). matplotlib is imported inside the functions (CLI start-up).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from . import claims as claims_mod

DPI = 200
PANEL_IN = (3.4, 2.6)  # width, height of one panel, inches
MAX_COLUMNS = 4  # a figure wraps to a new row past this many panels (search answers)
MS_PER_S = 1e3


# --- shared helpers ------------------------------------------------------------------------------


def _figure(rows: int, columns: int, sharey: bool = True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(PANEL_IN[0] * columns + 0.6, PANEL_IN[1] * rows + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, sharey=sharey)
    return figure, axes


def prepare() -> None:
    """What a process's first figure costs beyond its own drawing, done ahead (a process that will
    draw one later, on a core that is free now): matplotlib imported, a panel with text and a log
    axis laid out and rendered once, so its fonts are loaded."""
    import io

    figure, axes = _figure(1, 1)
    axes[0][0].plot([1, 2], [1, 10], marker="o", label="prepare")
    axes[0][0].set_yscale("log")
    axes[0][0].set_title("prepare")
    axes[0][0].legend()
    figure.savefig(io.BytesIO(), format="png")


def saved_paths(png: Path) -> list[Path]:
    """The files `_save` writes for `png`: the PNG and the SVG beside it."""
    return [png, png.with_suffix(".svg")]


def _save(figure, png: Path) -> list[Path]:
    """png at DPI and an SVG beside it. The layout is solved once, then frozen for both files (each
    save would solve it again: most of a figure's cost is measuring its text)."""
    import matplotlib

    engine = figure.get_layout_engine()
    if engine is not None:
        engine.execute(figure)
        figure.set_layout_engine("none")
    _, svg = saved_paths(png)
    with matplotlib.rc_context({"svg.hashsalt": "djinnsim", "svg.fonttype": "path"}):
        figure.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
        figure.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return saved_paths(png)


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Text broken into lines that fit `width_in` inches at `fontsize` points (a glyph is at most
    about 0.6 em wide in the default font), so no title runs past its panel or the canvas."""
    import textwrap

    chars = max(int(width_in * 72 / (0.6 * fontsize)), 12)
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def cost_line(text: str) -> str:
    """`measured cost model: <model> on <hardware>` as `measured cost model, <hardware>`; several
    cost models (joined by ` + `) each shortened."""
    parts = []
    for item in text.split(" + "):
        kind, _, rest = item.partition(" cost model: ")
        hardware = rest.split(" on ", 1)[1] if " on " in rest else ""
        parts.append(f"{kind} cost model" + (f", {hardware}" if hardware else ""))
    return " + ".join(parts)


def _title(ax, text: str) -> None:
    # a fixed height: placing a title automatically measures every tick label of its axes
    ax.set_title(_wrap(text, PANEL_IN[0] - 0.4, 7), fontsize=7, y=1.02)


def _suptitle(figure, text: str) -> None:
    figure.suptitle(_wrap(text, figure.get_figwidth() - 0.2, 9), fontsize=9)


def _number(value: float) -> str:
    """A tick label: 0.01, 0.5, 2, 1,000, never 10^3 or 1e+03."""
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:g}"
    return f"{value:.10f}".rstrip("0").rstrip(".")


def _log_ticks(axis, values: Iterable[float]) -> None:
    """Decade ticks, with 2 and 5 between them when the data spans three decades or fewer."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    positive = [v for v in values if v and v > 0]
    span = math.log10(max(positive) / min(positive)) if positive else 0.0
    subs = (1.0, 2.0, 5.0) if span <= 3 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _number(v)))
    axis.set_minor_locator(NullLocator())  # unlabelled minor ticks cost more to draw than they tell
    axis.set_minor_formatter(NullFormatter())


def _n_ticks(ax, ns: list[int]) -> None:
    """The swept N on a log2 axis; past 8 values only powers of two are labelled."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    labelled = ns if len(ns) <= 8 else [n for n in ns if n & (n - 1) == 0] or ns
    ax.set_xticks(labelled, [str(n) for n in labelled])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _colors(backends: list[str]):
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {b: palette(i % 10) for i, b in enumerate(backends)}


def _legend(figure, handles: dict[str, Any]) -> None:
    if handles:
        longest = max(len(name) for name in handles)
        fits = max(int((figure.get_figwidth() - 0.3) / (0.45 + longest * 0.075)), 1)  # 8 pt text
        figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                      ncols=min(len(handles), fits), fontsize=8, frameon=False)


# --- Figure 6 ------------------------------------------------------------------------------------


def figure6_layout(summaries: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[float]]:
    """Rows (GPU, model) and columns (link Gbps) of Figure 6, in order of first appearance."""
    rows = list(dict.fromkeys((s["gpu"], s["model"]) for s in summaries))
    columns = list(dict.fromkeys(float(s["link_gbps"]) for s in summaries))
    return rows, columns


def write_figure6(summaries: list[dict[str, Any]], backends: list[str], path: Path) -> list[Path]:
    """Figure 6 (figure6_figure) as `path` (PNG) and its SVG."""
    return _save(figure6_figure(summaries, backends), path)


def figure6_figure(summaries: list[dict[str, Any]], backends: list[str]):
    """P99 per-phase latency (REASON + REFLECT pooled, seconds) vs N: a panel per (GPU, model) row
    and link column, a line per backend, an X and `OOM` where a backend first runs out of memory.

    The line stops before the first OOM N; the X sits at the P99 of the phases that did finish
    there, or at the line's last value when none did."""
    rows, columns = figure6_layout(summaries)
    grouped = claims_mod.groups(summaries)
    figure, axes = _figure(len(rows), len(columns))
    colors = _colors(list(dict.fromkeys([*backends, *(s["backend"] for s in summaries)])))
    handles: dict[str, Any] = {}
    every_y: list[float] = []
    for r, (gpu, model) in enumerate(rows):
        for c, gbps in enumerate(columns):
            ax = axes[r][c]
            members = grouped.get((model, gpu, gbps), [])
            ns = sorted({p["n_agents"] for p in members})
            drawn = _figure6_panel(ax, members, colors, handles)
            every_y += drawn
            if drawn:
                _n_ticks(ax, ns)
            else:
                ax.text(0.5, 0.5, "no phase finished" if members else "not simulated", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8)
            cost = cost_line(claims_mod.group_cost_model(members)) if members else "not simulated"
            _title(ax, f"{model} / {gpu} / {gbps:g} Gbps\n{cost}")
            if r == len(rows) - 1:
                gpus = claims_mod.gpus_of(members) if members else 1
                ax.set_xlabel("concurrent agents N" + (f" on {gpus} GPUs" if gpus > 1 else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel("P99 latency per phase (s)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
    if every_y:
        axes[0][0].set_yscale("log")
        _log_ticks(axes[0][0].yaxis, every_y)
    _legend(figure, handles)
    _suptitle(figure, "Figure 6: P99 per-phase latency (REASON + REFLECT) vs concurrent agents; X: first OOM")
    return figure


def _figure6_panel(ax, members: list[dict[str, Any]], colors: dict, handles: dict) -> list[float]:
    """Draw one (model, GPU, link) group; return the y values drawn (seconds)."""
    drawn: list[float] = []
    for backend, points in claims_mod.by_backend(members).items():
        color = colors[backend]
        first_oom = claims_mod.oom_n(points)
        xs, ys = [], []
        for p in points:
            value = claims_mod.p99_ms(p)
            if (first_oom is None or p["n_agents"] < first_oom) and value:
                xs.append(p["n_agents"])
                ys.append(value / MS_PER_S)
        (line,) = ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=color, label=backend)
        handles.setdefault(backend, line)
        drawn += ys
        if first_oom is not None:
            at = next(p for p in points if p["n_agents"] == first_oom)
            survivors = at["agents"]["pooled"]["p99_ms"]
            y = survivors / MS_PER_S if survivors else (ys[-1] if ys else None)
            if y:
                drawn.append(y)
                ax.plot([first_oom], [y], marker="x", ms=8, mew=2, color=color, linestyle="")
                ax.annotate(f"OOM @ {first_oom}", (first_oom, y), textcoords="offset points", xytext=(-5, 5),
                            ha="right", color=color, fontsize=7)
    return drawn


# --- Exp 2.1 -------------------------------------------------------------------------------------


def write_exp21_figure(summaries: list[dict[str, Any]], backends: list[str], path: Path) -> list[Path]:
    """The Exp 2.1 figure (exp21_figure) as `path` (PNG) and its SVG."""
    return _save(exp21_figure(summaries, backends), path)


def exp21_figure(summaries: list[dict[str, Any]], backends: list[str]):
    """Exp 2.1 per (model, GPU) row: mean per-token latency per backend (ms; against the link rate
    when the scenario sweeps it) and payload per run, both ways, per backend (MB)."""
    rows = list(dict.fromkeys((s["gpu"], s["model"]) for s in summaries))
    rates = sorted({float(s["link_gbps"]) for s in summaries})
    swept = len(rates) > 1
    figure, axes = _figure(len(rows), 2, sharey=False)
    colors = _colors(list(dict.fromkeys([*backends, *(s["backend"] for s in summaries)])))
    handles: dict[str, Any] = {}
    for r, (gpu, model) in enumerate(rows):
        members = [s for s in summaries if (s["gpu"], s["model"]) == (gpu, model)]
        cost = cost_line(claims_mod.group_cost_model(members))
        latency_ax, bytes_ax = axes[r]
        by_backend: dict[str, list[dict[str, Any]]] = {}
        for s in members:
            by_backend.setdefault(s["backend"], []).append(s)
        names = list(by_backend)
        latency_values: list[float] = []
        if swept:
            for backend, points in by_backend.items():
                points = sorted(points, key=lambda s: s["link_gbps"])
                xs = [p["link_gbps"] for p in points if claims_mod.mean_per_token_ms(p)]
                ys = [claims_mod.mean_per_token_ms(p) for p in points if claims_mod.mean_per_token_ms(p)]
                (line,) = latency_ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=colors[backend])
                handles.setdefault(backend, line)
                latency_values += ys
            latency_ax.set_xscale("log")
            _log_ticks(latency_ax.xaxis, rates)
            if len(rates) <= 8:  # the swept rates themselves
                latency_ax.set_xticks(rates, [_number(r) for r in rates])
            latency_ax.set_xlabel("link (Gbps)", fontsize=8)
            where = f"{model} / {gpu}"
        else:
            values = [claims_mod.mean_per_token_ms(by_backend[b][0]) or 0.0 for b in names]
            bars = latency_ax.bar(range(len(names)), values, color=[colors[b] for b in names])
            for backend, bar in zip(names, bars):
                handles.setdefault(backend, bar)
            latency_values += values
            _bar_labels(latency_ax, names, values)
            where = f"{model} / {gpu} / {rates[0]:g} Gbps"
        mb = [claims_mod.mean_mb_per_run(by_backend[b][0]) or 0.0 for b in names]
        bars = bytes_ax.bar(range(len(names)), mb, color=[colors[b] for b in names])
        for backend, bar in zip(names, bars):
            handles.setdefault(backend, bar)
        _bar_labels(bytes_ax, names, mb)
        for ax, values, label in ((latency_ax, latency_values, "mean latency per token (ms)"),
                                  (bytes_ax, mb, "payload per run, up + down (MB)")):
            _value_axis(ax, values)
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", axis="y", alpha=0.3)
        _title(latency_ax, f"{where}\n{cost}")
        _title(bytes_ax, f"{model} / {gpu} (bytes do not depend on the link)\n{cost}")
    _legend(figure, handles)
    _suptitle(figure, "Exp 2.1: per-token latency and bytes moved per backend")
    return figure


def _value_axis(ax, values: list[float]) -> None:
    """Log when the values span more than 30x, else linear from 0; headroom for the bar labels."""
    positive = [v for v in values if v > 0]
    if not positive:
        return
    low, high = min(positive), max(positive)
    if high / low > 30:
        ax.set_yscale("log")
        _log_ticks(ax.yaxis, positive)
        ax.set_ylim(low / 3, high * 3)
    else:
        ax.set_ylim(0, high * 1.15)


def _bar_labels(ax, names: list[str], values: list[float]) -> None:
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    for i, value in enumerate(values):
        if value <= 0:
            ax.annotate("none", (i, 0), xycoords=("data", "axes fraction"), textcoords="offset points",
                        xytext=(0, 2), ha="center", fontsize=6)
        else:
            ax.annotate(_number(float(f"{value:.3g}")), (i, value), textcoords="offset points", xytext=(0, 2), ha="center",
                        fontsize=6)


# --- search --------------------------------------------------------------------------------------


def write_search_figure(answers: list, path: Path, capacity: bool) -> list[Path]:
    """The search figure (search_figure) as `path` (PNG) and its SVG."""
    return _save(search_figure(answers, capacity), path)


def search_figure(answers: list, capacity: bool):
    """Every probe of every search answer: P99 per phase (s) vs N (capacity) or mean per-token
    latency (ms) vs link Gbps (break-even), log-log, the target dashed, failed probes as x, each
    answer circled and written in the legend; a panel per group, wrapping past MAX_COLUMNS."""
    panels: dict[tuple, list] = {}
    for a in answers:
        panels.setdefault((a.model, a.gpu, a.link_gbps if capacity else None, a.cost_model), []).append(a)
    count = max(len(panels), 1)
    columns = min(count, MAX_COLUMNS)
    rows = math.ceil(count / columns)
    figure, axes = _figure(rows, columns, sharey=False)
    flat = [ax for row in axes for ax in row]
    colors = _colors(list(dict.fromkeys(a.backend for a in answers)))
    scale = 1 / MS_PER_S if capacity else 1.0
    for ax, ((model, gpu, gbps, kind), members) in zip(flat, panels.items()):
        values: list[float] = []
        xs_all: list[float] = []
        for a in members:
            color = colors[a.backend]
            pts = sorted((p for p in a.probes if p.value_ms is not None), key=lambda p: p.x)
            xs, ys = [p.x for p in pts], [p.value_ms * scale for p in pts]
            values += ys
            xs_all += xs
            ax.plot(xs, ys, marker="o", ms=3, lw=1, color=color, label=_answer_text(a, capacity))
            bad = [p for p in pts if not p.ok]
            ax.scatter([p.x for p in bad], [p.value_ms * scale for p in bad], marker="x", color=color, zorder=3)
            x, y = (a.max_agents, a.p99_ms_at_max) if capacity else (a.link_gbps, a.per_token_ms_at)
            if x and y is not None:
                ax.scatter([x], [y * scale], s=80, facecolors="none", edgecolors=color, zorder=4)
            target = (a.slo_p99_ms if capacity else a.target_ms) * scale
            values.append(target)
            ax.axhline(target, color="grey" if capacity else color, ls="--", lw=0.8)
        if values and min(values) > 0:
            ax.set_yscale("log")
            _log_ticks(ax.yaxis, values)
        if xs_all and min(xs_all) > 0:
            ax.set_xscale("log")
            _log_ticks(ax.xaxis, xs_all)
        ax.set_xlabel("agents N" if capacity else "link (Gbps)", fontsize=8)
        ax.set_ylabel("P99 latency per phase (s)" if capacity else "mean latency per token (ms)", fontsize=8)
        where = f"{model} / {gpu}" + (f" / {gbps:g} Gbps" if capacity else "")
        _title(ax, f"{where}\n{cost_line(members[0].cost_model_detail)}")
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in flat[len(panels):]:
        ax.remove()
    what = "agents under a P99 target" if capacity else "slowest link meeting a per-token target"
    _suptitle(figure, f"Search: {what}; dashed: target, x: failed probe, circle: answer")
    return figure


def _answer_text(answer: Any, capacity: bool) -> str:
    if capacity:
        most = f">= {answer.max_agents}" if answer.limited_by == "cap" else str(answer.max_agents)
        return f"{answer.backend}: {most} agents ({answer.limited_by})"
    at = "-" if answer.link_gbps is None else f"{answer.link_gbps:g} Gbps"
    return f"{answer.backend}: {at} ({answer.limited_by})"
