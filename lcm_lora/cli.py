"""The `lcm-lora` command: the only reader of sys.argv.

    lcm-lora train --config configs/tiny.yaml [--flag value ...] [--dry-run]
    lcm-lora cache --config configs/tiny.yaml --cache_dir cache/tiny-eps   # encode the data once
    lcm-lora generate --pretrained_model teacher-eps --lora output/tiny-eps --prompt "a red circle ..."
    lcm-lora export --checkpoint output/tiny-eps/checkpoint-400 --output_dir exported/
    lcm-lora world dataset|quality|build ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    from .data import DataError
    from .checkpoint import TrainingStopped
    from .trainer import train

    try:
        train(config)
    except (DataError, ConfigError) as err:  # checkpoints already written stay; the message says what to fix
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
    parser.add_argument("--pretrained_model", required=True, help="Base model: hub id, folder, or teacher-eps.")
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
    args = parser.parse_args(argv)
    from .inference import generate, load_lcm_pipeline, save_images

    pipe = load_lcm_pipeline(args.pretrained_model, args.lora, args.device, DTYPES[args.dtype],
                             args.num_ddim_timesteps, args.timestep_scaling_factor)
    images = generate(pipe, args.prompt, args.num_inference_steps, args.guidance_scale, args.seed,
                      args.height, args.width)
    print(f"wrote {len(images)} images and {save_images(images, args.output_dir)}")


def export_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lcm-lora export",
                                     description="Write a training checkpoint's LoRA in diffusers format.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="A checkpoint-N folder of a training run.")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    from .export import export_checkpoint

    try:
        print(f"wrote {export_checkpoint(args.checkpoint, args.output_dir, DTYPES[args.dtype])}")
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")


def world_main(argv: list[str]) -> None:
    from .world import build, dataset, quality

    commands = {"dataset": dataset.main, "quality": quality.main, "build": build.main}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: lcm-lora world {{{','.join(commands)}}} [--help]")
    commands[argv[0]](argv[1:])


COMMANDS = {"train": train_main, "cache": cache_main, "generate": generate_main, "export": export_main, "world": world_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: lcm-lora {{{','.join(COMMANDS)}}} [--help]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
