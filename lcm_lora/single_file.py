"""Community single-file checkpoints (the original key layout of lcm_lora.ldm_keys), loaded offline.

A "single file" is one .safetensors holding the whole pipeline with the names of the original
training code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.text_model.*` (CLIP text encoder). SDXL files (Stability-AI's sgm
code) hold two encoders instead: `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L, HF
layout) and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG in open_clip's layout). The name
tables below are built from a model's config, block by block, so they fit SD1.x, SD2.x, the SDXL
family (SDXL, SSD-1B, Vega) and our tiny teachers alike. Writing goes through safetensors at the
edge; reading goes through diffusers' own `from_single_file`, which the tests use to prove the
tables (write with ours, read with theirs).

What `StableDiffusionPipeline.from_single_file` needs to work offline (diffusers 0.42, read from
`diffusers/loaders/single_file.py`, `single_file_model.py`, `single_file_utils.py`):

- `config=<local folder>`: a folder is used as is; every component's config comes from its
  subfolder (`unet/config.json`, `vae/config.json` with its `scaling_factor`,
  `text_encoder/config.json`, `tokenizer/*`, `scheduler/scheduler_config.json`), so a checkpoint
  whose parts differ from SD1.5 (our tiny teacher) is built right. Without `config` diffusers
  guesses a hub repo from the keys (SD1.5 for anything unknown) and downloads its configs; with a
  hub id that is not in the local cache it retries with `local_files_only=False`, i.e. goes online
  even when asked not to. `load_single_file_pipeline` therefore resolves a hub id from the local
  cache itself and always hands diffusers a folder.
- `local_files_only=True`: no hub call for the configs or the file.
- never `prediction_type=` / `scheduler_type=` / `original_config=`: they switch diffusers to its
  legacy path, which builds the scheduler (or all parts) from defaults instead of the folder. Pass
  a scheduler instance (`scheduler=...`) instead.
- `safety_checker=None, feature_extractor=None, requires_safety_checker=False`: the single-file
  loader never loads a safety checker, and without these the pipeline warns or needs a
  `feature_extractor/` folder it has no use for.
- diffusers finds the CLIP text encoder only under `cond_stage_model.transformer.text_model.*`
  (SD1) or SDXL's two `conditioner.embedders.*` (it converts bigG with `convert_open_clip_checkpoint`,
  telling the encoders apart by width); other keys make it fall back to
  `<config>/text_encoder/diffusion_pytorch_model.*`, which a transformers folder lacks, so it fails with "Weights for this component appear to be
  missing". A UNet / VAE tensor missing from the file stays on the meta device and fails later
  with "Cannot copy out of meta tensor". `load_single_file_pipeline` refuses a file that lacks a
  whole part with a clear message instead; the tests load against a configs-only folder, so every
  weight provably comes from the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError
from .ldm_keys import PART_PREFIXES, SDXL_PART_PREFIXES
from .model_ref import hub_configs, looks_like_hub_id
from .world import assets


# kwargs that make from_single_file ignore the config folder (its legacy path).
LEGACY_LOAD_KWARGS = ("prediction_type", "scheduler_type", "original_config", "original_config_file")
LOAD_DEFAULTS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
SDXL_LOAD_DEFAULTS = {"feature_extractor": None, "image_encoder": None}  # StableDiffusionXLPipeline has no checker
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def _pipeline_components(folder: Path) -> list[str]:
    import json

    index = json.loads((folder / "model_index.json").read_text())
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value[0] is not None
            and name not in OPTIONAL_COMPONENTS]


def config_folder(config: str | Path | None, checkpoint: str | Path) -> Path:
    """A folder with model_index.json and each component's config, or a ConfigError saying what to pass."""
    how = (f"loading {checkpoint} needs --single_file_config (config= in Python): a local diffusers pipeline folder "
           "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; configs are enough, no weights) "
           "that matches the checkpoint, e.g. the folder of the model it was fine-tuned from")
    if config is None:
        raise ConfigError(f"{how}; none was given.")
    folder = assets.resolve(config)
    if not folder.is_dir() and looks_like_hub_id(str(config)):
        try:
            folder = hub_configs(str(config), None, "--single_file_config")
        except ConfigError as err:
            raise ConfigError(f"{how}; {err}") from None
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"{how}; {config} is not such a folder (no model_index.json), nor a hub id in the local "
                          "cache.")
    missing = [name for name in _pipeline_components(folder) if not (folder / name).is_dir()]
    if missing:
        raise ConfigError(f"{how}; {folder} lacks {', '.join(f'{m}/' for m in missing)}.")
    return folder


def single_file_problems(path: str | Path, config: str | Path | None, allow_pickle_weights: bool = False) -> list[str]:
    """What stops a single-file checkpoint from loading offline (no file, no config folder, a folder of another
    family, the SDXL refiner), found before any weight is read."""
    checkpoint = Path(path)
    if checkpoint.suffix != ".safetensors" and not allow_pickle_weights:
        return [f"{checkpoint}: a pickle checkpoint ({checkpoint.suffix}) can run code when loaded; convert it "
                "to .safetensors (training also takes --allow_pickle_weights for files you trust)."]
    if not checkpoint.is_file():
        return [f"{checkpoint}: no such file."]  # diffusers would take it for a hub path
    try:
        folder = config_folder(config, checkpoint)
        described = folder_family(folder)
    except ConfigError as err:
        return [str(err)]
    return _family_problems(checkpoint, folder, described)


def folder_family(folder: Path) -> str:
    """The base model family a config folder's UNet describes (families.FAMILIES); the SDXL refiner is refused."""
    from diffusers import UNet2DConditionModel

    from .families import model_family, refiner_problem

    unet_config = dict(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    problem = refiner_problem(unet_config, folder)
    if problem:
        raise ConfigError(problem)
    return model_family(unet_config)


def _family_problems(checkpoint: Path, folder: Path, described: str) -> list[str]:
    """A checkpoint of another family than its config folder: diffusers would build the folder's UNet and fail on
    the first tensor of another shape, or, SSD-1B read as SDXL, on missing blocks."""
    from .families import FAMILY_NAMES, SDXL_FAMILY, single_file_family

    keys = _checkpoint_keys(checkpoint)
    if keys is None:
        return []
    try:
        actual = single_file_family(keys)
    except ConfigError as err:
        return [str(err)]
    if actual != described and (actual in SDXL_FAMILY or described in SDXL_FAMILY):  # SD1 / SD2 differ in encoders
        return [f"{checkpoint} is {FAMILY_NAMES[actual]}, but the config folder {folder} describes "
                f"{FAMILY_NAMES[described]}: give the folder of the model it was fine-tuned from."]
    return []


def _checkpoint_keys(checkpoint: Path) -> list[str] | None:
    """The tensor names of a .safetensors file, read from its header; None for a pickle file (never opened here)."""
    from safetensors import safe_open

    if checkpoint.suffix != ".safetensors":
        return None
    with safe_open(str(checkpoint), "pt") as f:
        return list(f.keys())


def _missing_parts(keys: list[str], part_prefixes: dict[str, tuple[str, ...]]) -> list[str]:
    return [part for part, prefixes in part_prefixes.items() if not any(k.startswith(prefixes) for k in keys)]


def load_single_file_pipeline(path: str | Path, config: str | Path | None,
                              torch_dtype: torch.dtype = torch.float32, *, allow_pickle_weights: bool = False,
                              **components):
    """A StableDiffusionPipeline (SD1/SD2) or StableDiffusionXLPipeline (SDXL, SSD-1B, Vega) from an original-layout
    .safetensors, built offline from `config`'s configs; the family comes from the folder's UNet config and must be
    the checkpoint's.

    `config`: a local diffusers pipeline folder (configs suffice), a bundled teacher's name, or a hub
    id already in the local cache. `components` (e.g. `scheduler=DDIMScheduler(...)`, `vae=...`)
    replace the file's or the folder's parts. A .ckpt / .pt file (a pickle, which can run code when
    loaded) is refused unless `allow_pickle_weights`. Calls, in effect::

        StableDiffusion[XL]Pipeline.from_single_file(path, config=<folder>, local_files_only=True,
            torch_dtype=torch_dtype, feature_extractor=None, **components)

    plus `safety_checker=None, requires_safety_checker=False` for SD1/SD2, `image_encoder=None` for SDXL.

    The VAE's scaling_factor and the scheduler come from the folder. See the module docstring for
    the kwargs that must not be passed (prediction_type, scheduler_type, original_config).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .families import SDXL_FAMILY

    checkpoint = Path(path)
    problems = single_file_problems(checkpoint, config, allow_pickle_weights)
    if problems:
        raise ConfigError(" ".join(problems))
    legacy = [k for k in LEGACY_LOAD_KWARGS if k in components]
    if legacy:
        raise ConfigError(f"{', '.join(legacy)}: these make diffusers ignore the config folder's scheduler; pass a "
                          "configured scheduler instead (scheduler=DDIMScheduler.from_pretrained(...)).")
    folder = config_folder(config, checkpoint)
    sdxl = folder_family(folder) in SDXL_FAMILY
    keys = _checkpoint_keys(checkpoint)
    missing = [] if keys is None else [part for part in _missing_parts(keys, SDXL_PART_PREFIXES if sdxl else
                                                                        PART_PREFIXES) if part not in components]
    if missing:
        raise ConfigError(f"{checkpoint} has no {', '.join(missing)} weights, which diffusers reports only as an "
                          f"unclear error later. Pass the part explicitly ({missing[0]}=...).")
    pipeline, defaults = (StableDiffusionXLPipeline, SDXL_LOAD_DEFAULTS) if sdxl else (StableDiffusionPipeline,
                                                                                       LOAD_DEFAULTS)
    return pipeline.from_single_file(str(checkpoint), config=str(folder), local_files_only=True,
                                     torch_dtype=torch_dtype, **{**defaults, **components})
