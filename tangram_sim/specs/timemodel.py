"""The contract of a time model (how long prefill and decode take), which the lifecycle's estimates use;
the simulator's roofline and calibrated models (`sim.timemodel`) implement it."""

from __future__ import annotations

from tangram_sim.models.layers import layer_blocks
from tangram_sim.models.spec import ModelSpec


class TimeModel:
    """Contract of a time model; `prefill_s` covers one batched prefill iteration."""

    def prefill_s(self, model: ModelSpec, tokens: int, tp: int = 1) -> float:
        raise NotImplementedError

    def decode_step_s(self, model: ModelSpec, batch: int, kv_tokens: float, tp: int = 1) -> float:
        raise NotImplementedError

    def prefill_layers_s(self, model: ModelSpec, tokens: int, tp: int = 1) -> list[float]:
        """`prefill_s` split over the model's layers in compute order, by their dense FLOPs per token (a
        prefill's cost is linear in them when, as in a calibrated model, it is linear in tokens)."""
        blocks = layer_blocks(model)
        return split(self.prefill_s(model, tokens, tp), blocks.flops_per_token, blocks.nbytes)


def split(total: float, weights: tuple[float, ...] | list[float], fallback: tuple[int, ...]) -> list[float]:
    """`total` in proportion to `weights` (to `fallback` when they are all zero)."""
    norm = sum(weights)
    if norm <= 0:
        weights, norm = fallback, sum(fallback)
    if norm <= 0:
        return [total / len(weights)] * len(weights) if weights else []
    return [total * w / norm for w in weights]
