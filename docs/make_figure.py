"""Draw the README's picture: the same prompts from the bundled tiny SDXL teacher, the LCM-LoRA at 1, 2, 4 and 8
steps (LCMScheduler, guidance 1) next to the teacher's 50 DDIM steps (guidance 4), each row one prompt and seed.

    python train_lcm_lora.py --config configs/tiny-sdxl.yaml      # the LoRA (about 12 minutes on 2 CPU cores)
    python docs/make_figure.py --lora output/tiny-sdxl --out docs/images/steps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from lcm_lora.export import lcm_scheduler_settings
from lcm_lora.world import assets

PROMPTS = ["a red striped circle at the top left on a plain background",
           "a blue square at the bottom right on a checkered background",
           "a green striped triangle at the top right on a plain background",
           "a yellow circle at the bottom left on a checkered background"]
LORA_STEPS = (1, 2, 4, 8)
SCALE = 3  # the world's images are 64x64: enlarged without smoothing


def draw(pipe, prompt: str, seed: int, steps: int, guidance: float) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]
    return image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", default="output/tiny-sdxl")
    parser.add_argument("--out", type=Path, default=Path("docs/images/steps.png"))
    args = parser.parse_args()

    pipe = StableDiffusionXLPipeline.from_pretrained(assets.resolve("teacher-sdxl"))
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    rows = []
    for seed, prompt in enumerate(PROMPTS):
        pipe.scheduler = LCMScheduler.from_config(base_config, **lcm_scheduler_settings(args.lora))
        pipe.load_lora_weights(args.lora)
        row = [draw(pipe, prompt, seed, n, 1.0) for n in LORA_STEPS]
        pipe.unload_lora_weights()
        pipe.scheduler = DDIMScheduler.from_config(base_config)  # SDXL's config: no x0 clipping
        rows.append(row + [draw(pipe, prompt, seed, 50, 4.0)])

    labels = [f"LoRA, {n} step{'s' * (n > 1)}" for n in LORA_STEPS] + ["teacher, 50 steps"]
    w, h, header = rows[0][0].width, rows[0][0].height, 24
    sheet = Image.new("RGB", (w * len(labels), header + h * len(rows)), "white")
    pen = ImageDraw.Draw(sheet)
    for j, label in enumerate(labels):
        pen.text((j * w + 6, 6), label, fill="black")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            sheet.paste(image, (j * w, header + i * h))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
