"""Fine-tuned variants that share some tensors with a base model.

Tangram's tensor-level reuse pays off when models share bytes (a fine-tune with frozen embeddings and
early layers, LoRA merges that leave most tensors untouched). A derived model keeps the base's
inventory; shared tensors keep the base's fingerprints, all others get new ones.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence

from tangram_sim.errors import ModelError
from tangram_sim.models.spec import ModelSpec, is_lookup_table, layer_of, tensor_fingerprint, tensor_root


def derive_model(base: ModelSpec, name: str, share: Sequence[str]) -> ModelSpec:
    """A variant of `base` named `name` sharing the tensors whose names match any fnmatch pattern in `share`.

    Every pattern must match at least one tensor, so a typo cannot silently share nothing.
    """
    if not name:
        raise ModelError(f"derived model of {base.name!r}: empty name, expected a model name")
    if name == base.name:
        raise ModelError(f"derived model {name!r}: same name as its base, expected a new name")
    if isinstance(share, str):
        share = [share]
    patterns = list(share)
    used = [False] * len(patterns)
    tensors = []
    for t in base.tensors:
        shared = False
        for i, pattern in enumerate(patterns):
            if fnmatch.fnmatchcase(t.name, pattern):
                used[i] = shared = True
        if not shared:
            t = dataclasses.replace(t, fingerprint=tensor_fingerprint(name, t.name, t.dtype, t.shape))
        tensors.append(t)
    for pattern, hit in zip(patterns, used):
        if not hit:
            raise ModelError(
                f"derived model {name!r}: share pattern {pattern!r} matches no tensor of {base.name!r}, "
                "expected fnmatch patterns over its tensor names"
            )
    return ModelSpec(
        name=name,
        family=base.family,
        tensors=tuple(tensors),
        dtype=base.dtype,
        arch=base.arch,
        source=f"derived:{base.name}",
    )


def share_patterns_first_layers(base: ModelSpec, fraction: float = 0.5, embeddings: bool = True) -> list[str]:
    """Patterns for the (text) token/position embeddings and the first `fraction` of each layer stack.

    Mirrors the common fine-tuning recipe that freezes the embeddings and the lower layers.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ModelError(f"share fraction {fraction!r}, expected a number between 0 and 1")
    patterns: list[str] = []
    if embeddings:
        patterns += [
            t.name for t in base.tensors if is_lookup_table(t.name) and tensor_root(t.name) == "text"
        ]
    stacks: dict[str, int] = {}
    for t in base.tensors:
        layer = layer_of(t.name)
        if layer is not None:
            stacks[layer[0]] = max(stacks.get(layer[0], 0), layer[1] + 1)
    for stack, count in stacks.items():
        shared = math.floor(fraction * count + 1e-9)
        patterns += [f"{stack}.{i}.*" for i in range(shared)]
    return patterns
