"""Policies that plan with the GPU's queue: model-value retention's lookahead and `elastic-spare` KV."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from tangram_sim.arena import Region, State
from tangram_sim.errors import ConfigError
from tangram_sim.models import get_model
from tangram_sim.policies.kv import KV
from tangram_sim.policies.lifecycle import ModelQueues
from tangram_sim.policies.retention import RETENTION
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system

GB = 10**9


def unit(key: str, size: int, owners: set[str], offset: int) -> Region:
    return Region(offset, size, State.RESIDENT, key=key, owners=frozenset(owners))


def trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def one_gpu() -> ClusterSpec:
    return ClusterSpec(1, 1, gpu_spec("a100-80gb", memory_gib=40), TierSpec())


class _Req:
    def __init__(self, rid: int, arrival: float, model: str) -> None:
        self.rid, self.arrival, self.model = rid, arrival, model


def test_queues_report_the_oldest_waiting_arrival_of_each_model() -> None:
    q: ModelQueues[_Req] = ModelQueues()
    assert q.oldest_arrivals() == {}
    for rid, (t, m) in enumerate([(1.0, "a"), (2.0, "b"), (3.0, "a")]):
        q.push(_Req(rid, t, m))
    assert q.oldest_arrivals() == {"a": 1.0, "b": 2.0}
    q.pop("a")
    assert q.oldest_arrivals() == {"a": 3.0, "b": 2.0}
    q.pop("b")
    assert q.oldest_arrivals() == {"a": 3.0}  # an emptied queue is not reported


def test_model_value_evicts_models_nobody_waits_for_first_then_the_latest_served() -> None:
    pol = RETENTION.create("model-value")
    assert pol.uses_queue
    for t in range(20):  # h is hot, a and b were requested once each
        pol.record_access("h", [], float(t))
    pol.record_access("a", [], 0.0)
    pol.record_access("b", [], 0.0)
    regions = [unit("h0", GB, {"h"}, 0), unit("a0", GB, {"a"}, GB), unit("b0", GB, {"b"}, 2 * GB),
               unit("a1", GB, {"a"}, 3 * GB), unit("c0", GB, {"c"}, 4 * GB)]
    assert pol.eviction_order(regions, 20.0) == ["c0", "a0", "a1", "b0", "h0"]  # by value: ties by offset
    # a and b wait (b since 10 s, a since 15 s); h does not: h goes first although it is worth most,
    # then a, whose oldest request is served after b's, then b.
    pol.observe_queue({"a": 15.0, "b": 10.0}, 20.0)
    assert pol.eviction_order(regions, 20.0) == ["c0", "h0", "a0", "a1", "b0"]
    # a unit shared with a waiting model counts as waiting (the soonest-served owner decides)
    shared = [*regions, unit("bh", GB, {"b", "h"}, 5 * GB)]
    assert pol.eviction_order(shared, 20.0)[-2:] == ["b0", "bh"]
    # without the lookahead the queue is ignored
    plain = RETENTION.create("model-value", queue_aware=False)
    assert not plain.uses_queue
    for t in range(20):
        plain.record_access("h", [], float(t))
    plain.record_access("a", [], 0.0)
    plain.record_access("b", [], 0.0)
    plain.observe_queue({"a": 15.0, "b": 10.0}, 20.0)
    assert plain.eviction_order(regions, 20.0) == ["c0", "a0", "a1", "b0", "h0"]
    with pytest.raises(ConfigError, match="queue_aware"):
        RETENTION.create("model-value", queue_aware="yes")


def test_elastic_spare_is_registered_and_on_demand() -> None:
    kv = KV.create("elastic-spare", block_tokens=16)
    assert kv.on_demand and kv.spares_queued
    assert not KV.create("elastic").spares_queued
    make_system("s", "tangram", {"kv": "elastic-spare"})  # a valid system field value


def _llava_batch_then_llama(kv: str) -> pd.DataFrame:
    """llama is retained; a batch of llava requests with long prompts (MHA: 0.5 MiB of KV per token)
    wants more KV than the free memory while a llama request waits behind them."""
    models = {m: ModelChoice(get_model(m)) for m in ("llama-3-8b", "llava-1.5-7b")}
    rows = [(0.0, "llama-3-8b", 200, 2)]
    rows += [(10.0 + 0.01 * i, "llava-1.5-7b", 4000, 4) for i in range(10)]
    rows += [(10.5, "llama-3-8b", 200, 2)]
    system = make_system(kv, "tangram", {"kv": kv, "keep_alive_s": 0.5})
    return simulate(models, trace(rows), one_gpu(), system).requests


def test_elastic_kv_evicts_the_waiting_model_and_elastic_spare_keeps_it() -> None:
    elastic = _llava_batch_then_llama("elastic")
    spare = _llava_batch_then_llama("elastic-spare")
    for r in (elastic, spare):
        assert (r.outcome == "completed").all()
        assert (r.bytes_loaded + r.bytes_reused == r.bytes_needed).all()
    last_llama = 11
    assert elastic.loc[last_llama, "bytes_loaded"] > 0  # its units went to llava's KV
    assert spare.loc[last_llama, "bytes_loaded"] == 0  # a full hit
    llava = spare[spare.model == "llava-1.5-7b"]
    assert llava.waited_for_kv_s.sum() > 0  # the batch grew only into memory nobody waits for
    assert elastic[elastic.model == "llava-1.5-7b"].waited_for_kv_s.sum() == 0


@pytest.mark.parametrize("retention", ["model-value", "tangram", "lru"])
def test_elastic_spare_accounts_for_every_request_under_pressure(retention: str) -> None:
    names = ["llava-1.5-7b", "llama-3-8b", "qwen2.5-3b", "phi-3-mini-4k"]
    models = {n: ModelChoice(get_model(n)) for n in names}
    rng = random.Random(3)
    t, rows = 0.0, []
    for _ in range(150):
        t += rng.expovariate(4.0)
        rows.append((t, rng.choice(names), rng.randint(100, 6000), rng.randint(1, 200)))
    system = make_system("s", "tangram-plus", {"kv": "elastic-spare", "retention": retention})
    runs = [simulate(models, trace(rows), one_gpu(), system, seed=1) for _ in range(2)]
    r = runs[0].requests
    assert len(r) == 150 and set(r.outcome) <= {"completed", "rejected"}
    assert (r[r.outcome == "rejected"].reason != "").all()
    done = r[r.outcome == "completed"]
    assert (done.bytes_loaded + done.bytes_reused == done.bytes_needed).all()
    assert runs[0].summary == runs[1].summary


def test_the_lifecycle_shows_the_queue_to_a_policy_that_plans_with_it() -> None:
    from tangram_sim.policies.retention import LruRetention

    seen: list[dict[str, float]] = []

    class Spy(LruRetention):
        uses_queue = True

        def observe_queue(self, oldest, now):  # type: ignore[no-untyped-def]
            seen.append(dict(oldest))

    if "test-queue-spy" not in RETENTION.names():
        RETENTION.register("test-queue-spy")(Spy)
    models = {m: ModelChoice(get_model(m)) for m in ("llama-3-8b", "yi-9b", "qwen2.5-14b")}
    rows = [(0.1 * i, ["llama-3-8b", "yi-9b", "qwen2.5-14b"][i % 3], 500, 8) for i in range(30)]
    system = make_system("s", "tangram", {"retention": "test-queue-spy", "keep_alive_s": 0.0})
    simulate(models, trace(rows), one_gpu(), system)
    assert seen and any(seen)  # asked before evicting, with the models then waiting
    arrivals = {round(0.1 * i, 9) for i in range(30)}
    assert all(m in models and round(t, 9) in arrivals for s in seen for m, t in s.items())
