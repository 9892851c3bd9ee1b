"""What every benchmark stage shares: the model, the device, the plan, the sample log, the console."""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from djinnsim.sim.specs import ModelSpec

from .plan import Plan
from .samples import SampleLog
from .timer import make_sync


@dataclass
class Session:
    spec: ModelSpec
    device: str  # "cpu" or "cuda:N"
    dtype: Any  # torch.dtype
    plan: Plan
    log: SampleLog
    say: Callable[[str], None] = print
    advance: Callable[[float], None] = lambda units: None
    weights: str = "random"  # or a local folder the model is loaded from
    model: Any = None
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    weight_file: Path | None = None  # the model as a safetensors file, written by the weights stage
    workers: Any = None  # the worker processes the multi-process stages share (calibrate/workers.py)
    _scratch: Path | None = None

    def scratch_dir(self) -> Path:
        """A temporary folder for this calibration (large files: the weight file), made on first use."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="djinnsim-calibrate-"))
        return self._scratch

    def remove_scratch(self) -> None:
        """Stop the worker processes and remove the temporary folder."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch, self.weight_file = None, None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        make_sync(self.device)()

    def free(self) -> None:
        """Return cached blocks, so each grid point and load starts from the same allocator state."""
        gc.collect()
        if self.is_cuda:
            import torch

            torch.cuda.empty_cache()
            release_pinned = getattr(torch._C, "_host_emptyCache", None)  # cached pinned host blocks, where torch has it
            if release_pinned is not None:
                release_pinned()


def is_oom(exc: BaseException) -> bool:
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or "out of memory" in str(exc).lower()


class PeakMemory:
    """Transient scratch of one call: the allocator's peak minus what is still held afterwards."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.workspace_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.session.is_cuda:
            import torch

            self.session.sync()
            torch.cuda.reset_peak_memory_stats(self.session.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.session.is_cuda and exc[0] is None:
            import torch

            self.session.sync()
            peak = torch.cuda.max_memory_allocated(self.session.device)
            held = torch.cuda.memory_allocated(self.session.device)
            self.workspace_bytes = int(peak - held)
