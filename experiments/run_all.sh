#!/usr/bin/env bash
# Re-run every shipped experiment into results/<name>/ (reference outputs committed to the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
for exp in experiments/*-azure.yaml experiments/*-servegen.yaml experiments/*-servegen-authors.yaml experiments/quickstart.yaml; do
  name=$(basename "$exp" .yaml)
  echo "== $name"
  tangram-sim run "$exp" --out "results/$name" --jobs "${JOBS:-2}" --quiet "$@"
done
