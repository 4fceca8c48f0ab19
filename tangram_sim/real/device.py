"""The real GPU: a `core.device.Device` whose work runs on a torch device, its durations measured.

The worker has already booked every decision in the arena (`self.arena`: the books of the device's
buffer), so this class only hands the work those books describe to the GPU's backend
(`real.backend`: the buffer, loader, engines and sequences, in a process of its own or in this one),
on the device's own thread (one per GPU, like a stream: its work runs in order) through the wall
clock's `run_on`:

- a cold start sends the plan's compaction moves in the order the plan applied them, the missing units
  and every unit's offset; the backend copies, copies the units the source policy takes from other
  arenas (`real.peers`: split by source when the start is handed over), reads the others from the
  checkpoint files into their regions (`Loader`: reader threads, staging buffers), then builds the
  engine on the arena's views; `load_s` is the copies and reads, `startup_s` the engine build; the units
  land, all of them, when the start returns;
- with execute-while-load (`execute_while_load`) the backend builds the engine first (on views: no byte
  needs to be there), runs the copies, and returns, its reads going on layer by layer on a thread of
  their own (`real.landing`). The start returns a `LayerProgress`; each landing the backend notes
  (units landed, layer blocks whole, at a `perf_counter` stamp) is read here on a thread of the
  device's own and delivered through the clock's `run_on` at its stamp's time, where `landed` books
  the units resident and the blocks' ready times are set; the last one finishes the progress with
  the load's measured end. The instance's first prefill runs layer by layer in the backend, each
  block waiting for its bytes, and its measured spans go to `LayerProgress.computed`, so the head's
  `overlap_s` and `first_layer_s` are measured, not modelled;
- startup stages (`core.startup`): the runtime stage is the engine build, performed and measured (a
  stated runtime time is the simulator's, not used here); the device context, KV initialisation and
  graph capture are not performed by this executor (its KV is arena blocks bound per request, it
  captures no graphs), so a system that states them is charged their stated times on the clock where
  the model places them - before the weights, on the lane beside the load, after it - and the steps
  table records them as kind `stage`: modelled, not measured;
- KV bytes the worker grants become block offsets: the regions of on-demand KV, or blocks of the
  instance's static pool (the pool's regions are cut into blocks when it is reserved); they reach the
  backend with its next command, as do freed KV and ended instances;
- prefill runs the group's prompts in one packed ragged forward pass, decode one batched step;
- a prefetched unit (`core.prefetch`) is read from its files into its region by one command on the
  same thread (`real.prefetching`); a cold start that follows one waits for at most one unit's read,
  recorded as a step of kind `prefetch-wait`.

Durations are measured by the backend around the work, synchronised with the device, and reach the
clock as `core.clock.Measured`: the hand-over between processes is charged to nobody.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import simpy
import torch

from tangram_sim.arena import Arena, Key
from tangram_sim.core.clock import Measured, WallClockEnvironment
from tangram_sim.core.device import Landed, LayerProgress, RankLoad, Started, Work, pipeline
from tangram_sim.core.records import Request
from tangram_sim.core.startup import StartupPlan, resolve_startup
from tangram_sim.core.storage import Node
from tangram_sim.core.worker import Instance
from tangram_sim.policies.kv import kv_block_bytes
from tangram_sim.real import pipelined
from tangram_sim.real.backend import BackendSpec, model_layouts
from tangram_sim.real.link import DeviceLink
from tangram_sim.real.loader import Checkpoint
from tangram_sim.real.memory import read_memory
from tangram_sim.real.peers import split
from tangram_sim.real.prefetching import prefetch_unit

LOAD_COLUMNS = [  # loaded_bytes / read_s: from the files; copied_bytes / copy_s: from other arenas
    "rid", "gpu", "model", "units", "units_loaded", "loaded_bytes", "moved_bytes", "move_s", "read_s",
    "engine_s", "total_s", "read_gbps", "wall_s", "units_copied", "copied_bytes", "copy_s",
]
STEP_COLUMNS = [  # one row per piece of device work: what the time model predicts, as measured
    "gpu", "kind", "model", "requests", "tokens", "kv_tokens", "time_s", "wall_s", "seconds",
]
LAYER_COLUMNS = [  # one row per layer block of each execute-while-load first prefill, times on the clock
    "gpu", "model", "rid", "tokens", "block", "ready_s", "start_s", "finish_s", "load_start_s", "load_end_s",
]
MEMORY_COLUMNS = [
    "time_s", "gpu", "device", "source", "total_bytes", "used_bytes", "free_bytes", "torch_allocated",
    "torch_reserved",
]


class RealDevice:
    """One arena on one torch device (a whole GPU, a slice of one, or the CPU); see module docstring.

    `process`: the backend runs in a child process of its own (pinned to `spec.cores`), else in this
    process on the device's thread. `verify`: after each cold start every tensor of the model is
    compared with its file (not timed, after every unit has landed; a mismatch fails the run with a
    one-line ModelError). `execute_while_load`: cold starts load layer by layer while the engine
    computes (see the module docstring)."""

    binds_memory = True  # KV bytes become block views, samples read the device's memory counters
    overlaps_load = True  # its backend can load layer by layer under a first prefill (execute_while_load)
    reads_gpu_copies = True  # a unit may be copied from another arena's buffer (`real.peers`)
    runs_pipelines = True  # a cold start may run as stages on several devices (`real.pipelined`)

    def __init__(self, env: WallClockEnvironment, gpu_id: int, spec: BackendSpec, ckpts: dict[str, Checkpoint],
                 prompts: dict[int, list[int]], *, process: bool = False, verify: bool = False,
                 execute_while_load: bool = False, startup: StartupPlan | None = None) -> None:
        self.env = env
        # the stages this device does not perform, charged their stated times (module docstring); its
        # runtime stage is the engine build it performs and measures
        self.stages = (startup or resolve_startup({}, 0.0)).without("runtime")
        self.execute_while_load = execute_while_load  # cold starts land layer by layer under the first prefill
        # reads the backend's landing notes, one at a time (a thread apart from the device's commands)
        self.notes = ThreadPoolExecutor(1, thread_name_prefix=f"gpu{gpu_id}-notes") if execute_while_load else None
        self.gpu_id = gpu_id  # position in the cluster
        self.device = torch.device(spec.device)  # torch device
        self.arena = Arena(spec.capacity, spec.alignment)  # the worker's books: the buffer's layout
        self.verify = verify
        self.prompts = prompts  # rid -> token ids, made before the clock started
        self.units: dict[str, list[Key]] = {}  # model -> its unit keys
        self.block_bytes: dict[str, int] = {}  # model -> one cross-layer KV block
        self.unit_model: dict[Key, str] = {}  # unit key -> a model whose files hold it
        for name, ckpt in ckpts.items():
            keys = [lay.unit.key for lay in model_layouts(spec, ckpt)]
            self.units[name] = keys
            self.block_bytes[name] = kv_block_bytes(ckpt.spec.kv_bytes_per_token, spec.block_tokens)
            for key in keys:
                self.unit_model.setdefault(key, name)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"gpu{gpu_id}")  # the device's stream
        self.link = DeviceLink(spec, process)  # the backend (builds it: a process starts here)
        self._torch_memory = self.link.call("memory")  # the backend's torch counters (its buffer)
        self._ops: list[tuple] = []  # bindings for the backend's next command (backend.apply)
        self.kv: dict[int, list[int]] = {}  # rid -> its KV block offsets (static pool blocks go back)
        self.pool_free: dict[str, list[int]] = {}  # model -> free block offsets of its static pool
        self.tokens: dict[int, list[int]] = {}  # rid -> generated tokens (filled by `close`)
        self.loads: list[tuple] = []  # LOAD_COLUMNS rows
        self.memory: list[tuple] = []  # MEMORY_COLUMNS rows
        self.steps: list[tuple] = []  # STEP_COLUMNS rows
        self.layers: list[tuple] = []  # LAYER_COLUMNS rows
        self._frames: dict[int, Any] = {}  # id(LayerProgress) -> its start's (submitted, t0), for its first prefill
        self.prefetches_submitted = 0  # prefetch reads handed to the thread (counted on the clock's thread)
        self.prefetches_finished = 0  # of those, done or skipped (counted on the device's thread)
        self._left: dict | None = None  # what the backend held at the end (`close`)
        self._closed = False

    def _take_ops(self) -> list[tuple]:
        ops, self._ops = self._ops, []
        return ops

    # ------------------------------------------------------------ cold start
    def start_instance(self, inst: Instance, head: Request, loads: Sequence[RankLoad], landed: Landed) -> Work:
        if inst.stages is not None:
            return (yield from pipelined.start(self, inst, head, loads, landed))
        if len(loads) != 1:
            raise AssertionError("the real device runs one-GPU instances only")
        load = loads[0]
        arena = self.arena
        offsets = {key: arena.lookup(key).offset for key in self.units[inst.model]}
        moves = [(m.src, m.dst, m.nbytes) for m in load.moves]
        env = self.env
        begun = env.now
        stages = self.stages
        if stages.pre_s:  # modelled stages before the weights (the device context)
            self.steps.append((self.gpu_id, "stage", inst.model, 1, 0, 0, begun, env.wall(), stages.pre_s))
            yield env.timeout(stages.pre_s)
        ops = self._take_ops()
        behind_prefetch = self.prefetches_submitted != self.prefetches_finished
        queued_at = time.perf_counter()
        layered = self.execute_while_load
        sourced = split(self, load)  # the holders' books as they stand at the hand-over
        missing = [key for key, _ in sourced.reads]
        args = (ops, inst.model, offsets, missing, moves, self.verify, layered, sourced.copies)
        submitted = env.now
        done: Measured = yield env.run_on(self.thread, lambda: sourced.run(lambda: self.link.call("start", *args)))
        if behind_prefetch:  # it waited for a prefetch read that had begun (at most one unit)
            self.steps.append((self.gpu_id, "prefetch-wait", inst.model, 1, 0, 0, submitted,
                               env.wall_at(queued_at), max(0.0, done.t0 - queued_at)))
        if layered:
            started = self._layered(inst, head, load, landed, done, submitted, len(offsets), sourced.reads,
                                    sourced.copied)
            engine_s, move_s, _, copy_s, _ = done.value
            move_s += copy_s
            # modelled stages on the lane run beside the load from its start (after the engine build)
            gate = submitted + engine_s / env.factor + stages.lane_s
            if gate > env.now:
                yield env.timeout(gate - env.now)
            started.startup_s = env.now - begun - move_s / env.factor
            return started
        move_s, read_s, engine_s, nbytes, gbps, copy_s, copied = done.value
        t0 = done.t0
        load_s = move_s + copy_s + read_s
        self.steps.append((self.gpu_id, "load", inst.model, 1, len(load.missing), 0, submitted, self.env.wall_at(t0),
                           load_s))
        self.steps.append((self.gpu_id, "engine", inst.model, 1, 0, 0, submitted + load_s,
                           self.env.wall_at(t0 + load_s), engine_s))
        self.loads.append((head.rid, self.gpu_id, inst.model, len(offsets), len(load.missing), nbytes,
                           load.moved_bytes, move_s, read_s, engine_s, done.seconds, gbps, self.env.wall_at(t0),
                           len(sourced.copied), copied, copy_s))
        landed(load, load.missing)  # every layer is ready when the start returns
        after = max(0.0, stages.lane_s - load_s) + stages.post_s  # modelled stages beside and after the load
        if after:
            self.steps.append((self.gpu_id, "stage", inst.model, 1, 0, 0, env.now, env.wall(), after))
            yield env.timeout(after)
        return Started(stages.pre_s + engine_s + after, load_s)

    def _layered(self, inst: Instance, head: Request, load: RankLoad, landed: Landed, done: Measured,
                 submitted: float, units: int, missing: list[tuple[Key, int]],
                 copied: list[tuple[Key, int]]) -> Started:
        """The engine may compute: a `LayerProgress` whose blocks' ready times, unit landings and end
        arrive as the backend's notes, each delivered at its stamp's time on the clock. `missing`: the
        units read from the files (the notes' indices); `copied`: those copied from other arenas, in
        place when the start returns."""
        env = self.env
        engine_s, move_s, n_blocks, copy_s, copied_bytes = done.value
        t0 = done.t0
        factor = env.factor

        def clock(stamp: float) -> float:  # a backend perf_counter as time on this replay's clock
            return submitted + (stamp - t0) / factor

        # reused and copied units are in place once the copies are done
        moved = clock(t0 + engine_s + move_s + copy_s)
        progress = LayerProgress(env, [moved] * n_blocks, clock(t0 + engine_s))
        self._frames[id(progress)] = (submitted, t0)  # for its first prefill (`_layered_prefill`)
        ready = progress.ready

        def wait_note(since: float) -> Measured:
            note = self.link.note()
            if note[0] == "error":
                raise note[1]
            stamp = note[3] if note[0] == "mark" else note[1]
            return Measured(note, since, max(0.0, stamp - since))

        def watch() -> None:
            since = t0 + (env.now - submitted) * factor  # the perf_counter of the clock's present
            env.run_on(self.notes, lambda: wait_note(since)).callbacks.append(arrived)

        def arrived(event) -> None:
            if not event.ok:
                return  # the failed event raises from the clock's step (the run fails with it)
            note = event.value.value
            if note[0] == "mark":
                _, blocks, landed_units, stamp = note
                at = clock(stamp)
                for b in blocks:
                    if at > ready[b]:
                        ready[b] = at
                if landed_units:
                    landed(load, [missing[i] for i in landed_units])
                watch()
                return
            _, stamp, read_s, nbytes, gbps = note
            progress.finish(clock(stamp))
            load_s = move_s + copy_s + read_s
            self.steps.append((self.gpu_id, "load", inst.model, 1, len(load.missing), 0,
                               submitted + engine_s / factor, env.wall_at(t0 + engine_s), load_s))
            self.loads.append((head.rid, self.gpu_id, inst.model, units, len(load.missing), nbytes,
                               load.moved_bytes, move_s, read_s, engine_s, engine_s + load_s, gbps, env.wall_at(t0),
                               len(copied), copied_bytes, copy_s))

        self.steps.append((self.gpu_id, "engine", inst.model, 1, 0, 0, submitted, env.wall_at(t0), engine_s))
        if copied or not missing:
            landed(load, copied)  # nothing to read, or copied: the backend still notes the end of its reads
        watch()
        return Started(engine_s, float("nan"), progress)

    # ------------------------------------------------------------ prefetch
    def prefetch_source(self, node: Node, key: Key) -> bool:
        """Any unit of the replay's checkpoints: it is read from its files on this device's thread."""
        return key in self.unit_model

    def prefetch_unit(self, key: Key, nbytes: int) -> tuple[simpy.Event, Callable[[], float | None]]:
        return prefetch_unit(self, key, nbytes)

    # ------------------------------------------------------------ KV
    def pool_reserved(self, inst: Instance, keys: Sequence[Key]) -> None:
        block = self.block_bytes[inst.model]
        free = self.pool_free.setdefault(inst.model, [])
        for key in keys:
            region = self.arena.lookup(key)
            free += [region.offset + i * block for i in range(region.size // block)]
        free.reverse()  # pop() hands out the lowest offsets first

    def kv_grown(self, inst: Instance, req: Request, keys: Sequence[Key], nbytes: int) -> None:
        block = self.block_bytes[inst.model]
        new: list[int] = []
        if keys:
            for key in keys:
                region = self.arena.lookup(key)
                new += [region.offset + i * block for i in range(region.size // block)]
        else:
            free = self.pool_free[inst.model]
            new = [free.pop() for _ in range(nbytes // block)]
        self.kv.setdefault(req.rid, []).extend(new)
        self._ops.append(("kv", req.rid, inst.model, new))
        if inst.stages is not None:
            pipelined.forward_kv(self, inst, self._ops[-1])

    def kv_freed(self, inst: Instance, req: Request) -> None:
        offsets = self.kv.pop(req.rid, [])
        self._ops.append(("free", req.rid))
        if inst.stages is not None:
            pipelined.forward_kv(self, inst, self._ops[-1])
        if inst.pool is not None and offsets:
            self.pool_free[inst.model] += offsets

    # ------------------------------------------------------------ forward passes
    def prefill(self, inst: Instance, batch: Sequence[Request]) -> tuple[simpy.Event, Callable[[], float]]:
        if inst.stages is not None:
            return pipelined.prefill(self, inst, batch)
        loading = inst.loading
        layered = loading is not None and not loading.consumed
        if layered:
            loading.consumed = True  # later prefills find every layer resident
        args = (self._take_ops(), inst.model, [(r.rid, self.prompts[r.rid]) for r in batch], layered)
        submitted = self.env.now
        if layered:
            start_submitted, start_t0 = self._frames.pop(id(loading))
            since = start_t0 + (submitted - start_submitted) * self.env.factor
            done = self.env.run_on(self.thread, lambda: self._layered_prefill(args, since))
        else:
            done = self.env.run_on(self.thread, lambda: self.link.call("prefill", *args))

        def finish() -> float:
            m: Measured = done.value
            lengths = m.value
            kind = "prefill"
            if layered:  # its time includes waits for landings: not a prefill step the time model fits
                kind = "prefill-layered"
                lengths, starts, finishes = lengths
                self._computed(inst, sum(lengths), loading, start_submitted, start_t0, starts, finishes)
            self.steps.append((self.gpu_id, kind, inst.model, len(batch), sum(lengths), max(lengths),
                               submitted, self.env.wall_at(m.t0), m.seconds))
            return m.seconds

        return done, finish

    def _layered_prefill(self, args: tuple, since: float) -> Measured:
        """The first prefill of a layered start, on the device's thread: the backend's pass, each block's
        measured compute placed by `pipeline` after its measured landing and the block before it, from
        `since` (the perf_counter that the clock's submission time stands for in the landings' frame). The
        lifecycle's bookkeeping between the start and this command is charged to nobody on the clock, as
        everywhere in a replay, while the reads went on in real time: placing the measured computes
        from the submission keeps the landings and the computes on one timeline. Value: (lengths, block
        starts, finishes) as perf_counter readings; seconds to the last block's end (or the last
        landing, if later)."""
        m: Measured = self.link.call("prefill", *args)
        lengths, starts, finishes, ready, end = m.value
        s, f = pipeline(ready, [b - a for a, b in zip(starts, finishes)], since)
        stop = max(f[-1], end) if f else end
        return Measured((lengths, s, f), since, stop - since)

    def _computed(self, inst: Instance, tokens: int, loading: LayerProgress, submitted: float, t0: float,
                  starts: list[float], finishes: list[float]) -> None:
        """The first prefill's measured layer spans, as times on the clock, to the progress and the layers
        table (once its load has finished: the note of the last landing may come after the prefill)."""
        factor = self.env.factor
        s = [submitted + (p - t0) / factor for p in starts]
        f = [submitted + (p - t0) / factor for p in finishes]

        def record(_event: object = None) -> None:
            loading.computed(s, f)
            rid = loading.head.rid if loading.head is not None else -1
            for b, (start, finish, ready) in enumerate(zip(s, f, loading.ready)):
                self.layers.append((self.gpu_id, inst.model, rid, tokens, b, ready, start, finish,
                                    loading.load_start, loading.load_end))

        if loading.finished:
            record()
        else:
            loading.done.callbacks.append(record)

    def decode(self, inst: Instance, running: Sequence[Request], horizon: float, kv_tokens: float,
               wake: object) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
        if horizon < 1:  # a request is at a KV growth point or done: nothing to run
            return self.env.timeout(0.0), lambda: (0.0, 0.0)
        if inst.stages is not None:
            return pipelined.decode(self, inst, running, kv_tokens)
        args = (self._take_ops(), inst.model, [r.rid for r in running])
        n = len(running)
        submitted = self.env.now
        done = self.env.run_on(self.thread, lambda: self.link.call("decode", *args))

        def finish() -> tuple[float, float]:
            m: Measured = done.value
            self.steps.append((self.gpu_id, "decode", inst.model, n, n, int(kv_tokens), submitted,
                               self.env.wall_at(m.t0), m.seconds))
            return m.seconds, 1.0

        return done, finish

    # ------------------------------------------------------------ pipelines
    def load_units(self, load: RankLoad) -> simpy.Event:
        return pipelined.load_units(self, load)

    def consolidate(self, inst: Instance, move_s: float) -> tuple[simpy.Event, Callable[[], float]]:
        return pipelined.consolidate(self, inst)

    # ------------------------------------------------------------ the rest
    def end_instance(self, inst: Instance) -> None:
        self._ops.append(("end", inst.model))
        self.pool_free.pop(inst.model, None)

    def sampled(self, now: float) -> None:
        r = read_memory(self.device)  # NVML: the device as a whole, whichever process holds it
        # torch's counters are per process: in process mode the backend's (its buffer), read at start
        allocated, reserved = self._torch_memory if self.link.process else (r.torch_allocated, r.torch_reserved)
        self.memory.append((now, self.gpu_id, r.device, r.source, r.total_bytes, r.used_bytes, r.free_bytes,
                            allocated, reserved))

    def check(self) -> None:
        """The arena's books are consistent, and nothing the lifecycle ended is still bound (call after
        `close`)."""
        self.arena.check_invariants()
        left = self._left
        if left is None:
            raise AssertionError(f"gpu {self.gpu_id}: check before close")
        if self.kv or left["kv"] or left["seqs"] or left["engines"] or not left["buffer_ok"]:
            raise AssertionError(f"gpu {self.gpu_id}: {left['kv']} KV bindings, {left['seqs']} sequences and "
                                 f"{left['engines']} engines left after the run")

    def close(self) -> None:
        """Hand the last bindings over, collect what the backend generated, stop its thread and process."""
        if self._closed:
            return
        self._closed = True
        try:
            self._left = self.thread.submit(self.link.call, "finish", self._take_ops()).result()
            self.tokens = self._left["tokens"]
        finally:
            self.thread.shutdown(wait=True)
            if self.notes is not None:
                self.notes.shutdown(wait=False, cancel_futures=True)
            self.link.close()
