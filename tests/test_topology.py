"""The topology: configuration errors, paths per source, the default cluster unchanged, contention on a
shared NIC and on the remote store."""

from __future__ import annotations

import pandas as pd
import pytest

from tangram_sim.errors import ConfigError
from tangram_sim.models import get_model
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.topology import Topology, TopologySpec, topology_from_config

QWEN = get_model("qwen2.5-3b")


def trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


@pytest.mark.parametrize("section, message", [
    ([], "cluster.topology: expected a mapping"),
    ({"nvlink": 300}, "cluster.topology.nvlink: unknown key"),
    ({"nvlink_gbps": 0}, "cluster.topology.nvlink_gbps: expected a number > 0"),
    ({"remote_store_gbps": float("nan")}, "cluster.topology.remote_store_gbps: expected a number > 0"),
    ({"remote_store_gbps": "10"}, "cluster.topology.remote_store_gbps: expected a number > 0"),
    ({"rdma": "yes"}, "cluster.topology.rdma: expected true or false"),
    ({"nics_per_node": 0}, "cluster.topology.nics_per_node: expected an integer >= 1"),
    ({"nics_per_node": 2.0}, "cluster.topology.nics_per_node: expected an integer >= 1"),
    ({"nics_per_node": True}, "cluster.topology.nics_per_node: expected an integer >= 1"),
])
def test_bad_topology_is_one_line_naming_the_key(section: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        topology_from_config(section)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_section_reaches_the_cluster_through_an_experiment() -> None:
    from tangram_sim.experiments.config import build_cluster, validate
    raw = {"name": "t", "cluster": {"nodes": 2, "topology": {"nvlink_gbps": 300, "rdma": True}},
           "models": [{"name": "qwen2.5-3b"}], "trace": {"kind": "synthetic"},
           "systems": [{"name": "t", "preset": "tangram"}]}
    spec = build_cluster(validate(raw, None)).topology
    assert spec == TopologySpec(nvlink_bps=300e9, rdma=True, remote_store_bps=None)
    raw["cluster"]["topology"] = {"rdma": 1}
    with pytest.raises(ConfigError, match=r"^cluster\.topology\.rdma: expected true or false"):
        validate(raw, None)
    raw["cluster"]["topology"] = {"nics_per_node": 10**12}  # no more NICs than GPUs: one line, no list of 10^12
    with pytest.raises(ConfigError, match=r"^cluster\.topology\.nics_per_node: expected an integer from 1 to "
                       r"gpus_per_node \(\d+\), got 1000000000000$"):
        validate(raw, None)
    del raw["cluster"]["topology"]
    assert "topology" not in validate(raw, None)["cluster"]  # configs without it keep their hash
    assert build_cluster(validate(raw, None)).topology == TopologySpec()


def test_paths_by_source() -> None:
    tiers = TierSpec(ssd_bps=6e9, network_bps=12.5e9)
    plain = Topology(2, 4, 25e9, tiers)
    assert plain.path("dram", 5) == (plain.pcie[5],)
    assert plain.path("ssd", 5) == (plain.ssd[1], plain.pcie[5])
    assert plain.path("remote", 5) == (plain.nic_in[1], plain.pcie[5])  # no store limit: the NIC's
    assert plain.path("peer-gpu", 5, 6) == (plain.pcie_up[6], plain.pcie[5])  # no NVLink: over PCIe
    with pytest.raises(ValueError):
        plain.path("peer-gpu", 5, 1)  # another node's GPU is no peer
    with pytest.raises(ValueError):
        plain.path("remote-gpu", 5, 1)  # no RDMA
    rich = Topology(2, 4, 25e9, tiers, TopologySpec(nvlink_bps=300e9, rdma=True, remote_store_bps=5e9))
    assert rich.path("peer-gpu", 5, 6) == (rich.nvlink_out[6], rich.nvlink_in[5])
    assert rich.path("remote-gpu", 5, 1) == (rich.pcie_up[1], rich.nic_out[0], rich.nic_in[1], rich.pcie[5])
    assert rich.path("remote", 5) == (rich.store, rich.nic_in[1], rich.pcie[5])
    assert rich.source_bps("peer-gpu", 5, 6) == 300e9
    assert rich.source_bps("remote-gpu", 5, 1) == 12.5e9
    assert plain.storage_bps(1) == 6e9
    remote_only = Topology(2, 4, 25e9, TierSpec(ssd_holds_all=False, network_bps=12.5e9),
                           TopologySpec(remote_store_bps=5e9))
    assert remote_only.storage_bps(0) == 5e9  # the store is slower than the NIC


def _cold_loads(nodes: int, gpus: int, tiers: TierSpec, topology: TopologySpec, n_requests: int) -> pd.DataFrame:
    c = ClusterSpec(nodes, gpus, gpu_spec("a100-80gb", {"pcie_bps": 1e12}), tiers, topology=topology)
    models = {f"q{i}": ModelChoice(QWEN) for i in range(n_requests)}  # distinct names: one cold start each
    t = trace([(0.0, f"q{i}", 10, 1) for i in range(n_requests)])
    system = make_system("s", "serverlessllm", {"engine_overhead_s": 0.0})
    return simulate(models, t, c, system).requests


@pytest.mark.parametrize("m", [1, 2, 4])
def test_m_cold_starts_share_one_nic_fairly(m: int) -> None:
    """m GPUs of one node start m models at once from the remote store: each load gets 1/m of the NIC."""
    nic = 1e9
    tiers = TierSpec(host_cache_bytes=0, network_bps=nic, ssd_holds_all=False)
    rows = _cold_loads(1, m, tiers, TopologySpec(), m)
    assert list(rows.gpu) == list(range(m))  # one cold start per GPU
    for load in rows.load_s:
        assert load == pytest.approx(m * QWEN.weight_bytes / nic, rel=1e-9)


def test_the_remote_store_limit_is_shared_by_nodes() -> None:
    """Two nodes read at once through 10 GB/s NICs from a store of 4 GB/s: 2 GB/s each; without the
    limit each node's NIC alone bounds it."""
    tiers = TierSpec(host_cache_bytes=0, network_bps=10e9, ssd_holds_all=False)
    limited = _cold_loads(2, 1, tiers, TopologySpec(remote_store_bps=4e9), 2)
    assert sorted(limited.gpu) == [0, 1]
    assert list(limited.load_s) == pytest.approx([QWEN.weight_bytes / 2e9] * 2, rel=1e-9)
    free = _cold_loads(2, 1, tiers, TopologySpec(), 2)
    assert list(free.load_s) == pytest.approx([QWEN.weight_bytes / 10e9] * 2, rel=1e-9)


def test_an_explicit_default_topology_changes_nothing() -> None:
    t = trace([(0.1 * i, "a" if i % 3 else "b", 50, 8) for i in range(40)])
    models = {"a": ModelChoice(QWEN), "b": ModelChoice(get_model("llama-3-8b"))}
    runs = []
    for topology in (None, TopologySpec(), TopologySpec(nvlink_bps=300e9, rdma=True)):
        c = ClusterSpec(2, 2, gpu_spec("a100-80gb", memory_gib=40), TierSpec())
        if topology is not None:
            c = ClusterSpec(2, 2, c.gpu, c.tiers, topology=topology)
        res = simulate(models, t, c, make_system("s", "tangram"))
        runs.append((res.requests, res.summary))
    for requests, summary in runs[1:]:  # NVLink and RDMA are unused by today's sources
        pd.testing.assert_frame_equal(requests, runs[0][0])
        assert summary == runs[0][1]


def test_paths_through_a_nic_per_gpu() -> None:
    """With n NICs per node, local GPU i reads and receives through NIC i mod n, and sends a copy out of
    the NIC of the GPU that holds it; the link names of one NIC per node stay as they were."""
    tiers = TierSpec(ssd_bps=6e9, network_bps=12.5e9)
    one = Topology(2, 4, 25e9, tiers, TopologySpec(rdma=True))
    assert [link.name for link in one.nic_in] == ["node0.net", "node1.net"] and one.nic_of(7) == 1
    two = Topology(2, 4, 25e9, tiers, TopologySpec(rdma=True, nics_per_node=2))
    assert [two.nic_of(g) for g in range(8)] == [0, 1, 0, 1, 2, 3, 2, 3]
    assert [link.name for link in two.nic_in] == ["node0.net0", "node0.net1", "node1.net0", "node1.net1"]
    assert two.path("remote", 5) == (two.nic_in[3], two.pcie[5])
    assert two.path("remote", 6) == (two.nic_in[2], two.pcie[6])
    assert two.path("remote-gpu", 5, 2) == (two.pcie_up[2], two.nic_out[0], two.nic_in[3], two.pcie[5])
    assert two.storage_bps(1) == 6e9 and two.source_bps("remote-gpu", 5, 2) == 12.5e9


@pytest.mark.parametrize("nics, share", [(1, 4), (2, 2), (4, 1)])
def test_cold_starts_share_the_nics_their_gpus_use(nics: int, share: int) -> None:
    """4 GPUs of one node start 4 models at once from the remote store over `nics` NICs: each NIC carries
    4 / nics of the loads, so each load takes that many model times over one NIC's rate."""
    nic = 1e9
    tiers = TierSpec(host_cache_bytes=0, network_bps=nic, ssd_holds_all=False)
    rows = _cold_loads(1, 4, tiers, TopologySpec(nics_per_node=nics), 4)
    assert sorted(rows.gpu) == [0, 1, 2, 3]
    assert list(rows.load_s) == pytest.approx([share * QWEN.weight_bytes / nic] * 4, rel=1e-9)
