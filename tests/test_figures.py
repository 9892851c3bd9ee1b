"""Figures (sim/figures.py): Figure 6 as a grid (rows GPU x model, columns link), seconds on plain
log ticks, OOM marked, nothing outside the canvas, PNG at 200 dpi plus SVG, byte-identical rewrites;
the Exp 2.1 figure and the search figure."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from djinnsim.sim import figures


def _agents(backend, n, p99_ms, gpu="h100-80gb", model="llama-2-7b", gbps=25.0, oom=False, cost="measured"):
    pooled = {"mean_ms": p99_ms and p99_ms / 2, "p50_ms": p99_ms and p99_ms / 2, "p99_ms": p99_ms}
    return {"backend": backend, "model": model, "gpu": gpu, "link_gbps": gbps, "n_agents": n, "oom": oom,
            "memory_bound_agents": None, "cost_model": f"{cost} cost model: meta-llama/X on NVIDIA {gpu.upper()}",
            "agents": {"pooled": pooled}}


def _sweep(gpus=("h100-80gb",), models=("llama-2-7b",), rates=(25.0,)):
    found = []
    for gpu in gpus:
        for model in models:
            for gbps in rates:
                for n, ms in ((1, 900.0), (2, 2_000.0), (4, 40_000.0), (8, 900_000.0)):
                    found.append(_agents("djinn", n, ms, gpu, model, gbps))
                    found.append(_agents("ray_keepalive", n, 1_000.0 if n < 4 else 1_200.0, gpu, model, gbps,
                                         oom=n >= 4))
    return found


def _texts_outside(figure) -> list[str]:
    """What is drawn (tick labels in view, titles, legends) beyond the canvas, as the figure's
    tight box sticking out on each side (inches); [] when everything is inside."""
    figure.canvas.draw()
    tight = figure.get_tightbbox(figure.canvas.get_renderer())
    width, height = figure.get_size_inches()
    sides = {"left": -tight.x0, "bottom": -tight.y0, "right": tight.x1 - width, "top": tight.y1 - height}
    return [f"{side} by {beyond:.2f} in" for side, beyond in sides.items() if beyond > 0.01]


def test_figure6_grid_rows_gpu_and_model_columns_link():
    summaries = _sweep(gpus=("a100-80gb", "h100-80gb"), models=("llama-2-7b", "mistral-7b"), rates=(10.0, 25.0, 100.0))
    rows, columns = figures.figure6_layout(summaries)
    assert rows == [("a100-80gb", "llama-2-7b"), ("a100-80gb", "mistral-7b"), ("h100-80gb", "llama-2-7b"),
                    ("h100-80gb", "mistral-7b")]
    assert columns == [10.0, 25.0, 100.0]
    figure = figures.figure6_figure(summaries, ["djinn", "ray_keepalive"])
    grid = figure.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (4, 3)
    assert figure.get_figwidth() < 12 and figure.get_figheight() < 12  # 12 panels, not one row of 7680 px
    assert _texts_outside(figure) == []


def test_figure6_latency_in_seconds_on_plain_ticks_and_oom_marked():
    figure = figures.figure6_figure(_sweep(), ["djinn", "ray_keepalive"])
    figure.canvas.draw()
    ax = figure.axes[0]
    assert "(s)" in ax.get_ylabel()
    djinn = next(line for line in ax.get_lines() if line.get_label() == "djinn")
    assert list(djinn.get_ydata()) == [0.9, 2.0, 40.0, 900.0]  # ms in, seconds drawn
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all("$" not in label and "e+" not in label and "^" not in label for label in labels)
    assert "1,000" in labels or "100" in labels
    assert any(t.get_text() == "OOM @ 4" for t in ax.texts)
    assert _texts_outside(figure) == []


def test_long_cost_model_names_stay_inside_the_canvas():
    summaries = [dict(s, cost_model="transferred cost model: meta-llama/Llama-2-7b-hf on NVIDIA A100-SXM4-80GB "
                                    "(transferred from NVIDIA H100 80GB HBM3 by datasheet ratios)") for s in _sweep()]
    assert _texts_outside(figures.figure6_figure(summaries, ["djinn", "ray_keepalive"])) == []


def test_png_at_200_dpi_plus_svg_byte_identical(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = figures.write_figure6(_sweep(), ["djinn", "ray_keepalive"], tmp_path / "a" / "figure6.png")
    second = figures.write_figure6(_sweep(), ["djinn", "ray_keepalive"], tmp_path / "b" / "figure6.png")
    assert [p.name for p in first] == ["figure6.png", "figure6.svg"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    dpi = Image.open(first[0]).info["dpi"]
    assert dpi == pytest.approx((200, 200), abs=0.1)
    assert first[1].read_text().lstrip().startswith("<?xml")


def _decode(backend, per_token_ms, mb, gbps=25.0):
    return {"backend": backend, "model": "llama-2-7b", "gpu": "h100-80gb", "link_gbps": gbps, "n_agents": None,
            "oom": False, "cost_model": "measured cost model: meta-llama/X on NVIDIA H100",
            "decode": {"mean_per_token_ms": per_token_ms, "mean_bytes_up": 0, "mean_bytes_down": mb * 1e6}}


def test_exp21_figure_bars_at_one_rate_and_lines_against_a_swept_rate():
    one = [_decode("semantic_blind", 28.0, 309.0), _decode("full_djinn", 30.0, 3.2), _decode("native_pytorch", 29.0, 0)]
    figure = figures.exp21_figure(one, ["native_pytorch", "semantic_blind", "full_djinn"])
    latency, volume = figure.axes[:2]
    assert [round(p.get_height(), 3) for p in latency.patches] == [28.0, 30.0, 29.0]
    assert [round(p.get_height(), 3) for p in volume.patches] == [309.0, 3.2, 0.0]
    assert volume.get_yscale() == "log" and latency.get_yscale() == "linear"  # 97x apart vs 7%
    assert _texts_outside(figure) == []
    swept = [_decode(b, ms * (1 + 100 / g), mb, g) for g in (10.0, 25.0, 100.0)
             for b, ms, mb in (("partially_aware", 100.0, 5000.0), ("full_djinn", 30.0, 3.2))]
    figure = figures.exp21_figure(swept, ["partially_aware", "full_djinn"])
    latency = figure.axes[0]
    assert latency.get_xscale() == "log" and "Gbps" in latency.get_xlabel()
    partially = latency.get_lines()[0]
    assert list(partially.get_xdata()) == [10.0, 25.0, 100.0]
    assert _texts_outside(figure) == []


def _probe(x, ms, ok):
    return SimpleNamespace(x=x, value_ms=ms, ok=ok)


def test_search_figure_wraps_panels_and_writes_the_answer():
    answers = []
    for gbps in (1.0, 10.0, 25.0, 100.0, 400.0):
        answers.append(SimpleNamespace(
            backend="djinn", model="llama-2-7b", gpu="h100-80gb", link_gbps=gbps, cost_model="measured",
            cost_model_detail="measured cost model: meta-llama/X on NVIDIA H100", slo_p99_ms=5000.0,
            max_agents=2, p99_ms_at_max=3600.0, limited_by="slo",
            probes=[_probe(1, 1000.0, True), _probe(2, 3600.0, True), _probe(3, 5200.0, False)]))
    figure = figures.search_figure(answers, capacity=True)
    grid = figure.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (2, figures.MAX_COLUMNS)
    assert figure.axes[0].get_legend().get_texts()[0].get_text() == "djinn: 2 agents (slo)"
    assert "(s)" in figure.axes[0].get_ylabel()
    assert _texts_outside(figure) == []
