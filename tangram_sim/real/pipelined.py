"""A pipelined cold start on real devices (`core.pipeline`): each stage's arena loads its layers, the
instance serves as a pipeline whose activations pass between the stages' backends, then consolidates.

The lifecycle decides as for the modelled device (which GPUs, which units each stage loads, when the
leader has the rest and the instance consolidates); the leader's `RealDevice` carries it out on the
stages' devices:

- Start: each stage's device runs its own `start` (its copies and reads of the stage's units, then an
  engine over that stage's layer blocks, `real.engine.build_engine(stage=...)`) on its own thread, all
  at once; the start returns a `core.device.LayerProgress` at once, as the modelled device's does, and
  each stage's units are booked landed (`landed`) when its start is done (its loads-table row is its own
  device's). The load (`load_s`) ends when the last stage's units were in place; that stage's engine
  build after it is the request's `startup_s`, as a serial start's engine build is.
- Serving: a prefill or decode step runs stage by stage: the leader's backend embeds and runs its layers,
  its hidden states go to the next stage's backend as bytes (`real.stage_backend.pack`), and so on; the last
  stage's greedy tokens go back to the first, which keeps the sequences' tokens. Every stage's part is
  queued on its device's thread when the lifecycle decides the step (so holds of `real.peers` and the
  parts of steps stay in the clock's decision order on every thread, and no two threads wait for each
  other in a cycle); a part waits for its input from the part before it. The step is measured from the
  first stage's start to the last one's end: the compute, and the hops (packing, the pipe through the
  lifecycle's process, unpacking). The first prefill is measured from its submission, so it includes
  waiting for the stages' loads: each stage computes once its own start is done and its input arrived,
  the chain rule of `policies.pipeline` run for real.
- KV: the lifecycle books a pipelined instance's KV on its leader (the room it needs once consolidated),
  so the leader's KV blocks hold every layer and the later stages read and write theirs there (their
  backends attach the leader's buffer, `real.peers`): the bytes are where the books say. Consolidation
  therefore moves no KV here; the modelled device charges the move a real pipeline-parallel engine makes
  (its stages keep their layers' KV on their own GPUs).
- Consolidation: the leader's background load of the other stages' units (`load_units`, on its thread,
  between the pipeline's steps, each unit from where the source policy says), then, at the lifecycle's
  consolidation, the leader's stage engine completed over every unit (`rebuild`: the parameters bound,
  no module built again; measured, steps of kind `consolidate`); the followers drop their stage's engine
  and sequences with their next command.

Units must not straddle a stage boundary (a stage's engine needs whole layers): a replay with a pipeline
needs units within one layer block, `check_stage_units`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import simpy

from tangram_sim.core.clock import Measured
from tangram_sim.core.device import Landed, LayerProgress, RankLoad, Started, Work
from tangram_sim.core.records import Request
from tangram_sim.errors import ConfigError
from tangram_sim.models.layers import layer_blocks, unit_parts
from tangram_sim.real.peers import split

if TYPE_CHECKING:
    from tangram_sim.core.records import ModelEntry
    from tangram_sim.core.worker import Instance
    from tangram_sim.real.device import RealDevice

__all__ = ["check_stage_units", "consolidate", "decode", "load_units", "prefill", "stage_blocks", "start"]


def stage_blocks(inst: Instance) -> list[tuple[int, int]]:
    """Layer blocks [b0, b1) of each stage (`Stages.starts` are blocks of `models.layers.layer_blocks`;
    `real.engine.stage_blocks` says which decoder layers, embeddings and head those are)."""
    stages = inst.stages
    assert stages is not None
    bounds = [*stages.starts, len(layer_blocks(inst.entry.spec))]
    return [(bounds[j], bounds[j + 1]) for j in range(len(stages.starts))]


def check_stage_units(name: str, entry: ModelEntry, system: str) -> None:
    """A ConfigError unless each of the model's units holds tensors of one layer block (a stage boundary
    may fall between any two blocks)."""
    blocks = layer_blocks(entry.spec)
    for i, parts in enumerate(unit_parts(entry.spec, entry.units)):
        if len({b for _, b in parts}) > 1:
            first, last = blocks.names[parts[0][1]], blocks.names[parts[-1][1]]
            raise ConfigError(f"systems ({system}): a pipelined replay needs reuse units within one layer, but unit "
                              f"{i} of model {name} holds {first} .. {last}; set granularity tensor")


def start(dev: RealDevice, inst: Instance, head: Request, loads: Sequence[RankLoad], landed: Landed) -> Work:
    """`Device.start_instance` of a pipelined instance led by `dev` (module docstring)."""
    env = dev.env
    begun = env.now
    if dev.stages.pre_s:  # modelled stages before the weights (the device context)
        dev.steps.append((dev.gpu_id, "stage", inst.model, 1, 0, 0, begun, env.wall(), dev.stages.pre_s))
        yield env.timeout(dev.stages.pre_s)
    n_blocks = len(layer_blocks(inst.entry.spec))
    submitted = env.now
    progress = LayerProgress(env, [submitted] * n_blocks, submitted)
    frame = {"submitted": submitted, "t0": time.perf_counter()}
    dev._frames[id(progress)] = frame
    stages = inst.stages
    assert stages is not None
    bounds = [*stages.starts, n_blocks]
    left = [len(loads)]  # stages still starting
    last = [submitted, 0.0]  # when the last stage's units were in place, and its engine build after that

    def launch(j: int, load: RankLoad, blocks: tuple[int, int]) -> None:
        device: RealDevice = load.worker.device
        offsets = {key: device.arena.lookup(key).offset for key in inst.rank_keys[j]}
        moves = [(m.src, m.dst, m.nbytes) for m in load.moves]
        sourced = split(device, load)
        missing = [key for key, _ in sourced.reads]
        home = -1 if j == 0 else dev.gpu_id  # a later stage's KV: in the leader's blocks
        args = (device._take_ops(), inst.model, offsets, missing, moves, device.verify, False, sourced.copies,
                (*blocks, home))

        def work() -> Measured:
            m = sourced.run(lambda: device.link.call("start", *args))
            if j == 0:
                frame["t0"] = m.t0  # the leader's first prefill is measured from its submission in this frame
            return m

        def started(event: simpy.Event) -> None:
            if not event.ok:
                return  # the failed event raises from the clock's step (the run fails with it)
            m: Measured = event.value
            move_s, read_s, engine_s, nbytes, gbps, copy_s, copied = m.value
            load_s = move_s + copy_s + read_s
            device.steps.append((device.gpu_id, "load", inst.model, 1, len(load.missing), 0, submitted,
                                 env.wall_at(m.t0), load_s))
            device.steps.append((device.gpu_id, "engine", inst.model, 1, 0, 0, submitted + load_s,
                                 env.wall_at(m.t0 + load_s), engine_s))
            device.loads.append((head.rid, device.gpu_id, inst.model, len(offsets), len(load.missing), nbytes,
                                 load.moved_bytes, move_s, read_s, engine_s, m.seconds, gbps, env.wall_at(m.t0),
                                 len(sourced.copied), copied, copy_s))
            landed(load, load.missing)
            loaded = env.now - engine_s / env.factor  # its units were in place before its engine was built
            for b in range(bounds[j], bounds[j + 1]):
                progress.ready[b] = loaded
            left[0] -= 1
            if loaded >= last[0]:
                last[:] = [loaded, engine_s / env.factor]
            if not left[0]:  # the load ends with the last stage's units; its engine build is startup
                head.startup_s += last[1]
                progress.finish(last[0])

        env.run_on(device.thread, work).callbacks.append(started)

    for j, (load, blocks) in enumerate(zip(loads, stage_blocks(inst))):
        launch(j, load, blocks)
    return Started(env.now - begun, float("nan"), progress)


def _run_stages(dev: RealDevice, inst: Instance, command: str, parts: list[tuple], since: Callable[[], float] | None
                ) -> simpy.Event:
    """Queue every stage's part of one step (`command` with each stage's arguments `parts`, to which the
    previous stage's packed output is appended) on its device's thread now; the event is the leader's, which
    ends with the last stage's. Its value: Measured((the last stage's tokens, per stage (t0, end)), from
    the first stage's start, or from `since()` when given, to the last stage's end)."""
    devices = [w.device for w in inst.group]
    hops: list[Future] = [Future() for _ in devices]  # stage j's output, for stage j + 1 (the last: the tokens)
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * len(devices)

    def part(j: int) -> None:
        try:
            given = () if j == 0 else (hops[j - 1].result(),)
            m: Measured = devices[j].link.call(command, *parts[j], *given)
            spans[j] = (m.t0, m.t0 + m.seconds)
            hops[j].set_result(m.value)
        except BaseException as exc:  # noqa: BLE001 - raised by the leader's part, which the clock waits on
            hops[j].set_exception(exc)

    for j in range(1, len(devices)):
        devices[j].thread.submit(part, j)

    def leader() -> Measured:
        part(0)
        tokens = hops[-1].result()  # raises what failed any stage
        t0 = since() if since is not None else spans[0][0]
        return Measured((tokens, list(spans)), t0, spans[-1][1] - t0)

    return dev.env.run_on(dev.thread, leader)


def _next_tokens(dev: RealDevice, rids: Sequence[int], tokens: Sequence[int]) -> None:
    """The last stage's tokens, to the first stage with its next command."""
    dev._ops.extend(("next", rid, token) for rid, token in zip(rids, tokens))


def prefill(dev: RealDevice, inst: Instance, batch: Sequence[Request]) -> tuple[simpy.Event, Callable[[], float]]:
    """`Device.prefill` of a pipelined instance: its first one measured from its submission (it waits for
    the stages' loads), later ones from the first stage's start."""
    loading = inst.loading
    first = loading is not None and not loading.consumed
    since = None
    env = dev.env
    submitted = env.now
    if first:
        loading.consumed = True
        frame = dev._frames.pop(id(loading))

        def since() -> float:  # the perf_counter of this submission in the start's frame (`_layered_prefill`)
            return frame["t0"] + (submitted - frame["submitted"]) * env.factor

    prompts = [(r.rid, dev.prompts[r.rid]) for r in batch]
    parts = [(w.device._take_ops(), inst.model, prompts, False) for w in inst.group]
    done = _run_stages(dev, inst, "prefill", parts, since)

    def finish() -> float:
        m: Measured = done.value
        tokens, spans = m.value
        _next_tokens(dev, [r.rid for r in batch], tokens)
        n = sum(len(p) for _, p in prompts)
        dev.steps.append((dev.gpu_id, "prefill-pipelined", inst.model, len(batch), n, max(len(p) for _, p in prompts),
                          submitted, env.wall_at(m.t0), m.seconds))
        if first:
            factor = env.factor
            t0 = m.t0
            starts = [submitted + (a - t0) / factor for a, _ in spans]
            finishes = [submitted + (b - t0) / factor for _, b in spans]

            def record(_event: object = None) -> None:
                loading.computed(starts, finishes)

            if loading.finished:
                record()
            else:
                loading.done.callbacks.append(record)
        return m.seconds

    return done, finish


def decode(dev: RealDevice, inst: Instance, running: Sequence[Request], kv_tokens: float
           ) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
    """`Device.decode` of a pipelined instance: one step through every stage."""
    rids = [r.rid for r in running]
    parts = [(w.device._take_ops(), inst.model, rids) for w in inst.group]
    submitted = dev.env.now
    done = _run_stages(dev, inst, "decode", parts, None)

    def finish() -> tuple[float, float]:
        m: Measured = done.value
        _next_tokens(dev, rids, m.value[0])
        dev.steps.append((dev.gpu_id, "decode-pipelined", inst.model, len(rids), len(rids), int(kv_tokens),
                          submitted, dev.env.wall_at(m.t0), m.seconds))
        return m.seconds, 1.0

    return done, finish


def forward_kv(dev: RealDevice, inst: Instance, op: tuple) -> None:
    """A KV binding of the leader's (its blocks' offsets, in its buffer), to the later stages too."""
    for w in inst.group[1:]:
        w.device._ops.append(op)


def load_units(dev: RealDevice, load: RankLoad) -> simpy.Event:
    """`load_units` of the leader: the other stages' units into the regions booked for them (after the
    plan's compaction copies), each from where the source policy says (`real.peers.split`, which counts
    the bytes per source, as for a cold start), on the leader's thread between the pipeline's steps."""
    env = dev.env
    arena = dev.arena
    sourced = split(dev, load)
    reads = [(dev.unit_model[key], key, arena.lookup(key).offset) for key, _ in sourced.reads]
    copies = [(gpu, src, arena.lookup(key).offset, n)
              for (gpu, key, src), (_, n) in zip(sourced.copies, sourced.copied)]
    moves = [(m.src, m.dst, m.nbytes) for m in load.moves]
    args = (dev._take_ops(), reads, moves, copies)
    submitted = env.now
    done = env.run_on(dev.thread, lambda: sourced.run(lambda: dev.link.call("load_units", *args)))

    def record(event: simpy.Event) -> None:
        if event.ok:
            m: Measured = event.value
            dev.steps.append((dev.gpu_id, "merge-load", "", len(load.missing), 0, 0, submitted, env.wall_at(m.t0),
                              m.seconds))

    done.callbacks.append(record)
    return done


def consolidate(dev: RealDevice, inst: Instance) -> tuple[simpy.Event, Callable[[], float]]:
    """The leader's engine rebuilt over every unit (the KV is in its blocks already); the followers drop
    their stage's engine and sequences with their next command."""
    env = dev.env
    for w in inst.group[1:]:
        w.device._ops.extend([("free", r.rid) for r in inst.running] + [("end", inst.model)])
    offsets = {key: dev.arena.lookup(key).offset for key in dev.units[inst.model]}
    args = (dev._take_ops(), inst.model, offsets)
    submitted = env.now
    done = env.run_on(dev.thread, lambda: dev.link.call("rebuild", *args))

    def finish() -> float:
        m: Measured = done.value
        dev.steps.append((dev.gpu_id, "consolidate", inst.model, len(inst.running), 0, 0, submitted,
                          env.wall_at(m.t0), m.seconds))
        return m.seconds

    return done, finish
