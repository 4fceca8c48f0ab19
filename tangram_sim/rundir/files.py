"""Plain file operations of a run folder: atomic writes, removal, checksums, Parquet concatenation."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp) on a temporary name beside `path`, then rename it into place.

    An interrupted write leaves only a dot-named temporary, never a truncated file under the real name.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def concat_parquet(paths: Sequence[Path], out: Path) -> None:
    """The Parquet files `paths` one after the other in `out`, one row group in memory at a time.

    A run's jobs each store their requests and timeline; concatenating them as DataFrames held every
    job's rows at once plus the copy `concat` makes (2 M requests in 8 jobs: 762 MiB above the imports,
    against 238 MiB here, on the development VM).
    Schemas are unified as `pd.concat` would: a column that is all null in one job takes its type from
    the others, a column one job lacks is null there; the first file's pandas metadata is kept.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in paths]
    schema = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    schema = schema.with_metadata(schemas[0].metadata)
    with pq.ParquetWriter(out, schema) as writer:
        for path in paths:
            source = pq.ParquetFile(path)
            for i in range(source.num_row_groups):
                table = source.read_row_group(i)
                columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
                           else pa.nulls(table.num_rows, f.type) for f in schema]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)



def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

