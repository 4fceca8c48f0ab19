"""The shared lifecycle rules: per-model FCFS queues, the fairness yield, the preemption victim."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from tangram_sim.policies.lifecycle import ModelQueues, must_yield, preemption_victim


@dataclass(eq=False)
class Req:
    rid: int
    model: str
    arrival: float


def test_queues_keep_fcfs_per_model_and_overall() -> None:
    q: ModelQueues[Req] = ModelQueues()
    reqs = [Req(0, "a", 0.0), Req(1, "b", 1.0), Req(2, "a", 2.0), Req(3, "c", 3.0)]
    for r in reqs:
        q.push(r)
    assert len(q) == 4 and q.count_for("a") == 2 and q.count_for("zzz") == 0
    assert q.head() is reqs[0] and q.head(exclude="a") is reqs[1] and q.first("a") is reqs[0]
    assert q.pop("a") is reqs[0]
    assert q.head() is reqs[1] and q.first("a") is reqs[2]
    q.push_front(reqs[0])  # preempted: recomputed before the younger request of its model
    assert q.first("a") is reqs[0] and q.head() is reqs[0] and len(q) == 4
    assert sorted(r.rid for r in q) == [0, 1, 2, 3]
    for model in ["a", "a", "b", "c"]:
        q.pop(model)
    assert not q and q.head() is None and q.first("a") is None


@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abc")), max_size=60))
def test_queues_match_a_reference_list(ops: list[tuple[bool, str]]) -> None:
    """Pushes and pops in any order: the heads always equal a sorted reference's."""
    q: ModelQueues[Req] = ModelQueues()
    ref: list[Req] = []
    rid = 0
    for push, model in ops:
        if push:
            r = Req(rid, model, float(rid))
            rid += 1
            q.push(r)
            ref.append(r)
        elif q.count_for(model):
            got = q.pop(model)
            want = min((r for r in ref if r.model == model), key=lambda r: r.rid)
            assert got is want
            ref.remove(want)
        assert len(q) == len(ref)
        assert q.head() is min(ref, key=lambda r: r.rid, default=None)
        for m in "abc":
            others = [r for r in ref if r.model != m]
            assert q.head(exclude=m) is min(others, key=lambda r: r.rid, default=None)


def test_must_yield_only_to_an_older_request_that_waited_a_window() -> None:
    older, own = Req(3, "b", 10.0), Req(5, "a", 11.0)
    assert not must_yield(None, own, 100.0, 5.0)
    assert not must_yield(older, own, 14.9, 5.0)  # waited 4.9 s of a 5 s window
    assert must_yield(older, own, 15.0, 5.0)
    assert not must_yield(Req(7, "b", 12.0), own, 100.0, 5.0)  # younger than the candidate
    assert must_yield(older, own, 10.0, 0.0)  # window 0: plain FCFS


def test_preemption_victim_is_the_newest_other_request_never_the_last() -> None:
    a, b, c = Req(0, "m", 0.0), Req(1, "m", 1.0), Req(2, "m", 2.0)
    assert preemption_victim([a]) is None
    assert preemption_victim([a], growing=a) is None
    assert preemption_victim([a, b, c]) is c
    assert preemption_victim([a, b, c], growing=c) is b
    assert preemption_victim([a, b, c], growing=a) is c
    assert preemption_victim([], growing=None) is None
