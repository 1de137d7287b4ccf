"""Typed training configuration: the one source of CLI flags, YAML presets and `--dry-run`.

Sections group the fields for reading; flags and YAML keys are flat and carry the same names as
diffusers' LCM scripts (`--lora_rank`, `--w_min`, ...), so users' commands carry over unchanged.
Precedence: dataclass defaults < `--config` YAML < command-line flags. Imports the stdlib and yaml only.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
EXPORT_FORMATS = ("diffusers", "kohya", "peft", "hub")  # hub: the former name of diffusers, still accepted
EXPORT_DTYPES = ("fp32", "fp16", "bf16")
LOSS_TYPES = ("l2", "huber", "huber_sample")
METHODS = ("lcm", "tcd", "pcm")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
DATA_SOURCES = ("train_data_dir", "dataset_name", "train_shards_path_or_url", "encodings_dir")
# LCM-LoRA's targets (diffusers' LCM-LoRA scripts); never conv_in, conv_out or time_embedding.
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


def _help(text: str, low: float | None = None, high: float | None = None, low_open: bool = False,
          high_open: bool = False, comma_separated: bool = False) -> dict:
    """A field's help text and, for a number, its valid range [low, high] (an end open where said, None: unbounded).
    `TrainConfig.validate` checks every range before anything loads. A comma-separated list also takes "a,b"."""
    return {"help": text, "range": (low, high, low_open, high_open), "comma_separated": comma_separated}


class ConfigError(ValueError):
    """A bad configuration value: the message names the flag and says what to do."""


@dataclass
class ModelArgs:
    pretrained_teacher_model: str = field(default="", metadata=_help(
        "Teacher: a hub id, a local diffusers folder, or a bundled tiny teacher (teacher-eps, teacher-vpred)."))
    revision: str | None = field(default=None, metadata=_help(
        "Hub revision of the teacher (diffusers' scripts: --teacher_revision)."))
    variant: str | None = field(default=None, metadata=_help("Weight variant of the teacher, e.g. fp16."))
    single_file_config: str | None = field(default=None, metadata=_help(
        "For a single-file teacher (.safetensors in the original SD layout, e.g. a community checkpoint): a "
        "local diffusers folder (or hub id) holding the base model's configs and tokenizer, so loading works offline."))
    pretrained_vae_model_name_or_path: str | None = field(default=None, metadata=_help(
        "A VAE to use instead of the teacher's (a folder or hub id), e.g. an fp16-safe SDXL VAE; without one, an "
        "SDXL-family VAE encodes in fp32 under --mixed_precision fp16, since it overflows in fp16."))
    allow_pickle_weights: bool = field(default=False, metadata=_help(
        "Also load .bin/.ckpt (pickle) weights, which can run code when loaded; only for files you trust."))
    prediction_type: str | None = field(default=None, metadata=_help(
        "Override the teacher's prediction type (epsilon, v_prediction, sample); default: its scheduler config."))


@dataclass
class DataArgs:
    train_data_dir: str | None = field(default=None, metadata=_help(
        "A folder: an imagefolder (images + metadata.jsonl/csv/parquet), or images with same-name .txt or "
        ".caption files (searched recursively, one caption per line)."))
    dataset_name: str | None = field(default=None, metadata=_help(
        "A Hugging Face dataset: hub name, local folder, save_to_disk folder, or a .parquet/.arrow/.csv/.jsonl file."))
    train_shards_path_or_url: str | None = field(default=None, metadata=_help(
        "webdataset tar shards: paths, a glob, a brace pattern or pipe: commands, '::'-joined (needs the "
        "webdataset extra); each sample an image (.jpg/.png/.webp) plus .txt/.caption or LAION-style .json."))
    encodings_dir: str | None = field(default=None, metadata=_help(
        "Train from encodings written by `lcm-lora cache` (no VAE or text encoder in memory)."))
    dataset_config_name: str | None = field(default=None, metadata=_help("The dataset's configuration name."))
    image_column: str = field(default="image", metadata=_help("Column holding the images."))
    caption_column: str = field(default="text", metadata=_help("Column holding the captions."))
    resolution: int = field(default=512, metadata=_help("Training resolution in pixels (square).", low=8))
    center_crop: bool = field(default=True, metadata=_help("Center crop after resizing; else random crop."))
    random_flip: bool = field(default=False, metadata=_help("Randomly flip images horizontally."))
    use_fix_crop_and_size: bool = field(default=True, metadata=_help(
        "SDXL: condition on (res, res, 0, 0, res, res), the inference default, instead of each image's real "
        "original size and (flip-corrected) crop."))
    proportion_empty_prompts: float = field(default=0.0, metadata=_help("Share of captions replaced by ''.", low=0, high=1))
    max_train_samples: int | None = field(default=None, metadata=_help("Use only this many samples.", low=1))
    max_bad_samples_fraction: float = field(default=0.05, metadata=_help(
        "Stop when more than this share of samples read are unusable (checked from 200 samples on).", low=0, high=1))
    dataloader_num_workers: int = field(default=0, metadata=_help("Data-loading worker processes (0: main).", low=0))
    vae_encode_batch_size: int = field(default=32, metadata=_help(
        "Images the VAE encodes at once (a batch is encoded in chunks of this size, to bound memory).", low=1))


@dataclass
class LoraArgs:
    lora_rank: int = field(default=64, metadata=_help("LoRA rank r.", low=1))
    lora_alpha: float = field(default=64.0, metadata=_help("LoRA alpha; the update is scaled by alpha / r.", low=0, low_open=True))
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA branch.", low=0, high=1, high_open=True))
    lora_target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata=_help(
        "UNet module name suffixes that get a LoRA: space- or comma-separated (to_q,to_k as in diffusers' scripts).",
        comma_separated=True))


@dataclass
class DistillArgs:
    method: str = field(default="lcm", metadata=_help(
        "What the student's jump ends at: lcm (the data, LCM: sample with LCMScheduler), tcd (a random earlier grid "
        "point s <= t_n, TCD: TCDScheduler) or pcm (the edge of its phase, PCM: trailing DDIMScheduler in "
        "--multiphase steps)."))
    multiphase: int = field(default=1, metadata=_help(
        "--method pcm: M, the number of phases, which is the number of sampling steps the LoRA is made for (PCM's "
        "flag); M must divide --num_ddim_timesteps.", low=1))
    tcd_zero_share: float = field(default=0.0, metadata=_help(
        "--method tcd: the share of examples whose jump ends at the data (s = 0), as LCM's all do.", low=0, high=1))
    w_min: float = field(default=5.0, metadata=_help(
        "Smallest guidance w, LCM-paper convention: eps = eps_c + w (eps_c - eps_u), "
        "which is diffusers' guidance_scale w + 1.", low=0))
    w_max: float = field(default=15.0, metadata=_help("Largest guidance w (same convention as --w_min).", low=0))
    num_ddim_timesteps: int = field(default=50, metadata=_help(
        "N, the DDIM solver's grid size; skipping step k = T / N. Use the same N at inference "
        "(LCMScheduler's original_inference_steps).", low=1))
    timestep_scaling_factor: float = field(default=10.0, metadata=_help(
        "s in the boundary scalings c_skip, c_out (LCMScheduler's timestep_scaling).", low=0, low_open=True))
    sigma_data: float = field(default=0.5, metadata=_help("sigma_data in the boundary scalings.", low=0, low_open=True))
    loss_type: str = field(default="huber", metadata=_help(
        "l2, huber (pseudo-Huber per element, as LCM-LoRA) or huber_sample (pseudo-Huber of each example's RMS "
        "difference, as iCT)."))
    huber_c: float = field(default=0.001, metadata=_help("c of the pseudo-Huber loss.", low=0, low_open=True))
    ema_decay: float = field(default=0.0, metadata=_help(
        "mu of the target network theta- = EMA of the LoRA (LCM paper); 0 targets the student itself, as "
        "LCM-LoRA does. 0.99 removed multi-step drift on the tiny world (docs/results.md, Known shortfalls).", low=0, high=1,
        high_open=True))


@dataclass
class OptimArgs:
    train_batch_size: int = field(default=16, metadata=_help("Batch size per device.", low=1))
    learning_rate: float = field(default=1e-4, metadata=_help("AdamW learning rate.", low=0, low_open=True))
    lr_scheduler: str = field(default="constant", metadata=_help("constant, constant_with_warmup, linear, cosine."))
    lr_warmup_steps: int = field(default=500, metadata=_help("Linear warmup steps.", low=0))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1.", low=0, high=1, high_open=True))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2.", low=0, high=1, high_open=True))
    adam_weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay.", low=0))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon.", low=0, low_open=True))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip the gradient norm to this (0: no clipping).", low=0))
    max_train_steps: int = field(default=1000, metadata=_help("Optimizer steps to train.", low=1))
    num_train_epochs: int | None = field(default=None, metadata=_help(
        "Passes over the data set; when given, sets --max_train_steps from the data set's size (images, data sets "
        "and caches; not streamed shards).", low=1))
    scale_lr: bool = field(default=False, metadata=_help(
        "Multiply --learning_rate by batch size x gradient accumulation steps x processes, as diffusers' scripts do."))
    use_8bit_adam: bool = field(default=False, metadata=_help(
        "bitsandbytes' 8-bit AdamW (pip install 'lcm-lora[bnb]', CUDA): less optimizer memory."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step.", low=1))


@dataclass
class RunArgs:
    output_dir: str = field(default="lcm-lora-output", metadata=_help("Where checkpoints, logs and the LoRA go."))
    seed: int | None = field(default=0, metadata=_help("Random seed; the same seed gives the same run.", low=0,
        high=2**32 - 1))
    mixed_precision: str = field(default="no", metadata=_help(
        "no, fp16 or bf16: the precision of the frozen weights and forward passes; LoRA weights stay fp32."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Trade compute for UNet activation memory."))
    enable_xformers_memory_efficient_attention: bool = field(default=False, metadata=_help(
        "Use xformers attention (pip install 'lcm-lora[xformers]'); default is PyTorch SDPA."))
    allow_tf32: bool = field(default=False, metadata=_help("Allow TF32 matmuls on Ampere+ GPUs."))
    torch_compile: bool = field(default=False, metadata=_help(
        "Compile the UNet with torch.compile (inductor): the first steps take longer while it compiles, once for the "
        "LoRA on and once off (docs/performance.md)."))
    checkpointing_steps: int = field(default=500, metadata=_help(
        "Save the training state every N steps (0: only when stopped by a signal).", low=0))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help(
        "Keep at most this many checkpoints (default: all).", low=1))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "'latest' or a checkpoint folder. 'latest' with no checkpoint starts a new run, unless --output_dir "
        "holds a finished or another run."))
    allow_config_change: bool = field(default=False, metadata=_help(
        "Resume although the configuration differs from the checkpoint's in what changes the result; each "
        "change is recorded in the LoRA's metadata."))
    overwrite: bool = field(default=False, metadata=_help(
        "Start a new run in an --output_dir that holds one, replacing its checkpoints, config and LoRA files."))
    max_consecutive_nonfinite_steps: int = field(default=10, metadata=_help(
        "Optimizer steps with a non-finite loss or gradient are skipped; stop after this many in a row.", low=1))
    validation_steps: int = field(default=200, metadata=_help(
        "Every N steps and at the last, sample the validation prompts and score the LoRA's agreement with the "
        "teacher into metrics.jsonl (0: never).", low=0))
    validation_prompts: tuple[str, ...] = field(default=(), metadata=_help(
        "Prompts for validation; prompt i starts from seed --seed + i."))
    validation_inference_steps: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata=_help(
        "LCM step counts drawn and scored at each validation.", low=1))
    validation_teacher_steps: int = field(default=25, metadata=_help(
        "DDIM steps of the teacher's reference sample, drawn once per run at guidance_scale 1 + (w_min + w_max) / 2, "
        "the guidance the LoRA learns.", low=1))
    export_formats: tuple[str, ...] = field(default=("diffusers", "kohya"), metadata=_help(
        "LoRA files written at the end: diffusers (pytorch_lora_weights.safetensors with kohya keys, as the official "
        "LCM-LoRA repos ship it: loads in diffusers, ComfyUI, A1111 / Forge, InvokeAI and sd-scripts), kohya (the same "
        "file as <output_name>.safetensors, a name for a UI's LoRA folder), peft (PEFT keys in "
        "peft/pytorch_lora_weights.safetensors: diffusers only). hub: the former name of diffusers."))
    export_dtype: str = field(default="fp16", metadata=_help("dtype of exported LoRA weights: fp16, bf16 or fp32."))
    output_name: str | None = field(default=None, metadata=_help(
        "Name of the kohya file and its ss_output_name / modelspec.title; default lcm-lora-<teacher name>."))
    report_to: str = field(default="tensorboard", metadata=_help(
        "Accelerate tracker(s), comma-separated: tensorboard, wandb, comet_ml, mlflow, ..., all or none."))
    tracker_project_name: str = field(default="lcm-lora", metadata=_help(
        "The project name the trackers log under (Accelerator.init_trackers)."))
    logging_dir: str = field(default="logs", metadata=_help("Tracker log folder, inside output_dir."))
    license: str | None = field(default=None, metadata=_help(
        "The model card's license, a Hub license id (lower case, e.g. openrail++). A LoRA derives from its base "
        "model, whose license applies; default: that of the family's reference model (SD 1.x creativeml-openrail-m, "
        "SD 2.x and SDXL openrail++, SSD-1B and Vega apache-2.0). Give the teacher's own when it has another."))
    push_to_hub: bool = field(default=False, metadata=_help(
        "Upload the output folder to the Hugging Face Hub at the end, as diffusers' scripts do: the LoRA files, "
        "README.md, validation images and plots (not checkpoints, logs, metrics.jsonl or config.yaml). Log in first: "
        "hf auth login."))
    hub_model_id: str | None = field(default=None, metadata=_help(
        "The Hub repo for --push_to_hub (owner/name, or a name under your account); default: --output_dir's folder "
        "name. Created when missing, with your account's default visibility."))


# Flags of diffusers' LCM scripts (examples/consistency_distillation/train_lcm_distill_*.py) that have another
# name here, and flags with no counterpart, each answered with what to do instead, so their commands carry over.
RENAMED_FLAGS = {"teacher_revision": "revision", "cache_dir": "encodings_dir"}
DEPRECATED_FLAGS = {"cache_dir": "--cache_dir is the old name of --encodings_dir (encodings written by `lcm-lora "
                                 "cache`); in diffusers' scripts it is the download cache, which HF_HOME sets here"}
UNSUPPORTED_FLAGS = {
    "cast_teacher_unet": "the teacher always runs in --mixed_precision's dtype here (one UNet, LoRA off, serves as "
                         "teacher): drop the flag",
    "hub_token": "log in with `hf auth login` instead (or set HF_TOKEN): a token on the command line ends up in "
                 "the shell's history and the process list",
    "interpolation_type": "images are resized with Pillow's bicubic filter: drop the flag",
    "pretrained_model_name_or_path": "name the teacher with --pretrained_teacher_model",
}
IGNORED_FLAGS = ("local_rank",)  # torch.distributed.launch's; Accelerate reads LOCAL_RANK from the environment

SECTIONS = {"model": ModelArgs, "data": DataArgs, "lora": LoraArgs, "distill": DistillArgs,
            "optim": OptimArgs, "run": RunArgs}


@dataclass
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def to_flat_dict(self) -> dict[str, Any]:
        """{flag name: value}, the form of YAML presets and of exported metadata."""
        flat = {}
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                flat[key] = list(value) if isinstance(value, tuple) else value
        return flat

    @classmethod
    def from_flat_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        owners = _field_owners()
        values = _renamed(values, source)
        unknown = [k for k in values if k not in owners]
        if unknown:
            hints = [f"'{k}'" + _suggest(k, owners) for k in unknown]
            raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}. See `lcm-lora train --help`.")
        kwargs: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in values.items():
            section, f = owners[key]
            kwargs[section][key] = _coerce(value, f, source)
        return cls(**{s: SECTIONS[s](**kw) for s, kw in kwargs.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A preset (flat `flag: value` YAML) with keyword overrides, as `--config path --flag value` gives it."""
        return cls.from_flat_dict(with_overrides(load_yaml(Path(path)), overrides), source=str(path))

    def validate(self) -> list[str]:
        """Every problem found, each naming its flag; empty when the config is usable."""
        c, problems = self, []
        if not c.model.pretrained_teacher_model:
            problems.append("--pretrained_teacher_model is required (a hub id, a folder, or teacher-eps).")
        if c.model.prediction_type not in (None, *PREDICTION_TYPES):
            problems.append(f"--prediction_type must be one of {PREDICTION_TYPES}, got {c.model.prediction_type!r}.")
        sources = [flag for flag in DATA_SOURCES if _get(c, flag)]
        if not sources:
            problems.append("give --train_data_dir (a folder), --dataset_name, --train_shards_path_or_url or --encodings_dir.")
        if len(sources) > 1:
            problems.append(f"give only one of --{', --'.join(sources)}.")
        if c.data.train_shards_path_or_url and c.data.max_train_samples is not None:
            problems.append("--max_train_samples does not apply to streamed --train_shards_path_or_url; "
                            "name fewer shards instead.")
        if c.data.encodings_dir and (c.data.random_flip or not c.data.center_crop):
            problems.append("--encodings_dir holds one center crop per image: drop --random_flip and "
                            "--center_crop false, or train from the images.")
        if c.distill.w_min > c.distill.w_max:
            problems.append(f"--w_min ({c.distill.w_min}) must not exceed --w_max ({c.distill.w_max}).")
        problems += method_problems(c.distill)
        if c.distill.loss_type not in LOSS_TYPES:
            problems.append(f"--loss_type must be one of {LOSS_TYPES}, got {c.distill.loss_type!r}.")
        if c.run.mixed_precision not in MIXED_PRECISION:
            problems.append(f"--mixed_precision must be one of {MIXED_PRECISION}, got {c.run.mixed_precision!r}.")
        bad_formats = [f for f in c.run.export_formats if f not in EXPORT_FORMATS]
        if bad_formats:
            problems.append(f"--export_formats {' '.join(bad_formats)}: unknown; choose from {', '.join(EXPORT_FORMATS)}.")
        if c.run.export_dtype not in EXPORT_DTYPES:
            problems.append(f"--export_dtype must be one of {EXPORT_DTYPES}, got {c.run.export_dtype!r}.")
        if c.optim.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"--lr_scheduler must be one of {LR_SCHEDULERS}, got {c.optim.lr_scheduler!r}.")
        if c.run.overwrite and c.run.resume_from_checkpoint is not None:
            problems.append("--overwrite starts a new run and --resume_from_checkpoint continues one: give one of them.")
        problems += [license_problem(c.run.license)] if license_problem(c.run.license) else []
        for flag, (section, f) in _field_owners().items():
            problems += _range_problems(flag, getattr(getattr(c, section), flag), f.metadata.get("range"))
        return problems


def method_problems(d: DistillArgs) -> list[str]:
    """--method and the flags that belong to one method only."""
    if d.method not in METHODS:
        return [f"--method must be one of {METHODS}, got {d.method!r}."]
    problems = []
    if d.multiphase != 1 and d.method != "pcm":
        problems.append(f"--multiphase {d.multiphase} applies to --method pcm only; drop it or add --method pcm.")
    if d.method == "pcm" and d.num_ddim_timesteps % d.multiphase:
        problems.append(f"--multiphase {d.multiphase} must divide --num_ddim_timesteps {d.num_ddim_timesteps}, so that "
                        "each phase edge is a solver grid point (e.g. --num_ddim_timesteps 40 for 2, 4 or 8 phases).")
    if d.tcd_zero_share and d.method != "tcd":
        problems.append(f"--tcd_zero_share {d.tcd_zero_share} applies to --method tcd only; drop it or add --method tcd.")
    return problems


def license_problem(license: str | None) -> str | None:
    """Why `license` cannot go in a model card's front matter (the Hub refuses an upload whose card names an unknown
    license), else None."""
    if license is None or re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        return None
    return (f"--license {license!r}: not a Hub license id; those are lower case, e.g. openrail++, creativeml-openrail-m, "
            "apache-2.0 or other (https://huggingface.co/docs/hub/repositories-licenses).")


def _range_problems(flag: str, value: Any, bounds: tuple | None) -> list[str]:
    """'--flag must be ...' for the first number of `value` (one, or a tuple) outside `bounds`; NaN never is inside."""
    if bounds is None or bounds[:2] == (None, None) or value is None:
        return []
    low, high, low_open, high_open = bounds
    for v in value if isinstance(value, tuple) else (value,):
        if not ((low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high))):
            return [f"--{flag} must be {_interval(*bounds)}, got {v}."]
    return []


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'above' if low_open else 'at least'} {low}"
    return f"within {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _field_owners() -> dict[str, tuple[str, dataclasses.Field]]:
    return {f.name: (section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _get(config: TrainConfig, flag: str) -> Any:
    section, _ = _field_owners()[flag]
    return getattr(getattr(config, section), flag)


def _renamed(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with diffusers' flag names mapped to ours; a flag with no counterpart is a ConfigError saying what to
    do instead."""
    refused = [f"--{k}: {UNSUPPORTED_FLAGS[k]}." for k in values if k in UNSUPPORTED_FLAGS]
    if refused:
        raise ConfigError(f"{source}: " + " ".join(refused))
    out = {}
    for key, value in values.items():
        if key in IGNORED_FLAGS:
            continue
        new = RENAMED_FLAGS.get(key, key)
        if new != key:
            if new in values:
                raise ConfigError(f"{source}: give --{new} only (--{key} is another name of it).")
            if key in DEPRECATED_FLAGS:
                print(f"warning: {DEPRECATED_FLAGS[key]}; use --{new}.", file=sys.stderr)
        out[new] = value
    return out


def _suggest(key: str, owners: dict) -> str:
    close = difflib.get_close_matches(key, owners, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _base_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(element type, is_sequence) of a field, from its annotation."""
    hint = typing.get_type_hints(_owner_class(f))[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], True
    if args:  # Optional[X] / X | None
        return args[0], False
    return hint, False


def _owner_class(f: dataclasses.Field) -> type:
    for cls in SECTIONS.values():
        if f.name in {g.name for g in dataclasses.fields(cls)}:
            return cls
    raise KeyError(f.name)


def _coerce(value: Any, f: dataclasses.Field, source: str) -> Any:
    kind, is_seq = _base_type(f)
    try:
        if value is None:
            return None
        if is_seq:
            items = [value] if isinstance(value, (str, int, float)) else list(value)
            if f.metadata.get("comma_separated"):
                items = [part.strip() for v in items for part in str(v).split(",") if part.strip()]
            return tuple(_scalar(kind, v) for v in items)
        return _scalar(kind, value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: '{f.name}' = {value!r} is not a valid {kind.__name__} ({err}).") from None


def _scalar(kind: type, value: Any) -> Any:
    """`value` as `kind`, refusing what would change it silently: 4.7 or true for an int, 'yes' for a bool."""
    if kind is bool and not isinstance(value, bool):
        raise TypeError("expected true or false")
    if kind in (int, float) and isinstance(value, bool):
        raise TypeError(f"expected a number, not {str(value).lower()}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise TypeError("expected a whole number")
    return kind(value)


COMMAND_HELP = {
    "train": ("Distill an LCM-LoRA from a Stable Diffusion teacher.", {}),
    "cache": ("Encode a data source once (VAE latent distributions and text embeddings) for training without the "
              "encoders: the training flags pick the teacher, the data and the resolution.",
              {"encodings_dir": "The folder to write the encodings to (required); train reads it with "
                                "--encodings_dir."}),
}


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    description, help_overrides = COMMAND_HELP[command]
    parser = argparse.ArgumentParser(prog=f"lcm-lora {command}", description=description,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help="A YAML preset of flat flag: value pairs (see configs/).")
    if command == "train":
        parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                            help="Run every check train makes before loading weights, print the resolved "
                                 "configuration as YAML and what train would do, and exit (non-zero on a problem).")
    _add_foreign_flags(parser)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            kind, is_seq = _base_type(f)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{help_overrides.get(f.name, f.metadata.get('help', ''))} (default: {default})"
            if kind is bool:
                group.add_argument(f"--{f.name}", action=BoolFlag, help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=kind, nargs="+" if is_seq else None, help=help_text)
    return parser


def _add_foreign_flags(parser: argparse.ArgumentParser) -> None:
    """diffusers' flag names, hidden from --help: renamed ones parse as ours, the rest reach _renamed's message."""
    for name in (*RENAMED_FLAGS, *UNSUPPORTED_FLAGS, *IGNORED_FLAGS):
        flag = parser.add_argument(f"--{name}", nargs="?", const=True, help=argparse.SUPPRESS)
        flag.default = argparse.SUPPRESS


class BoolFlag(argparse.Action):
    """--flag, --flag true|false (diffusers' and YAML's spellings) and --no-flag."""

    def __init__(self, option_strings, dest, **kwargs):
        names = [*option_strings, *(f"--no-{o[2:]}" for o in option_strings)]
        super().__init__(names, dest, nargs="?", metavar="true|false", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value (write --{option_string[5:]} false).")
            setattr(namespace, self.dest, False)
        elif value is None:
            setattr(namespace, self.dest, True)
        elif value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            setattr(namespace, self.dest, value.lower() in ("true", "1", "yes", "on"))
        else:
            parser.error(f"{option_string}: expected true or false, got {value!r}.")


def accelerate_mixed_precision() -> str | None:
    """The mixed precision `accelerate launch` passes on (its flag or its config file), else the one in the default
    accelerate config file (`accelerate config`), else None."""
    import os

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    try:
        from accelerate.commands.config.config_args import default_config_file
    except ImportError:
        return None
    path = Path(default_config_file)
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None
    value = saved.get("mixed_precision") if isinstance(saved, dict) else None
    return str(value) if value is not None else None


def with_overrides(preset: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`preset` updated with `overrides`; a data source among the overrides replaces the preset's source."""
    if any(RENAMED_FLAGS.get(k, k) in DATA_SOURCES for k in overrides):
        preset = {k: v for k, v in preset.items() if RENAMED_FLAGS.get(k, k) not in DATA_SOURCES}
    return {**preset, **overrides}


def parse_train_args(argv: list[str] | None = None, command: str = "train") -> tuple[TrainConfig, bool]:
    """(config, dry_run) from flags over an optional YAML preset over the defaults."""
    args = vars(build_parser(command).parse_args(argv))
    dry_run = args.pop("dry_run", False)
    values: dict[str, Any] = {}
    source = "command line"
    if "config" in args:
        source = f"{args['config']} and the command line"
        values = load_yaml(args.pop("config"))
    values = with_overrides(values, args)
    launch_precision = None if "mixed_precision" in values else accelerate_mixed_precision()
    if launch_precision:
        values["mixed_precision"] = launch_precision  # as diffusers' scripts default to it
    return TrainConfig.from_flat_dict(values, source=source), dry_run


def load_yaml(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file. Presets live in configs/.")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}. Each line is `flag: value`.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag: value pairs, got {type(data).__name__}.")
    TrainConfig.from_flat_dict(data, source=str(path))  # names the file on unknown keys or bad values
    return data


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_flat_dict(), sort_keys=False)
