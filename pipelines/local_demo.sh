#!/usr/bin/env bash
# The whole loop on one machine, stage by stage (what `stage=iterate` does in one command).
# Every step is skipped when its _SUCCESS marker exists, so rerunning after a crash continues.
#   bash pipelines/local_demo.sh [RUN_DIR] [ROUNDS] [extra key=value ...]
set -euo pipefail
RUN_DIR=${1:-runs/demo}
ROUNDS=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
PY=${PY:-python}

$PY -m noisystudent stage=teacher run_dir="$RUN_DIR" "$@"
for ((k = 1; k <= ROUNDS; k++)); do
  $PY -m noisystudent stage=pseudolabel run_dir="$RUN_DIR" round=$k "$@"
  $PY -m noisystudent stage=student run_dir="$RUN_DIR" round=$k "$@"
done
# iterate.finetune=final also fine-tunes the last student at its test resolution, for a preset whose
# test_img_size differs from its img_size (the demo's do not: iterate leaves the step out, and so does this):
#   $PY -m noisystudent stage=finetune run_dir="$RUN_DIR" round=$ROUNDS "$@"
$PY -m noisystudent stage=evaluate run_dir="$RUN_DIR" "$@"
cat "$RUN_DIR/report.md"
