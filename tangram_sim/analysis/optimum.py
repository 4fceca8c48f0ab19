"""The exact offline optimum of weight retention on one GPU, for small cases.

The problem: one GPU runs a known sequence of cold starts. Step `t` needs the reuse units `steps[t]`
resident while it runs, plus `reserve[t]` other bytes (its KV cache, say); memory holds `capacity`
bytes. A unit of the step that is not resident is loaded (its bytes cross PCIe); the units retained
from earlier steps that stay through step `t` must fit beside it:
size(steps[t]) + size(kept) + reserve[t] <= capacity, the others are evicted when it starts. When the
step ends its units are retained (keeping costs nothing: eviction is free and can wait for the next
step that needs the room). Memory is empty before the first step. `offline_optimum` finds the fewest
bytes loaded over every choice of what to keep through each step, and one schedule that achieves it.

Byte capacity only: no alignment, fragmentation or compaction, and eviction at any time. A retention
policy of the simulator, fed the same sequence on an arena of the same capacity with at least these
reserves, is more constrained, so it loads at least the optimum; with `reserve = 0` the optimum is a
lower bound for every policy on that GPU's schedule, tighter than the unlimited-memory bound
(`core.bound`, the case `capacity = inf`), which it never goes below.

Method: dynamic programming over the set of retained units after each step (bitmasks), with three
reductions that keep it exact: a unit never needed again is dropped from the state; only maximal sets
of kept units are tried (keeping more never loads more later: every choice open to a smaller set is
open to a larger one, and the next load can only shrink); a state is dropped when another state holds a
superset of its units at no greater cost. Limits: at most `max_units` distinct units (default 24)
and `max_states` states at a step (default 200,000), else ValueError; the work grows with steps x
states x maximal kept sets, which stays small for up to ~20 units (model-granularity runs of a few
models, or hand-made cases) and hundreds of steps.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

MAX_UNITS = 24
MAX_STATES = 200_000


@dataclass(frozen=True, slots=True)
class Optimum:
    loaded_bytes: int  # fewest bytes loaded over the sequence
    needed_bytes: int  # bytes the steps need, summed (what loads with no retention at all)
    loads: tuple[int, ...]  # per step, bytes loaded by one optimal schedule
    kept: tuple[frozenset[Hashable], ...]  # per step, the retained units that schedule keeps through it

    @property
    def io_reduction(self) -> float:
        """1 - loaded / needed, as the summary's `io_reduction` (0.0 when nothing is needed)."""
        return 1.0 - self.loaded_bytes / self.needed_bytes if self.needed_bytes else 0.0


def unlimited_memory_loads(steps: Sequence[Iterable[Hashable]], sizes: Mapping[Hashable, int]) -> int:
    """Bytes loaded when nothing is ever evicted: every distinct unit once."""
    return sum(sizes[u] for u in set().union(*map(set, steps)))


def _maximal_fits(items: list[tuple[int, int]], room: int) -> list[tuple[int, int]]:
    """Maximal sets of `items` ((bit, size), by size descending) whose sizes fit in `room`, as
    (mask, size) pairs: no item left out would fit beside them."""
    out: list[tuple[int, int]] = []
    n = len(items)

    def walk(i: int, mask: int, used: int, smallest_out: int) -> None:
        if i == n:
            if smallest_out > room - used:
                out.append((mask, used))
            return
        bit, size = items[i]
        if used + size <= room:
            walk(i + 1, mask | bit, used + size, smallest_out)
        walk(i + 1, mask, used, min(smallest_out, size))

    walk(0, 0, 0, room + 1)
    return out


def _prune(states: dict[int, int]) -> dict[int, int]:
    """Drop every state whose units are a subset of another state's at no greater cost."""
    order = sorted(states.items(), key=lambda kv: (kv[1], -kv[0].bit_count()))
    kept: list[tuple[int, int]] = []
    for mask, cost in order:
        if not any(mask & other == mask for other, _ in kept):
            kept.append((mask, cost))
    return dict(kept)


def offline_optimum(
    steps: Sequence[Iterable[Hashable]],
    sizes: Mapping[Hashable, int],
    capacity: int,
    reserve: int | Sequence[int] = 0,
    *,
    max_units: int = MAX_UNITS,
    max_states: int = MAX_STATES,
) -> Optimum:
    """The fewest bytes loaded over the retention choices of one GPU's cold starts (module docstring).

    `steps[t]` lists the units step t needs, `sizes` their bytes (> 0), `reserve` the other bytes each
    step holds (one number for all). Raises ValueError when a step cannot fit at all, or when the case
    exceeds `max_units` distinct units or `max_states` states at a step."""
    needs = [frozenset(s) for s in steps]
    reserves = [reserve] * len(needs) if isinstance(reserve, int) else list(reserve)
    if len(reserves) != len(needs):
        raise ValueError(f"{len(reserves)} reserves for {len(needs)} steps")
    units = sorted(set().union(*needs), key=repr)
    if len(units) > max_units:
        raise ValueError(f"{len(units)} distinct units: the exact search takes at most {max_units}")
    size = [int(sizes[u]) for u in units]
    if any(s <= 0 for s in size):
        raise ValueError("every unit must have a positive size")
    bit = {u: 1 << i for i, u in enumerate(units)}
    masks = [sum(bit[u] for u in need) for need in needs]

    def nbytes(mask: int) -> int:
        return sum(s for i, s in enumerate(size) if mask >> i & 1)

    later = [0] * len(masks)  # units needed after step t
    for t in range(len(masks) - 2, -1, -1):
        later[t] = later[t + 1] | masks[t + 1]
    states: dict[int, int] = {0: 0}  # retained units -> fewest bytes loaded to get there
    back: list[dict[int, tuple[int, int, int]]] = []  # per step: state -> (previous state, kept, load)
    for t, need in enumerate(masks):
        room = capacity - reserves[t] - nbytes(need)
        if room < 0:
            raise ValueError(f"step {t} needs {nbytes(need) + reserves[t]} bytes, over the capacity {capacity}")
        nxt: dict[int, int] = {}
        links: dict[int, tuple[int, int, int]] = {}
        for held, cost in states.items():
            load = nbytes(need & ~held)
            spare = held & ~need
            items = sorted(((1 << i, size[i]) for i in range(len(size)) if spare >> i & 1), key=lambda x: -x[1])
            total = sum(s for _, s in items)
            choices = [(spare, total)] if total <= room else _maximal_fits(items, room)
            for kept, _ in choices:
                state = (need | kept) & later[t]
                if cost + load < nxt.get(state, cost + load + 1):
                    nxt[state] = cost + load
                    links[state] = (held, kept, load)
        states = _prune(nxt)
        if len(states) > max_states:
            raise ValueError(f"{len(states)} states at step {t}: over the exact search's limit of {max_states}")
        back.append({s: links[s] for s in states})
    best = min(states, key=states.__getitem__)
    loads: list[int] = []
    kept_sets: list[frozenset[Hashable]] = []
    state = best
    for t in range(len(masks) - 1, -1, -1):
        held, kept, load = back[t][state]
        loads.append(load)
        kept_sets.append(frozenset(u for u in units if kept & bit[u]))
        state = held
    return Optimum(states[best], sum(nbytes(m) for m in masks), tuple(reversed(loads)),
                   tuple(reversed(kept_sets)))
