#!/bin/bash
# GPU: MiniLLM at the paper's scale (issue 6): a GPT-2-XL-shaped teacher (bf16) and a GPT-2-shaped student with
# random weights, 50 steps per way of computing the single-step term; and the chunked path's peak memory.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_minillm}; mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
timeout 120 python3 -m pytest test_minillm.py -q -k "chunk or kernel" 2>&1 | tail -3 | tee "$OUT/tests.txt"
timeout 240 python3 eval.py --bench minillm --max_steps 50 --rollout_size 64 --batch_size 32 \
    --max_new_tokens 128 --chunk 1024 2>&1 | tee "$OUT/bench_minillm.txt"
for c in 0 1024; do timeout 60 python3 kernels.py --memory $c; done 2>&1 | tee "$OUT/memory.txt"
# issue 15: a Qwen2.5-1.5B-shaped teacher and a Qwen2.5-0.5B-shaped student (151,936 rows, 151,665 tokens)
timeout 240 python3 eval.py --bench minillm --shapes qwen --max_steps 20 --rollout_size 64 --batch_size 16 \
    --max_new_tokens 128 --chunk 4096 2>&1 | tee "$OUT/bench_minillm_qwen.txt"
