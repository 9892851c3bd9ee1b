"""Sweeps in parallel: local processes and Ray tasks give the sequential run's files byte for byte."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from djinnsim.cli import app
from djinnsim.errors import DjinnsimError
from djinnsim.sim import parallel
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


# --- search on the same executor ------------------------------------------------------------------

# Three backends (three groups) with short phases on a pool of two GPUs: searches of a few probes each.
SEARCH = """
name: search_sweep
seed: 5
backends: [ray_keepalive, ray_serverless, djinn]
cluster: {nodes: 1, gpus_per_node: 2, router: least_loaded}
workload:
  kind: agents
  agents: [1]
  reason: {input_tokens: 8, new_tokens: 4}
  act: {kind: fixed, seconds: 1}
  reflect: {input_tokens: 4, new_tokens: 4}
"""
SEARCH_FILES = ("search.json", "search.md", "probes.csv", "search.png")


@pytest.fixture(scope="module")
def sequential_search(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    path = folder / "search.yaml"
    path.write_text(SEARCH)
    result = CliRunner().invoke(app, ["search", str(path), "--slo-p99-ms", "3000", "--json", "--out",
                                      str(folder / "sequential")])
    assert result.exit_code == 0, result.output
    return path, folder / "sequential", result.stdout


def _same_search(one: Path, other: Path) -> None:
    for name in SEARCH_FILES:
        assert (one / name).read_bytes() == (other / name).read_bytes(), name


def test_search_in_two_local_processes_gives_the_sequential_answers(sequential_search, tmp_path):
    path, expected, stdout = sequential_search
    result = CliRunner().invoke(app, ["search", str(path), "--slo-p99-ms", "3000", "--json", "--jobs", "2",
                                      "--out", str(tmp_path / "jobs2")])
    assert result.exit_code == 0, result.output
    assert result.stdout == stdout
    _same_search(expected, tmp_path / "jobs2")
    answers = json.loads(stdout)
    # a pool: max_agents is the pool's, per GPU beside it
    assert {a["gpus"] for a in answers.values()} == {2}
    assert all(a["max_agents_per_gpu"] == a["max_agents"] / 2 for a in answers.values())


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_search_on_ray_gives_the_sequential_answers(sequential_search, tmp_path):
    path, expected, stdout = sequential_search
    result = CliRunner().invoke(app, ["search", str(path), "--slo-p99-ms", "3000", "--ray", "--json",
                                      "--out", str(tmp_path / "ray")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(stdout)
    _same_search(expected, tmp_path / "ray")


def test_break_even_in_two_local_processes_gives_the_sequential_answers(tmp_path):
    from djinnsim.sim.parallel import held
    from djinnsim.sim.scenario import parse_scenario
    from djinnsim.sim.search import answers_json, probes_csv, search_break_even

    scenario = parse_scenario({
        "name": "decode_small", "seed": 1, "backends": ["native_pytorch", "full_djinn", "partially_aware"],
        "workload": {"kind": "decode", "prompt_tokens": 16, "new_tokens": 4, "runs": 3, "warmup_runs": 1}})
    alone = search_break_even(scenario, within_native_pct=5.0)
    with held(jobs=2):
        together = search_break_even(scenario, within_native_pct=5.0)
    assert answers_json(together) == answers_json(alone) and probes_csv(together) == probes_csv(alone)


class _Ref:
    def __init__(self, value):
        self.value = value


class _FakeRay(types.ModuleType):
    """Just enough of Ray to count how often a command starts it and how many tasks it runs."""

    class exceptions:  # noqa: N801 (ray.exceptions)
        class RayTaskError(Exception):
            pass

    def __init__(self):
        super().__init__("ray")
        self.inits = self.shutdowns = self.tasks = 0
        self._up = False

    def is_initialized(self):
        return self._up

    def init(self, **kwargs):
        self.inits += 1
        self._up = True

    def shutdown(self):
        self.shutdowns += 1
        self._up = False

    def remote(self, fn):
        fake = self

        class Remote:
            @staticmethod
            def remote(item):
                assert fake._up, "a task sent to a Ray that is not running"
                fake.tasks += 1
                return _Ref(fn(item))

        return Remote

    def wait(self, pending, num_returns=1):
        return pending[:num_returns], pending[num_returns:]

    def get(self, ref):
        return ref.value


def test_run_on_ray_starts_ray_once_for_the_sweep_and_the_claims_searches(tmp_path, monkeypatch):
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    path = tmp_path / "two.yaml"
    path.write_text(SEARCH.replace("agents: [1]", "agents: [1, 2]").replace("ray_serverless, ", ""))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--quiet", "--ray"])
    assert result.exit_code == 0, result.output
    # 4 points, then the claims' searches (density: djinn and keep-alive; keep-alive's OOM N) as 3 more tasks
    assert (fake.inits, fake.shutdowns, fake.tasks) == (1, 1, 7)
    _same_files(run_scenario_file(path, out=tmp_path / "sequential", quiet=True), tmp_path / "out")


# --- --ray ADDRESS: what answers there is checked before ray.init ----------------------------------

NOT_HTTP2 = "does not speak HTTP/2, so it is not gRPC"
SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame, HTTP/2's first word


def _headers_frame(block: bytes) -> bytes:
    """A response's HEADERS frame on stream 1 (END_STREAM | END_HEADERS) holding an HPACK `block`."""
    return len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block


@contextmanager
def _listener(answer: bytes | None):
    """A server on 127.0.0.1 that sends `answer` to whoever connects, then waits for them to close
    (`answer` None: says nothing until they close; b"": closes at once). Yields its HOST:PORT."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(30)
                try:
                    connection.recv(65536)  # the client's preface and request
                    if answer == b"":
                        continue
                    if answer is not None:
                        connection.sendall(answer)
                    while connection.recv(65536):
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        server.close()


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


def test_ray_address_nobody_listens_at_is_one_line(sequential, tmp_path, monkeypatch):
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    address = f"127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(app, ["run", str(sequential[0]), "--out", str(tmp_path / "x"), "--quiet",
                                      "--ray", address])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: --ray: nothing answers at {address} (Connection refused)"]
    assert fake.inits == 0 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("answer,reason", [
    # an egress proxy that takes every connection and answers HTTP/2 requests 404 (":status 404", static index 13)
    (SETTINGS_FRAME + _headers_frame(b"\x8d"), "is not a gRPC server (HTTP status 404)"),
    # ":status 502" as nginx or envoy write it: a literal, Huffman-coded
    (SETTINGS_FRAME + _headers_frame(bytes.fromhex("48826c02")), "is not a gRPC server (HTTP status 502)"),
    (b"-ERR unknown command 'PRI', with args beginning with: \r\n", NOT_HTTP2),  # a Redis
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", NOT_HTTP2),
    (b"", "closed the connection without a gRPC answer"),  # answer b"": it closes at once
], ids=["proxy_404", "huffman_502", "redis", "http1", "closes"])
def test_ray_address_where_something_else_answers_is_one_line_and_never_starts_ray(sequential, tmp_path,
                                                                                     monkeypatch, answer, reason):
    """Before the probe, ray.init tried such an address for about 20 s, printing Ray's C++ warnings."""
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    with _listener(answer) as address:
        result = CliRunner().invoke(app, ["run", str(sequential[0]), "--out", str(tmp_path / "x"), "--quiet",
                                          "--ray", address])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: --ray: no Ray at {address}: what answers there {reason}"]
    assert fake.inits == 0 and not (tmp_path / "x").exists()


def test_a_server_that_says_nothing_fails_the_probe():
    with _listener(None) as address:
        with pytest.raises(DjinnsimError, match=f"^--ray: no Ray at {address}: no gRPC answer within 0.2 s$"):
            parallel._reachable(address, timeout_s=0.2)


def test_a_grpc_answer_goes_on_to_ray(sequential, tmp_path, monkeypatch):
    """A gRPC server answers HTTP status 200 (its own status in the trailers), whatever the method."""
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    with _listener(SETTINGS_FRAME + _headers_frame(b"\x88")) as address:
        result = CliRunner().invoke(app, ["run", str(sequential[0]), "--out", str(tmp_path / "ray"), "--quiet",
                                          "--ray", address])
    assert result.exit_code == 0, result.output
    assert fake.inits == 1
    _same_files(sequential[1], tmp_path / "ray")


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_a_ray_gcs_passes_the_probe():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        parallel._reachable(ray.get_runtime_context().gcs_address)
    finally:
        if started:
            ray.shutdown()
