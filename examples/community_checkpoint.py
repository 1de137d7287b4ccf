"""An LCM-LoRA on a community fine-tune shipped as one file, stacked with a style LoRA.

What it shows: a LoRA distilled from a base model also speeds up that model's fine-tunes. The fine-tune here is
`community-dusk`, the bundled tiny teacher fine-tuned on a rose-tinted "dusk" world and saved as one
original-layout .safetensors, as community checkpoints are shared. diffusers' `from_single_file` reads it
offline with `config=` set to the base model's folder (its configs and tokenizer). The LCM-LoRA and a style
LoRA (`style-dusk`) are then loaded as two named adapters and mixed with `set_adapters`. The LCM-LoRA report
(arXiv 2311.05556) mixes them at 1.0 and 0.8. For a real model: `--checkpoint my-sd15-finetune.safetensors
--config <an SD1.5 folder with its configs>` and your own style LoRA.

Run, with a LoRA distilled from the bundled teacher (`python examples/distill_from_python.py`):

    python examples/community_checkpoint.py --lora output/tiny-eps --output_dir out/community

It writes, per prompt, the fine-tune with the LCM-LoRA alone (`lcm-*.png`) and with the style LoRA stacked
(`lcm+style-*.png`), in 4 steps (about 10 s on a CPU, most of it importing diffusers).
"""

import argparse
from pathlib import Path

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from lcm_lora.world import assets

PROMPTS = ["a red striped circle at the top left on a plain background",
           "a blue solid square at the bottom right on a checkered background"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", required=True, help="The LCM-LoRA: a folder with pytorch_lora_weights.safetensors.")
    parser.add_argument("--output_dir", required=True, help="Where the PNGs go.")
    parser.add_argument("--checkpoint", default="community-dusk", help="A single-file SD1.x/2.x .safetensors.")
    parser.add_argument("--config", default="teacher-eps", help="The folder of the model it was fine-tuned from.")
    parser.add_argument("--style_lora", default="style-dusk", help="A style LoRA folder (diffusers format).")
    parser.add_argument("--style_weight", type=float, default=0.8)
    parser.add_argument("--num_inference_steps", type=int, default=4)
    parser.add_argument("--original_inference_steps", type=int, default=10, help=(
        "The training run's --num_ddim_timesteps: 10 in configs/tiny.yaml, 50 in the SD presets."))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # The single file holds the weights; `config` gives every component's config, offline.
    pipe = StableDiffusionPipeline.from_single_file(str(assets.resolve(args.checkpoint)),
                                                    config=str(assets.resolve(args.config)),
                                                    local_files_only=True).to(device)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config,
                                              original_inference_steps=args.original_inference_steps)
    pipe.load_lora_weights(args.lora, adapter_name="lcm")
    pipe.load_lora_weights(str(assets.resolve(args.style_lora)), adapter_name="style")
    pipe.set_progress_bar_config(disable=True)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, adapters, weights in (("lcm", ["lcm"], [1.0]),
                                    ("lcm+style", ["lcm", "style"], [1.0, args.style_weight])):
        pipe.set_adapters(adapters, adapter_weights=weights)
        generator = torch.Generator(device).manual_seed(args.seed)  # the same noise for both rows
        images = pipe(PROMPTS, num_inference_steps=args.num_inference_steps, guidance_scale=1.0,
                      generator=generator).images
        for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
            image.save(out / f"{name}-{i:02d}.png")
            print(f"{out / f'{name}-{i:02d}.png'}: {prompt} ({' + '.join(adapters)})")


if __name__ == "__main__":
    main()
