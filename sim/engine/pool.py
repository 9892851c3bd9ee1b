"""A pool of GPU servers: `nodes` x `gpus_per_node` GpuServers, one Link per node (the node's NIC,
shared by its GPUs' traffic), and a router (router.py) that places work on GPUs.

- A session that holds GPU state (a keep-alive actor's process, a Djinn session's KV) is placed once,
  on the router's first choice, and stays there: it runs out of memory on its GPU, not the pool's.
- A serverless task (a backend that loads the weights for every request) is routed anew for every
  request: to the router's first GPU with the task's memory free now, else to its first choice
  (where the task waits for memory or fails, as the backend says).
"""

from __future__ import annotations

from dataclasses import dataclass

from .link import Link
from .plan import RequestPlan
from .router import make_router
from .server import GpuServer, ServerSession


@dataclass(slots=True)
class Channel:
    """A client's side of one session: the GPU serving it, that GPU's node link, the server's
    session, and whether the connection is open."""

    server: GpuServer
    link: Link
    session: ServerSession
    connected: bool = False


class GpuPool:
    def __init__(self, servers: list[GpuServer], links: list[Link], gpus_per_node: int, router: str) -> None:
        self.servers = servers
        self.links = links
        self.gpus_per_node = gpus_per_node
        self.router = make_router(router, len(servers))
        self.per_task = servers[0].serving.load_per_request

    def _link(self, gpu: int) -> Link:
        return self.links[gpu // self.gpus_per_node]

    def open(self, agent: int):
        """Place a new session (generator: a per-agent process may wait for memory); returns its Channel."""
        # a serverless session holds nothing on a GPU: each of its tasks is routed (route)
        gpu = self.router.rank(self.servers, agent)[0] if len(self.servers) > 1 and not self.per_task else 0
        server = self.servers[gpu]
        session = yield from server.open_session(agent)
        if not self.per_task:
            server.sessions += 1
        return Channel(server, self._link(gpu), session)

    def route(self, channel: Channel, plan: RequestPlan) -> None:
        """A serverless task's GPU: the router's first with the memory free now, else its first."""
        if not self.per_task or len(self.servers) == 1:
            return
        ranked = self.router.rank(self.servers, channel.session.agent)
        need = self.servers[ranked[0]].task_bytes(plan)
        gpu = next((i for i in ranked if self.servers[i].fits_now(need)), ranked[0])
        if self.servers[gpu] is not channel.server:
            channel.server, channel.link, channel.connected = self.servers[gpu], self._link(gpu), False

    def release(self, channel: Channel) -> None:
        channel.server.release(channel.session)
        if not self.per_task:
            channel.server.sessions -= 1

    @property
    def waiting(self) -> int:
        return sum(server.memory.waiting for server in self.servers)

    @property
    def peak_bytes(self) -> int:
        """The highest memory in use on any one GPU."""
        return max(server.memory.peak_bytes for server in self.servers)
