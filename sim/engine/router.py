"""Routers of a GPU pool, in a registry keyed by their YAML tag (`cluster.router`).

A router ranks the pool's GPUs for one placement; the pool (pool.py) takes the first for a session
(a keep-alive actor, a Djinn session: it stays there) and, for a serverless task, the first that
has the task's memory free now (else the first, where it waits or fails as the backend says).

    session_affinity  an agent's home GPU (agent mod GPUs) first, then the GPUs after it
    round_robin       a cursor that moves one GPU on at every placement
    least_loaded      fewest open sessions + requests in flight, then least memory in use, then index
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence


class Loaded(Protocol):
    """What a router may read of a GPU."""

    sessions: int
    routed: int

    @property
    def used_bytes(self) -> int: ...


def _rotated(count: int, first: int) -> list[int]:
    return [(first + i) % count for i in range(count)]


class SessionAffinity:
    def __init__(self, count: int) -> None:
        self.count = count

    def rank(self, gpus: Sequence[Loaded], agent: int) -> list[int]:
        return _rotated(self.count, agent % self.count)


class RoundRobin:
    def __init__(self, count: int) -> None:
        self.count = count
        self.cursor = 0

    def rank(self, gpus: Sequence[Loaded], agent: int) -> list[int]:
        order = _rotated(self.count, self.cursor)
        self.cursor = (self.cursor + 1) % self.count
        return order


class LeastLoaded:
    def __init__(self, count: int) -> None:
        self.count = count

    def rank(self, gpus: Sequence[Loaded], agent: int) -> list[int]:
        return sorted(range(self.count), key=lambda i: (gpus[i].sessions + gpus[i].routed, gpus[i].used_bytes, i))


ROUTERS: dict[str, Callable[[int], object]] = {
    "session_affinity": SessionAffinity,
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
}


def make_router(tag: str, count: int):
    return ROUTERS[tag](count)
