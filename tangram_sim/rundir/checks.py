"""Checks before a run folder is used: can it be made and written, may --force empty it, do stored jobs
read back."""

from __future__ import annotations

import os
from pathlib import Path

from tangram_sim.rundir.files import _sha256
from tangram_sim.rundir.lock import LOCK_NAME
from tangram_sim.rundir.records import PATH_SLACK, JobPart, RunDirError


def _os_error(path: Path, exc: OSError) -> RunDirError:
    return RunDirError(f"{path}: cannot write ({exc.strerror or exc.__class__.__name__})")


# ------------------------------------------------------------------ checks
def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):  # False (not an error) for names that are too long
            return candidate
    return Path(path.anchor or ".")


def check_out_dir(path: Path | str, option: str = "--out") -> None:
    """Refuse, in one line and before any work, an output folder that cannot be made or written."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as exc:  # a byte the shell passed that is not UTF-8 (pyarrow needs UTF-8 names)
        bad = os.fsencode(str(path)[exc.start:exc.end])
        raise RunDirError(f"{option}: the folder name holds a byte that is not UTF-8 text (0x{bad[0]:02x} at "
                          f"character {exc.start}); choose a UTF-8 name") from None
    absolute = Path(os.path.abspath(path))
    existing = _nearest_existing(absolute)
    if existing == absolute:
        if not absolute.is_dir():
            raise RunDirError(f"{option} {path}: exists and is a file; expected a folder")
        if not os.access(absolute, os.W_OK | os.X_OK):
            raise RunDirError(f"{option} {path}: folder is not writable")
        return
    if not existing.is_dir():
        raise RunDirError(f"{option} {path}: {existing} is a file, so no folder can be made under it")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):  # not reported by this file system: the usual Linux limits
        name_max, path_max = 255, 4096
    for part in absolute.parts[len(existing.parts):]:
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise RunDirError(f"{option}: folder name '{shown}' is {size} bytes; the file system allows "
                              f"{name_max}")
    if len(os.fsencode(str(absolute))) + PATH_SLACK > path_max:
        raise RunDirError(f"{option} {path}: path is too long for the files of a run ({path_max} bytes at most)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{option} {path}: cannot create it, {existing} is not writable")



def _contents(folder: Path) -> list[Path]:
    """What a folder holds, leaving out a lock file (a stale lock alone is an empty folder)."""
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]



def _damage(part: JobPart) -> str | None:
    """Why a stored job's frames do not read back (None when they do): checksums written with the job,
    else the Parquet footer."""
    digests = part.info.get("_sha256") or {}
    for name in part.frames:
        path = part.path / f"{name}.parquet"
        try:
            if name in digests:
                if _sha256(path) != digests[name]:
                    return f"{name}.parquet changed since it was written"
            else:
                import pyarrow.parquet as pq

                pq.read_metadata(path)
        except Exception as exc:  # OSError, ArrowInvalid: damaged either way
            return f"{name}.parquet does not read back ({exc.__class__.__name__})"
    return None


def _guard_force(run_dir: Path) -> None:
    """--force empties the folder: never the current folder, one holding it, home, or a root."""
    target = run_dir.resolve()
    cwd = Path.cwd().resolve()
    reason = ("is the current folder" if target == cwd else "holds the current folder" if target in cwd.parents
              else "is the home folder" if target == Path.home().resolve()
              else "is a root folder" if target.parent == target else None)
    if reason:
        raise RunDirError(f"--force would empty {run_dir}, which {reason}; choose a dedicated --out")


