"""The loopback host path with serialization (profile field network.loopback_path): what calibrate
takes from its composition rows, how the cost model interpolates it, and what a send over loopback
pays with it (closed forms)."""

from __future__ import annotations

import math

import pytest
import simpy
from pydantic import ValidationError

from djinnsim.calibrate.composition import loopback_path
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.engine.link import Link
from djinnsim.sim.profile import Network, load_profile
from djinnsim.sim.run import bundled_profiles
from djinnsim.sim.specs import get_model

H100 = next(p for p in bundled_profiles() if p.name == "h100-80gb-llama-2-7b.json")
LLAMA = get_model("llama-2-7b")
MB = 10**6


def _row(backend: str, each: int, server_s: float, parts: dict[str, float], extra_s: float) -> dict:
    return {"backend": backend, "up_bytes": each, "down_bytes": each, "measured_s": server_s + sum(parts.values()) + extra_s,
            "predicted": {**parts, "compute": 9.0},
            "server": {"h2d_s": server_s / 4, "compute_s": server_s / 2, "d2h_s": server_s / 4}}


def test_the_path_is_what_the_rows_took_beyond_the_connection_the_wire_and_deserialize_serialization_kept_in():
    parts = {"connect": 0.001, "serialize": 0.030, "wire": 0.050, "deserialize": 0.002}
    rows = [_row("partially_aware", 100 * MB, 0.07, parts, 0.170),  # (0.030 + 0.170) / 200 MB = 1.0 ns/B
            _row("partially_aware", 10 * MB, 0.02, parts, -0.010),  # (0.030 - 0.010) / 20 MB = 1.0 ns/B
            _row("partially_aware", 10 * MB, 0.02, parts, 0.010),  # 2.0 ns/B: 10 MB's median is 1.5
            _row("partially_aware", 1 * MB, 0.01, parts, -0.050),  # nothing left: left out
            _row("semantic_blind", 5 * MB, 0.01, parts, 1.0)]  # not a KV-shipping backend
    path = loopback_path(rows)
    assert [b for b, _ in path] == [10 * MB, 100 * MB]  # sorted by bytes
    assert path[0][1] == pytest.approx(1.5e-9, rel=1e-9) and path[1][1] == pytest.approx(1.0e-9, rel=1e-9)
    assert loopback_path(rows[3:]) is None


def _cost(points) -> ProfileCostModel:
    profile = load_profile(H100)
    network = profile.network.model_copy(update={"loopback_path": points, "loopback_gbps": 1.0})
    return ProfileCostModel(profile.model_copy(update={"network": network}), LLAMA)


def test_the_cost_model_interpolates_the_path_in_log_bytes_and_holds_it_flat_beyond():
    cost = _cost([(MB, 1e-9), (100 * MB, 3e-9)])
    assert cost.stream_path_s(10 * MB) == pytest.approx(10 * MB * 2e-9, rel=1e-12)  # halfway in log bytes
    assert cost.stream_path_s(MB // 10) == pytest.approx(MB / 10 * 1e-9, rel=1e-12)
    assert cost.stream_path_s(10**9) == pytest.approx(10**9 * 3e-9, rel=1e-12)
    assert cost.stream_path_s(0) == 0.0
    assert ProfileCostModel(load_profile(H100), LLAMA).stream_path_s(MB) is None  # not measured


@pytest.mark.parametrize("points", [[(MB, -1e-9)], [(0, 1e-9)], [(2 * MB, 1e-9), (MB, 1e-9)], [(MB, math.inf)], []])
def test_a_profile_refuses_a_path_that_is_not_positive_finite_and_sorted(points):
    with pytest.raises(ValidationError):
        Network(connect_s=0.0, per_message_s=0.0, loopback_path=points)


def test_a_send_over_loopback_pays_the_path_instead_of_serialize_in_series_with_the_wire():
    """One 10 MB message, alone on a 100 Gbps link, no cap: per message + path + wire + RTT/2 +
    deserialize; without the path, serialize + the serial rate take its place."""
    cost = _cost([(10 * MB, 2e-9)])
    gbps, rtt = 100.0, 1e-4
    wire = 10 * MB / (gbps * 1e9 / 8)
    plain = ProfileCostModel(load_profile(H100), LLAMA)
    for host, host_s in ((cost, 10 * MB * 2e-9), (plain, plain.serialize_s(10 * MB) + plain.stream_serial_s(10 * MB))):
        env = simpy.Environment()
        link = Link(env, gbps, rtt, None, 0, host, stream_serial=True)
        done = link.send(link.up, 10 * MB)
        env.run(done)
        expected = host.per_message_s() + host_s + wire + rtt / 2 + host.deserialize_s(10 * MB)
        assert env.now == pytest.approx(expected, rel=1e-9)
    env = simpy.Environment()  # a NIC (no loopback stack): the path is not charged
    link = Link(env, gbps, rtt, None, 0, cost, stream_serial=False)
    env.run(link.send(link.up, 10 * MB))
    assert env.now == pytest.approx(cost.per_message_s() + cost.serialize_s(10 * MB) + wire + rtt / 2
                                    + cost.deserialize_s(10 * MB), rel=1e-9)
