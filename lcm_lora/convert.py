"""The `export` and `merge` commands: any LoRA or training checkpoint -> every format, or baked into a model.

    export: a checkpoint-N folder, a training output folder, or a LoRA file (diffusers or kohya keys)
    merge:  W += strength · (alpha / r) · up @ down, applied in the single-file checkpoint's own (LDM) key
            space, so every tensor the LoRA does not target, and the file's metadata, stay byte for byte.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import export, formats, model_card
from .checkpoint import RECORD, checkpoint_step, read_record
from .config import EXPORT_FORMATS, PREDICTION_TYPES, ConfigError, ModelArgs, RunArgs, TrainConfig, license_problem
from .models import config_source, load_unet_config, resolve_teacher, teacher_prediction_type, unet_config
from .safetensors_io import check_outputs
from .ldm_keys import unet_ldm_key, unet_ldm_names
from .single_file import config_folder, single_file_problems

# Hashes of the weights describe the file before the merge: dropped rather than left wrong.
STALE_AFTER_MERGE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
KNOWN_FLAGS = frozenset(TrainConfig().to_flat_dict())
# A run's numbers that export uses (resolution, the checkpoint's alpha / r) or copies into the files' metadata for
# generation to read (the sampling grid): key -> whether it is a whole number. Each must be above 0.
RUN_NUMBERS = {"resolution": True, "lora_rank": True, "lora_alpha": False, "num_ddim_timesteps": True,
               "timestep_scaling_factor": False}


@dataclass
class Source:
    """What `export` reads: the run's config (empty for a LoRA from elsewhere), the file's metadata, the steps
    trained, how to read the modules once the teacher's UNet config says which keys are valid, and the files and
    folders it consists of (which no output may replace)."""

    config_flat: dict
    metadata: dict[str, str]
    steps: int | None
    read_modules: Callable[[dict], dict[str, formats.LoraModule]]
    inputs: list[Path] = field(default_factory=list)
    config_changes: tuple[str, ...] = ()
    run_dir: Path | None = None  # the training output folder it comes from, whose validation images the card shows


def export_lora_files(source: str | Path, out_dir: str | Path, export_formats: list[str] | None = None,
                      dtype: torch.dtype | None = None, teacher: str | None = None,
                      single_file_config: str | None = None, output_name: str | None = None,
                      overwrite: bool = False, license: str | None = None, repo_id: str | None = None) -> list[Path]:
    """Re-export `source` in each format; returns the LoRA files written. The teacher (for its UNet's module names
    and base model family) comes from the run's config or the file's metadata; `teacher` overrides it. Formats and
    dtype default to the run's --export_formats / --export_dtype, else diffusers + kohya in fp16.

    Beside them go a model card, README.md (model_card.py: `license` defaults to the run's --license, else the base
    model family's; its snippet loads the LoRA from `repo_id` when given), and for a training run's LoRA its last
    validation grid at or before the exported step, as validation.png. No file of the source or the teacher is
    ever replaced, and an existing file only with `overwrite`; both are checked before anything is written."""
    if license_problem(license):
        raise ConfigError(license_problem(license))
    src = read_source(Path(source), teacher)
    flat, meta = src.config_flat, src.metadata
    teacher = teacher or flat.get("pretrained_teacher_model") or meta.get("lcm_lora.teacher")
    single_file_config = single_file_config or flat.get("single_file_config")
    model = ModelArgs(pretrained_teacher_model=teacher, single_file_config=single_file_config)
    config = unet_config(model)
    prediction = flat.get("prediction_type") or meta.get("lcm_lora.prediction_type") or teacher_prediction_type(model)
    info = export.ExportInfo(config_flat=flat, teacher=teacher, prediction_type=prediction, steps=src.steps,
                             unet_config=config, output_name=_plain_file_name(
                                 output_name or flat.get("output_name") or export.default_output_name(teacher)),
                             config_changes=src.config_changes)
    export_formats = export_formats or flat.get("export_formats") or list(RunArgs.export_formats)
    dtype = dtype or export.DTYPES[flat.get("export_dtype", RunArgs.export_dtype)]
    outputs = list(export.output_paths(out_dir, export_formats, info.output_name).values())
    grid = model_card.validation_grid(src.run_dir, src.steps) if src.run_dir else None
    image = Path(out_dir) / "validation.png" if grid else None
    outputs += [Path(out_dir) / model_card.CARD_NAME, *([image] if image else [])]
    check_outputs(outputs, [*src.inputs, resolve_teacher(teacher), config_source(model)], overwrite)
    paths = export.write_formats(src.read_modules(config), out_dir, export_formats, dtype, info)
    if grid:
        shutil.copyfile(grid[0], image)
    model_card.write_card(out_dir, model_card.card_facts(info, out_dir, paths, license, repo_id, image,
                                                         grid[1] if grid else None))
    return paths


def _plain_file_name(name: str, what: str = "--output_name") -> str:
    """The kohya file's name: a folder in it (from a flag or a file's metadata) would write outside --output_dir."""
    if Path(name).name != name or name in (".", "..") or "\\" in name:
        raise ValueError(f"{what} {name!r}: must be a plain file name, without folders.")
    return name


def read_source(source: Path, teacher: str | None) -> Source:
    """A checkpoint-N folder (exact fp32 weights), a training output folder (its kohya file, which keeps the
    trained alpha, else its diffusers file) or any LoRA file; every value read from a file is checked."""
    if (source / export.LORA_CHECKPOINT_NAME).is_file():
        record, config_path = read_record(source), source.parent / "config.yaml"
        if record.get("config") is not None:  # the config this checkpoint was trained with
            flat = _run_config(record["config"], str(source / RECORD), required=("lora_rank", "lora_alpha"))
        elif config_path.is_file():  # a checkpoint saved without a record: the run's config.yaml
            flat = _read_run_config(config_path, required=("lora_rank", "lora_alpha"))
        else:
            raise FileNotFoundError(f"{config_path} is missing: a checkpoint-N folder is read with its run's config.yaml.")
        changes = tuple(record.get("config_changes", ()))
        return Source(flat, {}, checkpoint_step(source), lambda config: export.read_checkpoint_lora(source, config, flat),
                      [source, config_path], changes, source.parent)
    lora = _run_kohya_file(source) or export.lora_file(source)
    if not lora.is_file():
        raise FileNotFoundError(f"{source}: give a checkpoint-N folder, a training output folder or a LoRA .safetensors.")
    meta = export.read_metadata(lora)
    where = f"{lora}: lcm_lora.config"
    flat = _run_config(_json(meta.get("lcm_lora.config", "{}"), where), where)
    with export.naming(lora):
        if meta.get("lcm_lora.prediction_type") is not None:
            _choice(meta["lcm_lora.prediction_type"], "lcm_lora.prediction_type", PREDICTION_TYPES)
        steps = formats.number(meta["lcm_lora.steps_trained"], "lcm_lora.steps_trained", integer=True,
                               allow_zero=True) if "lcm_lora.steps_trained" in meta else None
    if not (teacher or flat.get("pretrained_teacher_model") or meta.get("lcm_lora.teacher")):
        raise ValueError(f"{lora} does not say which model it was trained on: pass --pretrained_teacher_model.")
    changes = _json(meta.get("lcm_lora.config_changes", "[]"), f"{lora}: lcm_lora.config_changes")
    if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
        raise ConfigError(f"{lora}: lcm_lora.config_changes must be a JSON list of strings.")
    run_dir = next((d for d in (source, lora.parent) if (d / "config.yaml").is_file()), None)  # a run's own LoRA
    return Source(flat, meta, steps, lambda config: export.read_lora(lora, config)[0], [source, lora], tuple(changes),
                  run_dir)


def _run_kohya_file(folder: Path) -> Path | None:
    config_path = folder / "config.yaml"
    if not folder.is_dir() or not config_path.is_file():
        return None
    flat = _read_run_config(config_path)
    name = flat.get("output_name") or export.default_output_name(flat.get("pretrained_teacher_model", ""))
    path = folder / f"{name}.safetensors"
    return path if path.is_file() else None


def _read_run_config(path: Path, required: tuple[str, ...] = ()) -> dict:
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable YAML config ({' '.join(str(err).split())}).") from None
    return _run_config(values, str(path), required)


def _json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: not valid JSON ({err}).") from None


def _run_config(values: object, source: str, required: tuple[str, ...] = ()) -> dict:
    """A run's flat config (its config.yaml, or a LoRA's lcm_lora.config), typed by the trainer's own rules, with
    the values export uses checked too; only the keys given are returned (a default must not pose as the run's)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of flag: value pairs, got {type(values).__name__}.")
    missing = [key for key in required if values.get(key) is None]
    if missing:
        raise ConfigError(f"{source}: {', '.join(missing)} missing; the LoRA's scale is alpha / rank.")
    values = {k: v for k, v in values.items() if k in KNOWN_FLAGS}  # a newer version's flags: not ours to check
    typed = TrainConfig.from_flat_dict(values, source).to_flat_dict()
    flat = {key: typed[key] for key in values}
    with export.naming(source):
        for key, integer in RUN_NUMBERS.items():
            if flat.get(key) is not None:
                formats.number(flat[key], key, integer)
        for key, choices in (("export_dtype", tuple(export.DTYPES)), ("prediction_type", PREDICTION_TYPES)):
            if flat.get(key) is not None:
                _choice(flat[key], key, choices)
        for export_format in flat.get("export_formats") or ():
            _choice(export_format, "export_formats", EXPORT_FORMATS)
    if flat.get("output_name"):
        _plain_file_name(flat["output_name"], f"{source}: output_name")
    return flat


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise formats.LoraFormatError(f"{key} = {value!r}: expected one of {', '.join(choices)}.")


def merge_lora(checkpoint: str | Path, lora: str | Path, output: str | Path, config_dir: str,
               strength: float = 1.0, overwrite: bool = False) -> tuple[Path, int]:
    """Bake a LoRA into a single-file checkpoint; returns the written file and the number of tensors changed.
    `output` may be none of the inputs (checkpoint, LoRA, config folder), and an existing file only with
    `overwrite`; both are checked before the checkpoint is read."""
    checkpoint, output = Path(checkpoint), Path(output)
    if checkpoint.suffix != ".safetensors":
        raise ValueError(f"--checkpoint {checkpoint}: only .safetensors single-file checkpoints are merged "
                         "(pickle files can run code when loaded).")
    if not math.isfinite(strength):
        raise ValueError(f"--strength {strength}: must be a finite number.")
    problems = single_file_problems(checkpoint, config_dir)  # also: a folder of another family, the SDXL refiner
    if problems:
        raise ConfigError(" ".join(problems))
    folder = config_folder(config_dir, checkpoint)
    check_outputs([output], [checkpoint, export.lora_file(lora), folder], overwrite)
    config = load_unet_config(str(folder), flag="--single_file_config")
    modules, lora_meta = export.read_lora(lora, config)
    tensors, meta = export.read_safetensors(checkpoint)
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
    merged = (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)
    if not torch.isfinite(merged).all():  # a finite LoRA on a finite weight can still overflow fp16 (max 65504)
        raise ValueError(f"{key}: the merged weight is not finite in {weight.dtype}; lower --strength or merge into "
                         "an fp32 checkpoint.")
    return merged
