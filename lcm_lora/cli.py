"""The `lcm-lora` command: the only reader of sys.argv.

    lcm-lora train --config configs/tiny.yaml [--flag value ...] [--dry-run]
    lcm-lora cache --config configs/tiny.yaml --cache_dir cache/tiny-eps   # encode the data once
    lcm-lora generate --pretrained_model teacher-eps --lora output/tiny-eps --prompt "a red circle ..."
    lcm-lora export --checkpoint output/tiny-eps/checkpoint-400 --output_dir exported/ --formats kohya diffusers
    lcm-lora merge --checkpoint model.safetensors --lora output/tiny-eps --output merged.safetensors --single_file_config DIR
    lcm-lora world dataset|quality|build ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .export import DTYPES

# Bad input of the file commands: each message names the file or flag (ConfigError, LoraFormatError and
# UnreadableFileError are ValueErrors; NotImplementedError is a model layout without an LDM form).
USER_ERRORS = (ValueError, OSError, NotImplementedError)


def train_main(argv: list[str] | None = None) -> None:
    from .config import ConfigError, parse_train_args, to_yaml

    try:
        config, dry_run = parse_train_args(argv)
        if dry_run:
            print(to_yaml(config), end="")
            return
        problems = config.validate()
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    except ConfigError as err:
        sys.exit(f"error: {err}")
    from .checkpoint import TrainingStopped
    from .data import DataError
    from .formats import LoraFormatError
    from .trainer import train

    try:
        train(config)
    except (DataError, ConfigError, LoraFormatError) as err:  # checkpoints written stay; the message says what to fix
        sys.exit(f"error: {err}")
    except TrainingStopped as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_code)


def cache_main(argv: list[str] | None = None) -> None:
    """Encode a data source once: the training flags pick teacher, data and resolution; --cache_dir
    names the folder to write."""
    from .config import ConfigError, parse_train_args
    from .data import DataError

    parser = argparse.ArgumentParser(prog="lcm-lora cache", add_help=False)
    parser.add_argument("--cache_dir", default=None)
    known, rest = parser.parse_known_args(argv)  # here --cache_dir is the output, not a data source
    out = known.cache_dir
    try:
        config, _ = parse_train_args(rest)
        problems = config.validate() + ([] if out else ["--cache_dir is required: the folder to write the cache to."])
        if not problems:  # what the teacher's config files say, before any weight loads (as train does)
            from .models import teacher_problems

            problems = teacher_problems(config.model, config.data.resolution, config.distill.num_ddim_timesteps)
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        from .caching import write_cache

        device = "cuda" if torch.cuda.is_available() else "cpu"
        manifest = write_cache(config, out, device=device)
    except (ConfigError, DataError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {manifest['num_samples']} samples to {out} (skipped: {manifest['skipped'] or 'none'})")


def generate_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lcm-lora generate", description="Few-step images with an LCM-LoRA.")
    parser.add_argument("--pretrained_model", required=True,
                        help="Base model: hub id, folder, teacher-eps, or a single-file .safetensors checkpoint.")
    parser.add_argument("--single_file_config", default=None,
                        help="For a single-file --pretrained_model: a local diffusers folder with its configs.")
    parser.add_argument("--lora", default=None, help="Folder or .safetensors file of the LoRA (omit: no LoRA).")
    parser.add_argument("--prompt", nargs="+", required=True)
    parser.add_argument("--num_inference_steps", type=int, default=4)
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="diffusers' convention; 1.0 = no CFG.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_ddim_timesteps", type=int, default=None,
                        help="The training run's value; default: read from the LoRA's metadata, else 50.")
    parser.add_argument("--timestep_scaling_factor", type=float, default=None,
                        help="The training run's value; default: read from the LoRA's metadata, else 10.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--output_dir", type=Path, default=Path("generated"))
    parser.add_argument("--overwrite", action="store_true", help="Replace images already in --output_dir.")
    args = parser.parse_args(argv)
    from .inference import generate, image_paths, load_lcm_pipeline, save_images
    from .models import resolve_teacher
    from .safetensors_io import check_outputs
    from .world import assets

    inputs = [resolve_teacher(args.pretrained_model), args.lora and assets.resolve(args.lora),
              args.single_file_config and resolve_teacher(args.single_file_config)]
    try:  # the outputs are checked first: a refusal should not come after minutes of loading and sampling
        check_outputs(image_paths(args.output_dir, len(args.prompt)), inputs, args.overwrite)
        pipe = load_lcm_pipeline(args.pretrained_model, args.lora, args.device, DTYPES[args.dtype],
                                 args.num_ddim_timesteps, args.timestep_scaling_factor, args.single_file_config)
        images = generate(pipe, args.prompt, args.num_inference_steps, args.guidance_scale, args.seed,
                          args.height, args.width)
        grid = save_images(images, args.output_dir, overwrite=args.overwrite)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    print(f"wrote {len(images)} images and {grid}")


def export_main(argv: list[str] | None = None) -> None:
    from .config import EXPORT_FORMATS

    parser = argparse.ArgumentParser(prog="lcm-lora export", description="Write a LoRA in the formats each tool loads.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="A checkpoint-N folder, a training output folder, or a LoRA .safetensors (diffusers or kohya).")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--formats", nargs="+", choices=EXPORT_FORMATS, default=None,
                        help="diffusers: pytorch_lora_weights.safetensors; kohya: <output_name>.safetensors for "
                             "ComfyUI/A1111; hub: kohya keys in hub/pytorch_lora_weights.safetensors. "
                             "Default: the run's --export_formats, else diffusers kohya.")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the LoRA weights (alpha stays fp32). Default: the run's --export_dtype, else fp16.")
    parser.add_argument("--output_name", default=None, help="kohya file name and title; default lcm-lora-<teacher>.")
    parser.add_argument("--pretrained_teacher_model", default=None,
                        help="The base model, when the source does not record it (a LoRA from elsewhere).")
    parser.add_argument("--single_file_config", default=None, help="Config folder, when that base model is a single file.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace files already in --output_dir (never the source's own files).")
    args = parser.parse_args(argv)
    from .convert import export_lora_files

    try:
        paths = export_lora_files(args.checkpoint, args.output_dir, args.formats, args.dtype and DTYPES[args.dtype],
                                  args.pretrained_teacher_model, args.single_file_config, args.output_name,
                                  args.overwrite)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    for path in paths:
        print(f"wrote {path}")


def merge_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lcm-lora merge",
                                     description="Bake a LoRA into a single-file checkpoint (original SD key layout).")
    parser.add_argument("--checkpoint", type=Path, required=True, help="The model: a single-file .safetensors.")
    parser.add_argument("--lora", type=Path, required=True, help="A LoRA file or folder (diffusers or kohya keys).")
    parser.add_argument("--output", type=Path, required=True, help="The merged .safetensors to write.")
    parser.add_argument("--single_file_config", required=True,
                        help="A local diffusers folder with the model's configs (its unet/config.json names the blocks).")
    parser.add_argument("--strength", type=float, default=1.0, help="Multiplier of the LoRA's update.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing --output (never --checkpoint or --lora).")
    args = parser.parse_args(argv)
    from .convert import merge_lora

    try:
        path, changed = merge_lora(args.checkpoint, args.lora, args.output, args.single_file_config, args.strength,
                                   args.overwrite)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    print(f"wrote {path}: {changed} UNet tensors changed, every other tensor as it was")


def world_main(argv: list[str]) -> None:
    from .world import build, dataset, quality

    commands = {"dataset": dataset.main, "quality": quality.main, "build": build.main}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: lcm-lora world {{{','.join(commands)}}} [--help]")
    commands[argv[0]](argv[1:])


COMMANDS = {"train": train_main, "cache": cache_main, "generate": generate_main, "export": export_main,
            "merge": merge_main, "world": world_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: lcm-lora {{{','.join(COMMANDS)}}} [--help]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
