"""Writing a pipeline as one original-layout single file (lcm_lora.ldm_keys' names): what community checkpoints
look like, for the tests. The library only reads single files (lcm_lora.single_file) and merges LoRAs into them
(lcm_lora.convert)."""

from __future__ import annotations

from pathlib import Path

import torch

from lcm_lora.ldm_keys import (CLIP_PREFIX, OPEN_CLIP_FIXED, OPEN_CLIP_FUSED, OPEN_CLIP_LAYER, OPEN_CLIP_PROJECTION,
                               SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, VAE_CONV_ATTENTION_LEAVES, text_encoder_ldm_key,
                               unet_ldm_key, unet_ldm_names, vae_ldm_key, vae_ldm_names)
from lcm_lora.safetensors_io import save_safetensors_atomic

def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    names = unet_ldm_names(dict(unet.config))
    return {unet_ldm_key(k, names): v for k, v in unet.state_dict().items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    names = vae_ldm_names(dict(vae.config))
    out = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = vae_ldm_key(key, names)
        leaf, param = ldm_key.rsplit(".", 2)[-2:]
        if leaf in VAE_CONV_ATTENTION_LEAVES and param == "weight" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[ldm_key] = tensor
    return out


def text_encoder_to_ldm(text_encoder, prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """OpenAI CLIP ViT-L (SD1's encoder, SDXL's first) in the HF layout under `prefix`; SD2's OpenCLIP is refused."""
    kind = type(text_encoder).__name__
    if kind != "CLIPTextModel":
        raise NotImplementedError(f"text encoder {kind}: only a CLIPTextModel is written under {prefix}*.")
    if getattr(text_encoder.config, "hidden_act", "quick_gelu") != "quick_gelu":
        # SD2's OpenCLIP ViT-H, converted to HF CLIP, is the only gelu one; its original layout is
        # cond_stage_model.model.* with fused in_proj weights.
        raise NotImplementedError("text encoder looks like SD2's OpenCLIP (hidden_act "
                                  f"{text_encoder.config.hidden_act!r}); its cond_stage_model.model.* layout "
                                  "is not supported.")
    return {text_encoder_ldm_key(k, prefix): v for k, v in text_encoder.state_dict().items()}


def open_clip_to_ldm(text_encoder_2, prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SDXL's CLIPTextModelWithProjection (OpenCLIP bigG converted to HF) back in open_clip's layout under `prefix`:
    q, k, v fused into one in_proj, the projection transposed."""
    state = text_encoder_2.state_dict()
    hf_projection, projection = OPEN_CLIP_PROJECTION
    out = {prefix + ldm: state[hf] for hf, ldm in OPEN_CLIP_FIXED.items()}
    out[prefix + projection] = state[hf_projection].T
    for i in range(text_encoder_2.config.num_hidden_layers):
        hf, ldm = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{ldm}attn.in_proj_{param}"] = torch.cat([state[f"{hf}{qkv}.{param}"] for qkv in OPEN_CLIP_FUSED])
            out |= {f"{ldm}{name}.{param}": state[f"{hf}{hf_name}.{param}"]
                    for hf_name, name in OPEN_CLIP_LAYER.items()}
    if len(out) != len(state) - 4 * text_encoder_2.config.num_hidden_layers:  # 6 q/k/v tensors became 2 per layer
        raise KeyError("text encoder 2 has parameters the open_clip layout does not name (a LoRA attached? fuse "
                       "and unload it first).")
    return out


def pipeline_to_ldm_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """UNet + VAE + text encoder(s) as one state dict in the original layout: SD1's, or SDXL's (both encoders)."""
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    if sdxl != (text_encoder_2 is not None):
        raise ValueError("an SDXL UNet comes with two text encoders (text_encoder_2 = OpenCLIP bigG), an SD1 or "
                         f"SD2 UNet with one; got a {'SDXL' if sdxl else 'non-SDXL'} UNet and "
                         f"{'one' if text_encoder_2 is None else 'two'}.")
    text = (text_encoder_to_ldm(text_encoder, SDXL_CLIP_PREFIX) | open_clip_to_ldm(text_encoder_2) if sdxl
            else text_encoder_to_ldm(text_encoder))
    merged = unet_to_ldm(unet) | vae_to_ldm(vae) | text
    if len(merged) != len(unet.state_dict()) + len(vae.state_dict()) + len(text):
        raise AssertionError("two parameters were given the same LDM name: a name table is wrong")
    return merged


def save_single_file(pipe, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a StableDiffusion(XL)Pipeline as one original-layout .safetensors (temp name, then rename)."""
    state = pipeline_to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    # .contiguous(): the VAE attention weights are reshaped views; safetensors wants dense CPU tensors.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return save_safetensors_atomic(tensors, Path(path), {"format": "pt", **(metadata or {})})
