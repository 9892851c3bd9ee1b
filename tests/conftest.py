"""Shared fixtures: a deterministic cost model with constant costs, and a small calibration profile."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from djinnsim.sim.costmodel import CostModel
from djinnsim.sim.profile import (
    SCHEMA_VERSION,
    Bandwidth,
    LinearFit,
    Memory,
    Metadata,
    Network,
    Profile,
    WeightLoad,
)
from djinnsim.sim.specs import ModelSpec, get_model


class FakeCostModel(CostModel):
    """Constant costs and a jitter of exactly 1.0, so every simulated time has a hand formula.

    Every constant is distinct and non-zero so a formula that drops or doubles a term fails.
    """

    source = "fake"
    gpu_name = "fake GPU"

    def __init__(
        self,
        model: ModelSpec | None = None,
        *,
        prefill_const_s: float = 0.010,
        decode_const_s: float = 0.004,
        capacity_bytes: int = 80 * 10**9,
        weight_bytes: int = 10**9,
        context_bytes: int = 10**8,
        workspace_const_bytes: int = 10**6,
        connect_const_s: float = 1.1e-3,
        per_message_const_s: float = 2.3e-4,
        serialize: Bandwidth = Bandwidth(latency_s=1.3e-5, gbps=7.0),
        deserialize: Bandwidth = Bandwidth(latency_s=1.7e-5, gbps=11.0),
        h2d_pageable: Bandwidth = Bandwidth(latency_s=3.1e-5, gbps=5.0),
        d2h_pageable: Bandwidth = Bandwidth(latency_s=4.3e-5, gbps=6.0),
        pinned: Bandwidth = Bandwidth(latency_s=1.0e-6, gbps=20.0),
        load: WeightLoad = WeightLoad(fixed_s=0.25, gbps=2.0, aggregate_gbps={}),
    ) -> None:
        super().__init__()
        self.model = model or get_model("llama-2-7b")
        self.prefill_const_s = prefill_const_s
        self.decode_const_s = decode_const_s
        self._capacity = capacity_bytes
        self._weights = weight_bytes
        self._context = context_bytes
        self._workspace = workspace_const_bytes
        self._connect = connect_const_s
        self._per_message = per_message_const_s
        self._serde = {"serialize": serialize, "deserialize": deserialize}
        self._copies = {("h2d", False): h2d_pageable, ("d2h", False): d2h_pageable,
                        ("h2d", True): pinned, ("d2h", True): pinned}
        self._load = load

    def prefill_s(self, prompt_tokens: int, batch: int = 1, context_tokens: int = 0) -> float:
        return self.prefill_const_s

    def decode_step_s(self, batch: int, sum_context: int) -> float:
        return self.decode_const_s

    def jitter_samples(self, kind: Literal["decode", "prefill"]) -> np.ndarray:
        return np.ones(1)

    def weight_load(self, tier):
        return self._load

    def copy_bandwidth(self, direction, pinned):
        return self._copies[(direction, pinned)]

    def serde_bandwidth(self, which):
        return self._serde[which]

    def connect_s(self) -> float:
        return self._connect

    def per_message_s(self) -> float:
        return self._per_message

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def weight_bytes(self) -> int:
        return self._weights

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    @property
    def context_bytes_per_process(self) -> int:
        return self._context

    def workspace_bytes(self, tokens: int, batch: int = 1) -> int:
        return self._workspace


@pytest.fixture
def fake_cost() -> FakeCostModel:
    return FakeCostModel()


def make_profile(gpu_key: str = "h100-80gb", gpu_name: str = "NVIDIA H100 80GB HBM3") -> Profile:
    """A small, hand-written measured-style profile: one fit per scaling class, narrow domains."""
    return Profile(
        schema_version=SCHEMA_VERSION,
        metadata=Metadata(source="measured", gpu_name=gpu_name, gpu_key=gpu_key,
                          model_id="meta-llama/Llama-2-7b-hf", dtype="float16"),
        prefill=LinearFit(features=["1", "tokens", "tokens_sq"], coef=[0.002, 3.0e-5, 1.0e-9],
                          scale=["host", "compute", "compute"], domain={"prompt_tokens": (1, 512), "batch": (1, 4)}),
        decode_step=LinearFit(features=["1", "sum_context", "batch"], coef=[0.012, 2.0e-7, 1.0e-4],
                              scale=["mixed", "memory", "host"], domain={"sum_context": (0, 4096), "batch": (1, 4)}),
        jitter_decode=[0.95, 1.0, 1.05, 1.3],
        jitter_prefill=[1.0],
        h2d_pinned=Bandwidth(latency_s=1e-5, gbps=40.0),
        h2d_pageable=Bandwidth(latency_s=2e-5, gbps=12.0),
        d2h_pinned=Bandwidth(latency_s=1e-5, gbps=40.0),
        d2h_pageable=Bandwidth(latency_s=2e-5, gbps=12.0),
        serialize=Bandwidth(latency_s=1e-5, gbps=4.0),
        deserialize=Bandwidth(latency_s=1e-5, gbps=6.0),
        weight_load={
            "disk": WeightLoad(fixed_s=0.4, gbps=1.8, aggregate_gbps={2: 2.4, 4: 2.6}),
            "pageable": WeightLoad(fixed_s=0.3, gbps=10.0),
            "pinned": WeightLoad(fixed_s=0.2, gbps=40.0),
        },
        network=Network(connect_s=1e-4, per_message_s=3e-5),
        memory=Memory(total_bytes=85520809984, weight_bytes=13476831232, kv_bytes_per_token=524288,
                      context_bytes_per_process=536870912),
    )


@pytest.fixture
def h100_profile() -> Profile:
    return make_profile()
