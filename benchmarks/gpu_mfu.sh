#!/usr/bin/env bash
# Issue #8, deliverable 5: train-step tokens/s and MFU at d12 and d20 (seq 2048, bfloat16, SSSL windows) on
# one GPU, cuDNN's flash attention against ours, within a lent machine's 15 minutes of device time. Each run
# is capped so that a slow one leaves time for the next; what finished is in $OUT (default ./gpu_mfu).
#
#     bash benchmarks/gpu_mfu.sh            # from the repository root, with the image's python3 (jax, flax,
#                                           # optax, orbax, tqdm: nothing to install, see benchmarks/README.md)
#
# 131,072 tokens a step (4 micro-steps of 32 x 2,048) instead of nanochat's 524,288: MFU is per step and the
# accumulation count barely moves it, and 5 timed steps then take seconds, not minutes.
set -u
out=${OUT:-gpu_mfu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$out/device.txt" 2>&1
shape=(--aspect-ratio 64 --head-dim 128 --max-seq-len 2048 --vocab-size 32768 --window-pattern SSSL
       --total-batch-size 131072 --device-batch-size 32 --dtype bfloat16 --steps 5 --warmup 1 --no-parts)
for depth in 12 20; do
    PYTHONUNBUFFERED=1 timeout 270 python3 -m benchmarks.train_throughput --depth "$depth" "${shape[@]}" \
        --attention cudnn,nanojax 2>&1 | tee "$out/d$depth.txt"
done
