#!/usr/bin/env bash
# Submit the whole loop as dependent Slurm jobs: teacher, then per round pseudolabel -> student,
# then evaluate. Each job starts only when the previous one succeeded (afterok).
#   pipelines/slurm/submit.sh RUN_DIR ROUNDS [key=value ...]
# Per-stage sbatch options: TEACHER_OPTS, PSEUDOLABEL_OPTS, STUDENT_OPTS, EVALUATE_OPTS
# (e.g. STUDENT_OPTS="--nodes=4 --gpus-per-node=8 --time=24:00:00"); SBATCH_OPTS for all.
set -euo pipefail
RUN_DIR=${1:?usage: submit.sh RUN_DIR ROUNDS [key=value ...]}
ROUNDS=${2:?usage: submit.sh RUN_DIR ROUNDS [key=value ...]}
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$RUN_DIR/slurm"

submit() {  # submit.sh's own args: DEPENDENCY OPTS stage args...
  local dep=$1 opts=$2
  shift 2
  sbatch --parsable --chdir="$PWD" --output="$RUN_DIR/slurm/%x-%j.out" ${SBATCH_OPTS:-} $opts \
    ${dep:+--dependency=afterok:$dep} "$HERE/stage.sbatch" "$@"
}

job=$(submit "" "${TEACHER_OPTS:-} --job-name=ns-teacher" stage=teacher run_dir="$RUN_DIR" "$@")
echo "teacher: $job"
for ((k = 1; k <= ROUNDS; k++)); do
  job=$(submit "$job" "${PSEUDOLABEL_OPTS:-} --job-name=ns-pseudolabel-$k" stage=pseudolabel round=$k run_dir="$RUN_DIR" "$@")
  echo "round $k pseudolabel: $job"
  job=$(submit "$job" "${STUDENT_OPTS:-} --job-name=ns-student-$k" stage=student round=$k run_dir="$RUN_DIR" "$@")
  echo "round $k student: $job"
done
# FINETUNE=1: the last round's student fine-tuned at its test resolution (a preset whose test_img_size
# is larger than its img_size, e.g. efficientnet_l2; stage=finetune refuses the others and says why)
if [ -n "${FINETUNE:-}" ]; then
  job=$(submit "$job" "${FINETUNE_OPTS:-} --job-name=ns-finetune" stage=finetune round=$ROUNDS run_dir="$RUN_DIR" "$@")
  echo "round $ROUNDS finetune: $job"
fi
job=$(submit "$job" "${EVALUATE_OPTS:-} --job-name=ns-evaluate" stage=evaluate run_dir="$RUN_DIR" "$@")
echo "evaluate: $job"
echo "$job" > "$RUN_DIR/slurm/last_job"
