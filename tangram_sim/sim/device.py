"""The modelled GPU: a `core.device.Device` whose every step takes the time model's time.

A cold start is the engine overhead, then the compaction copies (device-to-device bandwidth plus a
per-unit overhead; ranks copy in parallel, the slowest sets the pace), then the loads: each missing
unit streams host->GPU over the GPU's PCIe link, from the node's DRAM cache, else its SSD, else the
network, as fluid transfers that share links fairly (`core.links`). Prefill is one time-model iteration
per group. Decode is a fluid: between events (an arrival that can join, a completion, a KV growth
point) every running sequence advances at one token per step, the step time from the time model for
the current batch and KV size; this keeps events per request O(1) instead of O(output tokens).
A prefetch (`core.prefetch`) loads one unit at a time from the node's DRAM cache over the GPU's PCIe
link (after the per-unit overhead); cancelling it removes its transfer from the link at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import simpy

from tangram_sim.arena import Arena, Key
from tangram_sim.core.device import RankLoad, Work
from tangram_sim.core.links import Fabric, Link
from tangram_sim.core.records import Request
from tangram_sim.core.storage import Node
from tangram_sim.core.worker import Instance
from tangram_sim.errors import ConfigError
from tangram_sim.sim.timemodel import TimeModel


class ModelledDevice:
    """One simulated GPU (see the module docstring); all of them share one `Fabric` of links."""

    binds_memory = False  # the arena's books are the whole device

    def __init__(self, env: simpy.Environment, gpu_id: int, memory_bytes: int, alignment: int,
                 pcie_bps: float, fabric: Fabric, time_model: TimeModel, engine_overhead_s: float,
                 unit_overhead_s: float, d2d_bps: float, whole_steps: bool = False,
                 load_overhead_s: float = 0.0) -> None:
        self.env = env
        self.gpu_id = gpu_id  # position in the cluster
        self.arena = Arena(memory_bytes, alignment=alignment)  # the books are the whole device
        self.pcie = Link(f"gpu{gpu_id}.pcie", pcie_bps)  # host->GPU, shared by this GPU's transfers
        self.pcie_bps = pcie_bps
        self.fabric = fabric  # every link of the cluster
        self.time_model = time_model
        self.engine_overhead_s = engine_overhead_s  # runtime start before the weights load
        self.unit_overhead_s = unit_overhead_s  # per loaded unit (allocation, copy launch)
        self.load_overhead_s = load_overhead_s  # per rank that loads anything (the loader's setup)
        self.d2d_bps = d2d_bps  # compaction copies
        self.whole_steps = whole_steps  # a wake-up waits for the decode step under way to end (an
        # engine that schedules per iteration, as the real replay's); else the fluid batch stops at once

    def start_instance(self, inst: Instance, head: Request, loads: Sequence[RankLoad]) -> Work:
        env = self.env
        t0 = env.now
        # Ranks copy and load in parallel; the slowest one sets the pace.
        copy_s = 0.0
        for load in loads:
            rank_s = load.moved_bytes / self.d2d_bps + self.unit_overhead_s * len(load.missing)
            if load.missing and self.load_overhead_s:
                rank_s += self.load_overhead_s
            copy_s = max(copy_s, rank_s)
        if self.engine_overhead_s:
            yield env.timeout(self.engine_overhead_s)
        t_load = env.now
        if copy_s:
            yield env.timeout(copy_s)
        transfers = [ev for load in loads if load.missing for ev in load.worker.device._transfers(load)]
        if transfers:
            yield env.all_of(transfers)
        return t_load - t0, env.now - t_load

    def _transfers(self, load: RankLoad) -> list[simpy.Event]:
        """Missing units stream host->GPU; those not in the DRAM cache come from SSD or remote first."""
        node = load.worker.node
        cache, on_ssd, ssd_holds_all = node.cache, node.on_ssd, node.tiers.ssd_holds_all
        from_dram = from_ssd = from_remote = 0
        for key, nbytes in load.missing:
            if key in cache:
                from_dram += nbytes
                cache.move_to_end(key)
            elif ssd_holds_all or key in on_ssd:
                from_ssd += nbytes
            else:
                from_remote += nbytes
        fabric = self.fabric
        events = []
        if from_dram:
            events.append(fabric.transfer(from_dram, (self.pcie,)))
        if from_ssd:
            events.append(fabric.transfer(from_ssd, (node.ssd, self.pcie)))
        if from_remote:
            events.append(fabric.transfer(from_remote, (node.network, self.pcie)))
        return events

    def prefetch_source(self, node: Node, key: Key) -> bool:
        """Only units in the node's DRAM cache: their transfer crosses this GPU's PCIe link alone."""
        return key in node.cache

    def prefetch_unit(self, key: Key, nbytes: int) -> tuple[simpy.Event, Callable[[], float | None]]:
        copy = _PrefetchCopy(self, nbytes)
        return copy.done, copy.cancel

    def prefill(self, inst: Instance, batch: Sequence[Request]) -> tuple[simpy.Event, Callable[[], float]]:
        dt = self.time_model.prefill_s(inst.entry.spec, sum(r.input_tokens for r in batch), len(inst.group))
        return self.env.timeout(dt), lambda: dt

    def decode(self, inst: Instance, running: Sequence[Request], horizon: float, kv_tokens: float,
               wake: simpy.Event | None) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
        env = self.env
        step = self.time_model.decode_step_s(inst.entry.spec, len(running), kv_tokens, len(inst.group))
        start = env.now
        dt = horizon * step
        if dt > 0 and start + dt == start:  # e.g. a bandwidth of 1e-300 pushed time to 1e300 s
            raise ConfigError(f"simulated time reached {start:.3g} s, where a decode step of {dt:.3g} s no "
                              "longer advances the clock; expected rates, bandwidths and sizes of realistic scale")
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


class _PrefetchCopy:
    """One prefetched unit: the per-unit overhead, then its transfer over the GPU's PCIe link."""

    __slots__ = ("device", "nbytes", "done", "transfer", "cancelled")

    def __init__(self, device: ModelledDevice, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes
        self.done = device.env.event()  # the unit is in place
        self.transfer: simpy.Event | None = None  # the link transfer, once started
        self.cancelled = False
        if device.unit_overhead_s:
            device.env.timeout(device.unit_overhead_s).callbacks.append(self._begin)
        else:
            self._begin(None)

    def _begin(self, _event: object) -> None:
        if self.cancelled:
            return
        self.transfer = self.device.fabric.transfer(self.nbytes, (self.device.pcie,))
        self.transfer.callbacks.append(self._arrived)

    def _arrived(self, _event: object) -> None:
        if not self.cancelled:
            self.done.succeed()

    def cancel(self) -> float | None:
        """Stop now: the bytes moved so far (wasted), or None when the unit had arrived."""
        if self.done.triggered or (self.transfer is not None and self.transfer.triggered):
            return None
        self.cancelled = True
        if self.transfer is None:
            return 0.0
        moved = self.device.fabric.cancel(self.transfer)
        return 0.0 if moved is None else moved
