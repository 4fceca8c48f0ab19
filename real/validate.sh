#!/usr/bin/env bash
# Hardware validation end to end (checkpoints, calibrate, bench, replay, simulate, compare).
# Usage: real/validate.sh --device cuda:0 --out OUT   (or --device cpu); see real/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" real/validate.py "$@"
