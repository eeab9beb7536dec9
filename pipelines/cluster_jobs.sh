#!/usr/bin/env bash
# The sequence of batch jobs on a cluster, one job per stage, each launched on all GPUs of a node
# (or several nodes) with accelerate. Run each line as its own job, after the previous one
# finished (pipelines/slurm/submit.sh does this with Slurm dependencies).
#
#   RUN_DIR   shared filesystem path of the experiment (every job reads and writes there)
#   DATA      your shards, e.g. DATA="data=shards data.num_classes=1000 'data.labeled=\"/d/train-{000000..001023}.tar\"' ..."
set -euo pipefail
RUN_DIR=${RUN_DIR:?set RUN_DIR to a path on the shared filesystem}
ROUNDS=${ROUNDS:-3}
LAUNCH=${LAUNCH:-accelerate launch --config_file pipelines/accelerate/one_node_8gpu.yaml}
COMMON=${COMMON:-"optim=rmsproptf sched=step precision=bf16 channels_last=true"}

eval $LAUNCH -m noisystudent stage=teacher run_dir="$RUN_DIR" model=efficientnet_b0 $COMMON ${DATA:-}
for ((k = 1; k <= ROUNDS; k++)); do
  eval $LAUNCH -m noisystudent stage=pseudolabel run_dir="$RUN_DIR" round=$k $COMMON ${DATA:-}
  eval $LAUNCH -m noisystudent stage=student run_dir="$RUN_DIR" round=$k \
      "'iterate.models=[efficientnet_b0,efficientnet_b1,efficientnet_b2]'" student.unlabel_ratio=3 $COMMON ${DATA:-}
done
# with a preset tested above its train resolution (efficientnet_l2: 475 -> 800 px), the FixRes fine-tune:
#   eval $LAUNCH -m noisystudent stage=finetune run_dir="$RUN_DIR" round=$ROUNDS $COMMON ${DATA:-}
eval $LAUNCH -m noisystudent stage=evaluate run_dir="$RUN_DIR" $COMMON ${DATA:-}
