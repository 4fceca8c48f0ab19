"""The modelled device's passes under live layer handoff (`core.handoff`): a prefill or decode step of an
instance whose layers are still landing computes the landed layers here, in order, and hands the rest
to the source at the first layer that has not landed.

- A prefill walks the layers at the time model's per-layer split (`TimeModel.prefill_layers_s`): each
  landed layer takes its compute here; at the first one not landed, if a source is up and would finish
  the pass sooner than the layers could land here (one hop of the batch's tokens and the remaining
  layers' compute, against the chain rule over the landings expected at the rate the load has kept so
  far, `_landings`) and the system's rule says so (`worth`: always with `eager`; with `costed` when the
  waiting it saves the pass's requests exceeds what it adds to the source's running and queued
  requests), the source ends the pass (and is charged that compute, `ModelledDevice.borrowed_s`); else
  the pass waits for that layer and goes on. Without a source the first prefill runs as execute-while-load alone
  (`core.device.pipeline`). The first prefill's spans (here and on the source) give the head's
  `overlap_s`.
- A decode step while the layers land is one step at a time: the step's time from the time model, plus
  one hop of the batch's tokens when the source computes part of it (the layers not landed, by their
  share of the dense FLOPs, `core.handoff.shares`, at what they add to the source's own step); with no
  source, or when handing off is not `worth` it, it waits for the load, then steps.
- Every other pass of a system with live handoff (any GPU may be a source) ends later by the seconds
  its GPU computed for a new instance before or during it (`owing_prefill`, `owing_decode`); a decode
  batch advances by the time it had less those seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import simpy

from tangram_sim.core.device import LayerProgress, Work, pipeline
from tangram_sim.core.handoff import landed_prefix, marginal_decode_s, shares, source
from tangram_sim.core.pipeline import link_bps
from tangram_sim.core.records import Request
from tangram_sim.core.worker import Instance
from tangram_sim.models.layers import layer_blocks

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker
    from tangram_sim.sim.device import ModelledDevice

__all__ = ["decode", "owing_decode", "owing_prefill", "prefill"]


def _source(worker: GpuWorker, inst: Instance) -> tuple[GpuWorker, float] | None:
    """`core.handoff.source`, the work a source has taken still ahead of it read from its modelled device
    (`ModelledDevice.lent_until`)."""
    now = worker.cluster.env.now
    return source(worker, inst, lambda w: max(0.0, w.device.lent_until - now))


def _lend(src: GpuWorker, seconds: float, now: float) -> None:
    """`src` computes `seconds` of a new instance's work from `now`: its own passes pay them
    (`borrowed_s`), and they are ahead of it until `lent_until` (run back to back)."""
    dev = src.device
    dev.borrowed_s += seconds
    dev.lent_until = max(dev.lent_until, now) + seconds


def _wait_layer(dev: ModelledDevice, loading: LayerProgress, layer: int) -> simpy.Event:
    """An event when `layer` has landed."""
    event = loading.waiters.get(layer)
    if event is None:
        event = loading.waiters[layer] = dev.env.event()
    return event


def _landings(dev: ModelledDevice, inst: Instance, src: GpuWorker, loading: LayerProgress, first: int
              ) -> list[float]:
    """Per layer from `first`: when it should land, this GPU's share of the bytes still to come at the rate
    the load has kept so far (the layers landed since it began, as the device sees them), no faster than
    the faster of this GPU's PCIe link and the source's path to it; at that rate alone before a layer has
    landed. Layers already here take no time."""
    nbytes = layer_blocks(inst.entry.spec).nbytes
    pending = loading.pending
    rate = max(dev.pcie_bps, link_bps(src.cluster, src.gpu_id, inst.group[0].gpu_id))
    elapsed = dev.env.now - loading.load_start
    if pending is not None and elapsed > 0:
        landed = sum(b for b, p in zip(nbytes, pending) if not p) / inst.tp
        if landed > 0:
            rate = min(rate, landed / elapsed)
    now, out, total = dev.env.now, [], 0.0
    for i in range(first, len(nbytes)):
        if pending is None or pending[i]:
            total += nbytes[i] / inst.tp
        out.append(now + total / rate)
    return out


def worth(src: GpuWorker, saved: float, remote: float) -> bool:
    """Hand off, by the system's rule (`core.handoff`): always (`eager`), or when the request-seconds of
    waiting it saves the pass's requests (`saved`) exceed those it adds to the source's (its running and
    queued requests wait `remote` seconds longer: `costed`)."""
    if src.cluster.system.handoff == "eager":
        return True
    own = src.instance
    waiting = (len(own.running) if own is not None else 0) + src.queued
    return saved > 0 and saved > remote * waiting


def prefill(dev: ModelledDevice, inst: Instance, batch: Sequence[Request], loading: LayerProgress
            ) -> tuple[simpy.Event, Callable[[], float]]:
    """A prefill of `inst` while its layers land (module docstring)."""
    env = dev.env
    first = not loading.consumed
    worker = inst.group[0]
    if first and _source(worker, inst) is None:
        return dev._prefill_while_loading(inst, batch, loading)  # nothing to hand to: the chain rule
    loading.consumed = True
    start = env.now
    tokens = sum(r.input_tokens for r in batch)
    compute = dev.time_model.prefill_layers_s(inst.entry.spec, tokens, inst.tp)
    debt = dev.take_borrowed()
    done = env.event()
    took = [0.0]
    starts: list[float] = []
    finishes: list[float] = []

    def run() -> Work:
        if debt:
            yield env.timeout(debt)
        pending = loading.pending
        i = 0
        while i < len(compute):
            if loading.finished or pending is None or not pending[i]:
                starts.append(env.now)
                yield env.timeout(compute[i])
                finishes.append(env.now)
                i += 1
                continue
            found = _source(worker, inst)
            if found is not None:
                src, hop_per_token = found
                remote = sum(compute[i:])
                handed = env.now + hop_per_token * tokens + remote
                _, waited = pipeline(_landings(dev, inst, src, loading, i), compute[i:], env.now)
                if worth(src, (waited[-1] - handed) * len(batch), remote):
                    # the source owes the work from now (as a decode step's): its pass under way pays it,
                    # and a handoff decided meanwhile sees it busy (`core.handoff.source`)
                    _lend(src, remote, env.now)
                    starts.append(env.now)
                    yield env.timeout(handed - env.now)
                    finishes.append(env.now)
                    break
            yield _wait_layer(dev, loading, i)  # no source, or waiting is faster: compute it here
        took[0] = env.now - start
        if first:
            if loading.finished:
                loading.computed(starts, finishes)
            else:
                loading.done.callbacks.append(lambda _e: loading.computed(starts, finishes))
        done.succeed()

    env.process(run())
    return done, lambda: took[0]


def decode(dev: ModelledDevice, inst: Instance, running: Sequence[Request], horizon: float, kv_tokens: float,
           loading: LayerProgress) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
    """One decode step of `inst` while its layers land (module docstring)."""
    env = dev.env
    start = env.now
    if horizon <= 0:  # at a KV growth point or done: nothing to run
        return env.timeout(0.0), lambda: (0.0, 0.0)
    advance = min(1.0, horizon)
    n = len(running)
    step = dev.time_model.decode_step_s(inst.entry.spec, n, kv_tokens, inst.tp) * advance
    debt = dev.take_borrowed()
    local = landed_prefix(loading)
    layers = len(loading.ready)
    found = _source(inst.group[0], inst) if local < layers else None
    if found is not None:
        src, hop_per_token = found
        saved = (_landings(dev, inst, src, loading, local)[-1] - env.now - hop_per_token * n) * n
        remote = (1.0 - shares(layer_blocks(inst.entry.spec).flops_per_token, local)) * advance \
            * marginal_decode_s(dev.time_model, src, inst, n, kv_tokens)
        if not worth(src, saved, remote):
            found = None
    if local < layers and found is None:

        def wait() -> Work:
            if debt:
                yield env.timeout(debt)
            yield loading.done
            yield env.timeout(step)

        done = env.process(wait())
    else:
        dt = debt + step
        if found is not None:
            dt += hop_per_token * n
            _lend(src, remote, env.now)
        done = env.timeout(dt)
    return done, lambda: (env.now - start, advance)


class _Owing:
    """A pass of `dt` seconds on a GPU that may lend its compute: its end, later by every second borrowed
    before it ends (`ModelledDevice.borrowed_s`)."""

    __slots__ = ("dev", "done", "paid", "open")

    def __init__(self, dev: ModelledDevice, dt: float) -> None:
        self.dev = dev
        self.done = dev.env.event()  # the pass's end
        self.paid = dev.take_borrowed()  # seconds borrowed so far (owed from before: paid first)
        self.open = True  # the pass is still under way: later borrowings are its own
        dev.env.timeout(self.paid + dt).callbacks.append(self._check)

    def _check(self, _event: object = None) -> None:
        if not self.open:
            return  # the pass ended (woken): what is borrowed now is the next pass's
        debt = self.dev.take_borrowed()
        if debt > 0:
            self.paid += debt
            self.dev.env.timeout(debt).callbacks.append(self._check)
        else:
            self.open = False
            self.done.succeed()


def owing_prefill(dev: ModelledDevice, dt: float) -> tuple[simpy.Event, Callable[[], float]]:
    """A prefill of `dt` seconds that pays the GPU's borrowed seconds (module docstring)."""
    pass_ = _Owing(dev, dt)
    return pass_.done, lambda: dt + pass_.paid


def owing_decode(dev: ModelledDevice, horizon: float, step: float, dt: float, wake: simpy.Event | None
                 ) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
    """A fluid decode of `horizon` tokens at `step` seconds each (`dt` in all) that pays the GPU's borrowed
    seconds; a wake-up stops it at once, and the batch has advanced by its time less those seconds."""
    env = dev.env
    start = env.now
    pass_ = _Owing(dev, dt)
    done = pass_.done if wake is None else wake | pass_.done

    first = pass_.paid  # owed from before: paid before the batch runs

    def advanced() -> tuple[float, float]:
        pass_.open = False
        elapsed = env.now - start
        ran = min(dt, max(0.0, elapsed - first))
        # woken before every borrowed second was paid: the rest is owed by the next pass
        unpaid = (pass_.paid + dt - elapsed) - (dt - ran)
        if unpaid > 0:
            dev.borrowed_s += unpaid
        return elapsed, (min(horizon, ran / step) if step > 0 else horizon)

    return done, advanced
