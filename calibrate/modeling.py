"""Build the models djinnsim supports from their bundled config, with random weights, and run them.

Weights cannot be downloaded here: models are built from the spec in sim/data/models with random
weights (timing does not depend on weight values), or loaded from a local path. Written for both
the transformers 4.x/5.x APIs (the GPU machines run older releases than pip gives).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import torch
from djinnsim.errors import DjinnsimError
from djinnsim.sim.specs import ModelSpec

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def hf_config(spec: ModelSpec):
    """The transformers config equivalent to a bundled model spec."""
    import transformers

    if spec.architecture == "gpt2":
        return transformers.GPT2Config(
            vocab_size=spec.vocab_size,
            n_positions=spec.max_position_embeddings,
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_inner=spec.intermediate_size,
        )
    cls = transformers.MistralConfig if spec.architecture == "mistral" else transformers.LlamaConfig
    return cls(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def resolve_dtype(spec: ModelSpec, dtype: str | None, device: str) -> torch.dtype:
    name = dtype or spec.dtype
    if name not in TORCH_DTYPES:
        raise DjinnsimError(f"unknown dtype {name!r}; use one of {', '.join(TORCH_DTYPES)}")
    if device == "cpu" and name == "float16":
        return torch.float32  # fp16 matmuls on the CPU are slow and partly unsupported
    return TORCH_DTYPES[name]


def build_model(spec: ModelSpec, device: str, dtype: torch.dtype, weights: str = "random"):
    """A causal LM in eval mode on `device`: random weights, or loaded from a local folder."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if weights != "random":
            kwargs = {"dtype": dtype} if "dtype" in inspect.signature(AutoModelForCausalLM.from_pretrained).parameters else {}
            try:
                model = AutoModelForCausalLM.from_pretrained(weights, local_files_only=True, **kwargs)
            except (OSError, ValueError) as exc:
                raise DjinnsimError(f"cannot load weights from {weights}: {str(exc).splitlines()[0]}") from None
            return model.to(device=device, dtype=dtype).eval()
        with _default_dtype(dtype), torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config(spec))
    return model.to(dtype=dtype).eval()


def random_ids(spec: ModelSpec, batch: int, tokens: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (batch, tokens), generator=gen).to(device)


def output_cache(out):
    """The KV cache of a forward's output (named `cache` in newer transformers)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def forward(model, ids: torch.Tensor, cache=None, last_logits_only: bool = True):
    """One forward; returns (logits, cache). Uses the cache when given (incremental decode)."""
    kwargs = {"use_cache": True}
    if cache is not None:
        kwargs["past_key_values"] = cache
    if last_logits_only and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids, **kwargs)
    return out.logits, output_cache(out)


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer, whatever the cache class's API version."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def cut_cache(cache, length: int):
    """The cache cut back to its first `length` tokens, in place where the class can crop (a negative
    count removes that many tokens in both the 4.x and the 5.x API); None where it cannot."""
    extra = cache.get_seq_length() - length
    if extra <= 0:
        return cache
    if not hasattr(cache, "crop"):
        return None
    cache.crop(-extra)
    return cache


def cache_from_tensors(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class DecodeTiming:
    prefill_s: float
    step_s: list[float]

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.step_s)


@torch.inference_mode()
def timed_greedy_decode(model, ids: torch.Tensor, new_tokens: int, device: str) -> DecodeTiming:
    """Greedy decode with the KV cache, synchronizing after each step to time it."""
    import time

    synchronize(device)
    start = time.perf_counter()
    logits, cache = forward(model, ids)
    token = logits[:, -1:].argmax(-1)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        logits, cache = forward(model, token, cache)
        token = logits[:, -1:].argmax(-1)
        synchronize(device)
        steps.append(time.perf_counter() - start)
    return DecodeTiming(prefill_s=prefill_s, step_s=steps)
