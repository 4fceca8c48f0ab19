#!/usr/bin/env bash
# Every hardware check in one go: the executor check (gpu_check.py), then the simulator's validation
# against a real replay (validate.py), then the same validation of execute-while-load (validate.py
# --ewl: ServerlessLLM without and with it, the cold-start TTFT reduction predicted vs measured), and,
# with --pipeline, that of pipelined cold starts (experiments/replay-cpu-pipeline.yaml: HydraServe
# without and with two stages, on the arenas the validation carves out of the card).
# Run from the repository root on a GPU machine:
#
#     real/gpu_run.sh --device cuda:0 --out OUT [--check-gb 4] [--skip-check] [--skip-validate] [--skip-ewl]
#                     [--pipeline] [--validate-set KEY=VALUE ...] [--validate-arg ARG ...]
#
# (--skip-check --skip-validate --skip-ewl --pipeline runs the pipelined validation alone, within its
# --pipeline-timeout: all of them together do not fit a fifteen-minute slot of a GPU machine.)
# (--validate-set and --validate-arg apply to both validations; the execute-while-load one's report is
# appended to validate.md, its log to validate.log, its files are in results.tar.gz under validate-ewl/;
# likewise the pipelined one's, under validate-pipeline/.)
# (--validate-arg passes ARG on to validate.py, e.g. `--validate-arg --calibration=real/h200/calibration.yaml`,
# or `--validate-arg --repeat=2`: the trace replayed twice with one calibration, the replays' spread reported.)
#
# Work happens in a scratch folder (checkpoints are tens of GB); OUT receives at most eight files:
# the two reports (check.md, validate.md), their JSON, the console logs, and results.tar.gz holding
# every small output (calibration.yaml, fidelity.csv/png, replay and simulation tables, pytest log).
# `--device cpu` is the dry run (tiny models, seconds). Each step has its own time limit, so one that
# hangs still leaves the other's results.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda:0
OUT=
CHECK_GB=4
CHECK_TIMEOUT=240
VALIDATE_TIMEOUT=420
EWL_TIMEOUT=360
PIPELINE_TIMEOUT=360
SKIP_EWL=0
PIPELINE=0
VALIDATE_SETS=()
SKIP_CHECK=0
SKIP_VALIDATE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --check-gb) CHECK_GB=$2; shift 2 ;;
        --check-timeout) CHECK_TIMEOUT=$2; shift 2 ;;
        --validate-timeout) VALIDATE_TIMEOUT=$2; shift 2 ;;
        --ewl-timeout) EWL_TIMEOUT=$2; shift 2 ;;
        --skip-ewl) SKIP_EWL=1; shift ;;
        --pipeline) PIPELINE=1; shift ;;
        --pipeline-timeout) PIPELINE_TIMEOUT=$2; shift 2 ;;
        --validate-set) VALIDATE_SETS+=(--set "$2"); shift 2 ;;
        --validate-arg) VALIDATE_SETS+=("$2"); shift 2 ;;
        --skip-check) SKIP_CHECK=1; shift ;;
        --skip-validate) SKIP_VALIDATE=1; shift ;;
        *) echo "gpu_run.sh: unknown argument $1 (see the header of real/gpu_run.sh)" >&2; exit 2 ;;
    esac
done
[ -n "$OUT" ] || { echo "gpu_run.sh: --out OUT is required" >&2; exit 2; }
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tangram-gpu-run-XXXXXX")
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # GPU images often have python3 only

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    uname -a
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    command -v nvidia-smi >/dev/null && nvidia-smi
    df -h "$WORK" | tail -1
} >"$OUT/machine.txt" 2>&1

CHECK_ARGS=(--device "$DEVICE" --out "$WORK/check")
case "$DEVICE" in cpu) ;; *) CHECK_ARGS+=(--gb "$CHECK_GB") ;; esac
check_rc=0
if [ "$SKIP_CHECK" -eq 0 ]; then
    timeout "$CHECK_TIMEOUT" "$PY" real/gpu_check.py "${CHECK_ARGS[@]}" 2>&1 | tee "$OUT/check.log"
    check_rc=${PIPESTATUS[0]}
fi

validate_rc=0
if [ "$SKIP_VALIDATE" -eq 0 ]; then
    timeout "$VALIDATE_TIMEOUT" "$PY" real/validate.py --device "$DEVICE" --out "$WORK/validate" \
        "${VALIDATE_SETS[@]}" 2>&1 | tee "$OUT/validate.log"
    validate_rc=${PIPESTATUS[0]}
fi

ewl_rc=0
if [ "$SKIP_EWL" -eq 0 ]; then
    timeout "$EWL_TIMEOUT" "$PY" real/validate.py --device "$DEVICE" --out "$WORK/validate-ewl" --ewl \
        "${VALIDATE_SETS[@]}" 2>&1 | tee -a "$OUT/validate.log"
    ewl_rc=${PIPESTATUS[0]}
fi

pipeline_rc=0
if [ "$PIPELINE" -eq 1 ]; then
    timeout "$PIPELINE_TIMEOUT" "$PY" real/validate.py --device "$DEVICE" --out "$WORK/validate-pipeline" \
        --experiment experiments/replay-cpu-pipeline.yaml --skip-bench "${VALIDATE_SETS[@]}" 2>&1 \
        | tee -a "$OUT/validate.log"
    pipeline_rc=${PIPESTATUS[0]}
fi

cp "$WORK/check/gpu_check.md" "$OUT/check.md" 2>/dev/null
cp "$WORK/check/gpu_check.json" "$OUT/check.json" 2>/dev/null
cp "$WORK/validate/validate.md" "$OUT/validate.md" 2>/dev/null
cp "$WORK/validate/validate.json" "$OUT/validate.json" 2>/dev/null
if [ -f "$WORK/validate-ewl/validate.md" ]; then
    { echo; echo "---"; echo; echo "Execute-while-load validation (validate.py --ewl):"; echo;
      cat "$WORK/validate-ewl/validate.md"; } >>"$OUT/validate.md"
fi
if [ -f "$WORK/validate-pipeline/validate.md" ]; then
    { echo; echo "---"; echo; echo "Pipelined cold starts (validate.py --experiment experiments/replay-cpu-pipeline.yaml):";
      echo; cat "$WORK/validate-pipeline/validate.md"; } >>"$OUT/validate.md"
fi
# Everything small (no checkpoints): a single archive, so OUT stays within a handful of files.
tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='checkpoints' --exclude='bench-checkpoint' \
    --exclude='*.safetensors' . 2>/dev/null
echo "gpu_check exit $check_rc, validate exit $validate_rc, validate --ewl exit $ewl_rc," \
    "pipeline validation exit $pipeline_rc" | tee -a "$OUT/machine.txt"
rm -rf "$WORK"
[ "$check_rc" -eq 0 ] && [ "$validate_rc" -eq 0 ] && [ "$ewl_rc" -eq 0 ] && [ "$pipeline_rc" -eq 0 ]
