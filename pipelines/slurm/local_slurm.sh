#!/usr/bin/env bash
# Run the Slurm recipe against a real Slurm on this machine: slurmctld + slurmd on localhost
# (Debian's slurm-wlm), the demo for ROUNDS round(s) submitted by submit.sh as dependent jobs,
# then the daemons are stopped by their pid files. Needs root (the daemons run as root here).
#   apt-get install -y slurmctld slurmd slurm-client
#   pipelines/slurm/local_slurm.sh [RUN_DIR] [ROUNDS] [key=value ...]
# TIME_LIMIT (minutes, default none) is set on the student jobs, with USR1 SIGNAL_BEFORE seconds
# (default 30) before it, to exercise requeue-on-timeout and resume.
# LAUNCHER=submitit sends `stage=iterate` through Hydra's submitit launcher instead of submit.sh's sbatch
# chain (hydra/launcher=submitit_slurm, pip install 'noisystudent[slurm]'): one Slurm job of TASKS tasks
# (default 1), each one process of the step; Hydra waits for it and the job logs are printed.
set -euo pipefail
RUN_DIR=$(realpath -m "${1:-runs/slurm_demo}")
ROUNDS=${2:-1}
shift $(( $# > 2 ? 2 : $# ))
HERE=$(cd "$(dirname "$0")" && pwd)
D=$(mktemp -d /tmp/ns-slurm.XXXXXX)
HOST=$(hostname -s)
mkdir -p "$D/state" "$D/spool"
cat > "$D/slurm.conf" <<CONF
ClusterName=nslocal
SlurmctldHost=$HOST
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd.log
SlurmctldPort=${NS_SLURMCTLD_PORT:-6817}
SlurmdPort=${NS_SLURMD_PORT:-6818}
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
KillWait=10
MinJobAge=3600
NodeName=$HOST CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF=$D/slurm.conf

stop() {
  for p in slurmd slurmctld; do
    [ -f "$D/$p.pid" ] && kill "$(cat "$D/$p.pid")" 2>/dev/null || true
  done
}
trap stop EXIT
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && break; sleep 1; done
sinfo

export NS_PYTHON=${NS_PYTHON:-$(command -v python)}
if [ "${LAUNCHER:-sbatch}" = submitit ]; then
  TASKS=${TASKS:-1}
  "$NS_PYTHON" -m noisystudent -m hydra/launcher=submitit_slurm hydra.launcher.partition=local \
    hydra.launcher.nodes=1 hydra.launcher.tasks_per_node="$TASKS" hydra.launcher.cpus_per_task=$(( $(nproc) / TASKS )) \
    hydra.launcher.timeout_min=60 hydra.sweep.dir="$RUN_DIR/hydra" \
    stage=iterate iterate.rounds="$ROUNDS" run_dir="$RUN_DIR" "$@"
  echo "--- job logs"
  for f in "$RUN_DIR"/hydra/.submitit/*/*_log.*; do echo "== $f"; { grep -vE 'it/s\]|UserWarning|warnings.warn' "$f" || true; } | tail -n 8; done
  echo "--- final state"
  sleep 5  # Slurm marks the job completed a moment after its tasks exit
  for j in "$RUN_DIR"/hydra/.submitit/*/; do
    { scontrol show job "$(basename "$j")" || true; } | { grep -oE 'JobId=[0-9]+|JobState=[A-Z]+|NumTasks=[0-9]+' || true; } | tr '\n' ' '
    echo
  done
  cat "$RUN_DIR/report.md"
  exit 0
fi
STUDENT_OPTS=${TIME_LIMIT:+--time=$TIME_LIMIT --signal=B:USR1@${SIGNAL_BEFORE:-30}} "$HERE/submit.sh" "$RUN_DIR" "$ROUNDS" "$@"
last=$(cat "$RUN_DIR/slurm/last_job")
while squeue -h -o %i | grep -q .; do sleep 5; squeue -h -o "%i %j %T %M %r"; done
echo "--- job outputs"
for f in "$RUN_DIR"/slurm/*.out; do echo "== $f"; grep -vE 'it/s\]' "$f" | tail -n 5; done
echo "--- final state"
scontrol show job "$last" | grep -oE 'JobState=[A-Z]+' || true
cat "$RUN_DIR/report.md"
