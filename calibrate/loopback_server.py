"""The far end of the loopback TCP benchmark, run as its own process (`python -m ...`).

It moves bytes the way validate's server (validate/server.py) does: a thread per connection reads
each message (linkemu.recv_message) and hands it through a queue to one executor thread; the
executor frames the reply (wire.pack) and hands it back; the connection thread sends it through a
linkemu.Pacer (chunked, at no line rate). Requests: ECHO replies with an empty message; SINK reads
a message of any size and replies with a small acknowledgement; MIRROR replies with the same
tensor bytes (as a per-token backend's KV goes up and comes back), then a small trailer with the
request's receive time and the time its reply was framed, so the client can time each direction's
transport alone; STOP exits. Only sockets and numpy here, so it starts in a fraction of a second.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

from djinnsim.calibrate.wire import encode, pack
from djinnsim.common import linkemu

ECHO, SINK, MIRROR, STOP = 1, 2, 3, 9
UNPACED = linkemu.LinkParams(gbps=1e6, rtt_s=0.0)  # the pacer's path, no line rate, no delay


def _connection(conn: socket.socket, requests: queue.Queue, downlink: linkemu.Pacer) -> None:
    replies: queue.Queue = queue.Queue(maxsize=1)
    with conn:
        while True:
            try:
                msg_type, _, tensors, nbytes = linkemu.recv_message(conn)
            except (ConnectionError, OSError):
                return
            requests.put((msg_type, tensors, nbytes, time.perf_counter(), replies))
            messages = replies.get()
            if messages is None:
                return
            try:
                for message in messages:
                    downlink.send(conn, message)
            except OSError:
                return


def _reply(msg_type: int, tensors: dict, nbytes: int, received_at: float) -> list[list]:
    if msg_type == MIRROR:
        message = [pack(MIRROR, {}, tensors)]
        return [message, encode(ECHO, {"recv_at": received_at, "packed_at": time.perf_counter()})]
    return [encode(msg_type, {"n": nbytes} if msg_type == SINK else {})]


def serve(listener: socket.socket) -> None:
    requests: queue.Queue = queue.Queue()
    downlink = linkemu.Pacer(UNPACED)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_connection, args=(conn, requests, downlink), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    while True:
        msg_type, tensors, nbytes, received_at, replies = requests.get()
        if msg_type == STOP:
            replies.put(None)
            return
        replies.put(_reply(msg_type, tensors, nbytes, received_at))


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    print(listener.getsockname()[1], flush=True)
    with listener:
        serve(listener)


if __name__ == "__main__":
    main()
