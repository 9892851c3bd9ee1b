"""The far end of the loopback TCP benchmark, run as its own process (`python -m ...`).

It prints its port, then serves connections one after another: ECHO replies with an empty
message, SINK reads a message of any size and replies with a small acknowledgement, STOP exits.
Only sockets and numpy here, so it starts in a fraction of a second.
"""

from __future__ import annotations

import socket

from djinnsim.calibrate.wire import encode, recv_message, send_message

ECHO, SINK, STOP = 1, 2, 9


def serve(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    msg_type, _, _, nbytes = recv_message(conn)
                except (ConnectionError, OSError):
                    break
                if msg_type == STOP:
                    return
                send_message(conn, encode(msg_type, {"n": nbytes} if msg_type == SINK else {}))


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    print(listener.getsockname()[1], flush=True)
    with listener:
        serve(listener)


if __name__ == "__main__":
    main()
