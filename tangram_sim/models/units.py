"""Reuse units: the granularity at which GPU-resident weights are kept, evicted and reused.

`model` is ServerlessLLM-style all-or-nothing, `tensor` is Tangram's finest grain, and `group` merges
consecutive tensors of one block (embeddings, layer i, head) into units of at least `min_unit_bytes`
so policies and the arena handle hundreds rather than thousands of regions. Unit keys hash the
member tensors' fingerprints, so a fine-tune and its base get the same key exactly for units made
only of shared tensors.
"""

from __future__ import annotations

import functools
import hashlib
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
    target_units: int | None = None,
) -> tuple[ReuseUnit, ...]:
    """Split a model into reuse units covering every tensor exactly once, in tensor order.

    With `target_units`, `min_unit_bytes` becomes weight_bytes // target_units (group granularity).
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"unit granularity {granularity!r} is unknown, expected one of {', '.join(GRANULARITIES)}"
        )
    if target_units is not None:
        if isinstance(target_units, bool) or not isinstance(target_units, int) or target_units <= 0:
            raise ConfigError(f"target_units is {target_units!r}, expected a positive integer")
    elif isinstance(min_unit_bytes, bool) or not isinstance(min_unit_bytes, int) or min_unit_bytes <= 0:
        raise ConfigError(f"min_unit_bytes is {min_unit_bytes!r}, expected a positive integer")
    return _build_units(model, granularity, min_unit_bytes, target_units)


@functools.lru_cache(maxsize=512)
def _build_units(
    model: ModelSpec, granularity: str, min_unit_bytes: int, target_units: int | None
) -> tuple[ReuseUnit, ...]:
    n = len(model.tensors)
    if granularity == "model":
        return (_unit(model, granularity, list(range(n))),)
    if granularity == "tensor":
        return tuple(_unit(model, granularity, [i]) for i in range(n))
    if target_units is not None:
        min_unit_bytes = max(1, model.weight_bytes // target_units)
    groups: list[list[int]] = []
    start = 0
    while start < n:
        block = tensor_block(model.tensors[start].name)
        end = start
        while end < n and tensor_block(model.tensors[end].name) == block:
            end += 1
        groups.extend(_split_block(model, range(start, end), min_unit_bytes))
        start = end
    return tuple(_unit(model, granularity, g) for g in groups)


def _split_block(model: ModelSpec, indices: range, min_unit_bytes: int) -> list[list[int]]:
    """Greedy groups of >= min_unit_bytes; a short tail joins the block's previous group."""
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in indices:
        current.append(i)
        size += model.tensors[i].nbytes
        if size >= min_unit_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups
