#!/usr/bin/env bash
# Re-run every shipped experiment into results/<name>/ (reference outputs committed to the repo), then
# experiments/plus_seeds.py into results/plus-seeds/.
# replay-cpu*.yaml are for `tangram-sim real replay`; tune-space.yaml and tune-space-scaleout.yaml are search spaces,
# not experiments.
set -euo pipefail
cd "$(dirname "$0")/.."
for exp in experiments/*.yaml; do
  name=$(basename "$exp" .yaml)
  case "$name" in replay-cpu*|tune-space|tune-space-scaleout) continue ;; esac
  echo "== $name"
  tangram-sim run "$exp" --out "results/$name" --jobs "${JOBS:-2}" --quiet "$@"
done
# tangram-plus against the baselines at five seeds (results/plus-seeds/; resumes unless --force)
force=""
for arg in "$@"; do [ "$arg" = "--force" ] && force="--force"; done
echo "== plus-seeds"
python experiments/plus_seeds.py --jobs "${JOBS:-2}" $force
