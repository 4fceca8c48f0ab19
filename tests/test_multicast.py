"""Multicast: chain and binomial pipeline of n receivers against their closed forms, in the fabric alone
and in whole simulations of overlapping cold starts."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import simpy

from tangram_sim.core.links import Fabric, Link
from tangram_sim.errors import ConfigError
from tangram_sim.models import get_model
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.topology import TopologySpec
from tangram_sim.topology.multicast import finish_s, lag_blocks

QWEN = get_model("qwen2.5-3b")
MiB = 2**20


def test_lags_and_finish_times() -> None:
    assert [lag_blocks("chain", k) for k in range(1, 6)] == [1, 2, 3, 4, 5]
    assert [lag_blocks("binomial", k) for k in range(1, 9)] == [1, 2, 2, 3, 3, 3, 3, 4]
    assert finish_s("chain", 0, 10e9, 1e9, 1e9) == 10.0
    assert finish_s("chain", 7, 10e9, 1e9, 1e9) == 17.0
    assert finish_s("binomial", 7, 10e9, 1e9, 1e9) == 13.0  # 8 receivers: log2(8) blocks after the model
    with pytest.raises(ValueError):
        lag_blocks("chain", 0)


@pytest.mark.parametrize("kind", ["chain", "binomial"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_fabric_followers_meet_the_closed_form(kind: str, n: int) -> None:
    """n receivers, each on its own link of rate r: the root reads M bytes, receiver k follows (the previous
    one by a block in a chain, the root by ceil(log2(k+1)) blocks in a binomial pipeline)."""
    env = simpy.Environment()
    fabric = Fabric(env)
    r, m, b = 2e9, 12e9, 0.5e9
    events = [fabric.transfer(m, (Link("root", r),))]
    for k in range(1, n):
        follow = events[-1] if kind == "chain" else events[0]
        lag = b if kind == "chain" else lag_blocks(kind, k) * b
        events.append(fabric.transfer(m, (Link(f"r{k}", r),), follow=follow, lag=lag))
    done: dict[int, float] = {}
    for k, ev in enumerate(events):
        ev.callbacks.append(lambda _e, k=k: done.setdefault(k, env.now))
    env.run()
    for k in range(n):
        assert done[k] == pytest.approx(finish_s(kind, k, m, b, r), rel=1e-9)


def test_a_follower_on_a_slower_link_is_not_held_back() -> None:
    """A follower slower than its upstream stays behind by more than its lag: its own link bounds it."""
    env = simpy.Environment()
    fabric = Fabric(env)
    root = fabric.transfer(8e9, (Link("fast", 4e9),))
    slow = fabric.transfer(8e9, (Link("slow", 1e9),), follow=root, lag=1e9)
    times: list[float] = []
    slow.callbacks.append(lambda _e: times.append(env.now))
    env.run()
    assert times == [pytest.approx(1.0 / 4 + 8.0, rel=1e-9)]  # waits for the first block, then 1 GB/s


def _overlapping(n: int, nodes: int, multicast: str, topology: TopologySpec, block: int = 256 * MiB) -> pd.DataFrame:
    """n requests of one model at t=0 on n idle GPUs: n cold starts at once, checkpoints only in the remote
    store (a 12.5 GB/s NIC per node, PCIe far faster), no engine overhead."""
    per_node = n // nodes
    c = ClusterSpec(nodes, per_node, gpu_spec("a100-80gb", {"pcie_bps": 1e12}, 40),
                    TierSpec(host_cache_bytes=0, network_bps=12.5e9, ssd_holds_all=False), topology=topology)
    t = pd.DataFrame([(0.0, "q", 10, 1)] * n, columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    system = make_system("s", "serverlessllm", {"engine_overhead_s": 0.0, "max_batch": 1, "multicast": multicast,
                                                "multicast_block_bytes": block})
    res = simulate({"q": ModelChoice(QWEN)}, t, c, system)
    rows = res.requests
    assert rows.cold.all() and sorted(rows.gpu) == list(range(n))
    assert res.summary["bytes_loaded"] == n * QWEN.weight_bytes
    sources = ["bytes_from_remote", "bytes_from_ssd", "bytes_from_dram", "bytes_from_peer_gpu", "bytes_from_remote_gpu"]
    assert sum(res.summary[s] for s in sources) == res.summary["bytes_loaded"]
    return rows


@pytest.mark.parametrize("kind", ["chain", "binomial"])
@pytest.mark.parametrize("n", [4, 8])
def test_overlapping_cold_starts_across_nodes_form_a_stream(kind: str, n: int) -> None:
    rows = _overlapping(n, n, kind, TopologySpec(rdma=True, remote_store_bps=12.5e9))
    m, r, b = QWEN.weight_bytes, 12.5e9, 256 * MiB
    want = sorted(finish_s(kind, k, m, b, r) for k in range(n))
    assert sorted(rows.load_s) == pytest.approx(want, rel=1e-9)
    assert rows.load_s.max() == pytest.approx(m / r + (n - 1 if kind == "chain" else math.log2(n)) * b / r, rel=1e-9)


def test_without_multicast_the_store_is_shared() -> None:
    n = 4
    rows = _overlapping(n, n, "none", TopologySpec(rdma=True, remote_store_bps=12.5e9))
    assert list(rows.load_s) == pytest.approx([n * QWEN.weight_bytes / 12.5e9] * n, rel=1e-9)


def test_without_rdma_a_stream_stays_in_its_node() -> None:
    """Two nodes of two GPUs, no RDMA: one stream per node (two roots, each on its own NIC); each receiver
    reads from its root over PCIe (1 TB/s here), so its last block arrives b / 1 TB/s after the root's."""
    rows = _overlapping(4, 2, "chain", TopologySpec())
    m, r, b = QWEN.weight_bytes, 12.5e9, 256 * MiB
    assert sorted(rows.load_s) == pytest.approx([m / r, m / r, m / r + b / 1e12, m / r + b / 1e12], rel=1e-9)


def test_multicast_field_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^systems\.multicast: expected one of none, chain, binomial"):
        make_system("s", "tangram", {"multicast": "tree"})
    with pytest.raises(ConfigError, match=r"^systems\.overrides\.multicast_block_bytes: expected an integer >= 1"):
        make_system("s", "tangram", {"multicast_block_bytes": 0})
