"""Export the trained LoRA in every format: formats.py names the keys; safetensors IO is in safetensors_io.py.

    diffusers  <dir>/pytorch_lora_weights.safetensors       kohya keys (lora_unet_* + lora_down/lora_up + fp32
                                                            alpha) under diffusers' file name, with the kohya file's
                                                            metadata: the layout of the official LCM-LoRA repos
                                                            (latent-consistency/lcm-lora-sdv1-5, -sdxl, -ssd-1b), which
                                                            diffusers' `load_lora_weights(dir)`, ComfyUI, A1111/Forge,
                                                            InvokeAI and sd-scripts all load in full
    kohya      <dir>/<output_name>.safetensors               the same file under a name a UI's LoRA list shows
    peft       <dir>/peft/pytorch_lora_weights.safetensors  PEFT keys (unet.<module>.lora_A/B), alpha / r baked into
                                                            lora_B: `load_lora_weights(dir / "peft")`; diffusers only
    hub        the former name of the diffusers format, still accepted (with a warning)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from . import formats, samplers
from .config import EXPORT_FORMATS
from .families import model_family
from .formats import LoraModule
from .safetensors_io import read_metadata, read_safetensors, save_safetensors_atomic  # noqa: F401  (re-exported)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = f"peft/{DIFFUSERS_WEIGHT_NAME}"  # a folder of its own: `load_lora_weights` of it finds the file
# format -> (its file in the output folder, its key layout); {name} is the output name
FORMAT_FILES = {"diffusers": (DIFFUSERS_WEIGHT_NAME, "kohya"), "kohya": ("{name}.safetensors", "kohya"),
                "peft": (PEFT_WEIGHT_NAME, "peft")}
FORMAT_ALIASES = {"hub": "diffusers"}  # config.EXPORT_FORMATS lists both
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


def metadata(config_flat: dict, teacher: str, prediction_type: str, global_step: int | None,
             config_changes: tuple[str, ...] = ()) -> dict[str, str]:
    """What a user needs to sample correctly, as safetensors string metadata (every format carries it), and the
    configuration changes a resumed run was allowed (`--allow_config_change`). A LoRA from elsewhere has no run
    config: then only what is known is written."""
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
        "lcm_lora.config_changes": json.dumps(list(config_changes)) if config_changes else None,
    }
    sampler = samplers.to_metadata(samplers.for_config(c)) if c else {}
    return {**{k: str(v) for k, v in values.items() if v is not None}, **sampler}


# metadata key -> the LCMScheduler argument it sets, and whether it is a whole number
SCHEDULER_METADATA = {"lcm_lora.num_ddim_timesteps": ("original_inference_steps", True),
                      "lcm_lora.timestep_scaling_factor": ("timestep_scaling", False)}


def lcm_scheduler_settings(lora: str | Path) -> dict:
    """LCMScheduler arguments that match how a LoRA was trained, read from its metadata.

    Sampling with another `original_inference_steps` than the run's num_ddim_timesteps puts the
    few steps on timesteps the student never saw as consistency endpoints. {} when the file has
    no lcm-lora metadata (a LoRA from elsewhere): then LCMScheduler's defaults apply. A value that is
    not a positive number is refused, naming the file and key (0 steps divides by zero in LCMScheduler).
    """
    path = lora_file(lora)
    return _lcm_settings(read_metadata(path), path) if path.is_file() else {}


def _lcm_settings(meta: dict[str, str], path: Path) -> dict:
    with naming(path):
        return {argument: formats.number(meta[key], key, integer)
                for key, (argument, integer) in SCHEDULER_METADATA.items() if key in meta}


def lora_sampler(lora: str | Path) -> samplers.Sampler:
    """The scheduler, settings and eta a LoRA's metadata names (samplers.from_metadata); LCMScheduler on the settings
    of `lcm_scheduler_settings` for a LoRA that names none. A bad value is refused, naming the file."""
    path = lora_file(lora)
    meta = read_metadata(path) if path.is_file() else {}
    lcm_settings = _lcm_settings(meta, path)
    with naming(path):
        try:
            return samplers.from_metadata(meta, lcm_settings)
        except (ValueError, TypeError) as err:
            raise formats.LoraFormatError(f"its sampler metadata is not usable ({err}).") from None


@contextmanager
def naming(path: str | Path):
    """Prefix a LoraFormatError raised inside with the file (or file and key) it is about."""
    try:
        yield
    except formats.LoraFormatError as err:
        raise formats.LoraFormatError(f"{path}: {err}") from None


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
    config_changes: tuple[str, ...] = ()

    @property
    def resolution(self) -> int:
        return int(self.config_flat.get("resolution") or self.unet_config.get("sample_size", 64) * 8)


def default_output_name(teacher: str) -> str:
    """lcm-lora-<teacher's last path part>, safe as a file name."""
    from .model_ref import is_single_file

    path = Path(str(teacher).rstrip("/"))
    stem = (path.stem if is_single_file(str(path)) else path.name) or "model"
    return "lcm-lora-" + re.sub(r"[^A-Za-z0-9._-]+", "-", stem)


def output_paths(out_dir: str | Path, export_formats: tuple[str, ...] | list[str], output_name: str) -> dict[str, Path]:
    """format -> the file it writes under `out_dir`, in writing order; refuses an output name that makes two formats
    write one file (the second would silently replace the first)."""
    unknown = [f for f in export_formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"--export_formats {' '.join(unknown)}: unknown; choose from {', '.join(EXPORT_FORMATS)}.")
    for alias in sorted(set(export_formats) & set(FORMAT_ALIASES)):
        warnings.warn(f"export format {alias!r} is now {FORMAT_ALIASES[alias]!r}: its file (kohya keys, the layout of "
                      f"the LCM-LoRA hub repos) is {Path(out_dir) / DIFFUSERS_WEIGHT_NAME}, and hub/ is no longer "
                      "written.", FutureWarning)
    wanted = {FORMAT_ALIASES.get(f, f) for f in export_formats}
    paths = {f: Path(out_dir) / name.format(name=output_name) for f, (name, _) in FORMAT_FILES.items() if f in wanted}
    if len(set(paths.values())) < len(paths):
        raise ValueError(f"--output_name {output_name!r}: the kohya file would be the diffusers file "
                         f"{DIFFUSERS_WEIGHT_NAME}; choose another name.")
    return paths


def write_formats(modules: dict[str, LoraModule], out_dir: str | Path, export_formats: tuple[str, ...] | list[str],
                  dtype: torch.dtype, info: ExportInfo) -> list[Path]:
    """Write `modules` in each requested format under `out_dir`; returns the files written. Nothing is written when
    a file would hold NaN or inf (LoraFormatError naming it and the first such key)."""
    paths = output_paths(out_dir, export_formats, info.output_name)
    base_meta = metadata(info.config_flat, info.teacher, info.prediction_type, info.steps, info.config_changes)
    base_meta["lcm_lora.base_family"] = model_family(info.unet_config)  # SSD-1B and Vega files say SDXL elsewhere
    layouts = {FORMAT_FILES[f][1] for f in paths}
    content = {}
    if "kohya" in layouts:
        content["kohya"] = kohya_file(modules, dtype, info, base_meta)
    if "peft" in layouts:
        meta = {**base_meta, **formats.diffusers_adapter_metadata(modules), "lcm_lora.alpha_baked_into_lora_B": "true"}
        content["peft"] = formats.to_peft_keys(modules, dtype), meta
    files = {path: content[FORMAT_FILES[f][1]] for f, path in paths.items()}
    for path, (tensors, _) in files.items():
        _check_finite_output(path, tensors, modules, dtype)
    return [save_safetensors_atomic(tensors, path, meta) for path, (tensors, meta) in files.items()]


def _check_finite_output(path: Path, tensors: dict[str, torch.Tensor], modules: dict[str, LoraModule],
                         dtype: torch.dtype) -> None:
    """A finite LoRA can still overflow a narrower dtype (fp16 holds at most 65504): then the message says so."""
    try:
        formats.check_finite(tensors)
    except formats.LoraFormatError as err:
        overflow = all(torch.isfinite(m.down).all() and torch.isfinite(m.up).all() for m in modules.values())
        hint = f" (the LoRA is finite: its values overflow {dtype}; export in fp32)" if overflow else ""
        raise formats.LoraFormatError(f"{path}: not written: {str(err).rstrip('.')}{hint}.") from None


def kohya_file(modules: dict[str, LoraModule], dtype: torch.dtype, info: ExportInfo,
               base_meta: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya tensors (sgm block names for SDXL, diffusers names otherwise) and their full metadata."""
    base = formats.base_model(info.unet_config, info.prediction_type)
    names = None
    if base.sgm_names:
        from .ldm_keys import unet_ldm_names

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
    else its one other .safetensors (diffusers' own guess, which skips checkpoint, optimizer and scheduler files);
    in a run folder exported only as peft, peft/pytorch_lora_weights.safetensors."""
    path = Path(path)
    if not path.is_dir():
        return path
    candidates = sorted(p for p in path.glob("*.safetensors")
                        if not any(word in p.name for word in ("checkpoint", "optimizer", "scheduler")))
    if not candidates and (path / PEFT_WEIGHT_NAME).is_file():
        return path / PEFT_WEIGHT_NAME
    preferred = [p for p in candidates if p.name == DIFFUSERS_WEIGHT_NAME]
    # diffusers 0.42 warns and loads whichever file os.listdir gives first: a silent pick, refused here
    if not preferred and len(candidates) > 1:
        raise ValueError(f"{path} holds {len(candidates)} LoRA files ({', '.join(p.name for p in candidates)}) and no "
                         f"{DIFFUSERS_WEIGHT_NAME}: give the file.")
    return (preferred or candidates or [path / DIFFUSERS_WEIGHT_NAME])[0]


def read_lora(path: str | Path, unet_config: dict) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """A LoRA file (kohya or PEFT keys, diffusers or sgm names) or a folder holding pytorch_lora_weights.safetensors,
    strictly: every key is placed on a module of this UNet, every value is finite, or the read fails, naming the file
    and the keys."""
    path, tensors, meta = _read_lora_file(path)
    from .models import unet_module_paths
    from .ldm_keys import unet_ldm_names

    with naming(path):
        modules = formats.parse_lora(tensors, unet_module_paths(unet_config), meta, unet_ldm_names(unet_config))
    return modules, meta


def check_lora_for_diffusers(path: str | Path, unet_config: dict) -> Path:
    """The LoRA file `pipe.load_lora_weights(path)` will read, checked first as strictly as `read_lora`: diffusers
    skips UNet keys that match no module with only a warning (measured, diffusers 0.42: a LoRA none of whose keys
    fit loads "successfully" and images come out without it). Two things that loader does itself are left to it:
    text-encoder keys (it places them in the text encoder; a file must still hold UNet keys) and per-module scales
    (rank/alpha patterns, rsLoRA), whose metadata is still checked."""
    path, tensors, meta = _read_lora_file(path)
    from .models import unet_module_paths
    from .ldm_keys import unet_ldm_names

    unet, text_encoder = formats.split_text_encoder(tensors)
    with naming(path):
        formats.adapter_config(meta)
        if text_encoder and not unet:
            raise formats.LoraFormatError(f"only text-encoder keys ({len(text_encoder)}, e.g. {text_encoder[0]}): "
                                          "nothing for the UNet, which an LCM-LoRA adapts.")
        formats.parse_lora(unet, unet_module_paths(unet_config), None, unet_ldm_names(unet_config))
        formats.check_finite({k: tensors[k] for k in text_encoder})
    return path


def _read_lora_file(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    path = lora_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file.")
    return path, *read_safetensors(path)


def read_checkpoint_lora(checkpoint: Path, unet_config: dict, config_flat: dict) -> dict[str, LoraModule]:
    """A training checkpoint's PEFT LoRA (unscaled, no prefix), with the run's alpha / r."""
    from .models import unet_module_paths

    path = checkpoint / LORA_CHECKPOINT_NAME
    tensors, _ = read_safetensors(path)
    tensors = {formats.DIFFUSERS_PREFIX + k: v for k, v in tensors.items()}
    scale_meta = {formats.DIFFUSERS_ADAPTER_METADATA: json.dumps(
        {"r": config_flat["lora_rank"], "lora_alpha": config_flat["lora_alpha"]})}
    with naming(path):
        return formats.parse_lora(tensors, unet_module_paths(unet_config), scale_meta)
