"""The composition check: one real step of each remote backend, through the wire format and a real
socket, next to what the fitted primitives predict for the same step.

The server is this process, holding the model; the client is a separate process
(composition_client) that opens a new TCP connection per request (the presets' connection:
per_request), frames its tensors with wire.pack, and reads the reply. If measured and predicted agree, the simulator's sum of primitives describes these backends.

partially_aware paced by the link emulator (network.paced_path) is served apart by validate's own
server, a spawned process with its own model as validate's real runs start it (validate/realrun.py
ServerProcess), its downlink paced at each rate in turn (Op.PACE), and driven by validate's own
client: the path those rows measure is the one validate's real runs take, process included. Before
H200 runs 12 and 13 they went through this module's BackendServer and a message the client framed
once, outside the timing; in run 14 through validate's request handling inside this
process, where the server's copies ran about 3x faster than in validate's server process with the
same handling (run 14: 13-16 ms against 47 ms at 104 tokens, 3.0-3.6x); see paced_path.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass

import numpy as np
from djinnsim.sim.backends import get_backend
from djinnsim.sim.costmodel import CostModel
from djinnsim.sim.specs import ModelSpec

from . import wire
from .session import Session
from .timer import Timing

BACKENDS = ("semantic_blind", "partially_aware", "full_djinn")
REQUEST, REPLY, SETUP, STOP = 4, 5, 6, 9


@dataclass(frozen=True)
class StepShape:
    """What one step at sequence length L moves and runs, per backend (payload bytes, tensor counts)."""

    up_bytes: int
    down_bytes: int
    up_tensors: int
    down_tensors: int
    compute: str  # "prefill" (a full forward over L) or "decode" (one token over L-1 cached)


def step_shape(backend_name: str, spec: ModelSpec, seq_len: int) -> StepShape:
    backend = get_backend(backend_name)
    up, down = backend.step_bytes(spec, t=1, prompt_tokens=seq_len - 1)
    kv_tensors = 2 * spec.num_layers if backend.kv == "client" else 0
    compute = "prefill" if backend.step_compute == "full_context" else "decode"
    return StepShape(up, down, 1 + kv_tensors, 1 + kv_tensors, compute)


def predict_step_s(cost: CostModel, link_gbps: float, backend_name: str, spec: ModelSpec, seq_len: int) -> dict[str, float]:
    """The step's time as the sum of calibrated primitives (a per-request connection, two messages)."""
    shape = step_shape(backend_name, spec, seq_len)
    up_each, down_each = shape.up_bytes / shape.up_tensors, shape.down_bytes / shape.down_tensors
    parts = {
        "connect": cost.connect_s() + 2 * cost.per_message_s(),
        "serialize": cost.serialize_s(shape.up_bytes) + cost.serialize_s(shape.down_bytes),
        "wire": (shape.up_bytes + shape.down_bytes) / (link_gbps * 1e9),
        "deserialize": cost.deserialize_s(shape.up_bytes) + cost.deserialize_s(shape.down_bytes),
        "copies": shape.up_tensors * cost.copy_s(up_each, "h2d", pinned=False)
        + shape.down_tensors * cost.copy_s(down_each, "d2h", pinned=False),
        "compute": cost.prefill_s(seq_len, 1) if shape.compute == "prefill" else cost.decode_step_s(1, seq_len - 1),
    }
    parts["total"] = sum(parts.values())
    return parts


HOST_PARTS = ("connect", "serialize", "wire", "deserialize")  # predict_step_s's link parts


def _host_per_byte(rows: list[dict], parts: tuple[str, ...]) -> list[tuple[float, float]]:
    """Per partially_aware row: (bytes both ways, its host time per byte beyond the server's h2d,
    compute and d2h and the predicted `parts`)."""
    out = []
    for row in rows:
        if row["backend"] != "partially_aware":
            continue
        server = sum(row["server"][k] for k in ("h2d_s", "compute_s", "d2h_s"))
        modelled = sum(row["predicted"][k] for k in parts)
        both = row["up_bytes"] + row["down_bytes"]
        out.append((both, (row["measured_s"] - server - modelled) / both))
    return out


def loopback_serial_gbps(rows: list[dict]) -> float | None:
    """The host time per byte each way that the real path (`rows`: partially_aware steps of the
    composition stage, which runs the real server process, a new connection per request, no
    pacing) took beyond what the primitives charge for its link (connect, serialize, bytes /
    loopback cap, deserialize), as a rate: per row, measured - the server's h2d, compute and
    d2h - those parts, over the bytes both ways; the median over rows. None without such rows,
    or when the primitives already account for it all (the simulator then charges nothing more)."""
    per_byte = [value for _, value in _host_per_byte(rows, HOST_PARTS)]
    if not per_byte:
        return None
    s_per_byte = float(np.median(per_byte))
    return 1.0 / (s_per_byte * 1e9) if s_per_byte > 0 else None


PATH_PARTS = ("connect", "wire", "deserialize")  # what the simulator charges beside loopback_path


def loopback_path(rows: list[dict]) -> list[tuple[int, float]] | None:
    """The real path's host time per byte each way over loopback, serialization included, against
    the message's bytes: per partially_aware row (`rows`, as for loopback_serial_gbps), measured -
    the server's h2d, compute and d2h - the connection, the wire at the loopback cap and
    deserialize, over the bytes both ways, at the mean of the two messages' bytes; the median where
    a size repeats; rows whose remainder is not positive are left out. None without such rows.
    Unlike loopback_serial_gbps it keeps serialization in: the serialize stage's pack of a buffer
    it reuses changes regime at 64 MiB where the real path, which packs into a fresh buffer, does
    not, so a residual taken beyond it moves with the message size."""
    by_size: dict[int, list[float]] = {}
    for both, per_byte in _host_per_byte(rows, PATH_PARTS):
        if per_byte > 0:
            by_size.setdefault(int(round(both / 2)), []).append(per_byte)
    if not by_size:
        return None
    return [(size, float(np.median(values))) for size, values in sorted(by_size.items())]


def describe_path(path: list[tuple[int, float]]) -> str:
    """loopback_path as a line: each message size and its host time per MB."""
    return ", ".join(f"{size / 2**20:.0f} MiB {per_byte * 1e9:.3f} ms/MB" for size, per_byte in path)


def composition_row(cost: CostModel, link_gbps: float, spec: ModelSpec, seq_len: int, measured_s: float,
                    server: dict[str, float]) -> dict:
    """A partially_aware row as loopback_serial_gbps reads it, its link parts predicted with `cost`."""
    shape = step_shape("partially_aware", spec, seq_len)
    return {"backend": "partially_aware", "seq_len": seq_len, "measured_s": measured_s, "server": server,
            "predicted": predict_step_s(cost, link_gbps, "partially_aware", spec, seq_len),
            "up_bytes": shape.up_bytes, "down_bytes": shape.down_bytes}


def rows_from_end_to_end(end_to_end: dict[str, float], cost: CostModel, link_gbps: float, spec: ModelSpec) -> list[dict]:
    """partially_aware's composition rows as a profile keeps them (end_to_end's measured and server
    times), predicted again with `cost` (a refit's new fits); rows without server times are skipped."""
    rows = []
    for key, measured_s in end_to_end.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[:2] != ["composition", "partially_aware"] or parts[3] != "measured_s":
            continue
        prefix = ".".join(parts[:3])
        server = {k: end_to_end.get(f"{prefix}.server_{k}") for k in ("h2d_s", "compute_s", "d2h_s")}
        if all(v is not None for v in server.values()):
            rows.append(composition_row(cost, link_gbps, spec, int(parts[2][1:]), measured_s, server))
    return rows


def paced_path(rows: list[dict], cost: CostModel) -> list[tuple[float, float]] | None:
    """The real path's host time per byte each way in series with a link paced by the link
    emulator, serialization included, against the rate: per paced partially_aware row (`rows`: backend,
    paced_gbps, measured_s, server, up_bytes, down_bytes), measured - the server's h2d, compute and
    d2h - the connection - the wire at the paced rate (or the cap, where that is slower) -
    deserialize, over the bytes both ways; the median over a rate's rows, one point per rate, sorted.
    Rates whose remainder is not positive are left out. None without such rows.
    A paced link leaves the host's serialization and socket copies time to overlap the wire that an
    unpaced one does not (H200 runs 6 and 10: about 0.66 ms/MB in series at 2 and 4 Gbps against
    loopback_path's 0.9-1.0), and at or above the cap the emulator's chunked sends are not the
    unpaced stage's one sendall (run 12: 1.03 ms/MB real beyond the wire at 25 Gbps, 0.64 charged), so
    the loopback path measured unpaced does not stand in for it.
    The paced rows are validate's own client and server process (composition_client.paced_step,
    start_paced_server): until H200 runs 12 and 13 they were a message framed once and resent,
    against this module's single-threaded BackendServer, and took about 1.0 ms/MB beyond the wire
    where validate's real steps took 1.3 (run 13, L=104 at 25 Gbps; run 12 alike). In run 14 they
    went through validate's request handling inside this process and still read 0.24-0.27 ms/MB
    below validate's real steps at every rate (2-100 Gbps), with the server's copies 3.0-3.6x faster
    than validate's server process had them with the same handling: the process differed. Both changes
    came after the runs they answer (in-sample for runs 12-14); the next GPU run judges the last."""
    cap_Bps = (cost.stream_gbps() or math.inf) * 1e9
    connect = cost.connect_s() + 2 * cost.per_message_s()
    by_rate: dict[float, list[float]] = {}
    for row in rows:
        gbps = row.get("paced_gbps")
        if row["backend"] != "partially_aware" or gbps is None:
            continue
        both = row["up_bytes"] + row["down_bytes"]
        server = sum(row["server"][k] for k in ("h2d_s", "compute_s", "d2h_s"))
        wire = both / min(gbps * 1e9 / 8, cap_Bps)
        deserialize = cost.deserialize_s(row["up_bytes"]) + cost.deserialize_s(row["down_bytes"])
        per_byte = (row["measured_s"] - server - connect - wire - deserialize) / both
        if per_byte > 0:
            by_rate.setdefault(float(gbps), []).append(per_byte)
    if not by_rate:
        return None
    return [(gbps, float(np.median(values))) for gbps, values in sorted(by_rate.items())]


def paced_path_bytes(rows: list[dict]) -> int | None:
    """The message size (each way) paced_path was measured at: the geometric mean over the paced
    partially_aware rows of their messages' mean size. None without such rows."""
    sizes = [(row["up_bytes"] + row["down_bytes"]) / 2 for row in rows
             if row["backend"] == "partially_aware" and row.get("paced_gbps") is not None]
    return int(round(math.exp(float(np.mean(np.log(sizes)))))) if sizes else None


def paced_rows_from_end_to_end(end_to_end: dict[str, float], spec: ModelSpec) -> list[dict]:
    """The paced partially_aware rows as a profile keeps them (end_to_end's
    `composition_paced.partially_aware.L<context>.<rate>gbps` measured and server times), for
    paced_path; rows without server times are skipped."""
    rows = []
    for key, measured_s in end_to_end.items():
        parts = key.rsplit(".", 1)[0].split(".", 3)
        if not key.endswith(".measured_s") or len(parts) != 4 or parts[:2] != ["composition_paced", "partially_aware"]:
            continue
        prefix = key.removesuffix(".measured_s")
        server = {k: end_to_end.get(f"{prefix}.server_{k}") for k in ("h2d_s", "compute_s", "d2h_s")}
        if any(v is None for v in server.values()) or not parts[3].endswith("gbps"):
            continue
        seq_len = int(parts[2].removeprefix("L"))
        shape = step_shape("partially_aware", spec, seq_len)
        rows.append({"backend": "partially_aware", "seq_len": seq_len, "paced_gbps": float(parts[3].removesuffix("gbps")),
                     "measured_s": measured_s, "server": server, "up_bytes": shape.up_bytes, "down_bytes": shape.down_bytes})
    return rows


def describe_paced(path: list[tuple[float, float]]) -> str:
    """paced_path as a line: each rate and its host time per MB."""
    return ", ".join(f"{gbps:g} Gbps {per_byte * 1e9:.3f} ms/MB" for gbps, per_byte in path)


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits
        t = t.view(torch.int16)
    return t.cpu().numpy()


def _from_numpy(a: np.ndarray, s: Session):
    import torch

    t = torch.from_numpy(a)
    if a.dtype == np.int16 and s.dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.to(s.device)


class BackendServer:
    """Serves one request per connection, as each remote backend's server does for one token.

    It runs in the calling (main) thread: on the lent machines a model stepped from a second
    Python thread ran about 3x slower (eager decode is host bound), which would skew the check.
    """

    def __init__(self, s: Session) -> None:
        self.s = s
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.session_kv: list | None = None

    def serve_forever(self, client_alive=lambda: True, before_first=lambda: None) -> None:
        """Until the client's STOP, or once it is gone; `before_first()` runs when its first
        connection is accepted, before that request is read."""
        import torch

        self.listener.settimeout(1.0)
        with self.listener:
            while True:
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    if not client_alive():
                        return
                    continue
                before_first()
                before_first = lambda: None  # noqa: E731
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with conn, torch.inference_mode():
                    msg_type, header, tensors, _ = wire.recv_message(conn)
                    if msg_type == STOP:
                        conn.sendall(wire.pack(REPLY, {}))
                        return
                    if msg_type == SETUP:
                        n = self.s.spec.num_layers
                        self.session_kv = [(_from_numpy(tensors[f"k{i}"], self.s), _from_numpy(tensors[f"v{i}"], self.s)) for i in range(n)]
                        self.s.sync()
                        conn.sendall(wire.pack(REPLY, {}))
                        continue
                    conn.sendall(self._step(header["backend"], tensors))

    def _step(self, backend: str, tensors: dict) -> bytearray:
        from .modeling import cache_from_tensors, cache_tensors, forward

        s, marks = self.s, {}
        t0 = time.perf_counter()
        ids = _from_numpy(tensors["ids"], s)
        if backend == "partially_aware":
            pairs = [(_from_numpy(tensors[f"k{i}"], s), _from_numpy(tensors[f"v{i}"], s)) for i in range(s.spec.num_layers)]
        s.sync()
        marks["h2d_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if backend == "semantic_blind":
            logits = s.model(ids, use_cache=False).logits.to(s.dtype)  # logits travel in the model's dtype
            out_cache = None
        else:
            cache = cache_from_tensors(pairs if backend == "partially_aware" else self.session_kv)
            logits, out_cache = forward(s.model, ids, cache)
        s.sync()
        marks["compute_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reply = {"logits": _to_numpy(logits.to(s.dtype))}
        if backend == "partially_aware":
            for i, (k, v) in enumerate(cache_tensors(out_cache)):
                reply[f"k{i}"], reply[f"v{i}"] = _to_numpy(k), _to_numpy(v)
        marks["d2h_s"] = time.perf_counter() - t0
        return wire.pack(REPLY, marks, reply)


PACED_LIFETIME_S = 1800.0  # bounds of the paced rows' server (it stops at the client's SHUTDOWN, or when this process is gone)
PACED_IDLE_S = 300.0
PACED_START_S = 120.0  # its imports, then its model build and warm-up, each (H200 run 14: a 7B model built in 12 s)


def start_paced_server(s: Session, rates: list[float]):
    """validate's server process for the paced rows, started and ready (its port in `.port`), or None
    with a note where it could not start (the paced rows are then not measured)."""
    import multiprocessing

    import torch
    from djinnsim.validate.realrun import ServerProcess
    from djinnsim.validate.server import ServerConfig

    from .runner import model_key

    threads = None if s.is_cuda else torch.get_num_threads()  # on the CPU, the threads this process steps with
    config = ServerConfig(model=model_key(s.spec), device=s.device, dtype=str(s.dtype).removeprefix("torch."),
                          link_gbps=rates[0], rtt_s=0.0, lifetime_s=PACED_LIFETIME_S, idle_s=PACED_IDLE_S, threads=threads)
    s.free()  # the calibrating process's cached blocks returned before a second model is built beside its own
    server = ServerProcess(multiprocessing.get_context("spawn"), config)
    try:
        status, message = server.start(PACED_START_S)
    except BaseException:  # Ctrl-C or a time limit's SIGTERM while it starts: not left running
        server.stop()
        raise
    if status == "ready":
        return server
    server.stop()
    s.notes.append(f"composition: the paced rows' server process did not start ({status}: {message}); network.paced_path not measured")
    s.say(f"composition: the paced rows' server did not start ({status}: {message}); paced rows skipped")
    return None


def run_composition(s: Session, cost: CostModel, link_gbps: float) -> list[dict]:
    """The client is its own process (composition_client); the unpaced rows' server stays here, the
    paced rows' is validate's own server process."""
    import json
    import subprocess
    import sys

    from .runner import model_key

    spec, plan = s.spec, s.plan
    contexts = [c for c in plan.composition_contexts if c < spec.max_position_embeddings]
    paced = [c for c in plan.composition_paced_contexts if c < spec.max_position_embeddings] if plan.composition_paced_gbps else []
    rates = list(plan.composition_paced_gbps) if paced else []
    dtype = str(s.dtype).removeprefix("torch.")
    paced_server = start_paced_server(s, rates) if rates else None
    if paced_server is None:
        rates = []
    try:
        server = BackendServer(s)
        client = subprocess.Popen(
            [
                sys.executable, "-m", "djinnsim.calibrate.composition_client",
                "--port", str(server.port), "--model", model_key(spec), "--dtype", dtype,
                "--contexts", ",".join(map(str, contexts)), "--repeat", str(plan.composition_repeat),
                "--paced-gbps", ",".join(f"{g:g}" for g in rates), "--paced-contexts", ",".join(map(str, paced)),
                "--paced-port", str(paced_server.port) if paced_server is not None else "",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            # the client shut the paced rows' server down before its first unpaced request: its
            # process (model, CUDA context) is gone before that request is served
            server.serve_forever(client_alive=lambda: client.poll() is None,
                                 before_first=paced_server.stop if paced_server is not None else lambda: None)
            output, _ = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
    finally:
        if paced_server is not None:
            paced_server.stop()
    if client.returncode != 0:
        raise RuntimeError(f"composition client exited with code {client.returncode}")
    rows = []
    for line in output.splitlines():
        got = json.loads(line)
        backend, seq_len = got["backend"], got["seq_len"]
        total = Timing(got["samples_s"])
        server_side = {k: float(np.median([m[k] for m in got["server"]])) for k in ("h2d_s", "compute_s", "d2h_s")}
        gbps = got.get("paced_gbps")
        if gbps is not None:  # network.paced_path (runner) reads these
            s.log.add_timing("composition_paced", f"{backend}_L{seq_len}_{gbps:g}gbps", total.samples_s, context=seq_len)
            shape = step_shape(backend, spec, seq_len)
            rows.append({"backend": backend, "seq_len": seq_len, "paced_gbps": gbps, "measured_s": total.p50,
                         "server": server_side, "up_bytes": shape.up_bytes, "down_bytes": shape.down_bytes})
            wire_s = (shape.up_bytes + shape.down_bytes) / (gbps * 1e9 / 8)
            faults = {k: int(np.median([m[k] for m in got["server"]])) for k in ("h2d_faults", "d2h_faults")
                      if all(k in m for m in got["server"])}
            s.say(f"composition {backend:15} L={seq_len:>5} paced at {gbps:g} Gbps: measured {total.describe()}; "
                  f"the paced wire alone {wire_s * 1e3:.2f} ms, the server {sum(server_side.values()) * 1e3:.2f} ms "
                  f"(h2d {server_side['h2d_s'] * 1e3:.2f}, compute {server_side['compute_s'] * 1e3:.2f}, "
                  f"d2h {server_side['d2h_s'] * 1e3:.2f} ms"
                  + (f"; its process's page faults h2d {faults['h2d_faults']}, d2h {faults['d2h_faults']}, "
                     f"of {(shape.up_bytes + shape.down_bytes) // 4096} pages both ways" if len(faults) == 2 else "") + ")")
            s.advance(1)
            continue
        s.log.add_timing("composition", f"{backend}_L{seq_len}", total.samples_s, context=seq_len)
        predicted = predict_step_s(cost, link_gbps, backend, spec, seq_len)
        shape = step_shape(backend, spec, seq_len)
        rows.append({
            "backend": backend,
            "seq_len": seq_len,
            "up_bytes": shape.up_bytes,
            "down_bytes": shape.down_bytes,
            "measured_s": total.p50,
            "predicted_s": predicted["total"],
            "predicted": predicted,
            "server": server_side,
        })
        s.say(
            f"composition {backend:15} L={seq_len:>5}: measured {total.describe()} | predicted {predicted['total'] * 1e3:9.2f} ms "
            f"(ratio {total.p50 / predicted['total']:.2f}); server h2d {server_side['h2d_s'] * 1e3:.2f} ms, "
            f"compute {server_side['compute_s'] * 1e3:.2f} ms (predicted {predicted['compute'] * 1e3:.2f}), "
            f"d2h {server_side['d2h_s'] * 1e3:.2f} ms; up {shape.up_bytes / 1e6:.2f} MB, down {shape.down_bytes / 1e6:.2f} MB"
        )
        s.advance(1)
    s.log.flush()
    return rows
