"""The GPU server process of the real runs: owns the device, serves requests over loopback TCP.

One implementation for every backend: a request's header carries the backend's toggles (see
protocol.py). Threads receive and reply on each connection (socket I/O releases the GIL); one
executor thread runs requests on the device one at a time, first come first served, as Djinn's
server does. A per-agent backend (Ray keep-alive, Ray serverless) runs one such process per agent,
so its agents interleave on the GPU the way independent processes do (time slicing).

Resident weights are built once at start (random weights: timing does not depend on values).
Non-resident (serverless) processes load the weights for every GENERATE and free them after.

Every wait is bounded: the process exits at its deadline, after `idle_s` without a request, on a
SHUTDOWN request, or when its parent goes away. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass

from djinnsim.calibrate import wire
from djinnsim.calibrate.kv_cycle import minor_faults

from djinnsim.common import linkemu
from .protocol import Op


@dataclass(frozen=True)
class ServerConfig:
    model: str  # bundled model key
    device: str  # "cpu" or "cuda:N"
    dtype: str | None
    link_gbps: float
    rtt_s: float
    resident: bool = True  # weights loaded at start and kept; False: per request (serverless)
    weight_tier: str = "disk"  # where a non-resident load reads from: disk | pageable | pinned
    weights_file: str | None = None  # safetensors file written by a resident server (SAVE_WEIGHTS)
    lifetime_s: float = 600.0
    idle_s: float = 300.0
    threads: int | None = None  # torch CPU threads (device cpu): keep tests from oversubscribing


def serve(config: ServerConfig, control, memory_slots=None) -> None:
    """Entry point of a spawned server process.

    `control` is this end of a Pipe. The parent sends "go" (build and listen) or "quit"; this
    process answers ("ready", port, info), ("oom", message) or ("error", message).
    `memory_slots`: a semaphore bounding concurrent serverless loads (memory_full: wait).
    """
    deadline = time.perf_counter() + config.lifetime_s
    parent = os.getppid()
    _preimport(config)
    control.send(("imported", os.getpid()))
    while time.perf_counter() < deadline:
        if control.poll(0.2):
            if control.recv() != "go":
                return
            break
        if os.getppid() != parent:
            return
    else:
        return
    try:
        state = _GpuState(config, memory_slots)
    except Exception as exc:  # report OOM and any other start failure to the parent, in one line
        kind = "oom" if _is_oom(exc) else "error"
        control.send((kind, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        return
    listener = socket.create_server((linkemu.LOOPBACK, 0), backlog=256)
    listener.settimeout(0.2)
    control.send(("ready", listener.getsockname()[1], state.info()))
    _Server(config, state, listener, deadline, parent).run()


def _preimport(config: ServerConfig) -> None:
    """Import everything a request needs before any measurement: the workers of a point are
    spawned together, and imports running beside a measured request would slow it down."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from djinnsim.calibrate import modeling
    from djinnsim.sim.specs import get_model

    from . import weights  # noqa: F401

    spec = get_model(config.model)
    modeling.hf_config(spec)
    with torch.device("meta"):  # imports the architecture's module without allocating anything
        AutoModelForCausalLM.from_config(modeling.hf_config(spec))


def _is_oom(exc: BaseException) -> bool:
    from djinnsim.calibrate.session import is_oom

    return is_oom(exc)


class _Server:
    def __init__(self, config: ServerConfig, state: "_GpuState", listener: socket.socket, deadline: float, parent: int):
        self.config = config
        self.state = state
        self.listener = listener
        self.deadline = deadline
        self.parent = parent
        self.stop = threading.Event()
        self.requests: queue.Queue = queue.Queue()
        self.downlink = linkemu.Pacer(linkemu.LinkParams(config.link_gbps, config.rtt_s))
        self.last_request_at = time.perf_counter()

    def run(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()
        try:
            self._execute()
        finally:
            self.stop.set()
            self.listener.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        """Receive a request, hand it to the executor, send its reply paced by the downlink."""
        conn.settimeout(self.config.idle_s)
        replies: queue.Queue = queue.Queue(maxsize=1)
        with conn:
            while not self.stop.is_set():
                try:
                    op, header, tensors, _ = linkemu.recv_message(conn)
                except (ConnectionError, OSError, ValueError):
                    return
                self.requests.put((op, header, tensors, time.perf_counter(), replies))
                try:
                    parts = replies.get(timeout=max(self.deadline - time.perf_counter(), 0.1))
                except queue.Empty:
                    return
                try:
                    self.downlink.send(conn, parts)
                except OSError:
                    return

    def _execute(self) -> None:
        while time.perf_counter() < self.deadline:
            try:
                op, header, tensors, received_at, replies = self.requests.get(timeout=0.2)
            except queue.Empty:
                if time.perf_counter() - self.last_request_at > self.config.idle_s or os.getppid() != self.parent:
                    return
                continue
            self.last_request_at = time.perf_counter()
            try:
                if op == Op.PACE:  # one server paced at each of calibrate's rates in turn
                    self.downlink = linkemu.Pacer(linkemu.LinkParams(_rate(header), self.config.rtt_s))
                    replies.put([wire.pack(Op.REPLY, {"link_gbps": self.downlink.params.gbps}, {})])
                    continue
                reply_header, reply_tensors = self.state.handle(Op(op), header, tensors, received_at)
                replies.put([wire.pack(Op.REPLY, reply_header, reply_tensors)])
            except Exception as exc:  # a failed request answers with one line; the server lives on
                self.state.recover()
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                replies.put([wire.pack(Op.ERROR, {"oom": _is_oom(exc), "error": message})])
            if op == Op.SHUTDOWN:
                _drain(replies, timeout_s=2.0)  # let the connection thread send the reply first
                return


def _drain(replies: queue.Queue, timeout_s: float) -> None:
    until = time.perf_counter() + timeout_s
    while not replies.empty() and time.perf_counter() < until:
        time.sleep(0.01)
    time.sleep(0.05)


def _rate(header: dict) -> float:
    """A PACE request's line rate in Gbps: a finite number above zero."""
    gbps = header.get("link_gbps")
    if isinstance(gbps, bool) or not isinstance(gbps, (int, float)) or not math.isfinite(gbps) or gbps <= 0:
        raise ValueError(f"PACE needs link_gbps, a finite rate above zero (got {gbps!r})")
    return float(gbps)


class _GpuState:
    """The model, the sessions' KV caches and the handlers of each request type."""

    def __init__(self, config: ServerConfig, memory_slots) -> None:
        import torch

        from djinnsim.calibrate.modeling import build_model, resolve_dtype
        from djinnsim.sim.specs import get_model

        if config.threads:
            torch.set_num_threads(config.threads)
        self.torch = torch
        self.config = config
        self.device = config.device
        self.spec = get_model(config.model)
        self.dtype = resolve_dtype(self.spec, config.dtype, config.device)
        self.cuda = config.device.startswith("cuda")
        self.memory_slots = memory_slots
        self.sessions: dict[str, tuple] = {}
        self.host_weights = None
        if self.cuda:
            torch.cuda.set_device(torch.device(config.device))
            torch.cuda.init()
        if config.resident:
            self.model = build_model(self.spec, config.device, self.dtype)
            self._warm_up()
        else:
            self.model = None
            ones = torch.ones(8, 8, device=config.device, dtype=self.dtype)
            (ones @ ones).sum().item()  # the process is warm (context, cuBLAS) before its first load
            # ... and its attention library is set up, as a resident server's warm-up does (the
            # simulator charges a process only for attention shapes it has not run, not for set-up).
            q = torch.ones(1, self.spec.num_heads, 8, self.spec.head_dim, device=config.device, dtype=self.dtype)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
            torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], q, q).sum().item()
            if config.weight_tier in ("pageable", "pinned"):
                from .weights import host_state

                self.host_weights = host_state(config.weights_file, pinned=config.weight_tier == "pinned")
        self._sync()

    def _warm_up(self) -> None:
        """One short prefill and decode step: lazy CUDA/cuBLAS set-up is not charged to the first request."""
        from djinnsim.calibrate.modeling import forward, random_ids

        with self.torch.inference_mode():
            logits, cache = forward(self.model, random_ids(self.spec, 1, 8, self.device))
            for _ in range(3):
                logits, cache = forward(self.model, logits[:, -1:].argmax(-1), cache)
            forward(self.model, random_ids(self.spec, 1, 4, self.device), cache)  # a prefill on top of a cache
            forward(self.model, random_ids(self.spec, 1, 12, self.device), None, last_logits_only=False)
        self._sync()

    def info(self) -> dict:
        return {"pid": os.getpid(), "dtype": str(self.dtype).removeprefix("torch."), **self._memory()}

    # --- helpers ------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _memory(self) -> dict:
        if not self.cuda:
            return {"gpu_mem_bytes": 0, "gpu_mem_peak_bytes": 0}
        torch = self.torch
        return {
            "gpu_mem_bytes": int(torch.cuda.memory_reserved(self.device)),
            "gpu_mem_peak_bytes": int(torch.cuda.max_memory_reserved(self.device)),
        }

    def _to_device(self, array):
        return self.torch.from_numpy(array.copy() if not array.flags.writeable else array).to(self.device)

    def _to_numpy(self, tensor):
        tensor = tensor.detach().contiguous().cpu()
        if tensor.dtype == self.torch.bfloat16:  # numpy has no bfloat16: ship the bits
            tensor = tensor.view(self.torch.int16)
        return tensor.numpy()

    def recover(self) -> None:
        """After a failed request (e.g. OOM): free what it held so the next one starts clean."""
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # --- requests -----------------------------------------------------------------------------
    def handle(self, op: Op, header: dict, tensors: dict, received_at: float) -> tuple[dict, dict]:
        started_at = time.perf_counter()
        handler = {
            Op.STEP: self._step,
            Op.GENERATE: self._generate,
            Op.LOCAL_DECODE: self._local_decode,
            Op.END_SESSION: self._end_session,
            Op.RESET: self._reset,
            Op.SAVE_WEIGHTS: self._save_weights,
            Op.SHUTDOWN: lambda h, t: ({}, {}),
        }[op]
        with self.torch.inference_mode():
            reply, out = handler(header, tensors)
        timing = {"recv_at": received_at, "start_at": started_at, "done_at": time.perf_counter(),
                  "queue_s": started_at - received_at}
        return {**timing, **self._memory(), **reply}, out

    def _step(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        """One generated token of a per-token backend; toggles: kv, compute, logits, session, end."""
        from djinnsim.calibrate.modeling import cache_from_tensors, cache_tensors, forward

        torch = self.torch
        faults = minor_faults()
        t0 = time.perf_counter()
        ids = self._to_device(tensors["ids"])
        cache = None
        if header["kv"] == "client" and "kv" in tensors:
            stacked = self._to_device(tensors["kv"])  # [layers, 2, batch, kv_heads, tokens, head_dim]
            cache = cache_from_tensors([(layer[0], layer[1]) for layer in stacked.unbind(0)])
        elif header["kv"] == "session":
            cache = self.sessions.pop(header["s"], None)
        self._sync()
        h2d_s, h2d = time.perf_counter() - t0, sum(a.nbytes for a in tensors.values())
        h2d_faults = minor_faults() - faults
        t0 = time.perf_counter()
        compute = header["compute"]
        keep_all = header["logits"] == "all"
        if compute == "last_token":
            logits, cache = forward(self.model, ids[:, -1:], None)
        elif compute == "full_context":
            logits, cache = forward(self.model, ids, None, last_logits_only=not keep_all)
        else:
            logits, cache = forward(self.model, ids, cache, last_logits_only=not keep_all)
        self._sync()
        compute_s = time.perf_counter() - t0
        faults = minor_faults()
        t0 = time.perf_counter()
        out = {}
        if header["logits"] != "none":
            out["logits"] = self._to_numpy((logits if keep_all else logits[:, -1:]).to(self.dtype))
        if header["kv"] == "client":
            out["kv"] = self._to_numpy(torch.stack([torch.stack(pair) for pair in cache_tensors(cache)]))
        elif header["kv"] == "session" and not header.get("end"):
            self.sessions[header["s"]] = cache
        del cache
        d2h_s = time.perf_counter() - t0
        d2h_faults = minor_faults() - faults  # the process's first touches of fresh host pages, every thread
        d2h = sum(a.nbytes for a in out.values())
        return {"compute_s": compute_s, "copy_s": h2d_s + d2h_s, "h2d_s": h2d_s, "d2h_s": d2h_s,
                "h2d": h2d, "d2h": d2h, "h2d_faults": h2d_faults, "d2h_faults": d2h_faults}, out

    def _generate(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        """One generate call: (load weights,) prefill what is new, greedy-decode new_tokens."""
        load_s = 0.0
        if self.model is None:
            slot = self.memory_slots
            t0 = time.perf_counter()
            if slot is not None and not slot.acquire(timeout=max(self.config.lifetime_s, 1.0)):
                raise TimeoutError("no memory slot for the weight load")
            try:
                queued_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                from .weights import load_model

                with self.torch.inference_mode(False):
                    self.model = load_model(self.spec, self.device, self.dtype, self.config.weights_file, self.host_weights)
                self._sync()
                load_s = time.perf_counter() - t0
                reply, out = self._decode_phase(header, tensors)
            finally:
                self.model = None
                self.recover()
                if slot is not None:
                    slot.release()
            return {**reply, "load_s": load_s, "mem_wait_s": queued_s}, out
        return self._decode_phase(header, tensors)

    def _decode_phase(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        from djinnsim.calibrate.modeling import forward

        torch = self.torch
        t0 = time.perf_counter()
        ids = self._to_device(tensors["ids"])
        self._sync()
        copy_s = time.perf_counter() - t0
        session = header.get("s")
        cache = None
        if header["kv"] == "session" and session in self.sessions:
            cache, pending = self.sessions.pop(session)
            ids = torch.cat([pending, ids], dim=1)  # the last generated token was never fed back
        t0 = time.perf_counter()
        logits, cache = forward(self.model, ids, cache)
        token = logits[:, -1:].argmax(-1)
        self._sync()
        first_token_at = time.perf_counter()
        generated = [token]
        for _ in range(int(header["new"]) - 1):
            logits, cache = forward(self.model, token, cache)
            token = logits[:, -1:].argmax(-1)
            generated.append(token)
        self._sync()
        compute_s = time.perf_counter() - t0
        if header["kv"] == "session" and not header.get("end"):
            self.sessions[session] = (cache, token)
        del cache
        out = {"ids": self._to_numpy(torch.cat(generated, dim=1))}
        return {"compute_s": compute_s, "copy_s": copy_s, "first_token_at": first_token_at,
                "h2d": tensors["ids"].nbytes, "d2h": out["ids"].nbytes}, out

    def _local_decode(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        """native_pytorch: the whole greedy decode on this GPU, each step timed with a sync."""
        from djinnsim.calibrate.modeling import timed_greedy_decode

        ids = self._to_device(tensors["ids"])
        self._sync()
        started_at = time.perf_counter()
        timing = timed_greedy_decode(self.model, ids, int(header["new"]), self.device)
        return {"decode_at": started_at, "prefill_s": timing.prefill_s, "step_s": timing.step_s}, {}

    def _end_session(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        self.sessions.pop(header["s"], None)
        return {}, {}

    def _reset(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        self.sessions.clear()
        self.recover()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        return {}, {}

    def _save_weights(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        from .weights import save_weights

        return {"bytes": save_weights(self.model, header["path"])}, {}
