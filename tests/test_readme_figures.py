"""The README's figures for the shipped scenarios are the committed golden summaries' figures: a golden
regenerated for a model change must take the README with it (a new-user trial found five that had
not). Each check renders one golden value the way the README writes it and looks for that text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _golden(name: str) -> dict:
    return json.loads((ROOT / "scenarios" / "golden" / f"{name}.summary.json").read_text())


def _claim(name: str, starts: str, gpu: str = "h100-80gb") -> dict:
    (claim,) = [c for c in _golden(name)["claims"] if c["name"].startswith(starts) and f"/ {gpu} /" in c["group"]]
    return claim


def _verdict(claim: dict) -> str:
    return {"PASS": "PASSES", "FAIL": "FAILS"}[claim["verdict"]]


def _pooled_p99(name: str, label_start: str, n: int) -> float:
    (point,) = [p for p in _golden(name)["points"] if p["label"].startswith(label_start) and p["n_agents"] == n]
    return point["agents"]["pooled"]["p99_ms"]


def _expected() -> list[tuple[str, str]]:
    util_h100 = _claim("exp21_decode", "higher GPU utilization")
    util_a100 = _claim("exp21_decode", "higher GPU utilization", gpu="a100-80gb")
    serverless, djinn = _claim("agents32", "serverless P99 at N = 32"), _claim("agents32", "Djinn P99 at N = 32")
    batched = [_pooled_p99("agents32_batching", "djinn_batched__", n) for n in (1, 8, 32)]
    return [
        ("Exp 2.1 GPU utilization, H100", f"Exp 2.1 {_verdict(util_h100)} at {util_h100['value']:.2f}x on the H100"),
        ("Exp 2.1 GPU utilization, A100", f"{_verdict(util_a100)} at {util_a100['value']:.3f}x on the A100"),
        ("agents32 serverless P99", f"P99 > 5 s at N = 32 {_verdict(serverless)} ({serverless['value']:,.0f} ms)"),
        ("agents32 Djinn P99", f"Djinn P99 < 200 ms at N = 32 {_verdict(djinn)} ({djinn['value']:,.0f} ms)"),
        ("agents32_batching P99", "keeps P99 at " + " / ".join(f"{v:,.0f} ms" for v in batched) + " at N = 1 / 8 / 32"),
        ("pool32 serverless P99", f"serverless P99 at 32 per GPU {_claim('pool32', 'serverless P99')['value']:,.0f} ms"),
        ("pool32 Djinn P99", f"Djinn {_claim('pool32', 'Djinn P99')['value']:,.0f} ms (FAIL < 200 ms)"),
    ]


@pytest.mark.parametrize(("what", "text"), _expected(), ids=[w for w, _ in _expected()])
def test_the_readme_quotes_the_golden_figure(what, text):
    flat = " ".join(README.split())  # the README wraps its prose anywhere
    assert text in flat, f"README does not say {text!r} ({what}, from scenarios/golden/)"
