"""Things that own capacity, re-exported from the engine: a bandwidth shared by concurrent transfers,
a full-duplex link, GPU memory (see sim/engine/)."""

from .engine.link import Link
from .engine.memory import GpuMemory
from .engine.pipe import SharedPipe

__all__ = ["GpuMemory", "Link", "SharedPipe"]
