"""The Medusa reproduction's headline figures from a run of experiments/medusa-sharegpt.yaml.

    python experiments/medusa_summary.py [results/medusa-sharegpt]

Per rate and system, over the ten models (one run each): the mean cold start (weights plus the other
stages, `load_s + startup_s` of the requests that started an instance), its change against
serverless-vllm, the same less the engine process's init (`loading_change`: Medusa's "loading"
excludes it; for the systems with vLLM's stages), the mean over the models of each run's p99 TTFT and its change, and the p99 TTFT of
all the rate's requests together. Medusa's paper reports loading -42.5% and tail TTFT -53% against its
vLLM baseline (results/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import yaml

from tangram_sim.sim.systems import make_system

BASELINE = "serverless-vllm"
PROCESS_INIT_S = 0.652  # vLLM's engine process init in the artifact (init_phase1), outside its "loading"


def table(run: Path) -> pd.DataFrame:
    """One row per (rate, system) with the figures above."""
    summary = pd.read_csv(run / "summary.csv")
    requests = pd.read_parquet(run / "requests.parquet")
    rate = summary.drop_duplicates("point").set_index("point")["trace.rate"]
    requests["rate"] = requests["point"].map(rate)
    cold = requests[requests["cold"]].assign(cold_start_s=lambda d: d["load_s"] + d["startup_s"])
    config = yaml.safe_load((run / "config.yaml").read_text())
    vllm_stages = {s["name"] for s in config["systems"]
                   if make_system(s["name"], s["preset"], s.get("overrides")).startup.get("preset") == "vllm-medusa-a100"}
    per_run = summary.assign(rate=summary["trace.rate"]).set_index(["rate", "point", "system"])
    rows = []
    for (r, system), group in per_run.groupby(level=["rate", "system"]):
        base = per_run.xs((r, BASELINE), level=("rate", "system"))
        mine = group.droplevel(["rate", "system"])
        cs = cold[(cold["rate"] == r) & (cold["system"] == system)].groupby("point")["cold_start_s"].mean()
        cs_base = cold[(cold["rate"] == r) & (cold["system"] == BASELINE)].groupby("point")["cold_start_s"].mean()
        ttft = requests[(requests["rate"] == r) & (requests["system"] == system)]["ttft_s"]
        rows.append({
            "rate": r, "system": system,
            "cold_start_s": cs.mean(), "cold_start_change": (cs / cs_base - 1).mean(),
            "loading_change": ((cs - PROCESS_INIT_S) / (cs_base - PROCESS_INIT_S) - 1).mean()
            if system in vllm_stages else float("nan"),  # only where the engine's stages are vLLM's
            "p99_ttft_s": mine["p99_ttft_s"].mean(),
            "p99_ttft_change": (mine["p99_ttft_s"] / base["p99_ttft_s"] - 1).mean(),
            "pooled_p99_ttft_s": ttft.quantile(0.99),
            "ttft_slo_attainment": mine["ttft_slo_attainment"].mean(),
            "gpu_seconds_per_request": mine["gpu_seconds_per_request"].mean(),
        })
    return pd.DataFrame(rows)


def main(argv: list[str]) -> None:
    run = Path(argv[0] if argv else "results/medusa-sharegpt")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table(run).round(3).to_string(index=False))


if __name__ == "__main__":
    main(sys.argv[1:])
