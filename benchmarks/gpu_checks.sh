#!/usr/bin/env bash
# Every GPU check issue 15 asks for, as one script for a lent device (`run` on the device machine):
#   bash benchmarks/gpu_checks.sh
# 1. the CUDA tests (tests/test_device_data.py, marker gpu);
# 2. the GPU data path: host against device data, amp, channels_last (benchmarks/gpu_data_path.py);
# 3. trials per hour of resnet56 at 32x32 at 1, 2 and 4 trials per GPU against the limit, with the GPU's
#    utilisation (benchmarks/throughput.py --lengths gpu).
# Results go to $OUT (the device tool's folder that comes back) when set, else benchmarks/results/.
# Each step has its own time limit, so one that hangs leaves the others' results.
set -u
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PRUNETUNE_CACHE="${PRUNETUNE_CACHE:-/tmp/prunetune-gpu-cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
# the device machine reaches no registry: install this checkout over the packages it already has
python -c "import prunetune" 2>/dev/null || pip install -q --no-deps -e . > "$out/install.txt" 2>&1
python -c "import torch, ray, mlflow, optuna, torch_pruning; print(torch.__version__, torch.cuda.is_available())" \
    >> "$out/gpu.txt" 2>&1 || { echo "missing packages: see $out/gpu.txt" | tee -a "$out/gpu_checks.log"; exit 1; }
timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/test_device_data.py > "$out/gpu_tests.txt" 2>&1
echo "gpu tests: exit $?" | tee -a "$out/gpu_checks.log"
timeout 180 python benchmarks/gpu_data_path.py --device cuda --dataset noise-cifar --models resnet20,resnet56 \
    --warmup 1 --epochs 2 --data-fraction 0.5 --out "$out/gpu_data_path" > "$out/gpu_data_path.md" 2>&1
echo "gpu data path: exit $?" | tee -a "$out/gpu_checks.log"
timeout 330 python benchmarks/throughput.py --lengths gpu --out "$out/throughput" --label gpu > "$out/throughput_gpu.log" 2>&1
echo "throughput gpu: exit $?" | tee -a "$out/gpu_checks.log"
