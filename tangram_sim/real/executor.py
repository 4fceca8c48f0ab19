"""`RealGpu`: one device whose memory is driven by the same policies the simulator runs.

The lifecycle mirrors `tangram_sim.sim.cluster` step for step, so a trace replay can call it where
the simulator advances time: `start_instance` records the access with the retention policy, asks the
packing policy for a plan over the missing reuse units (evicting in retention order only when free
bytes are short), applies it with `execute_plan` (compaction moves are real device copies), pins the
reused units and loads the missing ones from the checkpoint; `end_instance` unpins them, so retained
units stay resident and reusable (or are freed with `none` retention). KV blocks come from the same
arena through `plan_kv` / `execute_kv_plan`: on demand per sequence (ElasticKV) or one static pool
reserved at instance start (the vLLM-style baseline).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tangram_sim.arena import Key, State
from tangram_sim.errors import CapacityError, ConfigError, ModelError
from tangram_sim.models.units import DEFAULT_MIN_UNIT_BYTES, GRANULARITIES
from tangram_sim.policies.kv import KV, KvPlan, KvPolicy, kv_block_bytes, plan_kv
from tangram_sim.policies.packing import PACKING, PackingPolicy
from tangram_sim.policies.retention import RETENTION, RetentionPolicy
from tangram_sim.real.checkpoints import torch_dtype
from tangram_sim.real.device_arena import MIN_ALIGNMENT, DeviceArena
from tangram_sim.real.engine import CausalLM, EngineConfig, PagedKv, build_engine, greedy
from tangram_sim.real.loader import (
    DEFAULT_CHUNK_BYTES,
    Checkpoint,
    Loader,
    LoadResult,
    Segment,
    UnitLayout,
    device_digest,
    file_digest,
    open_checkpoint,
)
from tangram_sim.real.memory import MemoryReading, read_memory

__all__ = ["Generation", "LoadStats", "RealGpu", "Step", "VerifyResult", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a one-line ConfigError (e.g. `cuda` on a machine without CUDA)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is unknown, expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available here, expected --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r}: expected cpu or cuda[:N]")
    return dev


@dataclass(slots=True)
class LoadStats:
    model: str  # checkpoint (folder) name
    needed_bytes: int  # weight bytes of the model
    loaded_bytes: int  # read from the checkpoint into the arena (missing units)
    reused_bytes: int  # already resident: retained, or shared with another model
    moved_bytes: int  # copied device-to-device by compaction
    evicted_bytes: int  # retained bytes dropped to make room (for the units and a static KV pool)
    units: int  # reuse units of the model
    units_loaded: int  # of which were missing
    plan_s: float  # packing policy
    move_s: float  # evictions + compaction copies (synchronised)
    load_s: float  # reads + host->device copies (synchronised)
    verify_s: float  # checksum comparison with the files (0 when off)
    total_s: float  # the whole start_instance
    read: LoadResult | None = None  # loader details; None when nothing was missing

    @property
    def load_gbps(self) -> float:
        return self.loaded_bytes / self.load_s / 1e9 if self.load_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["load_gbps"] = self.load_gbps
        return out


@dataclass(slots=True)
class VerifyResult:
    tensors: int  # tensors compared
    nbytes: int  # bytes compared
    seconds: float  # wall time


@dataclass(slots=True)
class Step:
    rids: list[int]  # sequences in this forward pass
    tokens: list[int]  # the greedy token produced for each
    logits: torch.Tensor  # fp32 [B, S', V] (last position only unless asked otherwise)
    seconds: float  # wall time of the forward pass (synchronised)


@dataclass(slots=True)
class Generation:
    rid: int  # the sequence
    tokens: list[int]  # first token (prefill), then one per decode step
    ttft_s: float  # prefill time: the first token
    decode_s: float  # all decode steps


@dataclass(slots=True)
class _Model:
    """A checkpoint known to this device: its units and where each of their tensors goes."""

    ckpt: Checkpoint  # headers, locations, config
    layouts: tuple[UnitLayout, ...]  # units in inventory order
    keys: tuple[str, ...]  # unit keys, same order
    by_key: dict[str, UnitLayout]  # key -> layout

    @property
    def name(self) -> str:
        return self.ckpt.name


@dataclass(slots=True)
class _Instance:
    model: _Model  # what runs
    serial: int  # distinguishes pool keys of successive instances
    engine: CausalLM | None = None  # built on first use (loading alone needs none)
    pool_keys: list[Key] = field(default_factory=list)  # static KV reservation regions
    free_blocks: list[int] | None = None  # static pool: free block offsets; None = ElasticKV
    rids: set[int] = field(default_factory=set)  # its live sequences


@dataclass(slots=True)
class _Seq:
    rid: int  # request id
    model: str  # whose instance runs it
    tokens: list[int]  # prompt + generated tokens
    cache: PagedKv  # block views
    length: int = 0  # tokens whose K/V are in the cache
    kv_keys: list[Key] = field(default_factory=list)  # ElasticKV regions
    blocks: list[int] = field(default_factory=list)  # block offsets (static pool)


class RealGpu:
    """One device arena + loader + engine, driven by the shared policies (see module docstring).

    `capacity` defaults to 90% of the free device memory on CUDA and must be given on the CPU.
    Policies are registry names or ready policy objects.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        capacity: int | None = None,
        granularity: str = "group",
        retention: str | RetentionPolicy = "tangram",
        packing: str | PackingPolicy = "pbp",
        kv: str | KvPolicy = "elastic",
        *,
        min_unit_bytes: int = DEFAULT_MIN_UNIT_BYTES,
        unit_divisor: int = 0,
        readers: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        staging: str = "auto",
        alignment: int = MIN_ALIGNMENT,
        verify: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = resolve_device(device)
        if granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity {granularity!r} is unknown, expected one of {', '.join(GRANULARITIES)}"
            )
        if capacity is None:
            if self.device.type != "cuda":
                raise ConfigError("arena capacity is required on the CPU, expected e.g. --capacity-gb 2")
            capacity = int(0.9 * torch.cuda.mem_get_info(self.device)[0])
        self.granularity = granularity
        self.min_unit_bytes = min_unit_bytes
        self.unit_divisor = unit_divisor  # > 0: the Tangram store's units (see models.units)
        self.retention = RETENTION.create(retention) if isinstance(retention, str) else retention
        self.packing = PACKING.create(packing) if isinstance(packing, str) else packing
        self.kv = KV.create(kv) if isinstance(kv, str) else kv
        self.verify = verify
        self.dev = DeviceArena(capacity, self.device, alignment)
        self.arena = self.dev.arena
        self.loader = Loader(self.device, readers, chunk_bytes, staging)
        self.instances: dict[str, _Instance] = {}  # model -> active instance
        self.history: list[LoadStats] = []  # every start_instance, in order
        self._models: dict[str, _Model] = {}  # model -> what was opened
        self._key_owners: dict[Key, set[str]] = {}  # unit key -> models whose weights include it
        self._seqs: dict[int, _Seq] = {}
        self._next_rid = 0
        self._serial = 0
        self._clock = clock
        self._t0 = clock()

    # ------------------------------------------------------------ models
    def open(self, model: str | os.PathLike[str] | Checkpoint) -> _Model:
        """Read a checkpoint's headers and register its units (no bytes move)."""
        if isinstance(model, str) and model in self._models and not os.path.exists(model):
            return self._models[model]
        ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model)
        old = self._models.get(ckpt.name)
        if old is not None:
            if old.ckpt.path != ckpt.path:
                raise ConfigError(
                    f"{ckpt.path}: model name {ckpt.name!r} is already used by {old.ckpt.path}, "
                    "expected distinct checkpoint folder names"
                )
            if old.ckpt.spec == ckpt.spec:
                old.ckpt = ckpt
                return old
            if ckpt.name in self.instances:
                raise ConfigError(f"{ckpt.path}: changed on disk while its instance is active")
            for key in old.keys:
                self._key_owners.get(key, set()).discard(ckpt.name)
        layouts = ckpt.layouts(self.granularity, self.min_unit_bytes, self.unit_divisor)
        entry = _Model(
            ckpt, layouts, tuple(lay.unit.key for lay in layouts), {lay.unit.key: lay for lay in layouts}
        )
        for key in entry.keys:
            self._key_owners.setdefault(key, set()).add(ckpt.name)
            region = self.arena.lookup(key)
            if region is not None and ckpt.name not in region.owners:
                self.arena.add_owner(key, ckpt.name)
        self._models[ckpt.name] = entry
        return entry

    def _owners(self, key: Key) -> Iterable[str]:
        return self._key_owners[key]

    def _now(self, now: float | None) -> float:
        return self._clock() - self._t0 if now is None else now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------ instances
    def start_instance(
        self, model: str | os.PathLike[str] | Checkpoint, now: float | None = None
    ) -> LoadStats:
        """Make `model` resident and pinned: evict/move/load its missing units as the policies plan.

        On a read error everything placed for it is released and the reused units unpinned before the
        ModelError propagates, so the arena holds no half-loaded model.
        """
        t0 = time.perf_counter()
        entry = self.open(model)
        name = entry.name
        if name in self.instances:
            raise ConfigError(f"model {name!r} already has an active instance on {self.device}")
        now = self._now(now)
        arena = self.arena
        self.retention.record_access(name, entry.keys, now)
        missing: list[tuple[Key, int]] = []
        reused: list[Key] = []
        reused_bytes = 0
        for lay in entry.layouts:
            if arena.lookup(lay.unit.key) is None:
                missing.append((lay.unit.key, lay.nbytes))
            else:
                reused.append(lay.unit.key)
                reused_bytes += lay.unit.nbytes
        needed = sum(arena.align(n) for _, n in missing)
        plan = self.packing.plan(arena, missing, ()) if arena.free_bytes >= needed else None
        if plan is None:
            keep = set(reused)
            order = [k for k in self.retention.eviction_order(arena.evictable(), now) if k not in keep]
            plan = self.packing.plan(arena, missing, order)
        if plan is None:
            fixed = arena.bytes_in(State.KV) + sum(
                r.size for r in arena.regions() if r.state is State.RESIDENT and r.pin_count
            )
            raise CapacityError(
                f"model {name!r}: {needed} bytes of missing units do not fit the {arena.capacity}-byte arena "
                f"({fixed} bytes pinned or KV), expected a larger arena capacity or fewer active instances"
            )
        t_plan = time.perf_counter()
        for key in plan.evictions:
            self.retention.on_evict(key, now)
        self.dev.execute(plan, self._owners)
        self._sync()
        t_move = time.perf_counter()
        for key in reused:
            arena.pin(key)
        segments = [
            Segment(slot.path, slot.start, slot.nbytes, p.offset + slot.rel)
            for p in plan.placements
            for slot in entry.by_key[p.key].slots
        ]
        try:
            result = self.loader.load(self.dev.buffer, segments) if segments else None
        except BaseException:
            for p in plan.placements:
                arena.release(p.key)
            for key in reused:
                arena.unpin(key)
            raise
        for p in plan.placements:
            arena.finish_load(p.key)
            arena.pin(p.key)
        t_load = time.perf_counter()
        self._serial += 1
        inst = _Instance(entry, self._serial)
        self.instances[name] = inst
        verify_s = 0.0
        kv_evicted = 0
        try:
            if self.verify:
                verify_s = self.verify_model(name).seconds
        except BaseException:
            self.end_instance(name)
            for p in plan.placements:  # bytes that failed verification are not worth retaining
                region = arena.lookup(p.key)
                if region is not None and region.movable:
                    arena.evict(p.key)
            raise
        if not self.kv.on_demand:
            try:
                kv_evicted = self._reserve_static(inst, now)
            except BaseException:
                self.end_instance(name)
                raise
        stats = LoadStats(
            model=name,
            needed_bytes=entry.ckpt.spec.weight_bytes,
            loaded_bytes=sum(slot.nbytes for p in plan.placements for slot in entry.by_key[p.key].slots),
            reused_bytes=reused_bytes,
            moved_bytes=plan.moved_bytes,
            evicted_bytes=plan.evicted_bytes + kv_evicted,
            units=len(entry.keys),
            units_loaded=len(plan.placements),
            plan_s=t_plan - t0,
            move_s=t_move - t_plan,
            load_s=t_load - t_move,
            verify_s=verify_s,
            total_s=time.perf_counter() - t0,
            read=result,
        )
        self.history.append(stats)
        return stats

    def end_instance(self, model: str) -> None:
        """Finish its sequences, free its KV, unpin its units (kept resident unless retention is none)."""
        inst = self._instance(model)
        for rid in list(inst.rids):
            self.finish(rid)
        for key in inst.pool_keys:
            self.arena.release(key)
        inst.pool_keys.clear()
        inst.engine = None
        for key in inst.model.keys:
            region = self.arena.lookup(key)
            if region is None or region.pin_count == 0:
                continue
            self.arena.unpin(key)
            if not self.retention.retains and region.pin_count == 0:
                self.arena.evict(key)
        del self.instances[inst.model.name]

    def evict_all(self, now: float | None = None) -> int:
        """Drop every unpinned resident unit (e.g. between benchmark repeats); returns bytes."""
        now = self._now(now)
        freed = 0
        for key in [r.key for r in self.arena.evictable()]:
            self.retention.on_evict(key, now)
            freed += self.arena.evict(key)
        return freed

    def _instance(self, model: str) -> _Instance:
        inst = self.instances.get(model)
        if inst is None:
            active = ", ".join(self.instances) or "none"
            raise ConfigError(
                f"model {model!r} has no active instance (active: {active}), expected start_instance first"
            )
        return inst

    # ------------------------------------------------------------ weights
    def weights(self, model: str) -> dict[str, torch.Tensor]:
        """Tensor name -> typed view of the arena, for a resident model (all its units present)."""
        entry = self._models.get(model)
        if entry is None:
            raise ConfigError(f"model {model!r} was never opened on this device")
        spec = entry.ckpt.spec
        out: dict[str, torch.Tensor] = {}
        for lay in entry.layouts:
            region = self.arena.lookup(lay.unit.key)
            if region is None or region.state is not State.RESIDENT:
                raise ConfigError(f"model {model!r} is not fully resident (unit {lay.unit.key} missing)")
            for slot in lay.slots:
                t = spec.tensors[slot.index]
                out[t.name] = self.dev.tensor(region.offset + slot.rel, torch_dtype(t.dtype), t.shape)
        return out

    def verify_model(self, model: str) -> VerifyResult:
        """Every tensor of a resident model, compared by checksum with its bytes in the file.

        Reused tensors are checked like loaded ones: a unit shared with another checkpoint must hold
        exactly this checkpoint's bytes. A mismatch is a one-line ModelError.
        """
        t0 = time.perf_counter()
        self._sync()
        entry = self._models[model]
        n = total = 0
        for lay in entry.layouts:
            region = self.arena.lookup(lay.unit.key)
            if region is None or region.state is not State.RESIDENT:
                raise ConfigError(f"model {model!r} is not fully resident (unit {lay.unit.key} missing)")
            for slot in lay.slots:
                on_device = device_digest(self.dev.bytes_at(region.offset + slot.rel, slot.nbytes))
                in_file = file_digest(slot.path, slot.start, slot.nbytes)
                if on_device != in_file:
                    raise ModelError(
                        f"{slot.path}: tensor {slot.name!r} on {self.device} differs from the file "
                        f"(blake2b {on_device} != {in_file}), expected bit-identical bytes"
                    )
                n += 1
                total += slot.nbytes
        return VerifyResult(n, total, time.perf_counter() - t0)

    # ------------------------------------------------------------ KV
    def _block_bytes(self, inst: _Instance) -> int:
        """Bytes of one cross-layer KV block of the instance's model (the policy module's formula)."""
        return kv_block_bytes(inst.model.ckpt.spec.kv_bytes_per_token, self.kv.block_tokens)

    def _block(self, inst: _Instance) -> tuple[int, torch.dtype, tuple[int, ...], int]:
        """(block bytes, dtype, block view shape, tokens per block) of an instance's model."""
        spec = inst.model.ckpt.spec
        cfg = self.engine(inst.model.name).config
        shape = cfg.kv_block_shape(self.kv.block_tokens)
        nbytes = self._block_bytes(inst)
        dtype = torch_dtype(spec.dtype)
        view_bytes = dtype.itemsize
        for d in shape:
            view_bytes *= d
        if view_bytes != nbytes:
            raise ModelError(f"{spec.source}: KV block is {view_bytes} bytes but the spec says {nbytes}")
        return nbytes, dtype, shape, self.kv.block_tokens

    def _plan_kv(self, nbytes: int, block: int, now: float) -> KvPlan:
        plan = plan_kv(self.arena, nbytes, block, ())
        if plan.must_wait:
            plan = plan_kv(
                self.arena, nbytes, block, self.retention.eviction_order(self.arena.evictable(), now)
            )
        return plan

    def _reserve_static(self, inst: _Instance, now: float) -> int:
        """The vLLM-style baseline: one pool at instance start, sized as the simulator sizes it.

        Returns the bytes of retained units evicted for it."""
        if inst.model.ckpt.spec.kv_bytes_per_token <= 0:
            inst.free_blocks = []
            return 0
        block = self._block_bytes(inst)
        weights = inst.model.ckpt.spec.weight_bytes
        want = self.kv.reservation_bytes(self.arena.capacity, weights)
        if want < self.arena.capacity - weights - want:
            want = self.arena.capacity - weights
        want -= want % block
        plan = self._plan_kv(want, block, now)
        if plan.must_wait:  # fragmentation: take the whole blocks the holes hold
            fits = sum(r.size - r.size % block for r in self.arena.free_regions())
            plan = plan_kv(self.arena, fits, block, ())
        evicted = 0
        for key in plan.evictions:
            self.retention.on_evict(key, now)
            evicted += self.arena.lookup(key).size
        inst.pool_keys = self.dev.execute_kv(plan, ("pool", inst.model.name, inst.serial))
        inst.free_blocks = [off + i * block for off, n in plan.extents for i in range(n // block)]
        return evicted

    def _ensure_kv(self, inst: _Instance, seq: _Seq, tokens: int, now: float) -> None:
        block, dtype, shape, per_block = self._block(inst)
        need = -(-tokens // per_block) - len(seq.cache.blocks)
        if need <= 0:
            return
        if inst.free_blocks is not None:
            if len(inst.free_blocks) < need:
                raise CapacityError(
                    f"model {seq.model!r}: request {seq.rid} needs {need} more KV blocks, "
                    f"the static pool has {len(inst.free_blocks)} free (the request would wait)"
                )
            offsets = [inst.free_blocks.pop() for _ in range(need)]
            seq.blocks += offsets
        else:
            plan = self._plan_kv(need * block, block, now)
            if plan.must_wait:
                raise CapacityError(
                    f"model {seq.model!r}: request {seq.rid} needs {need * block} more KV bytes and "
                    "nothing is free or evictable (the request would wait)"
                )
            for key in plan.evictions:
                self.retention.on_evict(key, now)
            seq.kv_keys += self.dev.execute_kv(plan, ("kv", seq.rid), first_index=len(seq.kv_keys))
            offsets = [off + i * block for off, n in plan.extents for i in range(n // block)]
        seq.cache.blocks += [self.dev.tensor(off, dtype, shape) for off in offsets]

    # ------------------------------------------------------------ inference
    def engine(self, model: str) -> CausalLM:
        """The instance's decoder, bound to its arena views on first use."""
        inst = self._instance(model)
        if inst.engine is None:
            ckpt = inst.model.ckpt
            inst.engine = build_engine(
                EngineConfig.from_checkpoint(ckpt.spec, ckpt.config), self.weights(model), self.device
            )
        return inst.engine

    def prefill(
        self, model: str, prompt: Sequence[int], now: float | None = None, all_logits: bool = False
    ) -> Step:
        """Start a sequence: KV blocks for the prompt, one forward pass, the first token (greedy)."""
        inst = self._instance(model)
        engine = self.engine(model)
        vocab = engine.config.vocab
        if not prompt or any(not 0 <= int(t) < vocab for t in prompt):
            raise ConfigError(f"prompt must be a non-empty list of token ids in [0, {vocab}) for {model!r}")
        rid = self._next_rid
        self._next_rid += 1
        seq = _Seq(rid, model, [int(t) for t in prompt], PagedKv(self.kv.block_tokens))
        self._seqs[rid] = seq
        inst.rids.add(rid)
        try:
            self._ensure_kv(inst, seq, len(prompt), self._now(now))
        except BaseException:
            self.finish(rid)
            raise
        tokens = torch.tensor([seq.tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)[None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = engine(tokens, positions, [seq.cache], last_only=not all_logits)
        self._sync()
        seconds = time.perf_counter() - t0
        seq.length = len(prompt)
        token = greedy(logits)[0]
        seq.tokens.append(token)
        return Step([rid], [token], logits, seconds)

    def decode_step(self, rids: Sequence[int], now: float | None = None) -> Step:
        """One token for each sequence (one batched forward pass of their model)."""
        seqs = [self._seq(r) for r in rids]
        if not seqs:
            raise ConfigError("decode needs at least one sequence")
        model = seqs[0].model
        if any(s.model != model for s in seqs):
            raise ConfigError("decode batches sequences of one model only")
        inst = self._instance(model)
        engine = self.engine(model)
        now = self._now(now)
        for s in seqs:
            self._ensure_kv(inst, s, s.length + 1, now)
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.length] for s in seqs], dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = engine(tokens, positions, [s.cache for s in seqs])
        self._sync()
        seconds = time.perf_counter() - t0
        new = greedy(logits)
        for s, t in zip(seqs, new):
            s.length += 1
            s.tokens.append(t)
        return Step(list(rids), new, logits, seconds)

    def decode(
        self, rids: Sequence[int], steps: int, now: float | None = None
    ) -> tuple[dict[int, list[int]], float]:
        """`steps` decode steps; returns the new tokens per sequence and the seconds they took."""
        out: dict[int, list[int]] = {r: [] for r in rids}
        seconds = 0.0
        for _ in range(steps):
            step = self.decode_step(rids, now)
            seconds += step.seconds
            for r, t in zip(step.rids, step.tokens):
                out[r].append(t)
        return out, seconds

    def generate(
        self, model: str, prompt: Sequence[int], decode_tokens: int, keep: bool = False
    ) -> Generation:
        """Prefill (first token) then `decode_tokens` decode steps; frees the KV unless `keep`."""
        first = self.prefill(model, prompt)
        rid = first.rids[0]
        tokens, decode_s = self.decode([rid], decode_tokens)
        if not keep:
            self.finish(rid)
        return Generation(rid, [first.tokens[0], *tokens[rid]], first.seconds, decode_s)

    def finish(self, rid: int) -> None:
        """The request ended: its KV blocks go back (to the arena, or to the static pool)."""
        seq = self._seqs.pop(rid, None)
        if seq is None:
            return
        inst = self.instances.get(seq.model)
        for key in seq.kv_keys:
            self.arena.release(key)
        if inst is not None:
            inst.rids.discard(rid)
            if inst.free_blocks is not None:
                inst.free_blocks += seq.blocks
        seq.cache.blocks.clear()

    def _seq(self, rid: int) -> _Seq:
        seq = self._seqs.get(rid)
        if seq is None:
            raise ConfigError(f"request {rid} is not running on {self.device}")
        return seq

    # ------------------------------------------------------------ state
    def memory(self) -> MemoryReading:
        return read_memory(self.device)

    def usage(self) -> dict[str, Any]:
        """The arena as the policies see it (bytes per state, fragmentation, per-model bytes)."""
        a = self.arena
        return {
            "capacity": a.capacity,
            "free": a.free_bytes,
            "resident": a.bytes_in(State.RESIDENT),
            "loading": a.bytes_in(State.LOADING),
            "kv": a.bytes_in(State.KV),
            "largest_free": a.largest_free(),
            "fragmentation": a.fragmentation(),
            "regions": a.num_regions(),
            "models": a.resident_bytes_by_model(),
        }

    def check(self) -> None:
        """Arena invariants, plus: every active instance's units are resident and pinned."""
        self.dev.check()
        for name, inst in self.instances.items():
            for key in inst.model.keys:
                region = self.arena.lookup(key)
                if region is None or region.state is not State.RESIDENT or not region.pin_count:
                    raise AssertionError(f"active model {name!r} has unit {key} not resident and pinned")

    def close(self) -> None:
        """End every instance and free the staging buffers (the device buffer goes with the object)."""
        for name in list(self.instances):
            self.end_instance(name)
        self.loader.close()


def checkpoint_dirs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand each path: a checkpoint folder as is, a folder of checkpoint folders to its children."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any(p.glob("*.safetensors")):
            children = sorted(c for c in p.iterdir() if c.is_dir() and any(c.glob("*.safetensors")))
            if children:
                out += children
                continue
        out.append(p)
    return out
