"""Everything a training or caching command can check before any weight loads, in one pass: the flags, the teacher
(resolved once: bundled name, folder, single file or hub id), the data source (opened, its columns and captions
checked), the output folder and the resume target, the trackers and the precision. `train`, `--dry-run` and
`cache` run it; every problem found is reported at once, each naming its flag.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os

import torch

from .agreement import reference_guidance
from .config import ConfigError, TrainConfig
from .data import DataError, load_source
from .data.cache import read_manifest
from .data.shards import expand_shards, require_webdataset
from .models import teacher_fingerprint, teacher_problems, unet_config, unet_module_paths
from .checkpoint import checkpoint_step
from .hub import hub_problems, repo_name
from .run_dir import RunPlan, plan_run

# Accelerate's tracker names (accelerate/tracking.py LOGGER_TYPE_TO_CLASS) and the module each one imports.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",),
                   "mlflow": ("mlflow",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                   "swanlab": ("swanlab",), "trackio": ("trackio",)}


def check_training(config: TrainConfig) -> RunPlan:
    """The run's plan in its output folder, or one ConfigError listing every problem by flag."""
    problems = config.validate()
    if not problems:
        problems = (teacher_problems(config.model, config.data.resolution, config.distill.num_ddim_timesteps,
                                     encoders=not config.data.encodings_dir)
                    + tracker_problems(config.run.report_to) + precision_problems(config.run.mixed_precision)
                    + optimizer_problems(config.optim.use_8bit_adam) + hub_problems(config.run))
    if not problems:
        problems = target_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    check_data(config)
    return plan_run(config)


def check_data(config: TrainConfig) -> None:
    """The data source opened without decoding an image, or a DataError naming it: the folder, data set, shard list
    or cache is there and has what training reads (image and caption columns, a full batch of samples, a cache made
    for this teacher). With --num_train_epochs, sets --max_train_steps from the number of samples."""
    d, o = config.data, config.optim
    if d.encodings_dir:
        samples = read_manifest(d.encodings_dir, teacher_fingerprint(config.model), d.resolution)["num_samples"]
    elif d.train_shards_path_or_url:
        require_webdataset()
        expand_shards(d.train_shards_path_or_url)
        samples = None  # a stream: its length is unknown until read
    else:
        samples = len(load_source(d))
    if samples is not None and samples < o.train_batch_size:
        raise DataError(f"the data has {samples} samples, fewer than one batch (--train_batch_size "
                        f"{o.train_batch_size}): add samples or lower the batch size.")
    if o.num_train_epochs is not None:
        if samples is None:
            raise DataError("--num_train_epochs needs a data set of known size; streamed --train_shards_path_or_url "
                            "trains for --max_train_steps.")
        o.max_train_steps = o.num_train_epochs * steps_per_epoch(samples, o.train_batch_size,
                                                                 o.gradient_accumulation_steps)


def steps_per_epoch(samples: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass: full batches only (the loaders drop the last partial one), shared between the
    processes of the launch (Accelerate pads the last round so that each gets as many), `accumulation` per step."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return math.ceil(math.ceil(samples // batch_size / processes) / accumulation)


def tracker_problems(report_to: str) -> list[str]:
    """Each --report_to name known to Accelerate and importable, so a run never logs to nothing."""
    problems = []
    for name in [n.strip() for n in report_to.split(",") if n.strip()]:
        if name in ("none", "all"):
            continue
        if name not in TRACKER_MODULES:
            close = difflib.get_close_matches(name, TRACKER_MODULES, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            problems.append(f"--report_to {name}: not a tracker; choose from {', '.join(TRACKER_MODULES)}, all or "
                            f"none.{hint}")
        elif not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[name]):
            problems.append(f"--report_to {name}: {TRACKER_MODULES[name][0]} is not installed (pip install "
                            f"{TRACKER_MODULES[name][0]}), or pass --report_to none.")
    return problems


def precision_problems(mixed_precision: str) -> list[str]:
    """fp16 on a machine without a GPU: CPUs emulate most fp16 arithmetic, so it is refused rather than slow."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        return ["--mixed_precision fp16: no GPU here, and CPUs run fp16 far slower than fp32; use --mixed_precision "
                "no (or bf16 on a CPU with native bf16)."]
    return []


def optimizer_problems(use_8bit_adam: bool) -> list[str]:
    if use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        return ["--use_8bit_adam needs bitsandbytes: pip install 'lcm-lora[bnb]' (CUDA), or drop the flag."]
    return []


def target_problems(config: TrainConfig) -> list[str]:
    """Each --lora_target_modules name matches a Linear or Conv2d of the teacher's UNet, as PEFT matches it (the
    module's name, or its last dotted parts); the UNet is built from its config on the meta device."""
    paths = unet_module_paths(unet_config(config.model))
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    problems = []
    for target in config.lora.lora_target_modules:
        if not any(p == target or p.endswith("." + target) for p in paths):
            close = difflib.get_close_matches(target, leaves, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            problems.append(f"--lora_target_modules {target}: no Linear or Conv2d of the teacher's UNet is named so "
                            f"(names end in e.g. to_q, to_k, to_v, to_out.0, proj_in, conv1).{hint}")
    return problems


def plan_summary(config: TrainConfig, plan: RunPlan) -> str:
    """What train does in its output folder, in one line (printed before anything loads)."""
    out = config.run.output_dir
    if plan.finished:
        what = f"{out} holds the finished run ({plan.checkpoint.name}): nothing to train."
    elif plan.checkpoint is not None:
        what = f"resuming from {plan.checkpoint} (step {checkpoint_step(plan.checkpoint)})."
    elif config.run.resume_from_checkpoint == "latest":
        what = f"--resume_from_checkpoint latest: no checkpoint in {out} yet, so a new run starts."
    else:
        what = f"a new run in {out}."
    what += " " + validation_summary(config)
    if config.run.push_to_hub:
        what += f" Then {out} goes up to the Hub repo {repo_name(config.run)} (created if missing)."
    return what


def validation_summary(config: TrainConfig) -> str:
    r, d = config.run, config.distill
    if not (r.validation_steps and r.validation_prompts):
        return ("No validation: --validation_steps with --validation_prompts scores the LoRA against the teacher "
                "during training (docs/watching.md).")
    steps = ", ".join(map(str, r.validation_inference_steps))
    return (f"Validation every {r.validation_steps} steps and at the last: {len(r.validation_prompts)} prompts at "
            f"{steps} steps against the teacher's {r.validation_teacher_steps} DDIM steps at guidance "
            f"{reference_guidance(d.w_min, d.w_max):g}, into {r.output_dir}/metrics.jsonl.")
