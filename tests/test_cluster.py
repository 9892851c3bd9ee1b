"""A pool of GPUs: routers by hand, placement, OOM per GPU, serverless tasks routed to free memory,
a link per node, and the default one-GPU cluster leaving every point as it was."""

from __future__ import annotations

import typing
from types import SimpleNamespace

import numpy as np
import pytest

from djinnsim.errors import DjinnsimError
from djinnsim.sim.engine.router import ROUTERS, make_router
from djinnsim.sim.engine.world import World
from djinnsim.sim.scenario import Cluster, expand_points, parse_scenario
from djinnsim.sim.simulate import memory_bound_agents


def _gpus(*loads):
    return [SimpleNamespace(sessions=s, routed=f, used_bytes=u) for s, f, u in loads]


def test_round_robin_moves_one_gpu_on_per_placement():
    router = make_router("round_robin", 3)
    gpus = _gpus((0, 0, 0), (0, 0, 0), (0, 0, 0))
    assert [router.rank(gpus, agent=7)[0] for _ in range(5)] == [0, 1, 2, 0, 1]


def test_session_affinity_puts_an_agent_on_its_home_gpu_first():
    router = make_router("session_affinity", 4)
    gpus = _gpus(*[(0, 0, 0)] * 4)
    assert router.rank(gpus, agent=6) == [2, 3, 0, 1]
    assert router.rank(gpus, agent=6) == [2, 3, 0, 1]  # the same every time


def test_least_loaded_ranks_by_work_then_memory_then_index():
    router = make_router("least_loaded", 4)
    gpus = _gpus((2, 1, 10), (1, 0, 50), (0, 1, 40), (3, 0, 0))
    assert router.rank(gpus, agent=0) == [2, 1, 3, 0]  # loads 3, 1, 1, 3; ties: less memory first


def test_scenario_routers_are_the_registry():
    args = typing.get_args(Cluster.model_fields["router"].annotation)
    assert set(args) == set(ROUTERS)


@pytest.mark.parametrize("cluster, needle", [
    ({"nodes": 0}, "cluster.nodes"),
    ({"gpus_per_node": 17}, "cluster.gpus_per_node"),
    ({"router": "random"}, "cluster.router"),
    ({"gpus": 4}, "cluster.gpus"),
])
def test_bad_cluster_is_one_line_naming_the_field(cluster, needle):
    with pytest.raises(DjinnsimError, match=needle.replace(".", r"\.")):
        _scenario(["djinn"], [1], cluster)


def _scenario(backends, agents, cluster=None, **workload):
    raw = {"name": "pool", "cost_model": "roofline", "backends": backends,
           "workload": {"kind": "agents", "agents": agents, "reason": {"input_tokens": 8, "new_tokens": 4},
                        "act": {"kind": "fixed", "seconds": 1.0}, "reflect": {"input_tokens": 4, "new_tokens": 4},
                        **workload}}
    if cluster is not None:
        raw["cluster"] = cluster
    return parse_scenario(raw)


def _world(scenario, cost, index=0):
    point = expand_points(scenario)[index]
    return World(scenario, point, cost, np.random.SeedSequence(0))


def test_default_cluster_keeps_the_label_and_one_gpu(fake_cost):
    scenario = _scenario(["djinn"], [2])
    explicit = _scenario(["djinn"], [2], {"nodes": 1, "gpus_per_node": 1, "router": "session_affinity"})
    assert expand_points(scenario)[0].label == expand_points(explicit)[0].label == "djinn__llama-2-7b-hf__h100-80gb__25gbps__n2"
    world = _world(scenario, fake_cost)
    assert len(world.pool.servers) == 1 and len(world.pool.links) == 1
    records = world.run()
    assert set(records.column("node")) == {0} and set(records.column("gpu_index")) == {0}


def test_a_pool_point_names_its_cluster():
    point = expand_points(_scenario(["djinn"], [2], {"nodes": 2, "gpus_per_node": 4, "router": "least_loaded"}))[0]
    assert point.label.endswith("__n2__2x4gpu_least_loaded")


def test_sessions_stay_on_their_gpu_and_records_name_it(fake_cost):
    world = _world(_scenario(["djinn"], [8], {"nodes": 2, "gpus_per_node": 2}), fake_cost)
    records = world.run()
    for agent, node, gpu in zip(records.column("agent"), records.column("node"), records.column("gpu_index")):
        home = agent % 4  # session_affinity: agent mod GPUs, for both of its phases
        assert (node, gpu) == (home // 2, home % 2)


def test_gpus_of_a_node_share_its_link(fake_cost):
    world = _world(_scenario(["djinn"], [1], {"nodes": 3, "gpus_per_node": 2}), fake_cost)
    pool = world.pool
    assert len(pool.links) == 3
    for gpu, server in enumerate(pool.servers):
        assert (server.node, server.index) == (gpu // 2, gpu % 2)
        assert pool._link(gpu) is pool.links[gpu // 2]
    assert pool._link(0) is pool._link(1) and pool._link(1) is not pool._link(2)


def _oom_agents(agents, cluster, cost):
    records = _world(_scenario(["ray_keepalive"], [agents], cluster), cost).run()
    oom = records.column("status") == "oom"
    return records, set(records.column("agent")[oom].tolist())


def test_keepalive_actors_run_out_of_memory_per_gpu(fake_cost):
    scenario = _scenario(["ray_keepalive"], [1])
    bound = memory_bound_agents(scenario, expand_points(scenario)[0].backend, fake_cost)
    _, oom = _oom_agents(bound + 4, None, fake_cost)
    one_gpu = bound + 4 - len(oom)  # what one GPU holds (its requests' workspace included)
    assert 0 < one_gpu <= bound
    pool = {"nodes": 1, "gpus_per_node": 2}
    records, oom = _oom_agents(2 * one_gpu, pool, fake_cost)
    assert not oom  # twice as many on two GPUs
    reason = records.column("phase") == "reason"
    assert np.bincount(records.column("gpu_index")[reason]).tolist() == [one_gpu, one_gpu]
    records, oom = _oom_agents(2 * one_gpu + 2, pool, fake_cost)
    assert len(oom) == 2  # one more actor on each GPU: each GPU runs out of memory on its own
    failed = (records.column("status") == "oom")
    assert sorted(records.column("gpu_index")[failed].tolist()) == [0, 1]


def test_a_serverless_task_goes_to_a_gpu_with_free_memory(fake_cost):
    scenario = _scenario(["ray_serverless"], [1], {"nodes": 1, "gpus_per_node": 2})
    world = _world(scenario, fake_cost)
    home = world.pool.servers[0]  # agent 0's home under session_affinity
    assert home.memory.try_alloc(home.memory.free_bytes)  # GPU 0 full
    records = world.run()
    assert list(records.column("status")) == ["ok", "ok"]
    assert list(records.column("gpu_index")) == [1, 1]


def test_a_serverless_task_waits_on_its_first_choice_when_no_gpu_has_room(fake_cost):
    scenario = _scenario(["ray_serverless"], [1], {"nodes": 1, "gpus_per_node": 2, "router": "round_robin"})
    world = _world(scenario, fake_cost)
    for server in world.pool.servers:
        assert server.memory.try_alloc(server.memory.free_bytes)
    world.start_clients()
    world.env.run(until=4.0)
    assert world.pool.servers[0].memory.waiting == 1  # round robin's first choice: GPU 0, full, so it waits
    assert world.pool.servers[1].memory.waiting == 0


@pytest.mark.parametrize("router", ["session_affinity", "least_loaded"])
def test_an_exp21_point_on_a_pool_draws_as_on_one_gpu(router):
    """Exp 2.1's one client on a 2 x 2 pool: every backend's per-token latency is the single GPU's
    (its sessions land on GPU 0, whose draws are the point's own), so the pool changes no comparison
    between backends (semantic_blind's edge over native comes from the profile, not the pool).
    round_robin moves each run to the next GPU, with that GPU's draws."""
    from djinnsim.sim.metrics import decode_summary
    from djinnsim.sim.records import records_frame
    from djinnsim.sim.run import simulate_scenario

    raw = {"name": "e21", "seed": 7, "backends": ["native_pytorch", "semantic_blind", "full_djinn"],
           "workload": {"kind": "decode", "prompt_tokens": 16, "new_tokens": 6, "runs": 4, "warmup_runs": 1}}
    per_token = {}
    for nodes in (1, 2):
        cluster = {"nodes": nodes, "gpus_per_node": nodes, "router": router}
        result = simulate_scenario(parse_scenario({**raw, "cluster": cluster}))
        per_token[nodes] = [decode_summary(records_frame(p.records))["mean_per_token_ms"] for p in result.points]
    assert per_token[2] == per_token[1]
