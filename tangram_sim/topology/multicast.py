"""Multicast of one model to several receivers that forward blocks as they arrive.

The receivers of one stream, in the order they joined, are 0 (the root, which reads from its own
source) and 1..n-1. Each receiver forwards what it has received, block by block, so a receiver is a
number of whole blocks behind the root instead of a whole model:

- `chain`: receiver k reads from receiver k-1, one block behind it: k blocks behind the root;
- `binomial`: the binomial pipeline (each member, every step, sends one block to one partner; lambdaScale
  multicasts this way): receiver k is ceil(log2(k+1)) blocks behind the root, and every member's uplink
  carries one stream's worth, so the simulator sends receiver k's bytes over receiver k-1's uplink as in
  the chain, with the tree's delay.

Over equal links of rate r, a model of M bytes in blocks of b bytes reaches receiver k at
M/r + lag_blocks(kind, k) * b/r: n receivers take one model time plus n-1 (chain) or ceil(log2 n)
(binomial) block times (`finish_s`), where n separate loads over one shared link would take n model
times.
"""

from __future__ import annotations

import math

MULTICAST = ("none", "chain", "binomial")  # a system's `multicast` field


def lag_blocks(kind: str, k: int) -> int:
    """Blocks receiver k (k >= 1) is behind the root."""
    if k < 1:
        raise ValueError(f"receiver {k}: the root is receiver 0, the others 1, 2, ...")
    if kind == "chain":
        return k
    if kind == "binomial":
        return math.ceil(math.log2(k + 1))
    raise ValueError(f"unknown multicast {kind!r}; expected chain or binomial")


def finish_s(kind: str, k: int, model_bytes: float, block_bytes: float, bps: float) -> float:
    """When receiver k has the whole model, every link at `bps` and the root starting at 0."""
    lag = 0 if k == 0 else lag_blocks(kind, k)
    return model_bytes / bps + lag * min(block_bytes, model_bytes) / bps
