"""Distill an LCM-LoRA from a Stable Diffusion teacher.

Tiny bundled teacher on a CPU (minutes):
    lcm-lora world dataset --out data/tiny-world --num_images 2000
    python train_lcm_lora.py --config configs/tiny.yaml

SD1.5 on one GPU, or on all of a machine's GPUs (Accelerate: DDP, DeepSpeed or FSDP via `accelerate config`):
    accelerate launch train_lcm_lora.py --config configs/sd15.yaml \\
        --pretrained_teacher_model stable-diffusion-v1-5/stable-diffusion-v1-5 --train_data_dir my-images/
    accelerate launch --multi_gpu --num_processes 8 train_lcm_lora.py --config configs/sd15.yaml ...

Print the resolved configuration and exit: add --dry-run.
"""

from lcm_lora.cli import train_main

if __name__ == "__main__":
    train_main()
