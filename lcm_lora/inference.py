"""Few-step generation with an exported LCM-LoRA: diffusers' pipeline with LCMScheduler swapped in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, LCMScheduler
from PIL import Image

from .config import ModelArgs
from .export import check_lora_for_diffusers, lcm_scheduler_settings
from .formats import LoraFormatError, number
from .models import is_single_file, resolve_teacher, unet_config
from .safetensors_io import check_outputs
from .single_file import load_single_file_pipeline
from .world import assets


def load_lcm_pipeline(pretrained_model: str, lora: str | Path | None, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, original_inference_steps: int | None = None,
                      timestep_scaling: float | None = None, single_file_config: str | None = None):
    """The base pipeline with LCMScheduler and the LoRA loaded exactly as a user would load it.

    `pretrained_model` is a hub id, a folder, a bundled teacher, or a single-file checkpoint (then
    `single_file_config` names the local folder with its configs). `original_inference_steps` and
    `timestep_scaling` must equal the training run's num_ddim_timesteps and timestep_scaling_factor:
    None takes them from the LoRA's metadata, else LCMScheduler's defaults (50 and 10). The LoRA is checked
    against the model's UNet config before any weight loads (export.check_lora_for_diffusers): a LoRA that does
    not fit is refused, never silently left out.
    """
    lora = assets.resolve(lora) if lora is not None else None  # a path, or the bundled style-dusk example
    settings = lcm_scheduler_settings(lora) if lora is not None else {}
    for name, value, integer in (("original_inference_steps", original_inference_steps, True),
                                 ("timestep_scaling", timestep_scaling, False)):
        if value is not None:
            settings[name] = number(value, name, integer)
    if lora is not None:
        model = ModelArgs(pretrained_teacher_model=pretrained_model, single_file_config=single_file_config)
        lora_path = check_lora_for_diffusers(lora, unet_config(model))
    pipe = load_base_pipeline(pretrained_model, single_file_config)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **settings)
    if lora is not None:
        try:
            pipe.load_lora_weights(str(lora_path))
        except Exception as err:  # diffusers raises IndexError, KeyError, ValueError... on what it cannot convert
            raise LoraFormatError(f"{lora_path}: diffusers' load_lora_weights failed ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())}).") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def load_base_pipeline(pretrained_model: str, single_file_config: str | None = None):
    """A diffusers pipeline from a hub id, folder, bundled teacher or single-file checkpoint, safetensors only."""
    source = resolve_teacher(pretrained_model)
    if is_single_file(source):
        return load_single_file_pipeline(source, single_file_config)
    return DiffusionPipeline.from_pretrained(source, safety_checker=None, use_safetensors=True)


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


@torch.no_grad()
def generate(pipe, prompts: list[str], num_inference_steps: int, guidance_scale: float, seed: int,
             height: int | None = None, width: int | None = None) -> list[Image.Image]:
    generator = torch.Generator(pipe.device).manual_seed(seed)
    out = pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               generator=generator, height=height, width=width, output_type="np")
    return [Image.fromarray((im * 255).round().clip(0, 255).astype(np.uint8)) for im in out.images]


def image_paths(output_dir: str | Path, count: int, prefix: str = "") -> list[Path]:
    """The files `save_images` writes for `count` images: one PNG each, then grid.png."""
    output_dir = Path(output_dir)
    return [output_dir / f"{prefix}{i:03d}.png" for i in range(count)] + [output_dir / f"{prefix}grid.png"]


def save_images(images: list[Image.Image], output_dir: str | Path, prefix: str = "", overwrite: bool = False) -> Path:
    """PNG per image plus grid.png; returns the grid's path. An existing image is replaced only with `overwrite`."""
    *paths, grid_path = image_paths(output_dir, len(images), prefix)
    check_outputs([*paths, grid_path], [], overwrite)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, images):
        image.save(path)
    make_grid(images, columns=min(len(images), 8)).save(grid_path)
    return grid_path
