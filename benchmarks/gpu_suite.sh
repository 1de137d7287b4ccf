#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one run, each row capped at 150 s: SD1.5's and SDXL's real
# architectures with random weights, each bench_step.py row printing step / UNet-calls ratios, counted TFLOP,
# achieved TFLOP/s, MFU against the device's peak and peak memory.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]                # OUT_DIR holds the shaped models and one log per row
#   PEER_SCRIPT=path/to/train_lcm_distill_lora_sd_wds.py bash benchmarks/gpu_suite.sh   # + diffusers' script
#
# PEER_SCRIPT is diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py, unmodified, from a
# diffusers checkout of the installed version; it is run on the same shaped SD1.5 teacher, batch and precision,
# for its samples/s and peak memory (it needs webdataset shards: written here from the tiny world).
set -uo pipefail
out=${1:-/tmp/lcm-lora-gpu}
mkdir -p "$out"
row() {  # row NAME bench_step.py flags...: one line of the suite, its log in $out/NAME.log
  local name=$1; shift
  echo "### $name: bench_step.py $*"
  timeout 150 python benchmarks/bench_step.py "$@" > "$out/$name.log" 2>&1
  grep -E "^(step|ideal|cached|ratio|peak|warm-up)" "$out/$name.log" || tail -5 "$out/$name.log"
}
[ -d "$out/sd15" ] || python benchmarks/make_shaped.py --arch sd15 --out "$out/sd15"
sd15=(--teacher "$out/sd15" --resolution 512 --lora_rank 64 --repeats 5)
row sd15-bf16-b8 "${sd15[@]}" --batch_size 8 --mixed_precision bf16
row sd15-fp16-b8 "${sd15[@]}" --batch_size 8 --mixed_precision fp16
row sd15-bf16-b8-compile "${sd15[@]}" --batch_size 8 --mixed_precision bf16 --torch_compile
row sd15-bf16-b8-xformers "${sd15[@]}" --batch_size 8 --mixed_precision bf16 --enable_xformers
row sd15-bf16-b16 "${sd15[@]}" --batch_size 16 --mixed_precision bf16
row sd15-bf16-b32 "${sd15[@]}" --batch_size 32 --mixed_precision bf16
row sd15-bf16-b32-gc "${sd15[@]}" --batch_size 32 --mixed_precision bf16 --gradient_checkpointing
row sd15-tf32-b8 "${sd15[@]}" --batch_size 8 --mixed_precision no --allow_tf32
[ -d "$out/sdxl" ] || python benchmarks/make_shaped.py --arch sdxl --out "$out/sdxl"
sdxl=(--teacher "$out/sdxl" --resolution 1024 --lora_rank 64 --repeats 3 --mixed_precision bf16)
row sdxl-bf16-b4 "${sdxl[@]}" --batch_size 4
row sdxl-bf16-b8-gc "${sdxl[@]}" --batch_size 8 --gradient_checkpointing
if [ -n "${PEER_SCRIPT:-}" ]; then
  [ -d "$out/shards" ] || python -m lcm_lora.cli world dataset --out "$out/shards" --num_images 512 \
    --format webdataset --shard_size 128 > /dev/null
  echo "### peer: $PEER_SCRIPT, batch 8, bf16, 512 px, rank 64 (its tqdm line gives s/it; it needs torchvision)"
  timeout 240 accelerate launch --mixed_precision bf16 "$PEER_SCRIPT" --pretrained_teacher_model "$out/sd15" \
    --train_shards_path_or_url "$out/shards/shard-{00000..00003}.tar" --resolution 512 --train_batch_size 8 \
    --lora_rank 64 --max_train_steps 30 --mixed_precision bf16 --output_dir "$out/peer" --report_to tensorboard \
    --dataloader_num_workers 4 > "$out/peer.log" 2>&1
  tr '\r' '\n' < "$out/peer.log" | grep -E "it/s|s/it" | tail -1
  echo "### ours: train_lcm_lora.py, the same shards and settings"
  timeout 240 accelerate launch --mixed_precision bf16 train_lcm_lora.py --pretrained_teacher_model "$out/sd15" \
    --train_shards_path_or_url "$out/shards/shard-{00000..00003}.tar" --resolution 512 --train_batch_size 8 \
    --lora_rank 64 --max_train_steps 30 --mixed_precision bf16 --output_dir "$out/ours" --report_to none \
    --dataloader_num_workers 4 --validation_steps 0 --checkpointing_steps 0 --overwrite > "$out/ours.log" 2>&1
  tr '\r' '\n' < "$out/ours.log" | grep -E "it/s|s/it" | tail -1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
