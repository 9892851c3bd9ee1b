"""Sweeps in parallel: local processes and Ray tasks give the sequential run's files byte for byte."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from djinnsim.cli import app
from djinnsim.errors import DjinnsimError
from djinnsim.sim.parallel import map_points
from djinnsim.sim.run import run_scenario_file

# Two backends, a pool of two GPUs, three N: 6 points that each take a fraction of a second.
SWEEP = """
name: sweep
seed: 7
backends: [ray_serverless, djinn]
cluster: {nodes: 2, gpus_per_node: 1, router: least_loaded}
workload:
  kind: agents
  agents: [1, 3, 6]
  reason: {input_tokens: 16, new_tokens: 6}
  act: {kind: exponential, mean_s: 0.5}
  reflect: {input_tokens: 8, new_tokens: 6}
  arrival: {kind: poisson, rate_per_s: 4}
"""
FILES = ("summary.json", "records.csv", "claims.md", "table2.md", "trace.json")


def _square(x: int) -> int:
    return x * x


def test_map_points_keeps_the_items_order():
    done = []
    assert map_points(_square, list(range(7)), jobs=2, progress=lambda d, t, i: done.append((d, t))) == \
        [x * x for x in range(7)]
    assert [d for d, _ in done] == list(range(1, 8)) and {t for _, t in done} == {7}


def test_jobs_below_one_is_an_error():
    with pytest.raises(DjinnsimError, match="--jobs"):
        map_points(_square, [1], jobs=0)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    path = folder / "sweep.yaml"
    path.write_text(SWEEP)
    return path, run_scenario_file(path, out=folder / "sequential", quiet=True)


def _same_files(one: Path, other: Path) -> None:
    for name in FILES:
        assert (one / name).read_bytes() == (other / name).read_bytes(), name
    assert sorted(p.name for p in (one / "baselines").iterdir()) == sorted(p.name for p in (other / "baselines").iterdir())


def test_two_local_processes_give_the_sequential_files(sequential, tmp_path):
    path, expected = sequential
    _same_files(expected, run_scenario_file(path, out=tmp_path / "jobs2", quiet=True, jobs=2))


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_tasks_give_the_sequential_files(sequential, tmp_path):
    path, expected = sequential
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "ray"), "--quiet", "--ray"])
    assert result.exit_code == 0, result.output
    _same_files(expected, tmp_path / "ray")


def test_ray_missing_is_one_line(sequential, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    result = CliRunner().invoke(app, ["run", str(sequential[0]), "--out", str(tmp_path / "x"), "--ray"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: --ray needs Ray: pip install 'djinnsim[ray]'"]


def test_ray_address_nobody_listens_at_is_one_line(sequential, tmp_path):
    pytest.importorskip("ray")
    result = CliRunner().invoke(app, ["run", str(sequential[0]), "--quiet", "--ray", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: --ray: nothing answers at 127.0.0.1:1")
