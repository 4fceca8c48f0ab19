"""The owner of a run folder: a lock file holding the writer's pid and host, taken atomically.

Two commands writing one folder at once would mix their files (one's config.yaml, the other's
summary.csv, both their requests) and both end "complete". The first to create `DIR/.tangram-lock`
(O_CREAT | O_EXCL: one wins, on every local file system) owns the folder until it releases it; the
others are refused in one line naming the owner. A lock left by a process that died (kill -9, a
crash) is stale: on the same host a pid that no longer runs is detected and the lock taken over; a
lock from another host is never guessed about, the message says how to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from tangram_sim.errors import TangramError

__all__ = ["LOCK_NAME", "FolderBusy", "RunLock", "lock_owner"]

LOCK_NAME = ".tangram-lock"


class FolderBusy(TangramError):
    """Another live process writes this folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: it exists
        return True
    except OSError:
        return False
    return True


def lock_owner(folder: Path | str) -> dict[str, Any] | None:
    """The owner recorded in a folder's lock if that owner may still be writing, else None (no lock, or
    a stale one of a process of this host that has ended)."""
    path = Path(folder) / LOCK_NAME
    try:
        data = json.loads(path.read_text())
        pid, host = int(data["pid"]), str(data["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):  # half written by a writer that died at once
        if time.time() - _mtime(path) < 5:
            return {"pid": "?", "host": "?", "started": "just now", "command": "?"}
        return None
    if host == socket.gethostname() and (pid == os.getpid() and data.get("token") != _TOKEN or not _alive(pid)):
        return None
    return data


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


_TOKEN = f"{os.getpid()}-{time.time_ns()}"  # this process's locks (a pid can be reused after a reboot)


def _describe(owner: dict[str, Any]) -> str:
    command = str(owner.get("command") or "")
    command = command if len(command) <= 80 else command[:77] + "..."
    return (f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"
            + (f": {command}" if command else ""))


class RunLock:
    """`with RunLock(folder, "tangram-sim run ..."):` or acquire()/release()."""

    def __init__(self, folder: Path | str, command: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.held = False

    def check(self) -> None:
        """Refuse (FolderBusy) now if another live process holds the folder; takes nothing."""
        owner = lock_owner(self.folder)
        if owner is not None and not self.held:
            raise self._busy(owner)

    def _busy(self, owner: dict[str, Any]) -> FolderBusy:
        remote = owner.get("host") != socket.gethostname()
        how = (f"if that process is gone, delete {self.path}" if remote
               else "wait for it to finish, or pick another --out")
        return FolderBusy(f"{self.folder}: being written by another process ({_describe(owner)}); {how}")

    def acquire(self) -> None:
        """Create the lock file atomically; take over a stale one; FolderBusy if it is held."""
        if self.held:
            return
        data = {"pid": os.getpid(), "host": socket.gethostname(), "token": _TOKEN,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = lock_owner(self.folder)
                if owner is not None:
                    raise self._busy(owner) from None
                self._remove_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(data) + "\n")
            self.held = True
            return
        raise FolderBusy(f"{self.folder}: another process keeps taking its lock ({self.path}); pick another --out")

    def _remove_stale(self) -> None:
        # Renamed first, so two processes taking over the same stale lock cannot both delete a fresh one.
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            data = json.loads(aside.read_text())
            fresh = data.get("token") != _TOKEN and lock_owner_data_alive(data)
        except (OSError, ValueError, TypeError):
            fresh = False
        if fresh:  # lost a race: someone took the lock between our read and the rename; put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            data = json.loads(self.path.read_text())
            if data.get("token") == _TOKEN and data.get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_owner_data_alive(data: dict[str, Any]) -> bool:
    """Whether the owner a lock's content names may still run (another host: assumed so)."""
    try:
        pid, host = int(data["pid"]), str(data["host"])
    except (KeyError, TypeError, ValueError):
        return False
    return host != socket.gethostname() or _alive(pid)
