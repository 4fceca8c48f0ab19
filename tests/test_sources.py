"""Sources: the policies on plain data, and cold starts that read another GPU's copy in a simulation."""

from __future__ import annotations

import pandas as pd
import pytest

from tangram_sim.core.sources import SOURCE_COLUMNS
from tangram_sim.errors import ConfigError
from tangram_sim.models import get_model
from tangram_sim.policies.source import SOURCE, GpuCopy
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.topology import TopologySpec

QWEN = get_model("qwen2.5-3b")
PEER = GpuCopy(3, "peer-gpu", 50e9)
FAR = GpuCopy(9, "remote-gpu", 100e9)
SLOW_PEER = GpuCopy(1, "peer-gpu", 5e9)


def test_the_policies_on_plain_copies() -> None:
    tiers, fastest, gpu_first = (SOURCE.create(n) for n in ("tiers", "fastest", "gpu-first"))
    assert not tiers.gpu_copies and tiers.choose("ssd", 6e9, [PEER]) is None
    assert fastest.choose("ssd", 6e9, [SLOW_PEER, PEER, FAR]) == 2  # the highest rate
    assert fastest.choose("dram", 25e9, [SLOW_PEER]) is None  # slower than the host copy
    assert fastest.choose("dram", 50e9, [PEER]) is None  # a tie keeps the host copy
    assert fastest.choose("ssd", 6e9, [GpuCopy(9, "remote-gpu", 50e9), PEER]) == 1  # tie: the peer first
    assert gpu_first.choose("dram", 25e9, [FAR, SLOW_PEER]) == 1  # a peer of the node, even a slow one
    assert gpu_first.choose("dram", 25e9, [FAR]) == 0


def test_an_unknown_source_policy_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^systems\.source: unknown source policy 'nearest'"):
        make_system("s", "tangram", {"source": "nearest"})


def _second_instance(source: str, nodes: int, gpus: int, topology: TopologySpec) -> tuple[pd.DataFrame, dict]:
    """Model q starts on GPU 0 at t=0 and decodes for long; a second request at t=5 cannot join it
    (max_batch 1), so an idle GPU starts a second instance while the first holds the weights."""
    c = ClusterSpec(nodes, gpus, gpu_spec("a100-80gb", {"pcie_bps": 25e9}, 40),
                    TierSpec(ssd_bps=6e9, network_bps=12.5e9), topology=topology)
    t = pd.DataFrame([(0.0, "q", 100, 3000), (5.0, "q", 100, 4)],
                     columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    system = make_system("s", "tangram", {"max_batch": 1, "source": source})
    res = simulate({"q": ModelChoice(QWEN)}, t, c, system)
    return res.requests, res.summary


def test_a_peer_copy_over_nvlink() -> None:
    rows, summary = _second_instance("fastest", 1, 2, TopologySpec(nvlink_bps=300e9))
    first, second = rows.iloc[0], rows.iloc[1]
    assert (first.gpu, second.gpu) == (0, 1) and first.cold and second.cold
    assert first.load_s == pytest.approx(QWEN.weight_bytes / 6e9, rel=1e-9)  # SSD-bound
    assert second.load_s == pytest.approx(QWEN.weight_bytes / 300e9, rel=1e-9)  # NVLink, no PCIe
    assert summary["bytes_from_ssd"] == QWEN.weight_bytes
    assert summary["bytes_from_peer_gpu"] == QWEN.weight_bytes
    assert sum(summary[c] for c in SOURCE_COLUMNS) == summary["bytes_loaded"]


def test_a_peer_copy_without_nvlink_crosses_both_pcie_links() -> None:
    rows, summary = _second_instance("gpu-first", 1, 2, TopologySpec())
    assert rows.iloc[1].load_s == pytest.approx(QWEN.weight_bytes / 25e9, rel=1e-9)
    assert summary["bytes_from_peer_gpu"] == QWEN.weight_bytes


@pytest.mark.parametrize("rdma", [True, False])
def test_another_nodes_gpu_only_with_rdma(rdma: bool) -> None:
    rows, summary = _second_instance("fastest", 2, 1, TopologySpec(rdma=rdma))
    second = rows.iloc[1]
    assert second.gpu == 1 and second.cold
    if rdma:  # NIC (12.5 GB/s) beats the SSD (6 GB/s)
        assert second.load_s == pytest.approx(QWEN.weight_bytes / 12.5e9, rel=1e-9)
        assert summary["bytes_from_remote_gpu"] == QWEN.weight_bytes
    else:
        assert second.load_s == pytest.approx(QWEN.weight_bytes / 6e9, rel=1e-9)
        assert summary["bytes_from_remote_gpu"] == 0 and summary["bytes_from_ssd"] == 2 * QWEN.weight_bytes


def test_the_default_reads_host_tiers_only() -> None:
    rows, summary = _second_instance("tiers", 1, 2, TopologySpec(nvlink_bps=300e9))
    assert summary["bytes_from_peer_gpu"] == 0
    # the second instance finds the checkpoint in the node's DRAM cache (the first load filled it)
    assert summary["bytes_from_dram"] == QWEN.weight_bytes and summary["bytes_from_ssd"] == QWEN.weight_bytes
    assert rows.iloc[1].load_s == pytest.approx(QWEN.weight_bytes / 25e9, rel=1e-9)


@pytest.mark.parametrize("overrides", [{"source": "fastest"}, {"multicast": "chain"}])
def test_a_device_that_reads_host_tiers_only_refuses_gpu_sources(overrides: dict) -> None:
    import simpy

    from tangram_sim.arena import ARENA_ALIGNMENT
    from tangram_sim.core.links import Fabric
    from tangram_sim.core.records import build_entries
    from tangram_sim.core.router import Recorder
    from tangram_sim.core.run import build_policies, run_lifecycle, trace_requests
    from tangram_sim.sim.device import ModelledDevice
    from tangram_sim.sim.timemodel import Roofline

    class HostOnly(ModelledDevice):
        reads_gpu_copies = False
        joins_multicast = False

    gpu = gpu_spec("a100-80gb", memory_gib=40)
    system = make_system("s", "tangram", overrides)
    env = simpy.Environment()
    t = pd.DataFrame([(0.0, "q", 10, 1)], columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    device = HostOnly(env, 0, gpu.memory_bytes, ARENA_ALIGNMENT, gpu.pcie_bps, Fabric(env), Roofline(gpu), 0.0, 0.0,
                      gpu.d2d_bps)
    expected = "reads units from other GPUs; these devices read their node's tiers only" if "source" in overrides \
        else "multicast chain streams a model from GPU to GPU; not yet supported by the real executor"
    with pytest.raises(ConfigError, match=expected):
        run_lifecycle(env, [device], trace_requests(t), gpus_per_node=1, tiers=TierSpec(), system=system,
                      entries=build_entries({"q": (QWEN, 1.0, 1)}, system, ARENA_ALIGNMENT), time_model=Roofline(gpu),
                      policies=build_policies(system, h2d_bps=gpu.pcie_bps, sensitivity={}, trace=t), seed=0,
                      recorder=Recorder(False, 1.0, True), engine_overhead_s=0.0, pcie_bps=gpu.pcie_bps)


def test_a_gpu_copy_speeds_up_the_load_estimate() -> None:
    from tangram_sim.policies.scheduler import PlacementOption, TtftAwareScheduler, estimated_load_s

    base = dict(node=0, queue_wait_s=0.0, free_bytes=10, resident_bytes=0, model_bytes=int(6e9),
                in_host_cache=False, host_to_gpu_bps=25e9, storage_bps=6e9, prefill_s=0.01)
    plain = PlacementOption(gpus=(0,), **base)
    near = PlacementOption(gpus=(1,), copy_bps=300e9, **base)
    slow = PlacementOption(gpus=(2,), copy_bps=1e9, **base)  # slower than the SSD: ignored
    assert estimated_load_s(plain) == pytest.approx(1.0)
    assert estimated_load_s(near) == pytest.approx(0.02)
    assert estimated_load_s(slow) == estimated_load_s(plain)
    assert TtftAwareScheduler().choose("q", [plain, near, slow], None) == 1  # type: ignore[arg-type]
