"""The loopback host path in series with a link paced below the loopback cap (profile field
network.paced_path): what calibrate takes from its paced composition rows, how the cost model
charges it against the link's rate, and what a send over a paced loopback link pays (closed forms)."""

from __future__ import annotations

import math

import pytest
import simpy
from pydantic import ValidationError

from djinnsim.calibrate.composition import paced_path, paced_rows_from_end_to_end
from djinnsim.sim.costmodel import ProfileCostModel
from djinnsim.sim.engine.link import Link
from djinnsim.sim.profile import Network, load_profile
from djinnsim.sim.run import bundled_profiles
from djinnsim.sim.specs import get_model

H100 = next(p for p in bundled_profiles() if p.name == "h100-80gb-llama-2-7b.json")
LLAMA = get_model("llama-2-7b")
MB = 10**6


def _cost(loopback_path, paced, cap_GBps: float = 1.5) -> ProfileCostModel:
    profile = load_profile(H100)
    network = profile.network.model_copy(update={"loopback_path": loopback_path, "paced_path": paced, "loopback_gbps": cap_GBps})
    return ProfileCostModel(profile.model_copy(update={"network": network}), LLAMA)


def _row(gbps: float, each: int, server_s: float, per_byte: float, cost: ProfileCostModel) -> dict:
    """A paced row whose host time beyond the connection, the paced wire and deserialize is `per_byte` both ways."""
    wire = 2 * each / min(gbps * 1e9 / 8, cost.stream_gbps() * 1e9)
    beyond = cost.connect_s() + 2 * cost.per_message_s() + wire + 2 * cost.deserialize_s(each)
    return {"backend": "partially_aware", "paced_gbps": gbps, "up_bytes": each, "down_bytes": each,
            "measured_s": server_s + beyond + per_byte * 2 * each,
            "server": {"h2d_s": server_s / 4, "compute_s": server_s / 2, "d2h_s": server_s / 4}}


def test_the_paced_path_is_what_each_rate_took_beyond_the_connection_the_paced_wire_and_deserialize():
    cost = _cost([(40 * MB, 1e-9)], None)
    rows = [_row(4.0, 40 * MB, 0.03, 0.6e-9, cost), _row(4.0, 52 * MB, 0.03, 0.7e-9, cost),  # median 0.7 ns/B,
            _row(4.0, 46 * MB, 0.03, 1.1e-9, cost),  # the mean 0.8
            _row(2.0, 40 * MB, 0.03, 0.5e-9, cost),
            _row(20.0, 40 * MB, 0.03, 0.9e-9, cost),  # above the 12 Gbps cap: the wire at the cap
            _row(1.0, 40 * MB, 0.03, -0.1e-9, cost),  # nothing left: left out
            {**_row(3.0, 40 * MB, 0.03, 0.5e-9, cost), "backend": "semantic_blind"},  # not the KV-shipping backend
            {**_row(3.0, 40 * MB, 0.03, 0.5e-9, cost), "paced_gbps": None}]  # unpaced: loopback_path's
    path = paced_path(rows, cost)
    assert [g for g, _ in path] == [2.0, 4.0, 20.0]
    # in ns/B to 1e-9 of one: the connection and deserialize (each under 0.01 ns/B here) must be taken off
    assert [s * 1e9 for _, s in path] == pytest.approx([0.5, 0.7, 0.9], rel=0, abs=1e-9)
    assert cost.connect_s() / (80 * MB) * 1e9 > 1e-6 and cost.deserialize_s(40 * MB) / (40 * MB) * 1e9 > 1e-6
    assert paced_path(rows[5:], cost) is None


def test_the_paced_rows_are_read_back_from_what_the_profile_keeps_every_rate_and_context():
    e = {}
    for key, gbps in (("composition_paced.partially_aware.L80.2gbps", 2.0), ("composition_paced.partially_aware.L104.2.5gbps", 2.5)):
        e[f"{key}.measured_s"] = 0.4
        for part in ("h2d_s", "compute_s", "d2h_s"):
            e[f"{key}.server_{part}"] = 0.01
    e["composition_paced.partially_aware.L96.4gbps.measured_s"] = 0.3  # no server times: skipped
    e["composition.partially_aware.L80.measured_s"] = 0.2  # unpaced
    rows = paced_rows_from_end_to_end(e, LLAMA)
    assert sorted((r["seq_len"], r["paced_gbps"]) for r in rows) == [(80, 2.0), (104, 2.5)]
    assert all(r["up_bytes"] > 0 and r["down_bytes"] > 0 and r["measured_s"] == 0.4 for r in rows)


def test_the_cost_model_charges_the_paced_path_in_log_rate_up_to_the_loopback_path_at_the_cap():
    cap_gbps = 1.6 * 8  # 12.8 Gbps
    cost = _cost([(MB, 1e-9), (100 * MB, 1e-9)], [(2.0, 0.5e-9), (4.0, 0.7e-9)], cap_GBps=1.6)
    assert cost.stream_path_s(10 * MB, 4.0) == pytest.approx(10 * MB * 0.7e-9, rel=1e-12)
    assert cost.stream_path_s(10 * MB, math.sqrt(8.0)) == pytest.approx(10 * MB * 0.6e-9, rel=1e-12)  # halfway in log rate
    between = math.sqrt(4.0 * cap_gbps)  # halfway from the fastest paced rate to the cap
    assert cost.stream_path_s(10 * MB, between) == pytest.approx(10 * MB * 0.85e-9, rel=1e-12)
    for at_or_above in (cap_gbps, 25.0, 400.0, None):  # at the cap, or the rate not given: loopback_path
        assert cost.stream_path_s(10 * MB, at_or_above) == pytest.approx(10 * MB * 1e-9, rel=1e-12)
    assert not cost.out_of_range
    assert cost.stream_path_s(10 * MB, 1.0) == pytest.approx(10 * MB * 0.5e-9, rel=1e-12)  # flat below 2 Gbps
    assert cost.out_of_range == {"a loopback link paced below 2 Gbps (its host path taken as at 2)"}
    assert cost.stream_path_s(0, 2.0) == 0.0
    unpaced = _cost([(MB, 1e-9)], None)
    assert unpaced.stream_path_s(10 * MB, 2.0) == pytest.approx(10 * MB * 1e-9, rel=1e-12)
    assert _cost(None, [(2.0, 0.5e-9)]).stream_path_s(MB, 2.0) is None  # no path at the cap: nothing charged


@pytest.mark.parametrize("points", [[(2.0, -1e-9)], [(0.0, 1e-9)], [(4.0, 1e-9), (2.0, 1e-9)], [(2.0, math.inf)],
                                    [(math.nan, 1e-9)], []])
def test_a_profile_refuses_a_paced_path_that_is_not_positive_finite_and_sorted(points):
    with pytest.raises(ValidationError, match="paced_path"):
        Network(connect_s=0.0, per_message_s=0.0, paced_path=points)


def test_a_network_without_the_paced_path_is_written_as_before_it_existed():
    network = load_profile(H100).network
    assert "paced_path" not in network.model_dump()
    assert network.model_copy(update={"paced_path": [(2.0, 1e-9)]}).model_dump()["paced_path"] == [(2.0, 1e-9)]


def test_a_send_over_a_paced_loopback_link_pays_the_paced_path_in_series_with_the_paced_wire():
    """One 10 MB message alone on a 2 Gbps loopback link: per message + paced path + wire + RTT/2 +
    deserialize; the same message at 100 Gbps, capped at the loopback rate, pays loopback_path."""
    cost = _cost([(10 * MB, 1e-9)], [(2.0, 0.4e-9)], cap_GBps=1.5)
    rtt = 1e-4
    for gbps, per_byte, rate_Bps in ((2.0, 0.4e-9, 2e9 / 8), (100.0, 1e-9, 1.5e9)):
        env = simpy.Environment()
        link = Link(env, gbps, rtt, 1.5e9, 0, cost, stream_serial=True)
        env.run(link.send(link.up, 10 * MB))
        expected = cost.per_message_s() + 10 * MB * per_byte + 10 * MB / rate_Bps + rtt / 2 + cost.deserialize_s(10 * MB)
        assert env.now == pytest.approx(expected, rel=1e-9)


def test_paced_rows_that_reach_the_cap_give_the_whole_curve_flat_beyond_both_ends():
    """Rates measured at and above the loopback cap (the link emulator paces there too): no
    loopback_path value enters, a link above the fastest rate or below the slowest is held flat and flagged."""
    cost = _cost([(MB, 9e-9)], [(2.0, 0.4e-9), (4.0, 0.5e-9), (25.0, 1.0e-9), (100.0, 1.2e-9)], cap_GBps=1.6)
    assert cost.stream_path_s(10 * MB, 10.0) == pytest.approx(10 * MB * (0.5e-9 + 0.5e-9 * math.log(2.5) / math.log(6.25)), rel=1e-12)
    assert cost.stream_path_s(10 * MB, 50.0) == pytest.approx(10 * MB * 1.1e-9, rel=1e-12)  # halfway in log rate
    assert cost.stream_path_s(10 * MB, 100.0) == pytest.approx(10 * MB * 1.2e-9, rel=1e-12)
    assert not cost.out_of_range
    assert cost.stream_path_s(10 * MB, 400.0) == pytest.approx(10 * MB * 1.2e-9, rel=1e-12)
    assert cost.stream_path_s(10 * MB, 1.0) == pytest.approx(10 * MB * 0.4e-9, rel=1e-12)
    assert cost.out_of_range == {"a loopback link paced above 100 Gbps (its host path taken as at 100)",
                                 "a loopback link paced below 2 Gbps (its host path taken as at 2)"}
    assert cost.stream_path_s(10 * MB) == pytest.approx(10 * MB * 9e-9, rel=1e-12)  # no rate given: loopback_path


def test_with_the_paced_rows_message_size_other_sizes_take_the_loopback_paths_shape():
    """paced_path_bytes set: a message of another size is charged the paced rows' level times
    loopback_path's ratio between its size and theirs (so a 4 MB message is not charged a 46 MB one's
    per-byte time); at their size, or without the field, the paced value as measured."""
    path = [(4 * MB, 0.2e-9), (46 * MB, 0.8e-9)]
    cost = _cost(path, [(2.0, 0.4e-9), (100.0, 1.2e-9)], cap_GBps=1.6)
    sized = _cost(path, [(2.0, 0.4e-9), (100.0, 1.2e-9)], cap_GBps=1.6)
    sized.profile = sized.profile.model_copy(update={"network": sized.profile.network.model_copy(update={"paced_path_bytes": 46 * MB})})
    for gbps, level in ((2.0, 0.4e-9), (100.0, 1.2e-9)):
        assert sized.stream_path_s(46 * MB, gbps) == pytest.approx(46 * MB * level, rel=1e-12)
        assert sized.stream_path_s(4 * MB, gbps) == pytest.approx(4 * MB * level * 0.25, rel=1e-12)
        assert cost.stream_path_s(4 * MB, gbps) == pytest.approx(4 * MB * level, rel=1e-12)  # no size: as measured
    below = _cost(path, [(2.0, 0.4e-9)], cap_GBps=1.6)  # paced below the cap only: up to loopback_path at the cap
    below.profile = below.profile.model_copy(update={"network": below.profile.network.model_copy(update={"paced_path_bytes": 46 * MB})})
    assert below.stream_path_s(4 * MB, 12.8) == pytest.approx(4 * MB * 0.2e-9, rel=1e-12)
    assert below.stream_path_s(4 * MB, 2.0) == pytest.approx(4 * MB * 0.1e-9, rel=1e-12)
