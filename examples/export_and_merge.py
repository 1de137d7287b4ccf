r"""Export an LCM-LoRA for ComfyUI / A1111 and bake it into a single-file checkpoint.

What it shows: the two steps from a training run to a file any UI loads, with lcm_lora's Python functions
(the `lcm-lora export` and `lcm-lora merge` commands call them):
1. `export_lora_files` writes the run's LoRA as a kohya file (`lora_unet_*` keys, with alpha and metadata) for
   ComfyUI's `models/loras/` or A1111's `models/Lora/`.
2. `merge_lora` adds strength * alpha/r * up @ down to each targeted weight of a single-file checkpoint, in the
   file's own (original SD) key space. Every other tensor stays byte for byte. The result is a 4-step model
   without any LoRA: load it with `from_single_file` and sample with LCMScheduler.
The merged model's images are then compared with the fine-tune + LoRA loaded by diffusers.

The same from the shell:

    lcm-lora export --checkpoint output/tiny-eps --output_dir out/merge/kohya --formats kohya
    lcm-lora merge --checkpoint lcm_lora/world/assets/community-dusk.safetensors --single_file_config teacher-eps \
        --lora out/merge/kohya/lcm-lora-teacher-eps.safetensors --output out/merge/dusk-lcm.safetensors

Run (about 12 s on a CPU, most of it importing diffusers):

    python examples/export_and_merge.py --lora output/tiny-eps --output_dir out/merge
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from lcm_lora import export_lora_files, merge_lora
from lcm_lora.world import assets

PROMPTS = ["a red striped circle at the top left on a plain background",
           "a blue solid square at the bottom right on a checkered background"]


def sample(pipe, original_inference_steps: int, seed: int) -> list:
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=original_inference_steps)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, generator=generator).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", required=True, help="A training output folder (or checkpoint-N, or a LoRA file).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--checkpoint", default="community-dusk", help="The single-file .safetensors to merge into.")
    parser.add_argument("--config", default="teacher-eps", help="The folder of the model it was fine-tuned from.")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--original_inference_steps", type=int, default=10, help=(
        "The training run's --num_ddim_timesteps: 10 in configs/tiny.yaml, 50 in the SD presets."))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output_dir)
    checkpoint, config = assets.resolve(args.checkpoint), str(assets.resolve(args.config))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # 1. Export: the kohya file, for ComfyUI, A1111, Forge and InvokeAI.
    [kohya] = export_lora_files(args.lora, out / "kohya", export_formats=["kohya"], overwrite=True)
    print(f"exported {kohya}")

    # 2. Merge: W += strength * (alpha / r) * up @ down, into a copy of the single file.
    merged, n_changed = merge_lora(checkpoint, kohya, out / f"{checkpoint.stem}-lcm.safetensors", config,
                                   strength=args.strength, overwrite=True)
    print(f"merged into {merged}: {n_changed} weights changed")

    # 3. Sample the merged file in 4 steps: a plain single-file model with LCMScheduler, no LoRA.
    pipe = StableDiffusionPipeline.from_single_file(str(merged), config=config, local_files_only=True).to(device)
    images = sample(pipe, args.original_inference_steps, args.seed)
    for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
        image.save(out / f"merged-{i:02d}.png")
        print(f"{out / f'merged-{i:02d}.png'}: {prompt}")

    # 4. Check: the unmerged checkpoint with the kohya file loaded by diffusers gives the same images.
    pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=config, local_files_only=True).to(device)
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    pipe.fuse_lora(lora_scale=args.strength)
    reference = sample(pipe, args.original_inference_steps, args.seed)
    diff = max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(images, reference))
    print(f"merged file vs checkpoint + load_lora_weights: largest pixel difference {diff} (of 255)")


if __name__ == "__main__":
    main()
