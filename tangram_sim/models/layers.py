"""A model as the layers a prefill runs through, and where each layer's bytes sit in the reuse units.

Execute-while-load (`SystemSpec.execute_while_load`) computes layer i of the first prefill as soon as
layer i's weights are resident and layer i-1 is done. Two facts about a model serve it:

- `layer_blocks(spec)`: the text stack in compute order - the embeddings block, the transformer layers by
  index, the head block - each with its bytes and its share of the prefill's work (dense FLOPs per token,
  and whether it is an attention layer, whose t^2 term grows with the prompt). A vision tower and
  projector are not in it: a text prompt never runs them, so their weights do not gate its first token.
- `unit_parts(spec, units)`: for each reuse unit, the fractions of its bytes through which each block's
  tensors in it end. A unit streams its bytes in tensor order, so block j is resident once every unit
  holding its tensors has streamed through the end of those tensors. This is what lets one rule serve
  every granularity: a ServerlessLLM whole-model unit makes its layers ready one after the other as its
  bytes stream in, a Tangram unit of a few blocks makes them ready at its own partial offsets, a tensor
  unit at its end.

Both are pure functions of immutable specs, cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tangram_sim.models.spec import (
    ModelSpec,
    is_lm_head,
    is_lookup_table,
    layer_of,
    tensor_block,
    tensor_root,
)
from tangram_sim.models.units import ReuseUnit


@dataclass(frozen=True, slots=True)
class LayerBlocks:
    """The text stack of one model in compute order (see the module docstring)."""

    names: tuple[str, ...]  # tensor_block names: "text.embeddings", "<stack>.<i>", ..., "text.head"
    nbytes: tuple[int, ...]  # weight bytes of each block
    flops_per_token: tuple[int, ...]  # dense matmul FLOPs per token of each (lookups 0; a tied output
    # projection's FLOPs go to the head block, where it runs, though its table loads with the embeddings)
    attention: tuple[bool, ...]  # a transformer layer: it carries the prompt's t^2 attention term
    index: dict[str, int]  # block name -> position

    def __len__(self) -> int:
        return len(self.names)


def _compute_order(name: str) -> tuple:
    layer = layer_of(name)
    if layer is not None:
        return (1, layer[0], layer[1])
    return (0,) if name.endswith(".embeddings") else (2,)


@functools.lru_cache(maxsize=256)
def layer_blocks(spec: ModelSpec) -> LayerBlocks:
    """The model's text blocks in compute order; a model whose tensors name no block gets one block."""
    text = [t for t in spec.tensors if tensor_root(t.name) == "text"] or list(spec.tensors)
    names = sorted({tensor_block(t.name) for t in text}, key=_compute_order)
    index = {n: i for i, n in enumerate(names)}
    nbytes = [0] * len(names)
    flops = [0] * len(names)
    for t in text:
        b = index[tensor_block(t.name)]
        nbytes[b] += t.nbytes
        if not is_lookup_table(t.name):
            flops[b] += 2 * t.numel
    if not any(is_lm_head(t.name) for t in spec.tensors):
        # tied embeddings: the token table is also the output projection (as ModelSpec counts FLOPs)
        tables = [t for t in text if is_lookup_table(t.name) and "position" not in t.name]
        if tables:
            flops[-1] += 2 * max(t.numel for t in tables)
    attention = tuple(layer_of(n) is not None for n in names)
    return LayerBlocks(tuple(names), tuple(nbytes), tuple(flops), attention, index)


@functools.lru_cache(maxsize=1024)
def unit_parts(spec: ModelSpec, units: tuple[ReuseUnit, ...]) -> tuple[tuple[tuple[float, int], ...], ...]:
    """Per unit: (fraction of the unit's bytes, block) for each text block with tensors in it, the fraction
    being where that block's last tensor in the unit ends; ascending by fraction. A unit's last block
    ends at 1.0 (or earlier when the unit's tail is a vision tensor, which gates no block)."""
    blocks = layer_blocks(spec)
    tensors = spec.tensors
    out = []
    for unit in units:
        total = unit.nbytes or 1
        ends: dict[int, int] = {}  # block -> bytes of the unit through its last tensor
        done = 0
        for i in unit.tensor_indices:
            t = tensors[i]
            done += t.nbytes
            b = blocks.index.get(tensor_block(t.name))
            if b is not None:
                ends[b] = done
        out.append(tuple(sorted((end / total, b) for b, end in ends.items())))
    return tuple(out)
