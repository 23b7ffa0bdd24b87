#!/usr/bin/env bash
# The GPU checks of one lent-GPU session, in one go (docs/benchmarks.md, "GPU"): DiT-XL/2 training
# throughput at 256 px latents (32x32x4) against the measured bf16 matmul peak, eager and compiled;
# the ditkit CLI end to end on CUDA (train, resume-free sample, torchrun with NCCL); and ditkit's
# Inception FID/IS against torch-fidelity's own calculate_metrics. Run from the repository root:
#   OUT=benchmarks/results/gpu bash benchmarks/gpu_check.sh
# Each part has its own time limit, so one slow part cannot take the others down.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
part() { echo "=== $1 ($(date +%T))"; }

part machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"

part "DiT-XL/2 train step, batch 32, eager"
timeout 200 $py benchmarks/train_throughput.py --model DiT-XL/2 --batch 32 --device cuda --steps 8 \
  --cases bf16,bf16+devnoise,fp32 --json "$OUT/train_xl2_b32.json"
part "DiT-XL/2 train step, batch 256, eager bf16"
timeout 100 $py benchmarks/train_throughput.py --model DiT-XL/2 --batch 256 --device cuda --steps 6 \
  --cases bf16 --json "$OUT/train_xl2_b256.json"

part "Inception FID/IS: ditkit vs torch-fidelity"
timeout 120 $py benchmarks/inception_agreement.py --device cuda --num 2000 --json "$OUT/inception_agreement.json"

part "CLI on CUDA: train digits 300 steps, sample, torchrun (NCCL) 40 steps"
runs=/tmp/ditkit_runs
timeout 150 $py -m ditkit train --recipe digits --device cuda --max-steps 300 --ckpt-every 300 --sample-every 0 \
  --log-every 100 --results-dir $runs --run-name gpu 2>&1 | grep -v "it/s]" | tail -8
timeout 60 $py -m ditkit sample --ckpt $runs/gpu --device cuda --num-samples 40 --out-dir $runs/samples 2>&1 | tail -3
cp $runs/samples/grid.png "$OUT/gpu_digits_grid.png"
timeout 90 $py -m torch.distributed.run --standalone --nproc_per_node 1 -m ditkit train --recipe digits --device cuda \
  --max-steps 40 --ckpt-every 40 --sample-every 0 --log-every 20 --results-dir $runs --run-name ddp 2>&1 \
  | grep -v "it/s]" | tail -5

part "DiT-XL/2 train step, batch 32, bf16 + torch.compile (cold cache)"
timeout 240 $py benchmarks/train_throughput.py --model DiT-XL/2 --batch 32 --device cuda --steps 8 \
  --cases bf16+compile --json "$OUT/train_xl2_b32_compile.json"
part done
