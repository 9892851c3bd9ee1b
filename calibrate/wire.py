"""The wire format of the remote backends, shared by calibrate (to time it) and validate (to run it).

A message is: 1 B type | 8 B length of the rest | 4 B JSON header length | JSON header | raw tensor
bytes. The header lists each tensor's name, dtype, shape and byte offset. Tensors are numpy arrays
here so that this module needs no torch.
"""

from __future__ import annotations

import json
import socket
import struct

import numpy as np

FRAMING_FIXED_BYTES = 1 + 8 + 4


def encode(msg_type: int, header: dict, tensors: dict[str, np.ndarray] | None = None) -> list[memoryview | bytes]:
    """Return the message as a list of buffers (no copy of tensor data)."""
    tensors = tensors or {}
    meta, buffers, offset = [], [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        meta.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "offset": offset})
        view = memoryview(array).cast("B")
        buffers.append(view)
        offset += view.nbytes
    head = json.dumps({**header, "tensors": meta}, separators=(",", ":")).encode()
    rest = 4 + len(head) + offset
    return [struct.pack("!BQI", msg_type, rest, len(head)), head, *buffers]


def decode(msg_type: int, body: bytes | bytearray | memoryview) -> tuple[int, dict, dict[str, np.ndarray]]:
    """Parse what follows the 9-byte prefix (header length, header, tensor bytes)."""
    view = memoryview(body)
    (head_len,) = struct.unpack_from("!I", view, 0)
    header = json.loads(bytes(view[4 : 4 + head_len]))
    data = view[4 + head_len :]
    tensors = {}
    for t in header.pop("tensors", []):
        dtype = np.dtype(t["dtype"])
        count = int(np.prod(t["shape"])) if t["shape"] else 1
        start = t["offset"]
        tensors[t["name"]] = np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(t["shape"])
    return msg_type, header, tensors


def message_bytes(parts: list[memoryview | bytes]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def send_message(sock: socket.socket, parts: list[memoryview | bytes]) -> int:
    """Send a message; returns the bytes written to the socket."""
    sent = 0
    for part in parts:
        sock.sendall(part)
        sent += len(part) if isinstance(part, bytes) else part.nbytes
    return sent


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection mid-message")
        got += k
    return buf


def recv_message(sock: socket.socket) -> tuple[int, dict, dict[str, np.ndarray], int]:
    """Receive one message; returns (type, header, tensors, bytes read from the socket)."""
    prefix = _recv_exact(sock, 9)
    msg_type, rest = struct.unpack("!BQ", prefix)
    body = _recv_exact(sock, rest)
    msg_type, header, tensors = decode(msg_type, body)
    return msg_type, header, tensors, 9 + rest


def pack(msg_type: int, header: dict, tensors: dict[str, np.ndarray] | None = None) -> bytearray:
    """The whole message in one contiguous buffer: the one copy a sender pays to frame tensors."""
    parts = encode(msg_type, header, tensors)
    buf = bytearray(message_bytes(parts))
    view, at = memoryview(buf), 0
    for part in parts:
        n = len(part) if isinstance(part, bytes) else part.nbytes
        view[at : at + n] = part
        at += n
    return buf


def unpack(buf: bytes | bytearray | memoryview) -> tuple[int, dict, dict[str, np.ndarray]]:
    """Parse a whole message (prefix included); tensors are views into `buf`, no copy."""
    view = memoryview(buf)
    msg_type, rest = struct.unpack_from("!BQ", view, 0)
    return decode(msg_type, view[9 : 9 + rest])
