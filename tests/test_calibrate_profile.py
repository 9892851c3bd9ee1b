"""The bundled H100 profile, profile round trips, the composition prediction, and the GPU path."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from djinnsim.calibrate.composition import predict_step_s, step_shape
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.profile import PiecewiseFit, load_profile, save_profile
from djinnsim.sim.specs import get_model

REPO = Path(__file__).resolve().parents[1]
H100 = REPO / "sim" / "data" / "profiles" / "h100-80gb-llama-2-7b.json"
LLAMA = get_model("llama-2-7b")


@pytest.fixture(scope="module")
def h100():
    return load_profile(H100)


def test_bundled_h100_profile_was_measured_on_an_h100(h100):
    m = h100.metadata
    assert m.source == "measured" and m.gpu_key == "h100-80gb" and "H100" in m.gpu_name
    assert m.model_id == LLAMA.model_id and m.dtype == "float16" and m.weights == "random" and not m.quick
    assert m.driver and m.cuda and m.torch and m.transformers and m.command.startswith("djinnsim calibrate")
    assert (H100.parent / h100.samples_file).is_file()


def test_bundled_profile_drives_the_cost_model(h100):
    cost = ProfileCostModel(h100, LLAMA)
    # Numbers a reader can check against the hardware: batch-1 decode is host bound (tens of ms),
    # a 4096-token prefill is compute bound, the KV size is the architecture's.
    assert 0.005 < cost.decode_step_s(1, 100) < 0.1
    assert 0.05 < cost.prefill_s(4096, 1) < 0.5
    assert cost.kv_bytes_per_token == LLAMA.kv_bytes_per_token == 512 * 1024
    assert cost.weight_bytes == pytest.approx(LLAMA.weight_bytes, rel=1e-3)
    assert cost.copy_s(2**30, "h2d", pinned=True) < cost.copy_s(2**30, "h2d", pinned=False)
    assert cost.load_aggregate_gbps("disk", 4) > 0
    assert cost.out_of_range == set()
    cost.decode_step_s(64, 64 * 4096)  # outside the measured grid: reported, not silent
    assert any("decode_step" in item for item in cost.out_of_range)


def test_profile_round_trip(h100, tmp_path):
    path = save_profile(h100, tmp_path / "copy.json")
    again = load_profile(path)
    assert again == h100
    assert isinstance(again.prefill, PiecewiseFit) or again.prefill.features == ["1", "tokens", "tokens_sq"]


def test_samples_beside_the_profile_have_the_raw_grid(h100):
    with (H100.parent / h100.samples_file).open() as fh:
        rows = list(csv.DictReader(fh))
    prefill = {r["point"] for r in rows if r["stage"] == "prefill" and r["unit"] == "s"}
    decode = {r["point"] for r in rows if r["stage"] == "decode" and r["unit"] == "s"}
    assert len(prefill) >= 40 and len(decode) >= 30
    assert sum(r["stage"] == "exp21_step" for r in rows) >= 49 * 10


def test_composition_bytes_follow_the_reference_formulas():
    """One step at L = 1024: what each backend moves, per reference.md."""
    kv, logits = LLAMA.kv_bytes_per_token, LLAMA.vocab_size * 2
    blind = step_shape("semantic_blind", LLAMA, 1024)
    assert (blind.up_bytes, blind.down_bytes, blind.compute) == (1024 * 8, 1024 * logits, "prefill")
    partial = step_shape("partially_aware", LLAMA, 1024)
    assert (partial.up_bytes, partial.down_bytes) == (8 + 1023 * kv, logits + 1024 * kv)
    assert partial.up_tensors == 1 + 2 * LLAMA.num_layers
    full = step_shape("full_djinn", LLAMA, 1024)
    assert (full.up_bytes, full.down_bytes, full.compute) == (8, logits, "decode")


def test_composed_prediction_is_the_sum_of_its_primitives(h100):
    cost = ProfileCostModel(h100, LLAMA)
    parts = predict_step_s(cost, 1.0, "full_djinn", LLAMA, 512)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert parts["compute"] == pytest.approx(cost.decode_step_s(1, 511))
    assert parts["wire"] == pytest.approx((8 + LLAMA.vocab_size * 2) / 1e9)


torch = pytest.importorskip("torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_calibration_on_the_gpu(tmp_path):
    from djinnsim.calibrate.runner import run_calibration

    result = run_calibration(device="cuda", model="tiny-llama", quick=True, out=tmp_path / "gpu.json", quiet=True)
    profile = load_profile(result.profile_path)
    assert profile.metadata.device == "cuda" and profile.metadata.driver
    assert profile.h2d_pinned.gbps > profile.h2d_pageable.gbps
    ProfileCostModel(profile, get_model("tiny-llama")).decode_step_s(1, 100)


def _composition_row(backend: str, up: int, down: int, server_s: float, modelled_s: float, extra_s: float) -> dict:
    parts = dict(zip(("connect", "serialize", "wire", "deserialize"), (0.1, 0.2, 0.3, 0.4)))
    parts = {k: v * modelled_s for k, v in parts.items()}
    return {"backend": backend, "up_bytes": up, "down_bytes": down,
            "measured_s": server_s + modelled_s + extra_s, "predicted": {**parts, "compute": 9.0},
            "server": {"h2d_s": server_s / 4, "compute_s": server_s / 2, "d2h_s": server_s / 4}}


def test_the_loopback_host_time_in_series_is_what_composition_measured_beyond_the_link_parts():
    from djinnsim.calibrate.composition import loopback_serial_gbps

    rows = [
        _composition_row("partially_aware", 60 * 10**6, 60 * 10**6, 0.08, 0.15, 0.120),  # 1.0 ns/B
        _composition_row("partially_aware", 200 * 10**6, 200 * 10**6, 0.2, 0.5, 0.200),  # 0.5 ns/B
        _composition_row("partially_aware", 10**9, 10**9, 0.5, 1.5, 1.600),  # 0.8 ns/B: the median
        _composition_row("semantic_blind", 8, 10**6, 0.03, 0.001, 5.0),  # not a KV-shipping backend
    ]
    assert loopback_serial_gbps(rows) == pytest.approx(1 / 0.8, rel=1e-9)
    assert loopback_serial_gbps(rows[3:]) is None
    assert loopback_serial_gbps([_composition_row("partially_aware", 10**6, 10**6, 0.01, 0.02, -0.001)]) is None


def test_a_refit_recomputes_the_loopback_host_time_from_the_composition_rows_it_keeps(h100):
    """end_to_end keeps each partially_aware row's measured and server times; rows built from them
    and predicted with the profile's primitives give back the host time put in: 1 ns a byte."""
    from djinnsim.calibrate.composition import loopback_serial_gbps, predict_step_s, rows_from_end_to_end, step_shape

    cost = ProfileCostModel(h100, LLAMA)
    cap = h100.network.loopback_gbps
    e = {}
    for seq_len in (128, 512):
        shape = step_shape("partially_aware", LLAMA, seq_len)
        parts = predict_step_s(cost, cap, "partially_aware", LLAMA, seq_len)
        link_s = sum(parts[k] for k in ("connect", "serialize", "wire", "deserialize"))
        key = f"composition.partially_aware.L{seq_len}"
        e.update({f"{key}.server_h2d_s": 0.01, f"{key}.server_compute_s": 0.03, f"{key}.server_d2h_s": 0.02,
                  f"{key}.measured_s": 0.06 + link_s + (shape.up_bytes + shape.down_bytes) * 1e-9})
    e["composition.partially_aware.L2048.measured_s"] = 9.0  # an older profile's row, no server times: skipped
    rows = rows_from_end_to_end(e, cost, cap, LLAMA)
    assert sorted(r["seq_len"] for r in rows) == [128, 512]
    assert loopback_serial_gbps(rows) == pytest.approx(1.0, rel=1e-9)
