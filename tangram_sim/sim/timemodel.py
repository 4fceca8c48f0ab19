"""How long prefill and decode take: a roofline by default, measured coefficients when calibrated.

Both time models honour one contract (`prefill_s`, `decode_step_s`) and are costed per GPU of a
tensor-parallel group (FLOPs and bytes divide by the TP degree; collective traffic is ignored).

`prefill_layers_s` splits one prefill iteration over the model's layers in compute order
(`models.layers.layer_blocks`) for execute-while-load, where layer i computes once its weights have
landed: the shares follow what bounds the iteration (the roofline's FLOPs, with each attention layer's
t^2 term, or its weight bytes when memory-bound; a linear calibrated model's dense FLOPs), and the
layers sum to `prefill_s` up to rounding, so a serial and an overlapped cold start cost the same compute.
Decode is not split: its first step needs the first token, which needs the last layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tangram_sim.models.layers import layer_blocks
from tangram_sim.models.spec import ModelSpec
from tangram_sim.sim.hardware import GpuSpec
from tangram_sim.specs.timemodel import TimeModel
from tangram_sim.specs.timemodel import split as _split

__all__ = ["Calibrated", "Calibration", "ModelCoefficients", "Roofline", "TimeModel", "with_coefficients"]


@dataclass(slots=True, frozen=True)
class Roofline(TimeModel):
    gpu: GpuSpec  # peak FLOP/s and HBM bandwidth come from here
    compute_efficiency: float = 0.5  # fraction of peak FLOP/s dense kernels reach
    memory_efficiency: float = 0.7  # fraction of HBM bandwidth streaming kernels reach
    prefill_overhead_s: float = 0.004  # launch/scheduling cost of one prefill iteration
    step_overhead_s: float = 0.002  # launch/scheduling cost of one decode iteration

    def _attn_dim(self, model: ModelSpec) -> int:
        arch = model.arch
        if arch is None or not arch.num_layers or not arch.num_heads or not arch.head_dim:
            return 0
        return arch.num_layers * arch.num_heads * arch.head_dim

    def prefill_s(self, model: ModelSpec, tokens: int, tp: int = 1) -> float:
        # FLOPs = 2 * params * tokens (matmuls) + 2 * layers * heads * head_dim * tokens^2 (causal
        # QK^T and AV: 4*t^2*d halved by the mask). Prefill also reads every weight once.
        flops = model.flops_per_token * tokens + 2.0 * self._attn_dim(model) * tokens * tokens
        compute = flops / tp / (self.gpu.bf16_flops * self.compute_efficiency)
        memory = model.weight_bytes / tp / (self.gpu.hbm_bps * self.memory_efficiency)
        return max(compute, memory) + self.prefill_overhead_s

    def prefill_layers_s(self, model: ModelSpec, tokens: int, tp: int = 1) -> list[float]:
        """Split by what bounds the iteration: each layer's FLOPs (its matmuls, plus an equal share of the
        attention term for each transformer layer) when compute-bound, its weight bytes when memory-bound;
        the per-iteration overhead goes with the same shares."""
        blocks = layer_blocks(model)
        flops = model.flops_per_token * tokens + 2.0 * self._attn_dim(model) * tokens * tokens
        compute = flops / tp / (self.gpu.bf16_flops * self.compute_efficiency)
        memory = model.weight_bytes / tp / (self.gpu.hbm_bps * self.memory_efficiency)
        total = max(compute, memory) + self.prefill_overhead_s
        if compute < memory:
            return _split(total, blocks.nbytes, blocks.nbytes)
        layers = sum(blocks.attention)
        attn = 2.0 * self._attn_dim(model) * tokens * tokens / layers if layers else 0.0
        weights = [f * tokens + (attn if a else 0.0) for f, a in zip(blocks.flops_per_token, blocks.attention)]
        return _split(total, weights, blocks.nbytes)

    def decode_step_s(self, model: ModelSpec, batch: int, kv_tokens: float, tp: int = 1) -> float:
        # One step produces one token per sequence: read all weights + every live KV byte once;
        # compute is 2 * params FLOPs per sequence. Memory-bound until batches get large.
        flops = model.flops_per_token * batch
        compute = flops / tp / (self.gpu.bf16_flops * self.compute_efficiency)
        bytes_read = model.weight_bytes + kv_tokens * model.kv_bytes_per_token
        memory = bytes_read / tp / (self.gpu.hbm_bps * self.memory_efficiency)
        return max(compute, memory) + self.step_overhead_s


@dataclass(slots=True, frozen=True)
class ModelCoefficients:
    prefill_base_s: float  # fixed cost of a prefill iteration
    prefill_per_token_s: float  # added per prompt token
    decode_base_s: float  # one decode step at batch 1 with an empty KV cache
    decode_per_seq_s: float = 0.0  # added per extra sequence in the batch
    decode_per_kv_token_s: float = 0.0  # added per live KV token read by a step
    # share of a prefill's time each layer block takes (models.layers.layer_blocks order), as measured
    # layer by layer by an execute-while-load replay; None: split by the blocks' FLOPs
    prefill_layer_shares: tuple[float, ...] | None = None


@dataclass(slots=True)
class Calibration:
    """Figures measured on a device by `tangram-sim real calibrate` (a YAML file)."""

    device: str  # what it was measured on
    h2d_bps: float | None = None  # pinned host->device bandwidth
    d2d_bps: float | None = None  # device->device copy bandwidth
    unit_overhead_s: float | None = None  # per loaded unit
    engine_overhead_s: float | None = None  # instance start
    models: dict[str, ModelCoefficients] | None = None  # per catalog model name
    # Checkpoint files -> device through the real loader (page cache or disk, as measured); when set,
    # the simulator's SSD tier streams at this rate, so loads run at min(read_bps, h2d_bps).
    read_bps: float | None = None
    # Per cold start that loads anything (the loader's setup: opening files, handing out the reads,
    # the final synchronisation), on top of unit_overhead_s per unit.
    load_overhead_s: float | None = None
    # A unit copied from another GPU of the node (a GPU source, `core.sources`), as the replays copied
    # them; when set, a peer copy runs at this rate instead of over the topology's NVLink or PCIe path.
    peer_bps: float | None = None
    # The rate a cold start's reads reach while its device computes the first prefill beside them
    # (execute-while-load): on a CPU device the reads and the compute share cores and memory bandwidth,
    # on a GPU the copy engines run beside the SMs. When set, a layered start's transfers also cross a
    # link of this rate of their GPU's own; None: they run at the rate of a serial start's.
    layered_load_bps: float | None = None

    @staticmethod
    def load(path: str | Path) -> Calibration:
        """Read a calibration YAML with the experiment loader's rules (`sim.calibration_file`)."""
        from tangram_sim.sim.calibration_file import read_calibration

        return read_calibration(path)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device}
        for key in ("h2d_bps", "d2d_bps", "read_bps", "peer_bps", "layered_load_bps", "unit_overhead_s",
                    "load_overhead_s",
                    "engine_overhead_s"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["models"] = {
            name: {f: list(v) if isinstance(v, tuple) else v for f in c.__slots__
                   if (v := getattr(c, f)) is not None}
            for name, c in (self.models or {}).items()
        }
        return out


@dataclass(slots=True, frozen=True)
class Calibrated(TimeModel):
    """Measured per-model coefficients; models without them fall back to the roofline."""

    calibration: Calibration
    fallback: Roofline

    def prefill_s(self, model: ModelSpec, tokens: int, tp: int = 1) -> float:
        c = (self.calibration.models or {}).get(model.name)
        if c is None:
            return self.fallback.prefill_s(model, tokens, tp)
        return c.prefill_base_s + c.prefill_per_token_s * tokens

    def prefill_layers_s(self, model: ModelSpec, tokens: int, tp: int = 1) -> list[float]:
        c = (self.calibration.models or {}).get(model.name)
        if c is None:
            return self.fallback.prefill_layers_s(model, tokens, tp)
        shares = c.prefill_layer_shares
        if shares is not None and len(shares) == len(layer_blocks(model)) and sum(shares) > 0:
            return _split(self.prefill_s(model, tokens, tp), shares, shares)
        return TimeModel.prefill_layers_s(self, model, tokens, tp)

    def decode_step_s(self, model: ModelSpec, batch: int, kv_tokens: float, tp: int = 1) -> float:
        c = (self.calibration.models or {}).get(model.name)
        if c is None:
            return self.fallback.decode_step_s(model, batch, kv_tokens, tp)
        return c.decode_base_s + c.decode_per_seq_s * (batch - 1) + c.decode_per_kv_token_s * kv_tokens


def with_coefficients(calibration: Calibration | None, coefficients: Mapping[str, float],
                      models: Iterable[str]) -> Calibration:
    """`calibration` (or an empty one) where every model of `models` without measured coefficients gets
    these (an experiment's `cluster.time_model`: one linear cost model for all)."""
    base = calibration if calibration is not None else Calibration(device="cluster.time_model")
    shared = ModelCoefficients(**coefficients)
    measured = dict(base.models or {})
    return replace(base, models={**{m: shared for m in models}, **measured})
