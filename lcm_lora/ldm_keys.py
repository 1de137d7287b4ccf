"""The original Stable Diffusion (LDM / CompVis, and Stability-AI's sgm for SDXL) key layout of single-file
checkpoints, as name tables built from a model's config, block by block, so they fit SD1.x, SD2.x, the SDXL family
(SDXL, SSD-1B, Vega) and the tiny teachers alike. Pure data and functions of configs: no weights, no files.

A "single file" is one .safetensors holding the whole pipeline with the names of the original training code:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and `cond_stage_model.transformer.text_model.*` (CLIP
text encoder). SDXL files hold two encoders instead: `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L,
HF layout) and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG in open_clip's layout). The tests prove the
tables against diffusers' own `from_single_file` (write with ours, read with theirs).
"""

from __future__ import annotations

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_INNER_PREFIX = "text_model."  # in SD1 files; transformers >= 5.6 dropped it from CLIPTextModel's own keys
# SDXL (Stability-AI/generative-models sgm GeneralConditioner; kohya library/sdxl_model_util.py): CLIP ViT-L in the
# HF layout, OpenCLIP ViT-bigG in its own.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# Which top-level key prefixes mean a file holds each part.
PART_PREFIXES = {
    "unet": (UNET_PREFIX,),
    "vae": (VAE_PREFIX,),
    "text_encoder": ("cond_stage_model.",),
}
SDXL_PART_PREFIXES = {**PART_PREFIXES, "text_encoder": (SDXL_CLIP_PREFIX,), "text_encoder_2": (SDXL_OPEN_CLIP_PREFIX,)}

# --- UNet -------------------------------------------------------------------------------------

# diffusers' defaults, for configs written by hand that leave keys out.
UNET_DEFAULTS = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "norm_num_groups": 32,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "dual_cross_attention": False,
    "attention_type": "default",
    "time_cond_proj_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
}

UNET_DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has attention
UNET_UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
# mid block type -> has attention: SSD-1B and Segmind Vega keep one resnet (UNetMidBlock2D, diffusers PR #5400).
UNET_MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False}

# Config values whose modules have no agreed LDM name: refuse them rather than write a file no tool reads.
UNET_UNSUPPORTED = {
    "dual_cross_attention": (True,),
    "time_embedding_type": ("fourier",),
    "resnet_time_scale_shift": ("ada_group", "spatial"),
    "class_embed_type": ("simple_projection",),
}
UNET_REQUIRED_NONE = ("time_cond_proj_dim", "encoder_hid_dim_type")  # e.g. a full LCM UNet's time_embedding.cond_proj

UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_out": "out.2",
}
UNET_NORM_OUT = {"conv_norm_out": "out.0"}  # absent when norm_num_groups is None
# A TimestepEmbedding used as class / addition embedding is LDM's label_emb Sequential(Linear, SiLU, Linear).
UNET_LABEL_EMBEDDING = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
}
UNET_RESNET_SHORTCUT = {"conv_shortcut": "skip_connection"}  # only when in_channels != out_channels

# Transformer2DModel (LDM SpatialTransformer) and BasicTransformerBlock: same names on both sides.
SPATIAL_TRANSFORMER_LEAVES = ("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK_LEAVES = (
    "norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "norm2", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "norm3", "ff.net.0.proj", "ff.net.2",
)

# --- VAE --------------------------------------------------------------------------------------

VAE_DEFAULTS = {
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
VAE_DOWN_BLOCK = "DownEncoderBlock2D"
VAE_UP_BLOCK = "UpDecoderBlock2D"

VAE_FIXED = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
}
VAE_QUANT_CONVS = {"use_quant_conv": "quant_conv", "use_post_quant_conv": "post_quant_conv"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
VAE_RESNET_SHORTCUT = {"conv_shortcut": "nin_shortcut"}
VAE_MID_RESNETS = {"resnets.0": "block_1", "resnets.1": "block_2"}
VAE_MID_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# LDM's AttnBlock uses 1x1 convolutions where diffusers uses Linear: 4-D weights in the file.
VAE_CONV_ATTENTION_LEAVES = ("q", "k", "v", "proj_out")

# --- OpenCLIP text encoder (SDXL's bigG) ---------------------------------------------------------

# transformers CLIPTextModelWithProjection -> open_clip TextTransformer, as diffusers' single_file_utils.py
# (DIFFUSERS_TO_LDM_MAPPING["openclip"], convert_open_clip_checkpoint) and kohya's sdxl_model_util.py
# (convert_text_encoder_2_state_dict_to_sdxl) pair them.
OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_PROJECTION = ("text_projection.weight", "text_projection")  # open_clip computes x @ P: P is weight.T
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_FUSED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # nn.MultiheadAttention's in_proj


# ===== name tables =============================================================================


def _with_defaults(config: dict, defaults: dict) -> dict:
    return {**defaults, **dict(config)}


def _spread(value, n: int) -> list:
    """diffusers' "one int for all, or one per block / layer" settings, as a list of n."""
    return [value] * n if isinstance(value, int) else list(value)


def _leaves(diffusers_prefix: str, ldm_prefix: str, table: dict[str, str]) -> dict[str, str]:
    return {f"{diffusers_prefix}.{d}": f"{ldm_prefix}.{ldm}" for d, ldm in table.items()}


def _unet_resnet(diffusers_prefix: str, ldm_prefix: str, in_channels: int, out_channels: int) -> dict[str, str]:
    # diffusers' ResnetBlock2D gets a 1x1 shortcut conv exactly when the channel count changes.
    table = {**UNET_RESNET, **(UNET_RESNET_SHORTCUT if in_channels != out_channels else {})}
    return _leaves(diffusers_prefix, ldm_prefix, table)


def _spatial_transformer(diffusers_prefix: str, ldm_prefix: str, depth: int) -> dict[str, str]:
    names = _leaves(diffusers_prefix, ldm_prefix, {leaf: leaf for leaf in SPATIAL_TRANSFORMER_LEAVES})
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        names |= _leaves(f"{diffusers_prefix}.{block}", f"{ldm_prefix}.{block}",
                         {leaf: leaf for leaf in TRANSFORMER_BLOCK_LEAVES})
    return names


def _check_unet_supported(config: dict) -> None:
    problems = [f"{key}={config[key]!r}" for key, bad in UNET_UNSUPPORTED.items() if config[key] in bad]
    problems += [f"{key}={config[key]!r}" for key in UNET_REQUIRED_NONE if config.get(key) is not None]
    problems += [f"down block {t!r}" for t in config["down_block_types"] if t not in UNET_DOWN_BLOCKS]
    problems += [f"up block {t!r}" for t in config["up_block_types"] if t not in UNET_UP_BLOCKS]
    if config["attention_type"] != "default":  # gated (GLIGEN) blocks add a fuser LDM never named
        problems.append(f"attention_type={config['attention_type']!r}")
    if config["mid_block_type"] not in UNET_MID_BLOCKS:
        problems.append(f"mid_block_type={config['mid_block_type']!r}")
    if _class_embedding_names(config) and _addition_embedding_names(config):
        problems.append("both a class and an addition embedding (both are LDM's label_emb)")
    if problems:
        raise NotImplementedError(f"UNet config has no original-SD (LDM) layout for: {', '.join(problems)}.")


def _class_embedding_names(config: dict) -> dict[str, str]:
    if config["class_embed_type"] in ("timestep", "projection"):
        return {f"class_embedding.{d}": ldm for d, ldm in UNET_LABEL_EMBEDDING.items()}
    if config["class_embed_type"] is None and config["num_class_embeds"] is not None:
        return {"class_embedding": "label_emb"}  # nn.Embedding in both (SD x4 upscaler)
    return {}  # none, or "identity" (no parameters)


def _addition_embedding_names(config: dict) -> dict[str, str]:
    if config["addition_embed_type"] == "text_time":  # SDXL's size / crop conditioning
        return {f"add_embedding.{d}": ldm for d, ldm in UNET_LABEL_EMBEDDING.items()}
    if config["addition_embed_type"] is not None:
        raise NotImplementedError(f"UNet addition_embed_type={config['addition_embed_type']!r} has no LDM layout.")
    return {}


def _unet_down_names(config: dict) -> dict[str, str]:
    channels, types = list(config["block_out_channels"]), list(config["down_block_types"])
    layers = _spread(config["layers_per_block"], len(types))
    depths = _spread(config["transformer_layers_per_block"], len(types))
    names, index, out_channels = {}, 1, channels[0]  # input_blocks.0 is conv_in
    for b, block_type in enumerate(types):
        in_channels, out_channels = out_channels, channels[b]
        block_depths = _spread(depths[b], layers[b])
        for layer in range(layers[b]):
            ldm = f"input_blocks.{index}"
            names |= _unet_resnet(f"down_blocks.{b}.resnets.{layer}", f"{ldm}.0",
                                  in_channels if layer == 0 else out_channels, out_channels)
            if UNET_DOWN_BLOCKS[block_type]:
                names |= _spatial_transformer(f"down_blocks.{b}.attentions.{layer}", f"{ldm}.1", block_depths[layer])
            index += 1
        if b < len(types) - 1:  # every block but the last halves the resolution, as its own input block
            names[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    return names


def _unet_mid_names(config: dict) -> dict[str, str]:
    channels = config["block_out_channels"][-1]
    names = _unet_resnet("mid_block.resnets.0", "middle_block.0", channels, channels)
    if not UNET_MID_BLOCKS[config["mid_block_type"]]:
        return names  # one resnet and nothing else: SSD-1B and Vega files have only middle_block.0
    depths = _spread(config["transformer_layers_per_block"], len(config["down_block_types"]))
    depth = _spread(depths[-1], 1)[0]  # the mid block takes the last (deepest) block's depth
    return (names
            | _spatial_transformer("mid_block.attentions.0", "middle_block.1", depth)
            | _unet_resnet("mid_block.resnets.1", "middle_block.2", channels, channels))


def up_block_depths(unet_config: dict) -> list[list[int]]:
    """The transformer depth of every layer of every up block: `reverse_transformer_layers_per_block` where the up
    path is not the down path reversed (SSD-1B: [[4, 4, 10], [2, 1, 1], ...]), else the down depths reversed."""
    config = _with_defaults(unet_config, UNET_DEFAULTS)
    n = len(config["up_block_types"])
    layers = list(reversed(_spread(config["layers_per_block"], n)))
    depths = config["reverse_transformer_layers_per_block"] or list(
        reversed(_spread(config["transformer_layers_per_block"], n)))
    # each up block has one layer more than its down block: it also takes the downsampler's skip
    return [_spread(depths[b], layers[b] + 1) for b in range(n)]


def _unet_up_names(config: dict) -> dict[str, str]:
    channels, types = list(reversed(config["block_out_channels"])), list(config["up_block_types"])
    n = len(types)
    names, index, out_channels = {}, 0, channels[0]
    for b, (block_type, block_depths) in enumerate(zip(types, up_block_depths(config))):
        prev_channels, out_channels = out_channels, channels[b]
        skip_channels = channels[min(b + 1, n - 1)]  # the skip saved before the matching down block
        num_layers = len(block_depths)
        has_attention = UNET_UP_BLOCKS[block_type]
        for layer in range(num_layers):
            ldm = f"output_blocks.{index}"
            in_channels = (prev_channels if layer == 0 else out_channels) + (
                skip_channels if layer == num_layers - 1 else out_channels)
            names |= _unet_resnet(f"up_blocks.{b}.resnets.{layer}", f"{ldm}.0", in_channels, out_channels)
            if has_attention:
                names |= _spatial_transformer(f"up_blocks.{b}.attentions.{layer}", f"{ldm}.1", block_depths[layer])
            if layer == num_layers - 1 and b < n - 1:  # the upsampler sits after the last layer's attention
                names[f"up_blocks.{b}.upsamplers.0.conv"] = f"{ldm}.{2 if has_attention else 1}.conv"
            index += 1
    return names


def unet_ldm_names(unet_config: dict) -> dict[str, str]:
    """Every parameter-holding leaf module of a UNet2DConditionModel -> its LDM path (no prefix)."""
    config = _with_defaults(unet_config, UNET_DEFAULTS)
    _check_unet_supported(config)
    return (dict(UNET_FIXED)
            | (UNET_NORM_OUT if config["norm_num_groups"] is not None else {})
            | _class_embedding_names(config)
            | _addition_embedding_names(config)
            | _unet_down_names(config)
            | _unet_mid_names(config)
            | _unet_up_names(config))


def _ldm_key(diffusers_key: str, names: dict[str, str], prefix: str, part: str) -> str:
    module, param = diffusers_key.rsplit(".", 1)
    if module not in names:
        hint = (" It looks like a PEFT/LoRA layer: fuse the LoRA and unload it first "
                "(pipe.fuse_lora(); pipe.unload_lora_weights())."
                if ".base_layer" in module or ".lora_" in module else "")
        raise KeyError(f"{part} parameter {diffusers_key!r} has no LDM name for this config.{hint}")
    return f"{prefix}{names[module]}.{param}"


def unet_ldm_key(diffusers_param_key: str, names: dict[str, str]) -> str:
    """`down_blocks.0.resnets.0.conv1.weight` -> `model.diffusion_model.input_blocks.1.0.in_layers.2.weight`."""
    return _ldm_key(diffusers_param_key, names, UNET_PREFIX, "UNet")


def _vae_resnet(diffusers_prefix: str, ldm_prefix: str, in_channels: int, out_channels: int) -> dict[str, str]:
    table = {**VAE_RESNET, **(VAE_RESNET_SHORTCUT if in_channels != out_channels else {})}
    return _leaves(diffusers_prefix, ldm_prefix, table)


def _vae_mid_names(half: str, channels: int, attention: bool) -> dict[str, str]:
    names = {}
    for resnet, ldm in VAE_MID_RESNETS.items():
        names |= _vae_resnet(f"{half}.mid_block.{resnet}", f"{half}.mid.{ldm}", channels, channels)
    if attention:
        names |= _leaves(f"{half}.mid_block.attentions.0", f"{half}.mid.attn_1", VAE_MID_ATTENTION)
    return names


def _check_vae_supported(config: dict) -> None:
    bad = [t for t in config["down_block_types"] if t != VAE_DOWN_BLOCK]
    bad += [t for t in config["up_block_types"] if t != VAE_UP_BLOCK]
    if bad or not isinstance(config["layers_per_block"], int):
        raise NotImplementedError(f"VAE config has no original-SD (LDM) layout: blocks {bad}, "
                                  f"layers_per_block {config['layers_per_block']!r}.")


def vae_ldm_names(vae_config: dict) -> dict[str, str]:
    """Every parameter-holding leaf module of an AutoencoderKL -> its LDM path (no prefix)."""
    config = _with_defaults(vae_config, VAE_DEFAULTS)
    _check_vae_supported(config)
    channels, layers = list(config["block_out_channels"]), config["layers_per_block"]
    n, attention = len(channels), config["mid_block_add_attention"]
    names = dict(VAE_FIXED) | {name: name for flag, name in VAE_QUANT_CONVS.items() if config[flag]}

    out_channels = channels[0]
    for b in range(n):
        in_channels, out_channels = out_channels, channels[b]
        for layer in range(layers):
            names |= _vae_resnet(f"encoder.down_blocks.{b}.resnets.{layer}", f"encoder.down.{b}.block.{layer}",
                                 in_channels if layer == 0 else out_channels, out_channels)
        if b < n - 1:
            names[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = f"encoder.down.{b}.downsample.conv"
    names |= _vae_mid_names("encoder", channels[-1], attention) | _vae_mid_names("decoder", channels[-1], attention)

    reversed_channels, out_channels = list(reversed(channels)), channels[-1]
    for i in range(n):
        ldm_index = n - 1 - i  # LDM numbers decoder blocks from the full-resolution end
        prev_channels, out_channels = out_channels, reversed_channels[i]
        for layer in range(layers + 1):
            names |= _vae_resnet(f"decoder.up_blocks.{i}.resnets.{layer}", f"decoder.up.{ldm_index}.block.{layer}",
                                 prev_channels if layer == 0 else out_channels, out_channels)
        if i < n - 1:
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{ldm_index}.upsample.conv"
    return names


def vae_ldm_key(diffusers_param_key: str, names: dict[str, str]) -> str:
    """`decoder.up_blocks.0.resnets.0.conv1.weight` -> `first_stage_model.decoder.up.<n-1>.block.0.conv1.weight`."""
    return _ldm_key(diffusers_param_key, names, VAE_PREFIX, "VAE")


def text_encoder_ldm_key(hf_key: str, prefix: str = CLIP_PREFIX) -> str:
    """A CLIPTextModel key (with or without `text_model.`) -> `cond_stage_model.transformer.text_model.<...>`
    (SD1), or under SDXL's `conditioner.embedders.0.transformer.`."""
    return prefix + (hf_key if hf_key.startswith(CLIP_INNER_PREFIX) else CLIP_INNER_PREFIX + hf_key)
