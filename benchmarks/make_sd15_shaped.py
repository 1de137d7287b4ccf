"""Write a random-weight pipeline in Stable Diffusion 1.5's real architecture, for speed and memory runs.

    python benchmarks/make_sd15_shaped.py --out /tmp/sd15-shaped [--prediction_type v_prediction]

The UNet, VAE and text encoder have SD1.5's configs (860M-parameter UNet, 77x768 text states);
the tokenizer is the tiny world's, so no download is needed. Quality is meaningless; cost is real.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lcm_lora.world import assets
from lcm_lora.world.architecture import make_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prediction_type", default="epsilon")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(assets.resolve("teacher-eps") / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(args.prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"UNet parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M -> {args.out}")


if __name__ == "__main__":
    main()
