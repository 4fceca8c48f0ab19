"""Assign models to requests of traces that have no (usable) model column.

Real traces rarely say which of *our* models a request wants: the Azure LLM traces have no model
column, function traces name functions, BurstGPT names services. A mapping makes that choice explicit
and reproducible (seeded), so that experiments state their popularity skew instead of hiding it:

- `{kind: zipf, alpha: 1.0, shuffle: false}`: model i (in list order, or a seeded permutation with
  `shuffle: true`) with probability proportional to 1/(i+1)^alpha; alpha=0 is uniform.
- `{kind: round-robin}`: models in turn, in arrival order (exact counts).
- `{kind: weights, weights: {model: w, ...}}`: i.i.d. with the given relative weights.

Requests are mapped one by one when the trace has no model column; when it carries labels (function
hashes, service names) each distinct label, busiest first, gets one model, so all requests of a
function stay on the same model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from tangram_sim.errors import TraceError
from tangram_sim.traces.formats import _string_column

MAPPING_KINDS: dict[str, tuple[str, ...]] = {
    "zipf": ("alpha", "shuffle"),
    "round-robin": (),
    "weights": ("weights",),
}
PER = ("auto", "request", "label")


def _number(value: Any, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise TraceError(f"{where}: expected a number >= {minimum:g}, got {value!r}")
    if value < minimum:
        raise TraceError(f"{where}: expected a number >= {minimum:g}, got {value!r}")
    return float(value)


def zipf_probabilities(n: int, alpha: float) -> np.ndarray:
    """P(rank i) proportional to 1/(i+1)^alpha for i in 0..n-1 (alpha=0: uniform)."""
    weights = 1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), alpha)
    return weights / weights.sum()


def check_mapping(mapping: Any, models: Sequence[str], where: str = "trace.mapping") -> dict[str, Any]:
    """Validate a mapping spec and return it with defaults filled in (TraceError naming the field)."""
    if not models:
        raise TraceError(f"{where}: no models to map requests onto")
    if not isinstance(mapping, Mapping):
        raise TraceError(f"{where}: expected a mapping like {{kind: zipf, alpha: 1.0}}, got {mapping!r}")
    kind = mapping.get("kind")
    if not isinstance(kind, str) or kind not in MAPPING_KINDS:
        raise TraceError(f"{where}.kind: expected one of {', '.join(MAPPING_KINDS)}, got {kind!r}")
    allowed = MAPPING_KINDS[kind]
    for key in mapping:
        if key != "kind" and key not in allowed:
            expected = ", ".join(("kind",) + allowed)
            raise TraceError(f"{where}.{key}: unknown key for mapping kind '{kind}'; expected {expected}")
    out: dict[str, Any] = {"kind": kind}
    if kind == "zipf":
        out["alpha"] = _number(mapping.get("alpha", 1.0), f"{where}.alpha")
        shuffle = mapping.get("shuffle", False)
        if not isinstance(shuffle, bool):
            raise TraceError(f"{where}.shuffle: expected true or false, got {shuffle!r}")
        out["shuffle"] = shuffle
    elif kind == "weights":
        weights = mapping.get("weights")
        if not isinstance(weights, Mapping) or not weights:
            raise TraceError(f"{where}.weights: expected a mapping model -> weight, got {weights!r}")
        clean: dict[str, float] = {}
        for name, w in weights.items():
            if name not in models:
                raise TraceError(
                    f"{where}.weights.{name}: '{name}' is not one of the models ({', '.join(models)})"
                )
            clean[name] = _number(w, f"{where}.weights.{name}")
        if sum(clean.values()) <= 0:
            raise TraceError(f"{where}.weights: expected at least one weight > 0")
        out["weights"] = clean
    return out


def assign(
    n: int, models: Sequence[str], mapping: Any, rng: np.random.Generator, where: str = "trace.mapping"
) -> np.ndarray:
    """Model index (into `models`) for each of n items in order, per the mapping."""
    spec = check_mapping(mapping, models, where)
    m = len(models)
    if spec["kind"] == "round-robin":
        return np.arange(n, dtype=np.int64) % m
    if spec["kind"] == "zipf":
        probs = zipf_probabilities(m, spec["alpha"])
        rank_to_model = rng.permutation(m) if spec["shuffle"] else np.arange(m)
        return rank_to_model[rng.choice(m, size=n, p=probs)]
    weights = np.array([spec["weights"].get(name, 0.0) for name in models], dtype=np.float64)
    return rng.choice(m, size=n, p=weights / weights.sum())


def apply_mapping(
    df: pd.DataFrame,
    models: Sequence[str],
    mapping: Any,
    rng: np.random.Generator,
    *,
    per: str = "auto",
    where: str = "trace.mapping",
) -> pd.DataFrame:
    """Return a copy of the canonical trace `df` with its `model` column assigned by `mapping`.

    `per="request"` maps every request independently; `per="label"` maps each distinct existing
    model label (ordered by request count, then name) to one model; `auto` picks `label` when the
    column holds values and `request` when it is empty.
    """
    if per not in PER:
        raise TraceError(f"{where}: per must be one of {', '.join(PER)}, got {per!r}")
    models = list(models)
    check_mapping(mapping, models, where)
    column = df["model"] if "model" in df.columns else pd.Series([None] * len(df), dtype=object)
    has_labels = not column.isna().all()
    if per == "auto":
        per = "label" if has_labels else "request"
    if per == "label" and not has_labels:
        raise TraceError(f"{where}: the trace has no model labels to map; map per request instead")
    if per == "request":
        chosen = assign(len(df), models, mapping, rng, where)
    else:
        labels, inverse, counts = np.unique(
            column.to_numpy(dtype=object).astype(str), return_inverse=True, return_counts=True
        )
        rank = np.argsort(-counts, kind="stable")  # busiest first; ties stay in name order
        label_model = np.empty(len(labels), dtype=np.int64)
        label_model[rank] = assign(len(labels), models, mapping, rng, where)
        chosen = label_model[inverse]
    out = df.copy()
    column = _string_column(chosen, models)
    column.index = df.index
    out["model"] = column
    return out
