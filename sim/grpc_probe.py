"""Whether a gRPC server answers at HOST:PORT, asked with one raw HTTP/2 request (no grpcio: Ray does
not bring it).

`--ray HOST:PORT` names a Ray cluster's GCS (or, as `ray://`, its client server); both are gRPC
servers. Something else listening there (a proxy that accepts every connection, a Redis, a web
server) costs `ray.init` about 20 s of retries and a screen of C++ warnings before it gives up, so
djinnsim asks first: a gRPC server answers any request with HTTP status 200 (its own status goes in
the trailers, even for a method it does not have); anything else is not Ray.

`probe(host, port, timeout_s)` returns None when a gRPC server answered, else why not, as words.
An answer it cannot read (an unusual header encoding) counts as gRPC: the probe only refuses what is
surely not Ray, and Ray itself judges the rest.
"""

from __future__ import annotations

import socket
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_FRAME_BYTES = 16384  # HTTP/2's default SETTINGS_MAX_FRAME_SIZE, which the probe never raises
PATH = b"/ray.rpc.NodeInfoGcsService/GetClusterId"  # what ray.init asks a GCS first
DATA, HEADERS, RST_STREAM, SETTINGS = 0x0, 0x1, 0x3, 0x4
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
# HPACK's static table: the entries whose name is :status (RFC 7541, appendix A)
STATUS_BY_INDEX = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}
# HPACK's Huffman codes of the ten digits (RFC 7541, appendix B): '0'-'2' in 5 bits, '3'-'9' in 6
HUFFMAN_DIGITS = {(0b00000, 5): "0", (0b00001, 5): "1", (0b00010, 5): "2",
                  **{(0b011001 + d, 6): str(3 + d) for d in range(7)}}


class _NotRead(Exception):
    """The answer is in a form this probe does not decode."""


class _NotHttp2(Exception):
    """The bytes that came back are not HTTP/2 frames."""


def probe(host: str, port: int, timeout_s: float) -> str | None:
    """None when a gRPC server answers at host:port within timeout_s, else why not (an OSError when
    nothing accepts the connection)."""
    deadline_at = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(PREFACE + _frame(SETTINGS, 0, 0, b"") + _frame(HEADERS, END_HEADERS, 1, _request_headers(host, port))
                     + _frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00"))  # one empty gRPC message
        frames = _Frames(sock, deadline_at)
        try:
            kind, flags, stream, payload = frames.next(first=True)
            sock.sendall(_frame(SETTINGS, ACK, 0, b""))
            while True:
                kind, flags, stream, payload = frames.next()
                if stream != 1:
                    continue
                if kind == RST_STREAM:
                    return "what answers there refused a gRPC request"
                if kind == HEADERS:
                    try:
                        status = _status(_header_block(flags, payload))
                    except _NotRead:
                        return None
                    return None if status == 200 else f"what answers there is not a gRPC server (HTTP status {status})"
        except _NotHttp2:
            return "what answers there does not speak HTTP/2, so it is not gRPC"
        except TimeoutError:
            return f"no gRPC answer within {timeout_s:g} s"
        except ConnectionError:
            return "what answers there closed the connection without a gRPC answer"


class _Frames:
    def __init__(self, sock: socket.socket, deadline_at: float) -> None:
        self.sock, self.deadline_at, self.buffer = sock, deadline_at, b""

    def next(self, first: bool = False) -> tuple[int, int, int, bytes]:
        """The next frame; `first`: the server's first, which HTTP/2 says is SETTINGS (not an ACK)."""
        header = self._read(9)
        length, kind, flags = int.from_bytes(header[:3], "big"), header[3], header[4]
        stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        if length > MAX_FRAME_BYTES or (first and (kind != SETTINGS or stream != 0 or flags & ACK)):
            raise _NotHttp2
        return kind, flags, stream, self._read(length)

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            left_s = self.deadline_at - time.monotonic()
            if left_s <= 0:
                raise TimeoutError
            self.sock.settimeout(left_s)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _integer(value: int, prefix_bits: int, first_bits: int = 0) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541, 5.1); `first_bits`: the flags above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_bits | value])
    out, value = [first_bits | limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + [value])


def _string(text: bytes) -> bytes:
    return _integer(len(text), 7) + text  # not Huffman-coded


def _request_headers(host: str, port: int) -> bytes:
    """POST PATH over http, gRPC's content type; literal fields without indexing, names from the static
    table where it has them (:path 4, :authority 1, content-type 31)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (b"\x83\x86"  # :method POST, :scheme http (static 3 and 6)
            + _integer(4, 4) + _string(PATH)
            + _integer(1, 4) + _string(authority.encode())
            + _integer(31, 4) + _string(b"application/grpc")
            + b"\x00" + _string(b"te") + _string(b"trailers"))


def _header_block(flags: int, payload: bytes) -> bytes:
    start, end = 0, len(payload)
    if flags & PADDED:
        start, end = 1, len(payload) - payload[0]
    if flags & PRIORITY:
        start += 5
    return payload[start:end]


def _read_integer(block: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    if at >= len(block):
        raise _NotRead
    limit = (1 << prefix_bits) - 1
    value, at = block[at] & limit, at + 1
    if value < limit:
        return value, at
    shift = 0
    while True:
        if at >= len(block) or shift > 28:
            raise _NotRead
        byte, at = block[at], at + 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _status(block: bytes) -> int:
    """The :status of a response's header block: its first field (pseudo-headers come first)."""
    at = 0
    while at < len(block) and block[at] & 0xE0 == 0x20:  # dynamic table size updates
        _, at = _read_integer(block, at, 5)
    if at >= len(block):
        raise _NotRead
    first = block[at]
    if first & 0x80:  # an indexed field
        index, _ = _read_integer(block, at, 7)
        if index not in STATUS_BY_INDEX:
            raise _NotRead
        return STATUS_BY_INDEX[index]
    name_index, at = _read_integer(block, at, 6 if first & 0x40 else 4)
    if name_index not in STATUS_BY_INDEX:
        raise _NotRead
    huffman = at < len(block) and bool(block[at] & 0x80)
    length, at = _read_integer(block, at, 7)
    value = block[at:at + length]
    if len(value) != length:
        raise _NotRead
    text = _huffman_digits(value) if huffman else value.decode("ascii", "replace")
    if not text.isdigit():
        raise _NotRead
    return int(text)


def _huffman_digits(value: bytes) -> str:
    """A Huffman-coded string of digits (a status code); anything else is not read."""
    bits = "".join(f"{byte:08b}" for byte in value)
    text, at = "", 0
    while len(bits) - at >= 5:
        for size in (5, 6):
            digit = HUFFMAN_DIGITS.get((int(bits[at:at + size], 2), size)) if len(bits) - at >= size else None
            if digit is not None:
                text, at = text + digit, at + size
                break
        else:
            break
    if set(bits[at:]) - {"1"} or len(bits) - at > 7:  # the padding: at most 7 ones (EOS's prefix)
        raise _NotRead
    return text
