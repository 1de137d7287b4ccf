"""The `export` and `merge` commands: any LoRA or training checkpoint -> every format, or baked into a model.

    export: a checkpoint-N folder, a training output folder, or a LoRA file (diffusers or kohya keys)
    merge:  W += strength · (alpha / r) · up @ down, applied in the single-file checkpoint's own (LDM) key
            space, so every tensor the LoRA does not target, and the file's metadata, stay byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import export, formats
from .checkpoint import checkpoint_step
from .config import ModelArgs, RunArgs
from .models import load_unet_config, teacher_prediction_type, unet_config
from .single_file import config_folder, unet_ldm_key, unet_ldm_names

# Hashes of the weights describe the file before the merge: dropped rather than left wrong.
STALE_AFTER_MERGE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


@dataclass
class Source:
    """What `export` reads: the run's config (empty for a LoRA from elsewhere), the file's metadata, the steps
    trained, and how to read the modules once the teacher's UNet config says which keys are valid."""

    config_flat: dict
    metadata: dict[str, str]
    steps: int | None
    read_modules: Callable[[dict], dict[str, formats.LoraModule]]


def export_lora_files(source: str | Path, out_dir: str | Path, export_formats: list[str] | None = None,
                      dtype: torch.dtype | None = None, teacher: str | None = None,
                      single_file_config: str | None = None, output_name: str | None = None) -> list[Path]:
    """Re-export `source` in each format. The teacher (for its UNet's module names and base model family)
    comes from the run's config or the file's metadata; `teacher` overrides it. Formats and dtype default to the
    run's --export_formats / --export_dtype, else diffusers + kohya in fp16."""
    src = read_source(Path(source), teacher)
    flat, meta = src.config_flat, src.metadata
    teacher = teacher or flat.get("pretrained_teacher_model") or meta.get("lcm_lora.teacher")
    single_file_config = single_file_config or flat.get("single_file_config")
    model = ModelArgs(pretrained_teacher_model=teacher, single_file_config=single_file_config)
    config = unet_config(model)
    prediction = flat.get("prediction_type") or meta.get("lcm_lora.prediction_type") or teacher_prediction_type(model)
    info = export.ExportInfo(config_flat=flat, teacher=teacher, prediction_type=prediction, steps=src.steps,
                             unet_config=config, output_name=output_name or flat.get("output_name")
                             or export.default_output_name(teacher))
    export_formats = export_formats or flat.get("export_formats") or list(RunArgs.export_formats)
    dtype = dtype or export.DTYPES[flat.get("export_dtype", RunArgs.export_dtype)]
    return export.write_formats(src.read_modules(config), out_dir, export_formats, dtype, info)


def read_source(source: Path, teacher: str | None) -> Source:
    """A checkpoint-N folder (exact fp32 weights), a training output folder (its kohya file, which keeps the
    trained alpha, else its diffusers file) or any LoRA file."""
    if (source / export.LORA_CHECKPOINT_NAME).is_file():
        config_path = source.parent / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: a checkpoint-N folder is read with its run's config.yaml.")
        flat = yaml.safe_load(config_path.read_text())
        return Source(flat, {}, checkpoint_step(source),
                      lambda config: export.read_checkpoint_lora(source, config, flat))
    lora = _run_kohya_file(source) or export.lora_file(source)
    if not lora.is_file():
        raise FileNotFoundError(f"{source}: give a checkpoint-N folder, a training output folder or a LoRA .safetensors.")
    meta = export.read_metadata(lora)
    flat = json.loads(meta.get("lcm_lora.config", "{}"))
    if not (teacher or flat.get("pretrained_teacher_model") or meta.get("lcm_lora.teacher")):
        raise ValueError(f"{lora} does not say which model it was trained on: pass --pretrained_teacher_model.")
    steps = int(meta["lcm_lora.steps_trained"]) if "lcm_lora.steps_trained" in meta else None
    return Source(flat, meta, steps, lambda config: export.read_lora(lora, config)[0])


def _run_kohya_file(folder: Path) -> Path | None:
    config_path = folder / "config.yaml"
    if not folder.is_dir() or not config_path.is_file():
        return None
    flat = yaml.safe_load(config_path.read_text())
    name = flat.get("output_name") or export.default_output_name(flat.get("pretrained_teacher_model", ""))
    path = folder / f"{name}.safetensors"
    return path if path.is_file() else None


def merge_lora(checkpoint: str | Path, lora: str | Path, output: str | Path, config_dir: str,
               strength: float = 1.0) -> tuple[Path, int]:
    """Bake a LoRA into a single-file checkpoint; returns the written file and the number of tensors changed."""
    checkpoint, output = Path(checkpoint), Path(output)
    if checkpoint.suffix != ".safetensors":
        raise ValueError(f"--checkpoint {checkpoint}: only .safetensors single-file checkpoints are merged "
                         "(pickle files can run code when loaded).")
    if output.resolve() == checkpoint.resolve():
        raise ValueError("--output must differ from --checkpoint: the original is never overwritten.")
    tensors, meta = export.read_safetensors(checkpoint)
    config = load_unet_config(str(config_folder(config_dir, checkpoint)), flag="--single_file_config")
    modules, lora_meta = export.read_lora(lora, config)
    names = unet_ldm_names(config)
    for path, module in modules.items():
        key = unet_ldm_key(f"{path}.weight", names)
        if key not in tensors:
            raise formats.LoraFormatError(f"{checkpoint}: no tensor {key} for the LoRA module {path}; is it the model "
                                          f"the LoRA and --single_file_config {config_dir} describe?")
        tensors[key] = _merged(tensors[key], formats.delta_weight(module, strength), key)
    merged_from = [m for m in (meta.get("modelspec.merged_from"), meta.get("modelspec.title") or checkpoint.name,
                               lora_meta.get("modelspec.title") or Path(lora).name) if m]
    meta = {k: v for k, v in meta.items() if k not in STALE_AFTER_MERGE}
    meta["modelspec.merged_from"] = ", ".join(merged_from)
    return export.save_safetensors_atomic(tensors, output, meta), len(modules)


def _merged(weight: torch.Tensor, delta: torch.Tensor, key: str) -> torch.Tensor:
    """W + ΔW in fp32, back in W's dtype; a 1x1 conv and a linear layer hold the same numbers in other shapes."""
    if delta.numel() != weight.numel():
        raise ValueError(f"{key}: the LoRA's update has shape {tuple(delta.shape)}, the weight {tuple(weight.shape)}.")
    return (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)
