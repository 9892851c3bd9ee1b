"""The client <-> server link: full duplex, one shared pipe per direction, one-way delay RTT/2."""

from __future__ import annotations

import simpy

from .pipe import SharedPipe, in_turn


class Link:
    """A full-duplex link: each direction is a SharedPipe at line rate; one-way delay is RTT/2.

    `stream_cap_Bps` caps each transfer at what one connection's host socket stack can move,
    whatever the line rate (None: a NIC at line rate; world.stream_cap_Bps says when it is set). `send` adds the hosts' per-message and
    (de)serialization costs of `host` (a CostModel) and `framing_bytes` per message, and returns the
    event to wait for. With `stream_serial`, each send also pays the host's `stream_serial_s`
    before it joins the pipe (the loopback stack's time in series with the wire; world.stream_serial),
    or, where the profile measured it, the host's `stream_path_s` per message at the link's rate in
    place of that and of serialization."""

    def __init__(self, env: simpy.Environment, gbps: float, rtt_s: float, stream_cap_Bps: float | None = None,
                 framing_bytes: int = 0, host=None, stream_serial: bool = False) -> None:
        rate = gbps * 1e9 / 8
        self.env = env
        self.gbps = gbps
        self.up = SharedPipe(env, lambda k: rate, stream_cap_Bps)
        self.down = SharedPipe(env, lambda k: rate, stream_cap_Bps)
        self.rtt_s = rtt_s
        self.framing_bytes = framing_bytes
        self.host = host
        self.stream_serial = stream_serial
        self._costs: dict[tuple[int, int], tuple[float, float]] = {}
        self._requests: dict[int, tuple] = {}  # id(plan) -> request_costs(plan)

    def costs_s(self, payload: int, messages: int) -> tuple[float, float]:
        """(sender's software + serialization, propagation + receiver's deserialization) of a
        send, memoized per (payload, messages): every agent sends the same few."""
        key = (payload, messages)
        costs = self._costs.get(key)
        if costs is None:
            host = self.host
            path_s = host.stream_path_s(payload / messages, self.gbps) if self.stream_serial and messages > 0 else None
            if path_s is not None:  # the measured loopback path, serialization included, per message
                host_s = messages * path_s
            else:
                host_s = host.serialize_s(payload) + (host.stream_serial_s(payload) if self.stream_serial else 0.0)
            costs = self._costs[key] = (messages * host.per_message_s() + host_s,
                                        messages * self.rtt_s / 2 + host.deserialize_s(payload))
        return costs

    def request_costs(self, plan) -> tuple:
        """A request plan's sends over this link, memoized per plan (holding it, so its id stays its
        own): (plan, then up and down: the bytes on the wire, `costs_s`)."""
        costs = self._requests.get(id(plan))
        if costs is not None and costs[0] is plan:
            return costs
        costs = (plan, self.wire_bytes(plan.bytes_up, plan.messages), *self.costs_s(plan.bytes_up, plan.messages),
                 self.wire_bytes(plan.bytes_down, plan.messages), *self.costs_s(plan.bytes_down, plan.messages))
        self._requests[id(plan)] = costs
        return costs

    def wire_bytes(self, payload: int, messages: int = 1) -> int:
        """What a send of `payload` in `messages` puts on the wire: the payload and each message's framing."""
        return payload + self.framing_bytes * messages

    def send(self, pipe: SharedPipe, payload: int, messages: int = 1, lead_s: float = 0.0) -> simpy.Event:
        """An event that fires when a send has arrived: sender software + serialization, the wire,
        propagation, receiver deserialization, after `lead_s` of the sender's own (a connection's
        set-up) waited in the same step. The send took from `lead_s` after it began to then."""
        env = self.env
        wire_bytes = payload + self.framing_bytes * messages
        costs = self._costs.get((payload, messages))  # costs_s, its memo read inline
        before_s, after_s = costs if costs is not None else self.costs_s(payload, messages)
        if wire_bytes > 0:
            return pipe.transfer(wire_bytes, lead_s=lead_s, before_s=before_s, after_s=after_s)
        # nothing on the wire: the fixed times one after another
        return in_turn(env, [*([lambda: env.timeout(lead_s)] if lead_s > 0 else []),
                             *([lambda: env.timeout(before_s)] if before_s > 0 else []),
                             lambda: pipe.transfer(wire_bytes),
                             *([lambda: env.timeout(after_s)] if after_s > 0 else [])])
