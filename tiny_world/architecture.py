"""Stable Diffusion's components, in diffusers' exact classes and layout, shrunk for a CPU.

64x64 images, a VAE with 4x spatial downsampling (16x16x4 latents), a CLIP text encoder with
Stable Diffusion's 77-token context, and a cross-attention UNet. Cross-attention sits at the 8x8
and 4x4 levels only: attention over 256 queries at 16x16 triples the CPU cost for little gain here.

The SDXL family's parts (two text encoders, a "text_time" UNet, SDXL's scheduler and VAE scale) are
shrunk the same way; their layout follows the SDXL paper (arXiv 2307.01952, section 2.1 and Table 1).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lcm_lora.world.scene import SIZE

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

LATENT_SIZE = SIZE // 4
TEXT_WIDTH = 64

# Stable Diffusion 1.5's noise schedule, exactly (scheduler/scheduler_config.json of SD1.5 and SD2.1).
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    skip_prk_steps=True,
)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def _clip_text_config(tokenizer: CLIPTokenizer, width: int, num_layers: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=projection_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(_clip_text_config(tokenizer, TEXT_WIDTH, num_layers=2, projection_dim=TEXT_WIDTH))


def make_unet(prediction_type: str) -> UNet2DConditionModel:
    del prediction_type  # the UNet is the same; the scheduler config carries the prediction type
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_scheduler(prediction_type: str) -> PNDMScheduler | DDIMScheduler:
    """SD1.5 ships a PNDMScheduler (epsilon); SD2.1 a DDIMScheduler (v_prediction). Mirror both."""
    scheduler_class = PNDMScheduler if prediction_type == "epsilon" else DDIMScheduler
    return scheduler_class.from_config({**SD_SCHEDULE, "prediction_type": prediction_type})


# The SDXL family, shrunk. Two encoder widths, as CLIP ViT-L (768) and OpenCLIP bigG (1280) differ, so a missing,
# swapped or misordered part of the concatenated context shows; a pooled width unlike either, so the pooled embedding
# cannot pass for a hidden state.
SDXL_TEXT_WIDTHS = (32, 64)
SDXL_POOLED_WIDTH = 48
SDXL_TIME_EMBED_DIM = 8  # sinusoidal width per size/crop number; SDXL's addition_time_embed_dim is 256
SDXL_SCALING_FACTOR = 0.13025  # SDXL VAE's vae/config.json

# SDXL base 1.0's scheduler/scheduler_config.json, every key. DDIM/LCM schedulers built with from_config inherit
# clip_sample and set_alpha_to_one from it; dropping them would let DDIM's defaults (clip x0 to [-1, 1]) creep in.
SDXL_SCHEDULE = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)


def make_sdxl_text_encoders(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """(text_encoder, text_encoder_2) in SDXL's classes: the second projects its EOS token to the pooled embedding.
    Three layers each, so the penultimate hidden state SDXL reads is neither the embeddings nor the last layer."""
    first_width, second_width = SDXL_TEXT_WIDTHS
    first = CLIPTextModel(_clip_text_config(tokenizer, first_width, num_layers=3, projection_dim=first_width))
    second_config = _clip_text_config(tokenizer, second_width, num_layers=3, projection_dim=SDXL_POOLED_WIDTH)
    return first, CLIPTextModelWithProjection(second_config)


def make_sdxl_tokenizer_2(tokenizer_dir: str | Path) -> CLIPTokenizer:
    """SDXL's tokenizer_2: the same BPE, but padding with "!" as OpenCLIP does (SDXL base 1.0's
    tokenizer_2/special_tokens_map.json). The world vocabulary starts with CLIP's byte symbols, so "!" is
    id 0 here as in OpenCLIP's."""
    return CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")


def make_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout for 16x16 latents: no attention at the top level, transformer depth growing downwards
    (SDXL's [1, 2, 10], the first entry unused, becomes [1, 1, 2]; the up path mirrors it and the mid block
    takes the last), linear projections, two resnets per level and a fixed head width. The "text_time"
    embedding takes the pooled text and six size/crop numbers: 6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_WIDTH."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),  # diffusers' name for the number of heads: 16 channels per head
        use_linear_projection=True,
        cross_attention_dim=sum(SDXL_TEXT_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_WIDTH,
        norm_num_groups=16,
    )


def with_scaling_factor(vae: AutoencoderKL, scaling_factor: float = SDXL_SCALING_FACTOR) -> AutoencoderKL:
    """A copy of `vae` whose latents are a = old / new scaling factor times the original's, so that
    latents * `scaling_factor` are what latents * old factor were, and decoding is unchanged.

    quant_conv's output is the posterior's (mean, logvar) per latent channel: z' = a z needs mean' = a mean
    and logvar' = logvar + 2 log a. post_quant_conv then reads z' as it read z if its input weights are
    divided by a.
    """
    a = vae.config.scaling_factor / scaling_factor
    channels = vae.config.latent_channels
    rescaled = copy.deepcopy(vae)
    with torch.no_grad():
        rescaled.quant_conv.weight[:channels] *= a
        rescaled.quant_conv.bias[:channels] *= a
        rescaled.quant_conv.bias[channels:] += 2 * math.log(a)
        rescaled.post_quant_conv.weight /= a
    rescaled.register_to_config(scaling_factor=scaling_factor)
    return rescaled


def make_tiny_sdxl_pipeline(tokenizer_dir: str | Path, vae: AutoencoderKL, unet: UNet2DConditionModel | None = None,
                            force_zeros_for_empty_prompt: bool = True) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline of the parts above, random weights except `vae` and `unet` if given.

    The pipeline gets a copy of `vae` rescaled to SDXL's scaling factor. Classifier-free guidance with no
    negative prompt uses zero embeddings when `force_zeros_for_empty_prompt`, as SDXL base 1.0 does.
    """
    # Imported here: diffusers' pipelines package loads transformers' image processors, which the components
    # above do not need.
    from diffusers import StableDiffusionXLPipeline

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder, text_encoder_2 = make_sdxl_text_encoders(tokenizer)
    return StableDiffusionXLPipeline(
        vae=with_scaling_factor(vae),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=make_sdxl_tokenizer_2(tokenizer_dir),
        unet=make_sdxl_unet() if unet is None else unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULE),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,  # an invisible watermark would change the pixels tests compare
    )
