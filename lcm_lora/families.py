"""Which base model a UNet config or a single-file checkpoint belongs to: SD1, SD2, SDXL, SSD-1B or Segmind Vega.

Decided by structure, never by channel counts, so the tiny test models of each layout are told apart like the real
ones. The SDXL refiner is recognised only to be refused: LCM-LoRA distils the base model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .config import ConfigError
from .ldm_keys import UNET_PREFIX, up_block_depths

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "ssd-1b": "SSD-1B", "vega": "Segmind Vega"}
FAMILIES = tuple(FAMILY_NAMES)
SDXL_FAMILY = ("sdxl", "ssd-1b", "vega")

# SDXL embeds 6 numbers (orig_h, orig_w, crop_top, crop_left, target_h, target_w); the refiner 5, an aesthetic score
# in place of the target size (SDXL paper §2.5; diffusers pipeline_stable_diffusion_xl_img2img.py `_get_add_time_ids`).
REFINER_TIME_IDS = 5
# Single-file markers (diffusers loaders/single_file_utils.py CHECKPOINT_KEY_NAMES "xl_base" / "xl_refiner"): the base
# holds OpenCLIP bigG as the second embedder, the refiner as its only one.
XL_BASE_TEXT_ENCODER = "conditioner.embedders.1.model."
XL_REFINER_TEXT_ENCODER = "conditioner.embedders.0.model."
SD2_TEXT_ENCODER = "cond_stage_model.model."  # OpenCLIP ViT-H; SD1's OpenAI CLIP is cond_stage_model.transformer.
SGM_LABEL_EMBEDDING = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL's size / crop embedding (add_embedding.linear_1)


def model_family(unet_config: dict) -> str:
    """One of FAMILIES: SDXL-family UNets have text-time (size / crop) conditioning, then the mid block and up depths
    tell them apart (_sdxl_variant); a ConfigError for the SDXL refiner (see refiner_problem)."""
    config = dict(unet_config)
    if config.get("addition_embed_type") != "text_time":
        # SD2 feeds OpenCLIP's 1024-wide context through linear projections; SD1 uses 1x1 convolutions.
        return "sd2" if config.get("use_linear_projection") or config.get("cross_attention_dim") == 1024 else "sd1"
    problem = refiner_problem(config, "the UNet config")
    if problem:
        raise ConfigError(problem)
    mid_attention = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"
    depths = up_block_depths(config)
    return _sdxl_variant(mid_attention, depths[1][0] if len(depths) > 1 else 0)


def single_file_family(keys: Iterable[str]) -> str:
    """One of FAMILIES from an original-layout (LDM / SGM) checkpoint's key names; a ConfigError for the refiner."""
    keys = set(keys)
    if any(k.startswith(XL_REFINER_TEXT_ENCODER) for k in keys):
        raise ConfigError(_refiner_message("the checkpoint"))
    if SGM_LABEL_EMBEDDING in keys or any(k.startswith(XL_BASE_TEXT_ENCODER) for k in keys):
        mid_attention = any(k.startswith(UNET_PREFIX + "middle_block.1.") for k in keys)
        second_layer = UNET_PREFIX + "output_blocks.3.1.transformer_blocks.1."
        return _sdxl_variant(mid_attention, 2 if any(k.startswith(second_layer) for k in keys) else 1)
    return "sd2" if any(k.startswith(SD2_TEXT_ENCODER) for k in keys) else "sd1"


def refiner_problem(unet_config: dict, source: str | Path | None = None) -> str | None:
    """Why `source` cannot be distilled if it is the SDXL refiner, else None.

    The refiner conditions on its one text encoder (OpenCLIP bigG: context and pooled vector of one width) and on
    five time ids, so its text-time projection is 5 · addition_time_embed_dim + cross_attention_dim (2560 = 5 · 256 +
    1280; the base has 2816 = 6 · 256 + 1280 with a 2048-wide context of two encoders). A pipeline folder says so
    too: no `text_encoder`, `requires_aesthetics_score` true (the refiner's model_index.json).
    """
    config = dict(unet_config)
    if config.get("addition_embed_type") != "text_time":
        return None
    projection = config.get("projection_class_embeddings_input_dim")
    time_dim, context = config.get("addition_time_embed_dim"), config.get("cross_attention_dim")
    refiner_shaped = None not in (projection, time_dim) and projection - REFINER_TIME_IDS * time_dim == context
    return _refiner_message(source or "the UNet config") if refiner_shaped or _refiner_folder(source) else None


def _refiner_folder(source: str | Path | None) -> bool:
    index = Path(source) / "model_index.json" if source else None
    if index is None or not index.is_file():
        return False
    components = json.loads(index.read_text())
    no_text_encoder = "text_encoder_2" in components and (components.get("text_encoder") or [None])[0] is None
    return bool(components.get("requires_aesthetics_score")) or no_text_encoder


def _refiner_message(source: str | Path) -> str:
    return (f"{source} is the SDXL refiner (one text encoder, 5 time ids with an aesthetic score), which is out of "
            "scope: distil the SDXL base model (stabilityai/stable-diffusion-xl-base-1.0) or a fine-tune of it.")


def _sdxl_variant(mid_attention: bool, second_up_block_depth: int) -> str:
    """SDXL keeps a transformer in its middle block; SSD-1B and Vega cut it to one resnet, and Vega also thins the
    second up block to one transformer layer where SSD-1B keeps two (stable-diffusion.cpp src/model_loader.cpp, which
    tests middle_block.1 and output_blocks.3.1.transformer_blocks.1; diffusers PR #5400 added these layouts)."""
    if mid_attention:
        return "sdxl"
    return "ssd-1b" if second_up_block_depth > 1 else "vega"
