"""The modelled GPU: a `core.device.Device` whose every step takes the time model's time.

A cold start is the system's startup stages before the weights (`core.startup`; by default the engine
overhead), then the compaction copies (device-to-device bandwidth plus a per-unit overhead; ranks copy in
parallel, the slowest sets the pace), then the loads: each missing unit streams to the GPU from its source
(`core.sources`: the node's DRAM cache, else its SSD, else the network; another GPU's copy when the
system's source policy picks one) over the links of the cluster's `topology`, as fluid transfers (one per
source and rank, the units in plan order) that share links fairly (`core.links`); stages on the lane beside the
load and those after it come last. A serial start lands every unit when its last transfer ends and
returns when the engine serves. With execute-while-load the transfers carry marks where each unit ends
and where each layer's bytes inside a unit end, so units land, and layers become ready, at the moment
their bytes arrive; the start returns at the compute gate and the instance's first prefill follows
`core.device.pipeline` over the layers' ready times and the time model's per-layer split. The GPU
computes for one instance at a time (the worker runs one), so nothing else competes for its compute
while it loads: the lane's stages end before the gate, compaction copies before any layer is ready.
Prefill is one time-model iteration per group. Decode is a fluid: between events (an arrival that can
join, a completion, a KV growth point) every running sequence advances at one token per step, the step time from the time model for
the current batch and KV size; this keeps events per request O(1) instead of O(output tokens).
A pipelined start (`core.pipeline`) loads each stage's units on its own GPU; without execute-while-load a
stage's layers are ready when all of its units have landed, and every prefill and decode step adds the
stages' activation hops; `load_units` is the leader's background load before it consolidates.
A prefetch (`core.prefetch`) loads one unit at a time from the node's DRAM cache over the GPU's PCIe
link (after the per-unit overhead); cancelling it removes its transfer from the link at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import simpy

from tangram_sim.arena import Arena, Key
from tangram_sim.core.device import Landed, LayerProgress, RankLoad, Started, Work, pipeline
from tangram_sim.core.links import Fabric, Link
from tangram_sim.core.pipeline import hop_s
from tangram_sim.core.records import Request
from tangram_sim.core.startup import StartupPlan
from tangram_sim.core.worker import Instance
from tangram_sim.errors import ConfigError
from tangram_sim.models.layers import layer_blocks
from tangram_sim.sim import handoff
from tangram_sim.sim.streams import Streams
from tangram_sim.sim.timemodel import TimeModel
from tangram_sim.topology import Topology


class ModelledDevice(Streams):
    """One simulated GPU (see the module docstring); all of them share one `Fabric` of links."""

    binds_memory = False  # the arena's books are the whole device
    overlaps_load = True  # its first prefill may run while the weights land (execute_while_load)
    reads_gpu_copies = True  # a unit may come from another GPU's copy
    joins_multicast = True  # or from a multicast stream
    runs_pipelines = True  # a cold start may run as pipeline stages on several GPUs (core.pipeline)

    def __init__(self, env: simpy.Environment, gpu_id: int, memory_bytes: int, alignment: int,
                 pcie_bps: float, fabric: Fabric, time_model: TimeModel, engine_overhead_s: float,
                 unit_overhead_s: float, d2d_bps: float, whole_steps: bool = False,
                 load_overhead_s: float = 0.0, startup: StartupPlan | None = None,
                 execute_while_load: bool = False, topology: Topology | None = None,
                 layered_load_bps: float | None = None) -> None:
        self.env = env
        self.gpu_id = gpu_id  # position in the cluster
        self.arena = Arena(memory_bytes, alignment=alignment)  # the books are the whole device
        # host->GPU, shared by this GPU's transfers: the topology's link of this GPU when the simulator
        # shares one topology with the cluster (`topology`), else one of its own
        self.pcie = topology.pcie[gpu_id] if topology is not None else Link(f"gpu{gpu_id}.pcie", pcie_bps)
        self._paths: dict[tuple[str, int], tuple[Link, ...]] = {}  # (source, holder GPU) -> links crossed
        self.pcie_bps = pcie_bps
        self.fabric = fabric  # every link of the cluster
        self.time_model = time_model
        self.engine_overhead_s = engine_overhead_s  # runtime start before the weights load
        self.unit_overhead_s = unit_overhead_s  # per loaded unit (allocation, copy launch)
        self.load_overhead_s = load_overhead_s  # per rank that loads anything (the loader's setup)
        self.d2d_bps = d2d_bps  # compaction copies
        self.whole_steps = whole_steps  # a wake-up waits for the decode step under way to end (an
        # engine that schedules per iteration, as the real replay's); else the fluid batch stops at once
        # the system's startup stages (None: the single stage `engine_overhead_s` before the weights)
        self.startup = startup
        self.execute_while_load = execute_while_load  # compute each layer as soon as it has landed
        # a layered start's reads share their device with its compute (`Calibration.layered_load_bps`):
        # they also cross this link (None: at a serial start's rate)
        self.landing = Link(f"gpu{gpu_id}.landing", layered_load_bps) if layered_load_bps else None
        # seconds this GPU computed for another instance (the source of a live handoff, `core.handoff`),
        # added to its own next prefill or decode
        self.borrowed_s = 0.0
        self.lent_until = 0.0  # when the work it has taken from new instances ends, run back to back
        self.lends: bool | None = None  # the system has a live handoff (known at the first instance)

    def start_instance(self, inst: Instance, head: Request, loads: Sequence[RankLoad], landed: Landed) -> Work:
        env = self.env
        t0 = env.now
        # Ranks copy and load in parallel; the slowest one sets the pace.
        copy_s = 0.0
        for load in loads:
            rank_s = load.moved_bytes / self.d2d_bps + self.unit_overhead_s * len(load.missing)
            if load.missing and self.load_overhead_s:
                rank_s += self.load_overhead_s
            copy_s = max(copy_s, rank_s)
        plan = self.startup
        before = self.engine_overhead_s if plan is None else plan.pre_s
        if before:
            yield env.timeout(before)
        t_load = env.now
        if inst.stages is not None and not self.execute_while_load:
            return Started(env.now - t0, math.nan, self._land_stages(inst, loads, landed, t_load, copy_s))
        if self.execute_while_load:
            progress = self._land_layers(inst, loads, landed, t_load, copy_s)
            if plan is not None and plan.lane_s:  # stages that gate compute (post_s is 0: SystemSpec)
                yield env.timeout(plan.lane_s)
            return Started(env.now - t0, math.nan, progress)
        if copy_s:
            yield env.timeout(copy_s)
        transfers = [ev for load in loads if load.missing for ev in load.worker.device._transfers(load)]
        if transfers:
            yield env.all_of(transfers)
        for load in loads:  # a serial engine gets its weights as a whole
            landed(load, load.missing)
        startup_s, load_s = t_load - t0, env.now - t_load
        if plan is not None and (plan.lane_s or plan.post_s):
            t_loaded = env.now
            after = max(0.0, t_load + plan.lane_s - t_loaded) + plan.post_s
            if after:
                yield env.timeout(after)
                startup_s += env.now - t_loaded
        return Started(startup_s, load_s)

    def _land_layers(self, inst: Instance, loads: Sequence[RankLoad], landed: Landed, t_load: float,
                     copy_s: float) -> LayerProgress:
        """Start the copies and marked transfers of an execute-while-load start (a process of their own);
        the returned progress fills as units and layers land."""
        entry = inst.entry
        n_layers = len(layer_blocks(entry.spec))
        progress = LayerProgress(self.env, [t_load] * n_layers, t_load)
        if self._lends(inst):  # passes compute the landed layers (core.handoff)
            progress.pending = [1] * n_layers  # nothing has landed before the copies are done
        self.env.process(self._stream(progress, entry.spec, entry.units, inst.rank_keys, loads, landed, copy_s))
        return progress

    def _land_stages(self, inst: Instance, loads: Sequence[RankLoad], landed: Landed, t_load: float,
                     copy_s: float) -> LayerProgress:
        """A pipelined start (`core.pipeline`) without execute-while-load: each stage's GPU loads its units
        (in parallel, each over its own links); its layers are ready once all of them have landed and its
        startup stages beside and after the load are done."""
        env = self.env
        stages = inst.stages
        assert stages is not None
        n_layers = len(layer_blocks(inst.entry.spec))
        progress = LayerProgress(env, [t_load] * n_layers, t_load)
        plan = self.startup
        lane_s, post_s = (plan.lane_s, plan.post_s) if plan is not None else (0.0, 0.0)
        bounds = [*stages.starts, n_layers]

        def stage_landed(rank: int) -> None:
            at = max(env.now, t_load + lane_s) + post_s
            for layer in range(bounds[rank], bounds[rank + 1]):
                progress.ready[layer] = at

        def run() -> Work:
            if copy_s:
                yield env.timeout(copy_s)
            events = []
            for rank, load in enumerate(loads):
                if not load.missing:
                    landed(load, ())
                    stage_landed(rank)
                    continue
                ev = env.all_of(load.worker.device._transfers(load))
                ev.callbacks.append(lambda _e, rank=rank, load=load: (landed(load, load.missing), stage_landed(rank)))
                events.append(ev)
            if events:
                yield env.all_of(events)
            end = max(progress.ready) if progress.ready else env.now
            if end > env.now:  # the stages after the load
                yield env.timeout(end - env.now)
            progress.finish(env.now)

        env.process(run())
        return progress

    def load_units(self, load: RankLoad) -> simpy.Event:
        """Load units booked as loading outside a cold start (a pipelined instance's consolidation,
        `core.pipeline`): compaction copies and per-unit overheads, then the transfers from their
        sources; the event fires when they are in place (the caller books them resident)."""
        copy_s = load.moved_bytes / self.d2d_bps + self.unit_overhead_s * len(load.missing)
        if load.missing and self.load_overhead_s:
            copy_s += self.load_overhead_s

        def run() -> Work:
            if copy_s:
                yield self.env.timeout(copy_s)
            transfers = self._transfers(load) if load.missing else []
            if transfers:
                yield self.env.all_of(transfers)

        return self.env.process(run())

    def consolidate(self, inst: Instance, move_s: float) -> tuple[simpy.Event, Callable[[], float]] | None:
        """A pipelined instance consolidates onto this leader: its running requests' KV of the other stages
        moves here, `move_s` (nothing to wait for when there is none)."""
        if move_s <= 0:
            return None
        return self.env.timeout(move_s), lambda: move_s

    def _lends(self, inst: Instance) -> bool:
        """The system hands layers off (`core.handoff`): read once, the system is the run's."""
        lends = self.lends
        if lends is None:
            lends = self.lends = inst.group[0].cluster.system.handoff != "none"
        return lends

    def take_borrowed(self) -> float:
        """The seconds computed for another instance since the last pass (`core.handoff`), now paid."""
        debt, self.borrowed_s = self.borrowed_s, 0.0
        return debt

    def prefill(self, inst: Instance, batch: Sequence[Request]) -> tuple[simpy.Event, Callable[[], float]]:
        loading = inst.loading
        if loading is not None and loading.pending is not None and not loading.finished:
            return handoff.prefill(self, inst, batch, loading)  # its layers still land (live handoff)
        if loading is not None and not loading.consumed:
            return self._prefill_while_loading(inst, batch, loading)
        dt = self.time_model.prefill_s(inst.entry.spec, sum(r.input_tokens for r in batch), inst.tp)
        if inst.stages is not None:
            dt += hop_s(inst.stages, sum(r.input_tokens for r in batch))
        if self.lends or (self.lends is None and self._lends(inst)):  # it may be a source: it pays its debts
            return handoff.owing_prefill(self, dt)
        return self.env.timeout(dt), lambda: dt

    def _prefill_while_loading(self, inst: Instance, batch: Sequence[Request], loading: LayerProgress
                               ) -> tuple[simpy.Event, Callable[[], float]]:
        """The first prefill of an instance whose weights are landing: once every layer's ready time is
        known (the last unit landed), `pipeline` gives each layer's span; the iteration ends with the last."""
        env = self.env
        loading.consumed = True
        start = env.now
        tokens = sum(r.input_tokens for r in batch)
        compute = self.time_model.prefill_layers_s(inst.entry.spec, tokens, inst.tp)
        stages = inst.stages
        if stages is not None:  # stage j's last layer ends when its activations reach stage j+1
            for j, per_token in enumerate(stages.hop_s_per_token):
                compute[stages.starts[j + 1] - 1] += per_token * tokens
        done = env.event()
        took = [0.0]

        def run(_event: object = None) -> None:
            starts, finishes = pipeline(loading.ready, compute, start)
            loading.computed(starts, finishes)
            # the engine serves once its model is whole: a text model's last layer lands with its last
            # unit anyway, but a vision tower's units (no layer of a text prompt) may land after it
            end = max(finishes[-1], loading.load_end) if finishes else loading.load_end
            took[0] = end - start
            env.timeout(max(0.0, end - env.now)).callbacks.append(lambda _e: done.succeed())

        if loading.finished:
            run()
        else:
            loading.done.callbacks.append(run)
        return done, lambda: took[0]

    def decode(self, inst: Instance, running: Sequence[Request], horizon: float, kv_tokens: float,
               wake: simpy.Event | None) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
        env = self.env
        loading = inst.loading
        if loading is not None and loading.pending is not None and not loading.finished:
            return handoff.decode(self, inst, running, horizon, kv_tokens, loading)  # live handoff
        step = self.time_model.decode_step_s(inst.entry.spec, len(running), kv_tokens, inst.tp)
        if inst.stages is not None:
            step += hop_s(inst.stages, len(running))
        start = env.now
        dt = horizon * step
        if dt > 0 and start + dt == start:  # e.g. a bandwidth of 1e-300 pushed time to 1e300 s
            raise ConfigError(f"simulated time reached {start:.3g} s, where a decode step of {dt:.3g} s no "
                              "longer advances the clock; expected rates, bandwidths and sizes of realistic scale")
        if self.lends or (self.lends is None and self._lends(inst)):
            return handoff.owing_decode(self, horizon, step, dt, wake)
        if wake is None:
            done = env.timeout(dt)
        elif not self.whole_steps or step <= 0:
            done = wake | env.timeout(dt)
        else:
            done = self._at_step_end(wake, start, step, dt)

        def advanced() -> tuple[float, float]:
            elapsed = env.now - start
            return elapsed, (min(horizon, elapsed / step) if step > 0 else horizon)

        return done, advanced

    def _at_step_end(self, wake: simpy.Event, start: float, step: float, dt: float) -> simpy.Event:
        """An event at `start + dt`, or when `wake` fires, at the end of the step then under way (a
        wake before the first step begins stops the batch at once)."""
        env = self.env
        done = env.event()

        def finish(_event: object = None) -> None:
            if not done.triggered:
                done.succeed()

        def woken(_event: object) -> None:
            if done.triggered:
                return
            steps = math.ceil((env.now - start) / step - 1e-9)
            end = min(dt, steps * step)
            if start + end <= env.now:
                finish()
            else:
                env.timeout(start + end - env.now).callbacks.append(finish)

        env.timeout(dt).callbacks.append(finish)
        wake.callbacks.append(woken)
        return done

    # Memory binding has no cost in the model (and the worker does not call these: binds_memory).
    def kv_grown(self, inst: Instance, req: Request, keys: Sequence[Key], nbytes: int) -> None:
        pass

    def kv_freed(self, inst: Instance, req: Request) -> None:
        pass

    def pool_reserved(self, inst: Instance, keys: Sequence[Key]) -> None:
        pass

    def end_instance(self, inst: Instance) -> None:
        pass

    def sampled(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass
