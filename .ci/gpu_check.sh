#!/bin/bash
# GPU checks in one call (the lent device machine; CI never runs this): versions, the test suite on CUDA,
# the generation benchmark, a short run of each distillation method in bf16, and the fused kernel's benchmark
# (skipped with BENCH=0). Needs out/teacher/best.pt and out/student-sft/best.pt (from `python minillm.py`).
# Logs go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
date -u | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
# the `datasets` package is not on the device image: its loader tests run on the CPU machine only
timeout 200 python3 -m pytest test_minillm.py -q -rs -k "not dolly and not pretrain_loaders and not unloadable" 2>&1 | tee "$OUT/tests.txt"
timeout 60 python3 eval.py --bench generate 2>&1 | tee "$OUT/bench_generate.txt"
for method in kd seqkd minillm; do
    timeout 90 python3 minillm.py --method $method --teacher out/teacher/best.pt --init out/student-sft/best.pt \
        --out /tmp/gpu-$method --overwrite --max_steps 60 --log_interval 20 --eval_interval 30 --lm_coef 0 2>&1 | grep -v settings
done | tee "$OUT/methods.txt"
[ "${BENCH:-1}" = 0 ] || timeout 240 python3 kernels.py 2>&1 | tee "$OUT/kernels.txt"
