#!/usr/bin/env bash
# VLLMEngine tests on a GPU machine: install the package with its vLLM extra, run the vllm-marked
# tests, report the GPU and timings. Usage: bash tests/gpu/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."

t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
python -m pip install -q -e ".[vllm,test]"
t1=$(date +%s)
python -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| vllm', vllm.__version__)"

status=0
timeout 480 python -m pytest -m "vllm" tests/unit/test_vllm_engine.py tests/integration/test_trainer_vllm.py -v -s "$@" || status=$?
t2=$(date +%s)

nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv
echo "install: $((t1 - t0))s  tests: $((t2 - t1))s  total: $((t2 - t0))s  pytest exit: ${status}"
exit "${status}"
