"""Generate in 4 steps with an LCM-LoRA, in plain diffusers.

What it shows: the three changes that turn a Stable Diffusion pipeline into a 4-step generator. LCMScheduler
replaces the model's scheduler, `load_lora_weights` loads the LoRA, and `guidance_scale` 1 turns classifier-free
guidance off (the student learned the guided teacher, so the call is also half the work). Nothing here
needs lcm_lora except the path of the bundled tiny teacher. For a real model, pass its hub id or folder as
--model (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 with a LoRA distilled from it, and
--original_inference_steps 50).

Run, with a LoRA distilled from the bundled teacher (`python examples/distill_from_python.py`, or
`python train_lcm_lora.py --config configs/tiny.yaml`):

    python examples/generate_4_steps.py --lora output/tiny-eps --output_dir out/generate

It writes one 64x64 PNG per prompt (about 10 s on a CPU, most of it importing diffusers).
"""

import argparse
from pathlib import Path

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from lcm_lora.world import assets

PROMPTS = ["a red striped circle at the top left on a plain background",
           "a blue solid square at the bottom right on a checkered background",
           "a yellow striped triangle at the top right on a plain background",
           "a green solid circle at the bottom left on a checkered background"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", required=True, help="A folder holding pytorch_lora_weights.safetensors, or a file.")
    parser.add_argument("--output_dir", required=True, help="Where the PNGs go.")
    parser.add_argument("--model", default="teacher-eps", help="The base model: a bundled teacher, hub id or folder.")
    parser.add_argument("--prompt", action="append", help="A prompt (repeatable); default: four world prompts.")
    parser.add_argument("--num_inference_steps", type=int, default=4)
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="1 to 2; 1 turns guidance off.")
    parser.add_argument("--original_inference_steps", type=int, default=10, help=(
        "The training run's --num_ddim_timesteps: 10 in configs/tiny.yaml, 50 in the SD presets."))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    pipe = StableDiffusionPipeline.from_pretrained(str(assets.resolve(args.model))).to(device)
    # LCMScheduler samples on the grid the LoRA was distilled on: original_inference_steps = N of training.
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config,
                                              original_inference_steps=args.original_inference_steps)
    lora = Path(args.lora)
    if lora.is_file():
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    else:
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)

    prompts = args.prompt or PROMPTS
    generator = torch.Generator(device).manual_seed(args.seed)
    images = pipe(prompts, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                  generator=generator).images

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        image.save(out / f"{i:02d}.png")
        print(f"{out / f'{i:02d}.png'}: {prompt}")


if __name__ == "__main__":
    main()
