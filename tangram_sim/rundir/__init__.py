"""Run directories: the folder `tangram-sim run` (and the real replay) write, made crash-safe.

Layout of DIR:

- `config.yaml`: the resolved experiment, written when the run starts;
- `run.json`: the run record. Written as "running" before anything else changes in DIR and rewritten
  last as "complete", "failed" or "interrupted", so a folder whose record is not "complete" is never
  mistaken for a finished run (`require_complete`, used by `plot`, `compare` and the report);
- `jobs/p0002-s001/`: one finished (point, system) job: `job.json` (summary row, timing, config hash)
  and one `<frame>.parquet` per result frame. A job folder is written under a temporary name and
  renamed, so it is either whole or absent; `--resume` keeps the ones whose config hash matches.
  The folder goes away when the run completes (the combined files hold everything);
- `summary.csv`, `timings.csv`, `<frame>.parquet` (requests, timeline, memory, loads, ...): combined
  from the job folders in (point, system) order at the end, each written atomically.

Usage (the runner; the real replay does the same with its own frames):

    writer = RunWriter(out_dir, resolved_config, kind="run", resume=..., force=...)
    done = writer.check(keys)          # read-only: may this folder be used? which jobs are stored?
    writer.open()                      # clear what must go, write config.yaml and run.json("running")
    writer.write_job(key, row, {"requests": df, ...}, timing={...})   # as each job finishes
    writer.fail_job(key, "tangram", "point 2 (x=24)", "model ... needs ...")
    summary = writer.combine()         # summary.csv, timings.csv, <frame>.parquet
    writer.add_files(render(out_dir))  # anything else the caller wrote
    record = writer.close(meta={...})  # run.json, last
"""


from tangram_sim.rundir.checks import check_out_dir
from tangram_sim.rundir.files import atomic_write, concat_parquet
from tangram_sim.rundir.records import (
    FORMAT,
    JOBS_DIR,
    RECORD,
    JobFailure,
    JobKey,
    JobPart,
    RunDirError,
    RunFailed,
    RunRecord,
    adopt_legacy,
    config_hash,
    read_record,
    require_complete,
)
from tangram_sim.rundir.writer import RunWriter

__all__ = [
    "FORMAT", "JOBS_DIR", "RECORD", "JobFailure", "JobKey", "JobPart", "RunDirError", "RunFailed", "RunRecord",
    "RunWriter", "adopt_legacy", "atomic_write", "check_out_dir", "concat_parquet", "config_hash", "read_record", "require_complete",
]
