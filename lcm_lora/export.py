"""Export the trained LoRA: key mapping as data, one pure transform, safetensors IO at the edge.

diffusers format: `unet.<module>.lora_A.weight` / `lora_B.weight`, loaded by
`pipe.load_lora_weights(dir)`. The alpha / r scale is baked into lora_B, so the file loads at the
right scale in every diffusers version, with or without metadata (lora_formats.md, R5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_PREFIX = "unet."


def peft_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's LoRA tensors with PEFT's names (`<module>.lora_A.weight`), detached copies."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def to_diffusers(state_dict: dict[str, torch.Tensor], rank: int, alpha: float,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """PEFT names -> diffusers names, with lora_B scaled by alpha / r (the scale is then 1)."""
    scale = alpha / rank
    out = {}
    for key, tensor in state_dict.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise KeyError(f"not a LoRA weight: {key}")
        value = tensor.float() * scale if ".lora_B." in key else tensor.float()
        out[DIFFUSERS_PREFIX + key] = value.to(dtype).contiguous()
    return out


def metadata(config_flat: dict, teacher: str, prediction_type: str, global_step: int) -> dict[str, str]:
    """What a user needs to sample correctly, as safetensors string metadata."""
    return {
        "format": "pt",
        "lcm_lora.teacher": teacher,
        "lcm_lora.prediction_type": prediction_type,
        "lcm_lora.rank": str(config_flat["lora_rank"]),
        "lcm_lora.alpha": str(config_flat["lora_alpha"]),
        "lcm_lora.alpha_baked_into_lora_B": "true",
        "lcm_lora.w_range": f"{config_flat['w_min']},{config_flat['w_max']}",
        "lcm_lora.w_convention": "LCM paper: eps_c + w (eps_c - eps_u); diffusers guidance_scale = w + 1",
        "lcm_lora.num_ddim_timesteps": str(config_flat["num_ddim_timesteps"]),
        "lcm_lora.timestep_scaling_factor": str(config_flat["timestep_scaling_factor"]),
        "lcm_lora.steps_trained": str(global_step),
        "lcm_lora.config": json.dumps(config_flat, sort_keys=True),
    }


def lcm_scheduler_settings(lora: str | Path) -> dict:
    """LCMScheduler arguments that match how a LoRA was trained, read from its metadata.

    Sampling with another `original_inference_steps` than the run's num_ddim_timesteps puts the
    few steps on timesteps the student never saw as consistency endpoints. {} when the file has
    no lcm-lora metadata (a LoRA from elsewhere): then LCMScheduler's defaults apply.
    """
    from safetensors import safe_open

    path = Path(lora)
    path = path / DIFFUSERS_WEIGHT_NAME if path.is_dir() else path
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    settings = {}
    if "lcm_lora.num_ddim_timesteps" in meta:
        settings["original_inference_steps"] = int(meta["lcm_lora.num_ddim_timesteps"])
    if "lcm_lora.timestep_scaling_factor" in meta:
        settings["timestep_scaling"] = float(meta["lcm_lora.timestep_scaling_factor"])
    return settings


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> Path:
    """Write to a temporary name and rename, so a kill mid-write never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def save_diffusers_lora(unet, out_dir: str | Path, rank: int, alpha: float, meta: dict[str, str],
                        dtype: torch.dtype = torch.float32) -> Path:
    tensors = to_diffusers(peft_state_dict(unet), rank, alpha, dtype)
    return save_safetensors_atomic(tensors, Path(out_dir) / DIFFUSERS_WEIGHT_NAME, meta)


LORA_CHECKPOINT_NAME = "lora_peft.safetensors"  # a training checkpoint's LoRA, PEFT names, unscaled


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A training checkpoint (its LoRA + the run's config.yaml one level up) -> diffusers format."""
    import yaml
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    weights, config_path = checkpoint / LORA_CHECKPOINT_NAME, checkpoint.parent / "config.yaml"
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --checkpoint must be a checkpoint-N folder of a training run.")
    flat = yaml.safe_load(config_path.read_text())
    step = int(checkpoint.name.split("-")[-1]) if checkpoint.name.split("-")[-1].isdigit() else -1
    meta = metadata(flat, flat["pretrained_teacher_model"], str(flat.get("prediction_type") or "teacher's"), step)
    tensors = to_diffusers(load_file(str(weights)), flat["lora_rank"], flat["lora_alpha"], dtype)
    return save_safetensors_atomic(tensors, Path(out_dir) / DIFFUSERS_WEIGHT_NAME, meta)
