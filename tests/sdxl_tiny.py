"""A tiny random SDXL pipeline in diffusers' folder layout, built offline from the world's tokenizer and VAE.

    folder = save_tiny_sdxl(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from lcm_lora.world import assets
from tiny_world.architecture import make_tiny_sdxl_pipeline

WORLD_TEACHER = assets.resolve("teacher-eps")


def tiny_sdxl_pipeline(force_zeros_for_empty_prompt: bool = True, seed: int = 0) -> StableDiffusionXLPipeline:
    """Random text encoders and UNet drawn from `seed` (the global RNG is left as it was), the world's VAE
    rescaled to SDXL's scaling factor, the world's tokenizer for both tokenizers."""
    vae = AutoencoderKL.from_pretrained(WORLD_TEACHER / "vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_tiny_sdxl_pipeline(WORLD_TEACHER / "tokenizer", vae,
                                       force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)


def save_tiny_sdxl(folder: str | Path, force_zeros_for_empty_prompt: bool = True, seed: int = 0) -> Path:
    """Save tiny_sdxl_pipeline(...) to `folder` (model_index.json records force_zeros_for_empty_prompt)."""
    tiny_sdxl_pipeline(force_zeros_for_empty_prompt, seed).save_pretrained(folder)
    return Path(folder)
