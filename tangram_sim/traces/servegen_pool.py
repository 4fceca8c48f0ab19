"""Requests from ServeGen client pools, the way ServeGen builds them and the Tangram authors split them.

Semantics (ServeGen's `generate_workload`, the Tangram authors' `generate_trace_tangram.py`; our code):
- Models of one pool share its clients: whole clients are assigned to the pool's models by a greedy
  split that balances each model's share of request volume, burstiness (rate x CV) and token lengths
  (mean and p95 of input and output, rate-weighted) against target shares rank^-alpha (first model
  listed = rank 1). A model's target rate in a window is the pool's aggregate rate x its share (when
  at least one of its clients is active then), and every rate is scaled by one factor so the mean
  total over the span is `target_rps` (none: the native rates).
- Per 600 s window (cut to the span at its ends) a model's target rate is split among its active
  clients in proportion to their rates; a client draws ceil(target x window) inter-arrival times
  from its window's Gamma or Weibull law, rescaled to sum to the window, and keeps the arrivals
  strictly inside it: the last one lands on the window's end and is dropped (ServeGen compares in
  floating point, which keeps it in about 1 of 1,000 windows).
- Token lengths: inverse-CDF samples of the client's PDFs at the latest dataset timestamp <= the
  window with every field non-empty; one uniform per request drives every field, as in ServeGen (a
  long prompt comes with a long answer). Multimodal input = text tokens + one image/audio/video
  sample (own uniform) per counted item. A client without a dataset file, or without data at that
  time, gets its lengths from the rate-weighted mixture of the pool's clients that have data in that
  window (a component per request, then its PDFs). Lengths below 1 become 1. All are counted in the
  trace's `notes`.
Randomness: one generator per (pool name, model rank) from the seed, so adding or reordering pools never
shifts another pool's requests.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tangram_sim.errors import TraceError
from tangram_sim.traces.servegen_data import WINDOW_S, PoolData, load_pool

STREAM_POOL = 7  # default_rng([seed, STREAM_POOL, crc32(pool name), model rank]): independent of pool order
_FEATURE_WEIGHTS = np.array([4.0, 2.0, 1.0, 1.0, 1.0, 1.0])  # volume, rate x cv, in avg/p95, out avg/p95
_MODALITIES = ("image", "audio", "video")
Pdf = dict[str, tuple[np.ndarray, np.ndarray]]  # field -> (values ascending, probabilities)


@dataclass(slots=True)
class _Window:
    """A pool's window inside the span."""

    start: int  # seconds from the start of the data
    t0: float  # start, seconds from the span's start
    size: float  # seconds of it inside the span
    rows: np.ndarray  # indices of the pool's active client windows that start at `start`


def power_law_shares(n: int, alpha: float) -> np.ndarray:
    """rank^-alpha, normalised: the target share of each of `n` models of a pool."""
    w = np.arange(1, n + 1, dtype=float) ** -float(alpha)
    return w / w.sum()


def split_clients(features: np.ndarray, client_ids: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Bucket (model index) of each client: heaviest first, each to the bucket that minimises the
    weighted, normalised distance of all buckets' feature sums to their targets (shares x total);
    an empty bucket gets a bonus of 0.25 so every model receives a client when possible."""
    n = len(shares)
    bucket = np.zeros(len(client_ids), dtype=np.int64)
    if n == 1 or not len(client_ids):
        return bucket
    total = features.sum(axis=0)
    norm = np.where(total > 0, total, 1.0)
    targets = shares[:, None] * total[None, :]
    loads = np.zeros((n, features.shape[1]))
    counts = np.zeros(n, dtype=np.int64)
    order = sorted(range(len(client_ids)), key=lambda i: (features[i, 0], client_ids[i]), reverse=True)
    for i in order:
        now = (np.abs(loads - targets) / norm * _FEATURE_WEIGHTS).sum(axis=1)
        after = (np.abs(loads + features[i] - targets) / norm * _FEATURE_WEIGHTS).sum(axis=1)
        score = now.sum() - now + after - 0.25 * (counts == 0) - 1e-6 * shares
        b = int(np.argmin(score))  # first of equal scores
        bucket[i] = b
        loads[b] += features[i]
        counts[b] += 1
    return bucket


def _windows(pool: PoolData, span: tuple[float, float]) -> list[_Window]:
    first = int(span[0] // WINDOW_S) * WINDOW_S
    out = []
    for start in range(first, int(math.ceil(span[1])), WINDOW_S):
        lo, hi = max(float(start), span[0]), min(float(start + WINDOW_S), span[1])
        if hi > lo:
            rows = np.flatnonzero(pool.timestamp == start)
            out.append(_Window(start, lo - span[0], hi - lo, rows))
    return out


class _Lengths:
    """Token-length sampling for one pool: each client's PDF entry per window, or the mixture."""

    def __init__(self, pool: PoolData) -> None:
        self.pool = pool
        self.times: dict[int, list[int]] = {}
        for c, ts in pool.pdfs:
            self.times.setdefault(c, []).append(ts)
        for ts_list in self.times.values():
            ts_list.sort()
        self.fields = next(iter(pool.pdfs.values())).keys() if pool.pdfs else ()
        self.mixed_requests = 0  # requests whose lengths came from the mixture
        self.clipped = 0  # lengths raised to 1

    def pdf(self, client: int, start: int) -> Pdf | None:
        times = self.times.get(client)
        if not times:
            return None
        i = int(np.searchsorted(times, start, side="right")) - 1
        return self.pool.pdfs[(client, times[i])] if i >= 0 else None

    def mixture(self, window: _Window) -> tuple[list[Pdf], np.ndarray]:
        """PDFs of the window's active clients that have data, and their rate weights."""
        comps, weights = [], []
        for r in window.rows:
            p = self.pdf(int(self.pool.client[r]), window.start)
            if p is not None:
                comps.append(p)
                weights.append(self.pool.rate[r])
        if not comps:  # nobody active has data: every client's latest entry, equal weights
            comps = [p for p in (self.pdf(c, window.start) for c in self.times) if p is not None]
            weights = [1.0] * len(comps)
        if not comps:
            raise TraceError(
                f"trace.pools.{self.pool.name}: no client of the pool has token-length data at or before "
                f"{window.start} s"
            )
        w = np.asarray(weights, dtype=float)
        return comps, w / w.sum()

    def sample(self, pdf: Pdf | None, window: _Window, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        if pdf is not None:
            return self._draw(pdf, n, rng)
        self.mixed_requests += n
        comps, w = self.mixture(window)
        pick = rng.choice(len(comps), size=n, p=w)
        inp, out = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        for k in np.unique(pick):
            at = np.flatnonzero(pick == k)
            inp[at], out[at] = self._draw(comps[int(k)], len(at), rng)
        return inp, out

    def _draw(self, pdf: Pdf, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        u = rng.random(n)  # one uniform per request for every field
        if "text_tokens" in pdf:
            inp = _inverse_cdf(pdf["text_tokens"], u)
            for m in _MODALITIES:
                counts = _inverse_cdf(pdf[f"{m}_count"], u).astype(np.int64) if f"{m}_count" in pdf else None
                if counts is not None and counts.sum() > 0:
                    per_item = _inverse_cdf(pdf[f"{m}_tokens"], rng.random(int(counts.sum())))
                    owner = np.repeat(np.arange(n), counts)
                    inp = inp + np.bincount(owner, weights=per_item, minlength=n)
        else:
            inp = _inverse_cdf(pdf["input_tokens"], u)
        out = _inverse_cdf(pdf["output_tokens"], u)
        inp, out = np.rint(inp).astype(np.int64), np.rint(out).astype(np.int64)
        self.clipped += int((inp < 1).sum() + (out < 1).sum())
        return np.maximum(inp, 1), np.maximum(out, 1)


def _inverse_cdf(pdf: tuple[np.ndarray, np.ndarray], u: np.ndarray) -> np.ndarray:
    values, probs = pdf
    idx = np.searchsorted(np.cumsum(probs), u, side="left")
    return values[np.minimum(idx, len(values) - 1)]


def _features(pool: PoolData, windows: list[_Window], lengths: _Lengths) -> np.ndarray:
    """Per client: volume, rate x cv mass, and rate-weighted mean/p95 input and output lengths."""
    index = {int(c): i for i, c in enumerate(pool.clients)}
    f = np.zeros((len(pool.clients), 6))
    for w in windows:
        for r in w.rows:
            c = int(pool.client[r])
            weight = pool.rate[r] * w.size
            i = index[c]
            f[i, 0] += weight
            f[i, 1] += weight * pool.cv[r]
            pdf = lengths.pdf(c, w.start)
            if pdf is not None:
                key = "text_tokens" if "text_tokens" in pdf else "input_tokens"
                for j, name in ((2, key), (4, "output_tokens")):
                    values, probs = pdf[name]
                    f[i, j] += weight * float(values @ probs)
                    f[i, j + 1] += weight * float(_inverse_cdf(pdf[name], np.array([0.95]))[0])
    return f


@dataclass(slots=True)
class _ModelPlan:
    pool: int  # index of the pool in the spec
    index: int  # rank of the model in its pool
    model: str
    share: float  # target share of the pool's rate
    clients: np.ndarray  # ids of the clients assigned to it
    rate: dict[int, float]  # window start -> target aggregate rate (before the global scale)


def generate(
    data: Path,
    pools: Mapping[str, Sequence[str]],
    span: tuple[float, float],
    seed: int,
    target_rps: float | None = None,
    alpha: float = 0.0,
) -> pd.DataFrame:
    """The canonical trace (arrival_s from the span's start, model, input_tokens, output_tokens)."""
    duration = span[1] - span[0]
    loaded: list[tuple[PoolData, list[_Window], _Lengths]] = []
    plans: list[_ModelPlan] = []
    notes: list[str] = []
    for p, (name, models) in enumerate(pools.items()):
        pool = load_pool(data, name, span)
        windows = _windows(pool, span)
        lengths = _Lengths(pool)
        loaded.append((pool, windows, lengths))
        shares = power_law_shares(len(models), alpha)
        bucket = split_clients(_features(pool, windows, lengths), pool.clients, shares)
        for k, model in enumerate(models):
            mine = pool.clients[bucket == k]
            rate = {}
            for w in windows:
                active = np.isin(pool.client[w.rows], mine)
                if active.any():
                    rate[w.start] = float(pool.rate[w.rows].sum()) * float(shares[k])
            plans.append(_ModelPlan(p, k, model, float(shares[k]), mine, rate))
        notes.extend(_missing_note(pool, windows))
    pools_names = list(pools)
    sizes = {(p, w.start): w.size for p, (_, ws, _) in enumerate(loaded) for w in ws}
    base = sum(r * sizes[(m.pool, t)] for m in plans for t, r in m.rate.items()) / duration
    if base <= 0:
        raise TraceError(f"trace.span: no client of the pools is active in [{span[0]:g}, {span[1]:g}] s")
    scale = 1.0 if target_rps is None else float(target_rps) / base

    parts = []
    for m in plans:
        pool, windows, lengths = loaded[m.pool]
        rng = np.random.default_rng([seed, STREAM_POOL, zlib.crc32(pools_names[m.pool].encode()), m.index])
        times, inps, outs = [], [], []
        for w in windows:
            target = m.rate.get(w.start)
            if target is None:
                continue
            rows = w.rows[np.isin(pool.client[w.rows], m.clients)]
            client_rate = target * scale * pool.rate[rows] / pool.rate[rows].sum()
            for r, cr in zip(rows, client_rate):
                n = int(math.ceil(cr * w.size))
                if n <= 1:
                    continue  # the one arrival lands on the window's end
                gaps = (rng.gamma(pool.shape[r], pool.scale[r], n) if pool.pattern[r] == 1
                        else rng.weibull(pool.shape[r], n) * pool.scale[r])
                total = gaps.sum()
                if not (total > 0 and math.isfinite(total)):
                    gaps, total = np.ones(n), float(n)  # degenerate law: evenly spaced
                t = w.t0 + np.cumsum(gaps[:-1]) * (w.size / total)
                t = t[t < w.t0 + w.size]
                inp, out = lengths.sample(lengths.pdf(int(pool.client[r]), w.start), w, len(t), rng)
                times.append(t)
                inps.append(inp)
                outs.append(out)
        if times:
            parts.append((m.pool, m.index, m.model, np.concatenate(times), np.concatenate(inps),
                          np.concatenate(outs)))
    return _frame(parts, plans, loaded, notes, scale, duration, data, pools_names)


def _missing_note(pool: PoolData, windows: list[_Window]) -> list[str]:
    volume = {int(c): 0.0 for c in pool.clients}
    for w in windows:
        for r in w.rows:
            volume[int(pool.client[r])] += pool.rate[r] * w.size
    missing = pool.clients[~pool.has_file]
    if not len(missing):
        return []
    total = sum(volume.values())
    share = sum(volume[int(c)] for c in missing) / total if total else 0.0
    return [
        f"{pool.name}: {len(missing)} of {len(pool.clients)} clients have no dataset file "
        f"({share:.1%} of the pool's requests in the span); their token lengths come from the "
        f"rate-weighted mixture of the pool's other clients"
    ]


def _frame(parts: list, plans: list[_ModelPlan], loaded: list, notes: list[str], scale: float,
           duration: float, data: Path, pool_names: list[str]) -> pd.DataFrame:
    if not parts:
        raise TraceError("trace: the ServeGen pools produced no requests in the span (raise target_rps?)")
    rank = {p: r for r, p in enumerate(sorted({p for p, *_ in parts}, key=lambda i: pool_names[i]))}
    order_key = np.concatenate([np.full(len(t), rank[p] * 1000 + k) for p, k, _, t, _, _ in parts])
    times = np.concatenate([t for *_, t, _, _ in parts])
    models = np.concatenate([np.full(len(t), i, dtype=np.int32) for i, (*_, t, _, _) in enumerate(parts)])
    order = np.lexsort((order_key, times))
    names = [m for _, _, m, *_ in parts]
    df = pd.DataFrame({
        "arrival_s": times[order],
        "model": pd.Categorical.from_codes(models[order], categories=pd.Index(names)).astype(object),
        "input_tokens": np.concatenate([i for *_, i, _ in parts])[order],
        "output_tokens": np.concatenate([o for *_, o in parts])[order],
    })
    mixed = sum(lengths.mixed_requests for _, _, lengths in loaded)
    clipped = sum(lengths.clipped for _, _, lengths in loaded)
    if mixed:
        notes.append(f"{mixed:,} of the {len(df):,} generated requests drew token lengths from a pool mixture")
    if clipped:
        notes.append(f"{clipped:,} token lengths below 1 were raised to 1")
    quiet = [m.model for m in plans if m.model not in set(names)]
    if quiet:
        notes.append(f"no requests for {', '.join(quiet)} (no active client assigned to it in the span)")
    notes.append(f"rate scale {scale:.6g}: {len(df):,} requests generated over {duration:g} s "
                 f"({len(df) / duration:.4g} req/s) before any trace window or max_requests")
    df.attrs.update({"source": str(data), "format": "servegen-pool", "skipped_rows": 0, "notes": notes})
    return df
