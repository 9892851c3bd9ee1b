"""Model and GPU specifications shipped with djinnsim (sim/data/{models,gpus}/*.yaml)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from djinnsim.errors import DjinnsimError

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
TOKEN_ID_BYTES = 8  # token ids cross the wire as int64


class ModelSpec(BaseModel):
    """Architecture of a decoder-only transformer, as much as costs and memory need."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str
    architecture: str = Field(pattern="^(llama|mistral|gpt2)$")
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    dtype: str = Field(pattern="^(float16|bfloat16|float32)$")
    parameters: int = Field(gt=0)

    @property
    def key(self) -> str:
        return self.model_id.rsplit("/", 1)[-1].lower()

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def weight_bytes(self) -> int:
        return self.parameters * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer; grouped-query attention stores num_kv_heads heads only."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def logits_bytes_per_position(self) -> int:
        return self.vocab_size * self.dtype_bytes

    def flops_per_token(self, context_tokens: int = 0) -> float:
        """Forward FLOPs for one token: 2 per parameter plus attention over the context."""
        attention = 4 * self.num_layers * self.hidden_size * context_tokens
        return 2.0 * self.parameters + attention

    def counted_parameters(self) -> int:
        """Parameters implied by the architecture fields (a check on `parameters`)."""
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        kv_dim = self.num_kv_heads * self.head_dim
        if self.architecture == "gpt2":
            per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
            return v * h + self.max_position_embeddings * h + n * per_layer + 2 * h
        per_layer = h * h + 2 * h * kv_dim + h * h + 3 * h * i + 2 * h
        return 2 * v * h + n * per_layer + h


class GpuSpec(BaseModel):
    """Datasheet figures of a GPU, for the analytic roofline model and profile transfer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    key: str
    memory_bytes: int = Field(gt=0)
    hbm_gbps: float = Field(gt=0, description="HBM bandwidth, GB/s")
    peak_tflops_fp16: float = Field(gt=0, description="dense fp16/bf16 tensor-core peak, TFLOP/s")
    pcie_gbps: float = Field(gt=0, description="effective pinned host<->device bandwidth, GB/s")
    pcie_pageable_gbps: float = Field(gt=0, description="effective pageable host<->device bandwidth, GB/s")
    disk_gbps: float = Field(gt=0, description="local disk read bandwidth for weight files, GB/s")


def _data_dir(kind: str) -> Path:
    return Path(str(resources.files("djinnsim.sim") / "data" / kind))


# The bundled data files are ours (not a scenario anyone may have written, see safeyaml): read by
# LibYAML's parser where PyYAML has it, the same safe constructor and resolver as yaml.safe_load
# (the same values), about 9x faster than the pure-Python parser (every `djinnsim` start reads them)
BUNDLED_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_bundled_yaml(text: str) -> Any:
    """A bundled data file's YAML: yaml.safe_load's values, by BUNDLED_YAML_LOADER."""
    return yaml.load(text, Loader=BUNDLED_YAML_LOADER)


def _load_yaml_model(path: Path, cls: type[BaseModel]) -> BaseModel:
    try:
        return cls.model_validate(load_bundled_yaml(path.read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise DjinnsimError(f"{path}: invalid {cls.__name__}: {str(exc).splitlines()[0]}") from None


@lru_cache(maxsize=None)
def available_models() -> dict[str, ModelSpec]:
    """All bundled models, keyed by both their short key (llama-2-7b) and their model_id."""
    found: dict[str, ModelSpec] = {}
    for path in sorted(_data_dir("models").glob("*.yaml")):
        spec = _load_yaml_model(path, ModelSpec)
        found[path.stem] = spec
        found[spec.key] = spec
        found[spec.model_id.lower()] = spec
    return found


@lru_cache(maxsize=None)
def available_gpus() -> dict[str, GpuSpec]:
    found: dict[str, GpuSpec] = {}
    for path in sorted(_data_dir("gpus").glob("*.yaml")):
        spec = _load_yaml_model(path, GpuSpec)
        found[spec.key] = spec
    return found


def get_model(name: str) -> ModelSpec:
    models = available_models()
    spec = models.get(name.lower())
    if spec is None:
        known = sorted(path.stem for path in _data_dir("models").glob("*.yaml"))
        raise DjinnsimError(f"unknown model {name!r}; known models: {', '.join(known)}")
    return spec


def get_gpu(name: str) -> GpuSpec:
    gpus = available_gpus()
    spec = gpus.get(name.lower())
    if spec is None:
        by_name = {g.name.lower(): g for g in gpus.values()}
        spec = by_name.get(name.lower())
    if spec is None:
        raise DjinnsimError(f"unknown GPU {name!r}; known GPUs: {', '.join(sorted(gpus))}")
    return spec


def gpu_key_for_device_name(device_name: str) -> str | None:
    """Map a CUDA device name (torch.cuda.get_device_name) to a bundled GPU key, if any."""
    lowered = device_name.lower()
    for key, token in (("h200", "h200"), ("h100-80gb", "h100"), ("a100-80gb", "a100")):
        if token in lowered:
            return key
    return None
