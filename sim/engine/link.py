"""The client <-> server link: full duplex, one shared pipe per direction, one-way delay RTT/2."""

from __future__ import annotations

import simpy

from .pipe import SharedPipe


class Link:
    """A full-duplex link: each direction is a SharedPipe at line rate; one-way delay is RTT/2.

    `stream_cap_Bps` caps each transfer at what one connection's host socket stack can move,
    whatever the line rate (None: a NIC at line rate; world.stream_cap_Bps says when it is set). `send` adds the hosts' per-message and
    (de)serialization costs of `host` (a CostModel) and `framing_bytes` per message."""

    def __init__(self, env: simpy.Environment, gbps: float, rtt_s: float, stream_cap_Bps: float | None = None,
                 framing_bytes: int = 0, host=None) -> None:
        rate = gbps * 1e9 / 8
        self.env = env
        self.up = SharedPipe(env, lambda k: rate, stream_cap_Bps)
        self.down = SharedPipe(env, lambda k: rate, stream_cap_Bps)
        self.rtt_s = rtt_s
        self.framing_bytes = framing_bytes
        self.host = host

    def send(self, pipe: SharedPipe, payload: int, messages: int = 1):
        """Sender software + serialization, the wire, propagation, receiver deserialization.
        Returns (seconds taken, bytes on the wire)."""
        env, host = self.env, self.host
        wire_bytes = payload + self.framing_bytes * messages
        start = env.now
        before_s = messages * host.per_message_s() + host.serialize_s(payload)
        if before_s > 0:
            yield env.timeout(before_s)
        yield pipe.transfer(wire_bytes)
        after_s = messages * self.rtt_s / 2 + host.deserialize_s(payload)
        if after_s > 0:
            yield env.timeout(after_s)
        return env.now - start, wire_bytes
