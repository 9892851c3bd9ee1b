"""Whole-model weight loads for the serverless baseline: from a safetensors file or host memory.

The model is built without initializing its weights (an allocation only), then each tensor is
filled from the source tier the way calibrate's weight-load benchmark reads it: `disk` reads the
safetensors file straight to the device (page cache and all, as a warm Ray worker would),
`pageable` and `pinned` copy a state dict the worker keeps in host memory.
"""

from __future__ import annotations

import contextlib
import warnings

from djinnsim.sim.specs import ModelSpec


@contextlib.contextmanager
def _no_init():
    """Skip random initialization: the weights are about to be overwritten by a load."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5.x
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4.x
        except ImportError:  # no such helper: initialize anyway (slower, same result after the copy)
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


def empty_model(spec: ModelSpec, device: str, dtype):
    """The model's modules with uninitialized weights allocated on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    from djinnsim.calibrate.modeling import _default_dtype, hf_config

    with warnings.catch_warnings(), _no_init(), _default_dtype(dtype), torch.device(device):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(hf_config(spec))
    return model.to(dtype=dtype).eval()


def save_weights(model, path: str) -> int:
    """Write the model's state dict as one safetensors file; returns its size in bytes."""
    import os

    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, path)
    return os.path.getsize(path)


def host_state(path: str, pinned: bool) -> dict:
    """The state dict read into (pinned or pageable) host memory, pages faulted in."""
    from safetensors.torch import load_file

    state = {}
    for name, tensor in load_file(path, device="cpu").items():
        state[name] = tensor.pin_memory() if pinned else tensor.clone()
    return state


def load_model(spec: ModelSpec, device: str, dtype, path: str, host: dict | None):
    """A ready model on `device`, its weights copied from `host` (a state dict) or read from `path`."""
    import torch
    from safetensors import safe_open

    model = empty_model(spec, device, dtype)
    targets = model.state_dict()
    with torch.no_grad():
        if host is not None:
            for name, tensor in host.items():
                targets[name].copy_(tensor, non_blocking=tensor.is_pinned())
        else:
            with safe_open(path, framework="pt", device=device) as fh:
                names = list(fh.keys())
                for name in names:
                    targets[name].copy_(fh.get_tensor(name))
    missing = set(targets) - set(host if host is not None else names)
    if missing:
        raise ValueError(f"weights file lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    return model
