"""The override options that `run` and `search` share: `--set FIELD=VALUE` (repeatable) and the
shortcuts `--agents`, `--backends`, `--gpu`, `--link-gbps` (sim/overrides.py applies them).

This module imports no simulator (CLI start-up time)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="FIELD=VALUE",
    help="override any scenario field by its dotted path, the value parsed as YAML "
         "(e.g. --set workload.agents=[1,1024] --set server.max_batch=32); repeatable, applied in order")]
AgentsOption = Annotated[Optional[str], typer.Option(
    help="agent counts N, e.g. 1,8,1024 (workload.agents)")]
BackendsOption = Annotated[Optional[str], typer.Option(
    help="backends, e.g. djinn,ray_keepalive (backends)")]
GpuOption = Annotated[Optional[str], typer.Option(
    "--gpu", help="bundled GPU, e.g. h200 (gpu; replaces a GPU sweep); a comma-separated list sweeps them")]
LinkGbpsOption = Annotated[Optional[str], typer.Option(
    help="link line rate in Gbps (link.gbps; replaces a link sweep); a comma-separated list sweeps them")]


def collect(sets: list[str] | None, agents: str | None = None, backends: str | None = None,
            gpu: str | None = None, link_gbps: str | None = None) -> list:
    """The overrides of one command line, in the order sim.overrides applies them."""
    from djinnsim.sim.overrides import collect as collect_overrides

    return collect_overrides(sets, agents=agents, backends=backends, gpu=gpu, link_gbps=link_gbps)
