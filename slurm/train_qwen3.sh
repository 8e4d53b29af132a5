#!/bin/bash
# TIP on-policy distillation, Qwen3-8B -> Qwen3-4B, on Slurm (8x H100 per node).
#
#   sbatch slurm/train_qwen3.sh                         # 1 node, config defaults
#   sbatch --nodes=2 slurm/train_qwen3.sh selection.keep_ratio=0.2   # extra dotted overrides
#   sbatch slurm/train_qwen3.sh rollout.engine=vllm     # vLLM rollouts, one engine per rank (PP=1)
#
# Environment (override with `sbatch --export=ALL,STUDENT=...`):
#   STUDENT, TEACHER   HF or megatron checkpoint dirs   (default /checkpoints/Qwen3-{4B,8B})
#   PROMPTS            JSONL of {problem, answer}        (default /data/dapo_math_17k.jsonl)
#   CONFIG             run config                        (default examples/configs/qwen3_8b_to_4b.yaml)
#   RUN_ROOT           where runs, logs and checkpoints go (default $PWD/runs)
#   VENV               virtualenv to activate (optional; install with pip install -e .[vllm,te])
# Preemption: Slurm sends USR1 five minutes before the limit; the job requeues itself and the
# next start resumes from the newest complete checkpoint (run.save_every steps apart).
#SBATCH --job-name=tip-qwen3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-examples/configs/qwen3_8b_to_4b.yaml}
STUDENT=${STUDENT:-/checkpoints/Qwen3-4B}
TEACHER=${TEACHER:-/checkpoints/Qwen3-8B}
PROMPTS=${PROMPTS:-/data/dapo_math_17k.jsonl}
RUN_ROOT=${RUN_ROOT:-$PWD/runs}
OUT_DIR="$RUN_ROOT/${SLURM_JOB_NAME:-tip-qwen3}"
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
mkdir -p logs "$OUT_DIR"
[[ -n "${VENV:-}" ]] && source "$VENV/bin/activate"

# Rendezvous on the first node of the allocation.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_ASYNC_ERROR_HANDLING=1 OMP_NUM_THREADS=8
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 PYTHONUNBUFFERED=1

# Resume automatically when a complete checkpoint exists (requeued or restarted job).
RESUME=false
if compgen -G "$OUT_DIR/checkpoints/step_*/trainer_state.json" > /dev/null; then RESUME=true; fi

requeue() {
  echo "$(date) USR1: requeueing job $SLURM_JOB_ID (resumes from the last checkpoint)"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

echo "$(date) job=$SLURM_JOB_ID nodes=$SLURM_NNODES master=$MASTER_ADDR:$MASTER_PORT resume=$RESUME out=$OUT_DIR"
srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m megatron_tip.train --config "$CONFIG" \
  student.path="$STUDENT" teacher.path="$TEACHER" data.prompts="$PROMPTS" \
  run.out_dir="$OUT_DIR" run.resume="$RESUME" "$@" &
wait $!   # wait in the background so the USR1 trap can run while training
