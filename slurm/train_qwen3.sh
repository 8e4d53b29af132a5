#!/bin/bash
# TIP on-policy distillation, Qwen3-8B -> Qwen3-4B, on Slurm (8 GPUs per node). Submit from the
# repository root (logs/ and the relative config paths are resolved there):
#
#   sbatch slurm/train_qwen3.sh                                        # 1 node, config defaults
#   sbatch --nodes=2 slurm/train_qwen3.sh selection.keep_ratio=0.2     # extra dotted overrides
#   sbatch slurm/train_qwen3.sh rollout.engine=vllm                    # vLLM rollouts (PP=1)
#   sbatch --gpus-per-node=4 --export=ALL,CONFIG=examples/configs/qwen25_14b_to_1p5b.yaml slurm/train_qwen3.sh
#
# Per-role layouts (config keys, as any override; all roles share the ranks, one after another):
#   parallel.tensor_parallel / .pipeline_parallel   the student's TP / PP (DP = the rest)
#   teacher.parallel.tensor_parallel / .pipeline_parallel
#                                                   the teacher's own TP / PP (0 = the student's)
#   teacher.offload                                 teacher weights in host memory between scoring
#                                                   passes (default false)
#   rollout.tensor_parallel                         TP of each vLLM engine, dividing the student's (0 = the student's)
#   rollout.vllm_enforce_eager                      no CUDA graphs (default: false on CUDA)
# e.g. sbatch slurm/train_qwen3.sh teacher.parallel.tensor_parallel=0 rollout.tensor_parallel=0
# (the Qwen3 pair with every role in the student's TP=4 layout). Plan a layout on the job's cluster
# first: python -m megatron_tip.plan --config CONFIG --nodes N --suggest (docs/planner.md).
#
# CPU test partition (no GPUs; the toy pair, 2 cores):
#   sbatch --gpus-per-node=0 --cpus-per-task=2 --mem=4G --time=00:20:00 \
#     --export=ALL,CONFIG=examples/configs/tiny_cpu.yaml slurm/train_qwen3.sh
#
# Environment (sbatch passes the submitting shell's environment; or --export=ALL,NAME=value):
#   CONFIG          run config                      (default examples/configs/qwen3_8b_to_4b.yaml)
#   STUDENT         student.path override           (unset: the config's value)
#   TEACHER         teacher.path override           (unset: the config's value; the paper's
#                   teacher is a GRPO-trained Qwen3-8B)
#   PROMPTS         data.prompts override           (unset: the config's value; make the JSONL with
#                   python -m megatron_tip.data.prepare dapo --in <parquet> --out <jsonl>)
#   RUN_ROOT        parent of the run directories   (default $PWD/runs)
#   RUN_NAME        run directory name              (default <job name>-<job id>: a requeued job
#                   keeps its id and resumes, a new job starts fresh; name an existing run to
#                   continue it in a new job)
#   NPROC_PER_NODE  training processes per node     (default: GPUs allocated on the node; with no
#                   GPUs, 1 process on the CPU)
#   OMP_NUM_THREADS CPU threads per process         (default: --cpus-per-task / NPROC_PER_NODE)
#   MASTER_PORT     rendezvous port on the first node (default 29500 + job id % 1000)
#   MAX_REQUEUES    most times the job requeues itself (default 20)
#   VENV            virtualenv to activate          (optional; pip install -e .[vllm,te])
#
# Preemption: Slurm sends USR1 five minutes before the time limit (--signal=B:USR1@300); USR1 or
# SIGTERM to this script (scancel --signal=USR1 --batch JOB) makes every training process finish its
# step, save a checkpoint and exit (so does USR1/SIGTERM to every process of the job's steps,
# scancel --signal=USR1 JOB: checkpoints are written in-process, no helper process dies of it). The job
# then requeues itself if a checkpoint newer than at its start exists, the job is still running (a
# scancel stays a cancel) and it was requeued fewer than MAX_REQUEUES times; the requeued job (same
# id, same run directory) resumes from the newest complete checkpoint.
#SBATCH --job-name=tip-qwen3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

log() { echo "$(date '+%F %T') [train_qwen3.sh] $*"; }
die() { log "error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "run this with sbatch (no SLURM_JOB_ID)"
CONFIG=${CONFIG:-examples/configs/qwen3_8b_to_4b.yaml}
[[ -f $CONFIG ]] || die "CONFIG=$CONFIG not found (submit from the repository root or pass an absolute path)"
RUN_ROOT=${RUN_ROOT:-$PWD/runs}
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
OUT_DIR="$RUN_ROOT/$RUN_NAME"
MAX_REQUEUES=${MAX_REQUEUES:-20}
RESTARTS=${SLURM_RESTART_COUNT:-0}
mkdir -p "$OUT_DIR"
if [[ -n ${VENV:-} ]]; then source "$VENV/bin/activate"; fi

# Processes per node: NPROC_PER_NODE, else the GPUs Slurm gave this node. SLURM_GPUS_ON_NODE is a
# plain count; SLURM_GPUS_PER_NODE may be typed ("h100:8", "a100:2,h100:2").
gpus_on_node() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  local n=0 item
  IFS=, read -ra items <<< "${SLURM_GPUS_PER_NODE:-0}"
  for item in "${items[@]}"; do n=$((n + ${item##*:})); done
  echo "$n"
}
if [[ -n ${NPROC_PER_NODE:-} ]]; then
  [[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE must be a positive integer"
  NPROC=$NPROC_PER_NODE
else
  NPROC=$(gpus_on_node)
  [[ $NPROC =~ ^[0-9]+$ ]] || die "cannot read a GPU count from SLURM_GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-}; set NPROC_PER_NODE"
  if ((NPROC == 0)); then
    NPROC=1
    log "no GPUs allocated: 1 process per node on the CPU (set NPROC_PER_NODE for more)"
  fi
fi
CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS / NPROC > 0 ? CPUS / NPROC : 1))}

# Rendezvous on the first node, at the address Slurm itself uses for it.
FIRST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)   # sed reads all: no SIGPIPE
MASTER_ADDR=$(scontrol show node -o "$FIRST" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
MASTER_ADDR=${MASTER_ADDR:-$FIRST}
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
export MASTER_ADDR MASTER_PORT
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 PYTHONUNBUFFERED=1
# torchrun must outlive the training processes' checkpoint save: it runs with USR1 and SIGTERM
# ignored (PET_SIGNALS_TO_HANDLE keeps recent torchrun from handling SIGTERM itself) while each
# training process saves and exits on either. Its PID goes to a node-local file so that a stop
# request reaches exactly its children, the training processes (the name carries the restart count,
# and the PID must still be a torchrun: a file left by an earlier, killed attempt is never used).
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
PID_PREFIX=/tmp/megatron_tip-$SLURM_JOB_ID.$RESTARTS

# Newest complete checkpoint step of this run (-1: none).
newest_checkpoint() {
  local d step=-1 s
  for d in "$OUT_DIR"/checkpoints/step_*/trainer_state.json; do
    [[ -s $d ]] || continue   # written last, atomically: present and non-empty = complete
    s=${d%/trainer_state.json}; s=${s##*/step_}
    ((10#$s > step)) && step=$((10#$s))
  done
  echo "$step"
}
START_CKPT=$(newest_checkpoint)

SRUN_PID=""
SIGNALLED=""
# USR1 to the training processes only (torchrun's children), on every node, through a second step.
# Not `kill -USR1 $SRUN_PID`: srun forwards a signal to every process of the step, and helper
# processes of the training ranks (checkpoint writers, vLLM engines) die of USR1.
signal_training() {
  srun --overlap --nodes="$SLURM_NNODES" --ntasks-per-node=1 bash -c '
    for f in "$0"-*.torchrun.pid; do
      p=$(cat "$f" 2>/dev/null) && mapfile -d "" cmd < "/proc/$p/cmdline" 2>/dev/null || continue
      [[ " ${cmd[*]} " == *torchrun* ]] || continue
      if command -v pkill >/dev/null; then pkill -USR1 -P "$p"
      else kill -USR1 $(cat /proc/"$p"/task/*/children); fi
    done; true' "$PID_PREFIX" || log "no signal step (srun --overlap failed; a job being cancelled has its steps signalled by Slurm)"
}
stop_training() {   # USR1 or SIGTERM to this script: ask every training process to save and exit
  SIGNALLED=$1
  log "SIG$1: asking the training processes to save a checkpoint and stop"
  if [[ -n $SRUN_PID ]]; then signal_training; fi
}
trap 'stop_training USR1' USR1
trap 'stop_training TERM' TERM

log "job=$SLURM_JOB_ID restarts=$RESTARTS nodes=$SLURM_NNODES procs/node=$NPROC threads=$OMP_NUM_THREADS" \
    "master=$MASTER_ADDR:$MASTER_PORT run=$OUT_DIR newest checkpoint=$START_CKPT"
OVERRIDES=(run.out_dir="$OUT_DIR" run.resume=auto)
if [[ -n ${STUDENT:-} ]]; then OVERRIDES+=(student.path="$STUDENT"); fi
if [[ -n ${TEACHER:-} ]]; then OVERRIDES+=(teacher.path="$TEACHER"); fi
if [[ -n ${PROMPTS:-} ]]; then OVERRIDES+=(data.prompts="$PROMPTS"); fi
srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" \
  bash -c 'trap "" USR1 TERM; "$@" & echo $! > "$0-$SLURM_PROCID.torchrun.pid"
    wait $!; rc=$?; rm -f "$0-$SLURM_PROCID.torchrun.pid"; exit $rc' "$PID_PREFIX" torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC" \
  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m megatron_tip.train --config "$CONFIG" "${OVERRIDES[@]}" "$@" &
SRUN_PID=$!
# wait returns early when a trap runs; keep waiting until srun itself has exited. After a signal,
# repeat USR1 every 30 s: a process still starting up ignores it (inherited from the wrapper).
while kill -0 "$SRUN_PID" 2>/dev/null; do
  if [[ -z $SIGNALLED ]]; then wait "$SRUN_PID" || true; continue; fi
  for ((i = 0; i < 30; i++)); do kill -0 "$SRUN_PID" 2>/dev/null && sleep 1; done
  if kill -0 "$SRUN_PID" 2>/dev/null; then signal_training; fi
done
rc=0; wait "$SRUN_PID" || rc=$?   # bash keeps the status of a reaped child
if ((rc == 0)); then log "training finished"; exit 0; fi

END_CKPT=$(newest_checkpoint)
STATE=$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.*JobState=\([^ ]*\).*/\1/p')
log "training stopped (srun exit $rc${SIGNALLED:+, SIG$SIGNALLED}); newest checkpoint: step $END_CKPT (at start: $START_CKPT); job state $STATE"
if [[ $STATE != RUNNING ]]; then
  log "not requeueing: the job is ending ($STATE)"
elif ((END_CKPT <= START_CKPT)); then
  log "not requeueing: no checkpoint newer than at this start (is run.save_every too large for the time limit?)"
elif ((RESTARTS >= MAX_REQUEUES)); then
  log "not requeueing: requeued $RESTARTS times already (MAX_REQUEUES=$MAX_REQUEUES)"
elif scontrol requeue "$SLURM_JOB_ID"; then
  log "requeued job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES); it resumes from step $END_CKPT"
  exit 0
else
  log "scontrol requeue $SLURM_JOB_ID failed"
fi
exit "$rc"
