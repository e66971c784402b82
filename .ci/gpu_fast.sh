#!/bin/bash
# GPU, issue 16, in one call of at most 9 minutes (run it with timeout_s 600): the fast decode (static cache, CUDA
# graphs) against the eager one and transformers' generate, MiniLLM against KD per training row and per response;
# where an eager step's time goes; the fast decode's GPU test; the fused kernel's block size / warps sweep in bf16
# and fp32; and, where Nsight Compute can read the counters, why the bf16 kernel runs where it does. Logs go to
# $OUT (one file per part).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_fast}; mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
# 1. the paper's shapes: a GPT-2-XL-shaped teacher (bf16) and a GPT-2-shaped student, 64 prompts x 128 new tokens
TORCH_LOGS=perf_hints timeout 270 python3 eval.py --bench rollout --rollout_size 64 --batch_size 32 \
    --max_new_tokens 128 2>&1 | tee "$OUT/bench_rollout.txt"
# 1b. where an eager decode step's time goes at those shapes (16 steps under the profiler: CPU-side and GPU-side)
timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/profile_eager.txt"
import argparse, torch, eval as ev, minillm
from torch.profiler import profile, ProfilerActivity
device, ctx, teacher, student, V = ev.bench_models(argparse.Namespace(device="cuda"), "gpt2")
prompts = torch.randint(0, V - 1, (64, 64)).tolist()
with ctx:
    minillm.rollout(student, teacher, prompts, 4, V - 1, 0.2)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        minillm.rollout(student, teacher, prompts, 16, V - 1, 0.2)
        torch.cuda.synchronize()
table = prof.key_averages()
print(table.table(sort_by="device_time_total", row_limit=15))
print(table.table(sort_by="cpu_time_total", row_limit=15))
PY
# 2. the tests that a GPU changes: the real fast decode (inductor, CUDA graphs), bf16 rollouts, the kernels in bf16
timeout 90 python3 -m pytest test_minillm.py -q -rs -k "fast_decode or bf16_autocast or kernel" 2>&1 \
    | tail -5 | tee "$OUT/tests.txt"
# 3. the kernel: (BLOCK, warps) per dtype as a share of copy bandwidth
timeout 80 python3 kernels.py --sweep 2>&1 | tee "$OUT/sweep.txt"
# 4. Nsight Compute on one bf16 forward + backward (N 8192, V 50257), the default launch (fails on gVisor)
timeout 40 ncu --clock-control none -k regex:_reverse_kl --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis python3 -c "
import torch, kernels
s = torch.randn(8192, 50257, device='cuda', dtype=torch.bfloat16, requires_grad=True)
t, y = torch.randn_like(s).detach(), torch.randint(0, 50257, (8192,), device='cuda')
kl, lq, _ = kernels.reverse_kl(s, t, y)
(kl.sum() + lq.sum()).backward()
torch.cuda.synchronize()" 2>&1 | tee "$OUT/ncu.txt" | tail -150
