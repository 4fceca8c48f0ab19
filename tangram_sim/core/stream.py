"""Finished requests written to Parquet in batches, so a long run does not keep one record per request.

`RequestStream` is a `Cluster.on_finished` sink: each request is checked (an outcome, a reason for a
rejection, loaded + reused = needed bytes, cold or warm) and turned into a row of REQUEST_COLUMNS as
it finishes; every `batch` rows go to the file. Rows are in the order requests finished, not by `rid`.
The run's summary is computed afterwards from the file's numeric columns, sorted by `rid`, with the
same `summarize` as an in-memory run, so the two give the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tangram_sim.core.metrics import REQUEST_COLUMNS, accounting_problems, request_row, summarize
from tangram_sim.core.records import ModelEntry, Request
from tangram_sim.core.slo import Slo

# what `summarize` reads, both metric families and their bounds (the rest of the table stays on disk)
SUMMARY_COLUMNS = ["rid", "arrival_s", "model", "output_tokens", "gpu", "outcome", "cold", "ttft_s", "load_s",
                   "overlap_s", "queue_s", "e2e_s", "bytes_needed", "bytes_loaded", "bytes_reused", "bytes_evicted",
                   "bytes_extra_evicted", "waited_for_kv_s", "preemptions"]


class RequestStream:
    """Sink of finished requests (see module docstring); `close` before reading the file."""

    def __init__(self, path: str | Path, batch: int = 50_000) -> None:
        self.path = Path(path)
        self.batch = batch  # rows per write
        self.rows: list[tuple] = []  # not yet written
        self.count = 0  # requests finished so far
        self.problems: list[str] = []  # accounting problems found (a few are enough to fail the run)
        self._writer: pq.ParquetWriter | None = None

    def __call__(self, req: Request) -> None:
        self.rows.append(request_row(req))
        self.count += 1
        if len(self.problems) < 6:
            self.problems += accounting_problems([req], 1)
        if len(self.rows) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pandas(pd.DataFrame(self.rows, columns=REQUEST_COLUMNS), preserve_index=False)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)
        self.rows = []

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        elif not self.path.exists():  # no request at all: an empty table with the columns
            pd.DataFrame(columns=REQUEST_COLUMNS).to_parquet(self.path, index=False)

    def summary(self, gpu_busy_s: float, compaction_bytes: int,
                entries: Mapping[str, ModelEntry] | None = None,
                prefetch: Mapping[str, int] | None = None, *, slo: Slo | None = None,
                gpu_held_s: float = 0.0) -> dict[str, Any]:
        """`summarize` over the written requests, in `rid` order (model names read as categories)."""
        frame = pd.read_parquet(self.path, columns=SUMMARY_COLUMNS, read_dictionary=["model"])
        frame = frame.sort_values("rid", kind="stable")
        return summarize(frame.reset_index(drop=True), gpu_busy_s, compaction_bytes, entries, prefetch,
                         slo=slo, gpu_held_s=gpu_held_s)
