"""How a `RealDevice` reaches its backend (`real.backend.DeviceBackend`): in this process, or in a child
process of its own, pinned to its own cores with its own torch threads, as serving stacks run one
process per GPU, so that two arenas of one host do not share an interpreter lock and the lifecycle's
bookkeeping does not run between a device's kernels.

Commands go one at a time from the device's thread and are answered in order. The backend's notes (an
execute-while-load start's landings, `real.landing`) come on a channel of their own: a queue in this
process, a one-way pipe from a child.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from typing import Any

import torch

from tangram_sim.real.backend import BackendSpec, DeviceBackend

__all__ = ["DeviceLink", "core_sets"]


def core_sets(n: int, threads: int | None) -> list[tuple[int, ...]]:
    """CPUs for `n` device processes: each its own `threads` (default: an equal share), wrapping
    around when there are fewer CPUs than asked for."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    each = threads or max(1, len(cpus) // max(1, n))
    return [tuple(cpus[(i * each + j) % len(cpus)] for j in range(each)) for i in range(n)]


def _serve(conn: Any, spec: BackendSpec, notes: Any) -> None:
    """A device process: build the backend, then answer commands until the pipe closes (the parent
    ended it, or died: a child never outlives its lifecycle)."""
    if spec.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cores)
    if spec.threads or spec.cores:
        torch.set_num_threads(spec.threads or len(spec.cores))
    import gc

    gc.disable()  # no collection pause inside a timed step; freed with the process
    try:
        backend = DeviceBackend(spec, notes.send)
    except BaseException as exc:  # noqa: BLE001 - delivered to the parent, which raises it
        conn.send((False, exc))
        return
    conn.send((True, None))
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if name == "close":
            backend.close()
            conn.send((True, None))
            break
        try:
            conn.send((True, getattr(backend, name)(*args)))
        except BaseException as exc:  # noqa: BLE001
            try:
                conn.send((False, exc))
            except Exception:  # an exception that does not pickle: its text
                conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


class DeviceLink:
    """Calls into one backend: in this process, or in a child process of its own (`process=True`).

    Calls are made from one thread at a time (the device's thread), so they are answered in order.
    The backend's notes (a layered start's landings, `real.landing`) come on a channel of their own,
    read with `note` from one other thread: a queue here, a one-way pipe from a child process."""

    def __init__(self, spec: BackendSpec, process: bool) -> None:
        self.process = process
        self._proc = None
        if not process:
            self._queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
            self._backend: DeviceBackend | None = DeviceBackend(spec, self._queue.put)
            return
        self._backend = None
        ctx = mp.get_context("spawn")  # never fork a process that holds torch's threads
        self._conn, child = ctx.Pipe()
        self._notes, notes_child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_serve, args=(child, spec, notes_child), daemon=True,
                                 name=f"tangram-{spec.device}")
        self._proc.start()
        child.close()
        notes_child.close()
        self._answer()

    def note(self) -> tuple:
        """The backend's next note (blocks until there is one)."""
        if not self.process:
            return self._queue.get()
        try:
            return self._notes.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            raise RuntimeError(f"the device process ended (exit code {code})") from None

    def _answer(self) -> Any:
        try:
            ok, value = self._conn.recv()
        except EOFError:
            code = self._proc.exitcode if self._proc is not None else None
            raise RuntimeError(f"the device process ended (exit code {code})") from None
        if not ok:
            raise value
        return value

    def call(self, name: str, *args: Any) -> Any:
        if self._backend is not None:
            return getattr(self._backend, name)(*args)
        self._conn.send((name, args))
        return self._answer()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
            self._queue.put(("error", RuntimeError("the device was closed")))  # frees a reader of `note`
            return
        if self._proc is None:
            return
        try:
            if self._proc.is_alive():
                self._conn.send(("close", ()))
                self._answer()
        except (OSError, EOFError, RuntimeError):
            pass
        self._conn.close()
        self._notes.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
        self._proc = None
