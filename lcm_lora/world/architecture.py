"""Stable Diffusion's components, in diffusers' exact classes and layout, shrunk for a CPU.

64x64 images, a VAE with 4x spatial downsampling (16x16x4 latents), a CLIP text encoder with
Stable Diffusion's 77-token context, and a cross-attention UNet. Cross-attention sits at the 8x8
and 4x4 levels only: attention over 256 queries at 16x16 triples the CPU cost for little gain here.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .scene import SIZE

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


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        projection_dim=TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


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
