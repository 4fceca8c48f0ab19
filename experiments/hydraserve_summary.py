"""The HydraServe reproduction's headline figures from a run of experiments/hydraserve-azure-functions.yaml.

    python experiments/hydraserve_summary.py [results/hydraserve-azure-functions]

Per sweep point (CV, rate) and system: the mean cold start (`load_s + startup_s` of the requests that
started an instance), how many times faster hydraserve's is, and the TTFT SLO attainment with
hydraserve's over it. HydraServe's paper reports cold starts 1.7-4.7x faster and TTFT SLO attainment
1.43-1.74x higher than ServerlessLLM and a serverless vLLM (results/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

SYSTEM = "hydraserve"


def table(run: Path) -> pd.DataFrame:
    """One row per (point, baseline system) with the figures above."""
    summary = pd.read_csv(run / "summary.csv")
    requests = pd.read_parquet(run / "requests.parquet")
    cold = requests[requests["cold"]].assign(cold_start_s=lambda d: d["load_s"] + d["startup_s"])
    start = cold.groupby(["point", "system"])["cold_start_s"].mean()
    per = summary.set_index(["point", "system"])
    rows = []
    for (point, system), row in per.iterrows():
        if system == SYSTEM:
            continue
        mine = per.loc[(point, SYSTEM)]
        rows.append({
            "cv": row["trace.cv"], "rate": row["trace.rate"], "baseline": system,
            "cold_start_s": start[(point, system)], "hydraserve_cold_start_s": start[(point, SYSTEM)],
            "cold_start_speedup": start[(point, system)] / start[(point, SYSTEM)],
            "ttft_slo": row["ttft_slo_attainment"], "hydraserve_ttft_slo": mine["ttft_slo_attainment"],
            "ttft_slo_gain": mine["ttft_slo_attainment"] / row["ttft_slo_attainment"],
        })
    return pd.DataFrame(rows)


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "results/hydraserve-azure-functions")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(table(run).to_string(index=False))


if __name__ == "__main__":
    main()
