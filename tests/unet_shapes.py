"""UNet configs with the block layouts of the real models, for naming tests (no weights needed at full size)."""

SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
                 layers_per_block=2, sample_size=64)
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                 upcast_attention=True, sample_size=96)
SDXL_UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128)
# Segmind's distilled SDXL UNets (arXiv 2401.02677; diffusers PR #5400): fewer transformer layers, a mid block of one
# resnet, and for SSD-1B an up path deeper than the down path reversed.
SSD1B_LAYOUT = dict(transformer_layers_per_block=[1, 2, 4], mid_block_type="UNetMidBlock2D",
                    reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]])
VEGA_LAYOUT = dict(transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D")
SSD1B_UNET = dict(SDXL_UNET, **SSD1B_LAYOUT)
VEGA_UNET = dict(SDXL_UNET, **VEGA_LAYOUT)
# The SDXL refiner (stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json): one 1280-wide encoder, 5 time ids.
SDXL_REFINER_UNET = dict(SDXL_UNET, block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
                         down_block_types=["DownBlock2D", *["CrossAttnDownBlock2D"] * 2, "DownBlock2D"],
                         up_block_types=["UpBlock2D", *["CrossAttnUpBlock2D"] * 2, "UpBlock2D"],
                         transformer_layers_per_block=4, cross_attention_dim=1280,
                         projection_class_embeddings_input_dim=2560)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)

# The same layouts with tiny channels, small enough to hold real tensors.
TINY_SD15_UNET = dict(SD15_UNET, block_out_channels=[16, 32, 64, 64], attention_head_dim=2, norm_num_groups=8,
                      sample_size=8)
# Tiny SDXL-family UNets fit the tiny SDXL pipeline's text encoders (tests/sdxl_tiny.py): context 32 + 64 = 96, pooled
# 48, so the text-time projection is 6 time ids · 8 + 48 = 96. SSD-1B and Vega keep their real transformer depths.
TINY_SDXL_UNET = dict(SDXL_UNET, block_out_channels=[16, 32, 64], attention_head_dim=[2, 4, 8], norm_num_groups=8,
                      transformer_layers_per_block=[1, 2, 3], cross_attention_dim=96, addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=96, sample_size=8)
TINY_SSD1B_UNET = dict(TINY_SDXL_UNET, **SSD1B_LAYOUT)
TINY_VEGA_UNET = dict(TINY_SDXL_UNET, **VEGA_LAYOUT)
# The refiner's conditioning on SDXL's tiny blocks: one 64-wide encoder for context and pooled vector, 5 time ids.
TINY_SDXL_REFINER_UNET = dict(TINY_SDXL_UNET, cross_attention_dim=64, projection_class_embeddings_input_dim=5 * 8 + 64)
TINY_VAE = dict(SD_VAE, block_out_channels=[8, 16, 16], norm_num_groups=4, sample_size=32,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
