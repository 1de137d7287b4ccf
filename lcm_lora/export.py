"""Export the trained LoRA in every format: formats.py names the keys; safetensors IO happens here.

    diffusers  <dir>/pytorch_lora_weights.safetensors   PEFT keys (unet.<module>.lora_A/B), alpha / r baked
                                                        into lora_B: `pipe.load_lora_weights(dir)` (R5)
    kohya      <dir>/<output_name>.safetensors           lora_unet_* + lora_down/lora_up + fp32 alpha, ss_* and
                                                        modelspec.* metadata: ComfyUI, A1111, Forge, InvokeAI (R2)
    hub        <dir>/hub/pytorch_lora_weights.safetensors  kohya keys under the diffusers file name, the layout
                                                        of the LCM-LoRA hub repos: one file that loads everywhere
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from . import formats
from .config import EXPORT_FORMATS
from .formats import LoraModule
from .safetensors_io import read_metadata, read_safetensors, save_safetensors_atomic  # noqa: F401  (re-exported)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_CHECKPOINT_NAME = "lora_peft.safetensors"  # a training checkpoint's LoRA, PEFT names, unscaled
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # config.EXPORT_DTYPES


def lora_modules(unet, adapter: str = "default") -> dict[str, LoraModule]:
    """The live PEFT LoRA in internal form, each module's true scale read from PEFT (rsLoRA and
    per-module ranks or alphas included), detached fp32 copies."""
    modules = {}
    for path, layer in unet.named_modules():
        if hasattr(layer, "lora_A") and adapter in layer.lora_A:
            down = layer.lora_A[adapter].weight.detach().float().clone()
            up = layer.lora_B[adapter].weight.detach().float().clone()
            alpha = layer.scaling[adapter] * down.shape[0]  # scaling = alpha / r (alpha / sqrt(r) under rsLoRA)
            modules[path] = LoraModule(down=down, up=up, alpha=round(alpha) if abs(alpha - round(alpha)) < 1e-9 else alpha)
    return modules


def peft_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's LoRA tensors with PEFT's names (`<module>.lora_A.weight`), detached copies: checkpoints."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def metadata(config_flat: dict, teacher: str, prediction_type: str, global_step: int | None) -> dict[str, str]:
    """What a user needs to sample correctly, as safetensors string metadata (every format carries it).
    A LoRA from elsewhere has no run config: then only what is known is written."""
    c = config_flat
    values = {
        "format": "pt",
        "lcm_lora.teacher": teacher,
        "lcm_lora.prediction_type": prediction_type,
        "lcm_lora.rank": c.get("lora_rank"),
        "lcm_lora.alpha": c.get("lora_alpha"),
        "lcm_lora.w_range": f"{c['w_min']},{c['w_max']}" if "w_min" in c else None,
        "lcm_lora.w_convention": "LCM paper: eps_c + w (eps_c - eps_u); diffusers guidance_scale = w + 1"
        if "w_min" in c else None,
        "lcm_lora.num_ddim_timesteps": c.get("num_ddim_timesteps"),
        "lcm_lora.timestep_scaling_factor": c.get("timestep_scaling_factor"),
        "lcm_lora.steps_trained": global_step,
        "lcm_lora.config": json.dumps(c, sort_keys=True) if c else None,
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def lcm_scheduler_settings(lora: str | Path) -> dict:
    """LCMScheduler arguments that match how a LoRA was trained, read from its metadata.

    Sampling with another `original_inference_steps` than the run's num_ddim_timesteps puts the
    few steps on timesteps the student never saw as consistency endpoints. {} when the file has
    no lcm-lora metadata (a LoRA from elsewhere): then LCMScheduler's defaults apply.
    """
    path = lora_file(lora)
    if not path.is_file():
        return {}
    meta = read_metadata(path)
    settings = {}
    if "lcm_lora.num_ddim_timesteps" in meta:
        settings["original_inference_steps"] = int(meta["lcm_lora.num_ddim_timesteps"])
    if "lcm_lora.timestep_scaling_factor" in meta:
        settings["timestep_scaling"] = float(meta["lcm_lora.timestep_scaling_factor"])
    return settings


# -- file edges ---------------------------------------------------------------------------------------

def addnet_hashes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    """sd-scripts' `sshs_model_hash` / `sshs_legacy_hash` (what A1111 shows), computed as sd-scripts does on
    the file serialised with only the `ss_*` metadata, and ModelSpec's `hash_sha256` of the tensor bytes."""
    data = save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[header_end:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash, "modelspec.hash_sha256": "0x" + model_hash}


# -- one run, every format ----------------------------------------------------------------------------

@dataclass
class ExportInfo:
    """What the files say about the run: written into every format's metadata."""

    config_flat: dict
    teacher: str
    prediction_type: str
    steps: int | None
    unet_config: dict
    output_name: str

    @property
    def resolution(self) -> int:
        return int(self.config_flat.get("resolution") or self.unet_config.get("sample_size", 64) * 8)


def default_output_name(teacher: str) -> str:
    """lcm-lora-<teacher's last path part>, safe as a file name."""
    from .models import is_single_file

    path = Path(str(teacher).rstrip("/"))
    stem = (path.stem if is_single_file(str(path)) else path.name) or "model"
    return "lcm-lora-" + re.sub(r"[^A-Za-z0-9._-]+", "-", stem)


def write_formats(modules: dict[str, LoraModule], out_dir: str | Path, export_formats: tuple[str, ...] | list[str],
                  dtype: torch.dtype, info: ExportInfo) -> list[Path]:
    """Write `modules` in each requested format under `out_dir`; returns the files written."""
    unknown = [f for f in export_formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"--export_formats {' '.join(unknown)}: unknown; choose from {', '.join(EXPORT_FORMATS)}.")
    out_dir, written = Path(out_dir), []
    base_meta = metadata(info.config_flat, info.teacher, info.prediction_type, info.steps)
    if "diffusers" in export_formats:
        tensors = formats.to_diffusers_keys(modules, dtype)
        meta = {**base_meta, **formats.diffusers_adapter_metadata(modules), "lcm_lora.alpha_baked_into_lora_B": "true"}
        written.append(save_safetensors_atomic(tensors, out_dir / DIFFUSERS_WEIGHT_NAME, meta))
    if "kohya" in export_formats or "hub" in export_formats:
        tensors, meta = kohya_file(modules, dtype, info, base_meta)
        if "kohya" in export_formats:
            written.append(save_safetensors_atomic(tensors, out_dir / f"{info.output_name}.safetensors", meta))
        if "hub" in export_formats:
            written.append(save_safetensors_atomic(tensors, out_dir / "hub" / DIFFUSERS_WEIGHT_NAME, meta))
    return written


def kohya_file(modules: dict[str, LoraModule], dtype: torch.dtype, info: ExportInfo,
               base_meta: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya tensors (sgm block names for SDXL, diffusers names otherwise) and their full metadata."""
    base = formats.base_model(info.unet_config, info.prediction_type)
    names = None
    if base.sgm_names:
        from .single_file import unet_ldm_names

        names = unet_ldm_names(info.unet_config)
    tensors = formats.to_kohya_keys(modules, dtype, names)
    date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    meta = {**base_meta, **formats.kohya_metadata(modules, base, info.output_name, info.resolution,
                                                  info.prediction_type, date)}
    if info.steps is not None:
        meta["ss_steps"] = str(info.steps)
    # sd-scripts records a local model by its file name only: a full path would publish the user's folders.
    meta["ss_sd_model_name"] = Path(info.teacher).name if Path(info.teacher).exists() else str(info.teacher)
    meta.update(addnet_hashes(tensors, meta))
    return tensors, meta


# -- reading any LoRA back (strict) -------------------------------------------------------------------

def lora_file(path: str | Path) -> Path:
    """The file `pipe.load_lora_weights(path)` reads: the path itself, or in a folder pytorch_lora_weights.safetensors,
    else its one other .safetensors (diffusers' own guess, which skips checkpoint, optimizer and scheduler files)."""
    path = Path(path)
    if not path.is_dir():
        return path
    candidates = sorted(p for p in path.glob("*.safetensors")
                        if not any(word in p.name for word in ("checkpoint", "optimizer", "scheduler")))
    preferred = [p for p in candidates if p.name == DIFFUSERS_WEIGHT_NAME]
    return (preferred or candidates or [path / DIFFUSERS_WEIGHT_NAME])[0]


def read_lora(path: str | Path, unet_config: dict) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """A LoRA file (diffusers or kohya, diffusers or sgm names) or a folder holding pytorch_lora_weights.safetensors,
    strictly: every key is placed on a module of this UNet or the read fails, naming the keys."""
    path = lora_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file.")
    tensors, meta = read_safetensors(path)
    from .models import unet_module_paths
    from .single_file import unet_ldm_names

    try:
        modules = formats.parse_lora(tensors, unet_module_paths(unet_config), meta, unet_ldm_names(unet_config))
    except formats.LoraFormatError as err:
        raise formats.LoraFormatError(f"{path}: {err}") from None
    return modules, meta


def read_checkpoint_lora(checkpoint: Path, unet_config: dict, config_flat: dict) -> dict[str, LoraModule]:
    """A training checkpoint's PEFT LoRA (unscaled, no prefix), with the run's alpha / r."""
    from .models import unet_module_paths

    tensors, _ = read_safetensors(checkpoint / LORA_CHECKPOINT_NAME)
    tensors = {formats.DIFFUSERS_PREFIX + k: v for k, v in tensors.items()}
    scale_meta = {formats.DIFFUSERS_ADAPTER_METADATA: json.dumps(
        {"r": config_flat["lora_rank"], "lora_alpha": config_flat["lora_alpha"]})}
    return formats.parse_lora(tensors, unet_module_paths(unet_config), scale_meta)
