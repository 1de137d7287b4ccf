"""Distill an LCM-LoRA from Python: a TrainConfig and one call to `lcm_lora.trainer.train`.

What it shows: the Python API behind `lcm-lora train`. The preset `configs/tiny.yaml` is read into a
`TrainConfig` with overrides (any flag of `lcm-lora train --help`, by its name), the bundled tiny world is
written as an imagefolder, and `train(config)` returns the folder that holds the LoRA:
`pytorch_lora_weights.safetensors` for diffusers and `lcm-lora-teacher-eps.safetensors` for ComfyUI / A1111.
The same run from the shell: `lcm-lora train --config configs/tiny.yaml --train_data_dir DATA --output_dir OUT`.

Run (the whole preset, 400 steps: about 3.5 minutes on 2 CPU cores, writing the 2000 images included):

    python examples/distill_from_python.py --output_dir output/tiny-eps

A smoke run of 2 steps on 64 images (about 15 s, most of it importing diffusers):

    python examples/distill_from_python.py --max_train_steps 2 --num_images 64 --output_dir /tmp/lora

Then sample from it: `python examples/generate_4_steps.py --lora output/tiny-eps --output_dir out/`.
"""

import argparse
from pathlib import Path

from lcm_lora import TrainConfig, train
from lcm_lora.world.dataset import write_imagefolder

PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="output/tiny-eps", help="Where the LoRA and checkpoints go.")
    parser.add_argument("--data_dir", default="data/tiny-world", help="The training images (written when missing).")
    parser.add_argument("--num_images", type=int, default=2000,
                        help="World images to write when --data_dir holds fewer.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Default: the preset's (400).")
    args = parser.parse_args()

    # 1. Data: the tiny world as an imagefolder (PNGs + metadata.jsonl with file_name and text). Image i is drawn
    #    from seed i, so a folder that holds fewer images is rewritten with more, the same ones first.
    data_dir, metadata = Path(args.data_dir), Path(args.data_dir) / "metadata.jsonl"
    if not metadata.is_file() or len(metadata.read_text().splitlines()) < args.num_images:
        write_imagefolder(data_dir, args.num_images)

    # 2. The config: the preset, then overrides. TrainConfig.from_flat_dict({...}) builds one from flags alone.
    overrides = {"train_data_dir": str(data_dir), "output_dir": args.output_dir}
    if args.max_train_steps is not None:
        overrides["max_train_steps"] = args.max_train_steps
    config = TrainConfig.from_yaml(PRESET, **overrides)
    print(f"distilling {config.model.pretrained_teacher_model} for {config.optim.max_train_steps} steps "
          f"(batch {config.optim.train_batch_size}, LoRA rank {config.lora.lora_rank}, "
          f"N = {config.distill.num_ddim_timesteps} DDIM solver steps)")

    # 3. Distill: checkpoints, the LoRA files and config.yaml go to output_dir.
    lora_dir = train(config)
    print(f"LoRA written to {lora_dir}: {', '.join(sorted(p.name for p in lora_dir.glob('*.safetensors')))}")


if __name__ == "__main__":
    main()
