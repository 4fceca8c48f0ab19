"""A burst of cold starts on several empty nodes spreads over the nodes' storage instead of queueing on the
first node's SSD (the placement estimate counts the storage backlog of the cold starts already placed)."""

from __future__ import annotations

import pandas as pd
import pytest

from tangram_sim.experiments.config import build_cluster, build_models, build_systems
from tangram_sim.experiments.runner import load_point_trace, prepare
from tangram_sim.sim.simulate import simulate

BURST = {
    "name": "burst",
    "seed": 1,
    "cluster": {"nodes": 2, "gpus_per_node": 4, "gpu": "a100-80gb", "tiers": {"ssd_gbps": 2}},
    "models": [{"name": "llama-3-8b"}, {"name": "yi-9b"}, {"name": "qwen2.5-7b"}, {"name": "mistral-7b"}],
    # four requests, one per model, within 0.3 s: four cold starts at once
    "trace": {"kind": "synthetic", "n_requests": 4, "rate": 10.0, "arrival": "poisson",
              "input_mean": 64, "output_mean": 4, "mapping": {"kind": "round-robin"}},
    "outputs": {"plots": False},
    "systems": [{"name": "serverlessllm", "preset": "serverlessllm"}, {"name": "tangram", "preset": "tangram"}],
}


def run(system_index: int) -> pd.DataFrame:
    _, points = prepare(BURST, None)
    config = points[0]["config"]
    system = build_systems(config)[system_index]
    res = simulate(build_models(config, None), load_point_trace(config, None), build_cluster(config), system, seed=1)
    return res.requests


@pytest.mark.parametrize("system_index", [0, 1])
def test_a_burst_of_cold_starts_uses_both_nodes(system_index: int) -> None:
    req = run(system_index)
    assert (req.outcome == "completed").all() and req.cold.all()
    nodes = req.gpu // 4
    assert nodes.value_counts().to_dict() == {0: 2, 1: 2}
    # two 15-18 GB checkpoints on one 2 GB/s SSD: no load takes as long as three or four of them would
    assert req.load_s.max() < 3 * 15e9 / 2e9


def test_a_tensor_parallel_groups_copy_rate_counts_each_rank_from_a_gpu_of_its_rank() -> None:
    from types import SimpleNamespace

    from tangram_sim.core.router import Cluster
    from tangram_sim.sim.hardware import TierSpec
    from tangram_sim.topology import Topology
    from tangram_sim.topology.spec import TopologySpec

    node0, node1 = SimpleNamespace(node_id=0), SimpleNamespace(node_id=1)
    resident: dict[int, int] = {}

    def worker(gpu: int) -> SimpleNamespace:
        return SimpleNamespace(gpu_id=gpu, node=node0 if gpu < 4 else node1,
                               resident_bytes=lambda model, g=gpu: resident.get(g, 0))

    workers = [worker(g) for g in range(8)]
    topology = Topology(2, 4, 25e9, TierSpec(network_bps=12.5e9), TopologySpec(nvlink_bps=300e9, rdma=True))
    router = SimpleNamespace(entries={"m": SimpleNamespace(tp=2)}, gpu_model_bytes={"m": 10}, workers=workers,
                             gpus_per_node=4, topology=topology)
    group = (workers[2], workers[3])  # ranks 0 and 1 of node 0's second group
    assert Cluster.copy_bps(router, "m", group) == 0.0
    resident.update({0: 10, 1: 10})  # an instance on GPUs 0-1 of the same node: both ranks over NVLink
    assert Cluster.copy_bps(router, "m", group) == pytest.approx(2 * 300e9)
    resident.clear()
    resident.update({4: 10, 5: 10})  # on node 1: both ranks over RDMA, sharing the node's NIC
    assert Cluster.copy_bps(router, "m", group) == pytest.approx(12.5e9)
    resident.clear()
    resident.update({0: 10, 4: 10})  # rank 0's shards only (GPUs 0 and 4 are rank 0): rank 1 has no copy
    assert Cluster.copy_bps(router, "m", group) == 0.0
    # one NIC per GPU: the two ranks read from node 1 through their own NICs, the rates add up
    router.topology = Topology(2, 4, 25e9, TierSpec(network_bps=12.5e9),
                               TopologySpec(nvlink_bps=300e9, rdma=True, nics_per_node=4))
    resident.clear()
    resident.update({4: 10, 5: 10})
    assert Cluster.copy_bps(router, "m", group) == pytest.approx(2 * 12.5e9)
