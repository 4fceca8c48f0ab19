"""Reuse units: the granularity at which GPU-resident weights are kept, evicted and reused.

`model` is ServerlessLLM-style all-or-nothing, `tensor` is Tangram's finest grain, and `group` merges
consecutive tensors into units, by one of two rules:

- block groups (`unit_divisor` 0): tensors of one block (embeddings, layer i, head) merge until a unit
  is at least `min_unit_bytes`; a short tail joins the block's previous unit; units never span blocks.
- the Tangram store's rule (`unit_divisor` N > 0): the checkpoint is first cut, in tensor order and
  across block boundaries, into tensor groups of at least `min_unit_bytes` (8 MiB in the authors'
  checkpoint format; the last group may be shorter), then consecutive groups merge until each unit is
  at least weight bytes // N; a short tail joins the previous unit. About N units per model, each of
  them at least 1/N of the model, whatever its architecture. A model smaller than N x
  `min_unit_bytes` is cut into groups of weight bytes // N instead, so a scaled-down checkpoint (the
  CPU replay's tiny models) keeps about N units like the model it stands for; the authors' store
  would keep its 8 MiB groups (one unit for a model under 8 MiB).

Unit keys hash the member tensors' fingerprints, so a fine-tune and its base get the same key exactly
for units made only of shared tensors (unit boundaries depend on tensor sizes only, which a fine-tune
keeps).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from tangram_sim.errors import ConfigError
from tangram_sim.models.spec import ModelSpec, tensor_block

GRANULARITIES = ("model", "group", "tensor")
DEFAULT_MIN_UNIT_BYTES = 8 * 2**20


@dataclass(frozen=True, slots=True)
class ReuseUnit:
    key: str  # 16 hex chars over granularity + member fingerprints: equal keys = equal bytes
    nbytes: int  # sum of the member tensors' bytes (one contiguous region in the arena)
    tensor_indices: tuple[int, ...]  # positions in ModelSpec.tensors, ascending and consecutive


def _unit(model: ModelSpec, granularity: str, indices: list[int]) -> ReuseUnit:
    h = hashlib.blake2b(granularity.encode(), digest_size=8)
    for i in indices:
        h.update(b"|")
        h.update(model.tensors[i].fingerprint.encode())
    return ReuseUnit(
        key=h.hexdigest(),
        nbytes=sum(model.tensors[i].nbytes for i in indices),
        tensor_indices=tuple(indices),
    )


def build_units(
    model: ModelSpec,
    granularity: str,
    min_unit_bytes: int = DEFAULT_MIN_UNIT_BYTES,
    unit_divisor: int = 0,
) -> tuple[ReuseUnit, ...]:
    """Split a model into reuse units covering every tensor exactly once, in tensor order.

    Group granularity: block groups of >= `min_unit_bytes` when `unit_divisor` is 0, else the Tangram
    store's rule (groups of >= min(`min_unit_bytes`, weight bytes // `unit_divisor`) merged until each
    unit is >= weight bytes // `unit_divisor`; see the module docstring). Both are ignored at model
    and tensor granularity.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"unit granularity {granularity!r} is unknown, expected one of {', '.join(GRANULARITIES)}"
        )
    if isinstance(min_unit_bytes, bool) or not isinstance(min_unit_bytes, int) or min_unit_bytes <= 0:
        raise ConfigError(f"min_unit_bytes is {min_unit_bytes!r}, expected a positive integer")
    if isinstance(unit_divisor, bool) or not isinstance(unit_divisor, int) or unit_divisor < 0:
        raise ConfigError(f"unit_divisor is {unit_divisor!r}, expected an integer >= 0")
    return _build_units(model, granularity, min_unit_bytes, unit_divisor)


@functools.lru_cache(maxsize=512)
def _build_units(
    model: ModelSpec, granularity: str, min_unit_bytes: int, unit_divisor: int
) -> tuple[ReuseUnit, ...]:
    n = len(model.tensors)
    if granularity == "model":
        return (_unit(model, granularity, list(range(n))),)
    if granularity == "tensor":
        return tuple(_unit(model, granularity, [i]) for i in range(n))
    sizes = [t.nbytes for t in model.tensors]
    if unit_divisor:
        # the checkpoint's tensor groups, then the store's merge of those groups
        share = model.weight_bytes // unit_divisor
        chunks = _merge(([i] for i in range(n)), sizes, min(min_unit_bytes, share), tail_joins=False)
        groups = _merge(chunks, sizes, share, tail_joins=True)
        return tuple(_unit(model, granularity, g) for g in groups)
    groups = []
    start = 0
    while start < n:
        block = tensor_block(model.tensors[start].name)
        end = start
        while end < n and tensor_block(model.tensors[end].name) == block:
            end += 1
        groups.extend(_merge(([i] for i in range(start, end)), sizes, min_unit_bytes, tail_joins=True))
        start = end
    return tuple(_unit(model, granularity, g) for g in groups)


def _merge(chunks: Iterable[list[int]], sizes: list[int], min_bytes: int, tail_joins: bool) -> list[list[int]]:
    """Consecutive chunks (lists of tensor indices) merged greedily until each group holds >= `min_bytes`;
    a short last group joins the one before it when `tail_joins` (and there is one)."""
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for chunk in chunks:
        current.extend(chunk)
        size += sum(sizes[i] for i in chunk)
        if size >= min_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        if groups and tail_joins:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups
