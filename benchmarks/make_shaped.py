"""Write a random-weight pipeline in a real Stable Diffusion architecture, for speed and memory runs.

    python benchmarks/make_shaped.py --arch sd15 --out /tmp/sd15-shaped [--prediction_type v_prediction]
    python benchmarks/make_shaped.py --arch sdxl --out /tmp/sdxl-shaped    # also ssd-1b, vega

The UNet, VAE and text encoders have the published configs: SD1.5's 860M-parameter UNet with CLIP ViT-L
(runwayml/stable-diffusion-v1-5), SDXL base 1.0's 2.6B UNet with CLIP ViT-L and OpenCLIP bigG
(stabilityai/stable-diffusion-xl-base-1.0), and Segmind's SSD-1B and Vega UNets (segmind/SSD-1B,
segmind/Segmind-Vega). The tokenizers are the tiny world's, so no download is needed. Quality is
meaningless; cost is real.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lcm_lora.world import assets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tiny_world/ is the repository's, never installed
from tiny_world.architecture import SDXL_SCHEDULE, make_scheduler, make_sdxl_tokenizer_2

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128)
# Segmind's distilled SDXL UNets (arXiv 2401.02677): fewer transformer layers and a mid block of one resnet.
UNETS = {
    "sd15": SD15_UNET,
    "sdxl": SDXL_UNET,
    "ssd-1b": dict(SDXL_UNET, transformer_layers_per_block=(1, 2, 4), mid_block_type="UNetMidBlock2D",
                   reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1))),
    "vega": dict(SDXL_UNET, transformer_layers_per_block=(1, 1, 2), mid_block_type="UNetMidBlock2D"),
}
# (hidden size, layers, heads, activation, projection) of CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers.
CLIP_L = (768, 12, 12, "quick_gelu", 768)
OPEN_CLIP_BIGG = (1280, 32, 20, "gelu", 1280)


def text_config(tokenizer: CLIPTokenizer, shape: tuple) -> CLIPTextConfig:
    width, layers, heads, act, projection = shape
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act,
                          max_position_embeddings=77, projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def make_vae(scaling_factor: float, **extra) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling_factor, **extra)


def make_pipeline(arch: str, prediction_type: str):
    tokenizer_dir = assets.resolve("teacher-eps") / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2, **UNETS[arch])
    if arch == "sd15":
        return StableDiffusionPipeline(
            vae=make_vae(0.18215), text_encoder=CLIPTextModel(text_config(tokenizer, CLIP_L)), tokenizer=tokenizer,
            unet=unet, scheduler=make_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    return StableDiffusionXLPipeline(
        vae=make_vae(0.13025, force_upcast=True),  # SDXL 1.0's VAE overflows in fp16 (its vae/config.json)
        text_encoder=CLIPTextModel(text_config(tokenizer, CLIP_L)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer, OPEN_CLIP_BIGG)),
        tokenizer=tokenizer, tokenizer_2=make_sdxl_tokenizer_2(tokenizer_dir), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config({**SDXL_SCHEDULE, "prediction_type": prediction_type}),
        add_watermarker=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(UNETS), default="sd15")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prediction_type", default="epsilon")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = make_pipeline(args.arch, args.prediction_type)
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"{args.arch}: UNet parameters {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M -> {args.out}")


if __name__ == "__main__":
    main()
