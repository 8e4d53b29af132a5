#!/usr/bin/env bash
# GPU-only checks in one call (budget: under 10 min on one H100/H200; never run on a GPU yet): ops accuracy + bandwidth, fused linear+RKL, the megatron engine's lean decode forward vs megatron-core's, 10 bf16 training
# steps with the megatron and the vLLM engine, TE vs local layer spec, distributed-optimizer resume,
# THD packing through TE attention vs unpacked (bf16 logits per sequence; 3 steps thd vs bins),
# then the vllm-marked tests. Prints one JSON line per check and one SUMMARY line.
#   bash tests/gpu/run.sh              # on a CUDA machine: installs .[vllm,te,test] from this checkout
#   bash tests/gpu/run.sh --dry-run    # on a CPU machine: the Python parts with tiny shapes, nothing installed
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ "${1:-}" == "--dry-run" ]]; then
  exec python tests/gpu/checks.py --dry-run
fi

t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
# vLLM (and the CUDA torch it pins) from the project's own extras; TE is optional: its wheel needs a
# matching CUDA toolkit, so a failed TE install only marks the TE check as skipped.
timeout 300 python -m pip install -q -e ".[vllm,test]" || { echo "SUMMARY FAIL install .[vllm,test] failed"; exit 1; }
timeout 150 python -m pip install -q -e ".[te]" || echo "note: transformer-engine did not install; TE check skipped"
t1=$(date +%s)
python -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| vllm', vllm.__version__)"

status=0
timeout 540 python tests/gpu/checks.py "$@" || status=$?
timeout 150 python -m pytest -q -m "vllm" tests/unit/test_vllm_engine.py -x || status=$?
t2=$(date +%s)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
echo "install: $((t1 - t0))s  checks+tests: $((t2 - t1))s  total: $((t2 - t0))s  exit: ${status}"
exit "${status}"
