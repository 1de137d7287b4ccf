"""The `lcm-lora` command: the only reader of sys.argv.

    lcm-lora train --config configs/tiny.yaml [--flag value ...] [--dry-run]
    lcm-lora cache --config configs/tiny.yaml --encodings_dir cache/tiny-eps   # encode the data once
    lcm-lora generate --pretrained_model teacher-eps --lora output/tiny-eps --prompt "a red circle ..."
    lcm-lora export --checkpoint output/tiny-eps/checkpoint-400 --output_dir exported/ --formats kohya diffusers
    lcm-lora export --checkpoint output/tiny-eps --from_checkpoint best --output_dir exported/
    lcm-lora compare --pretrained_model teacher-eps --lora output/tiny-eps --output_dir compare/ --prompt "a red circle ..."
    lcm-lora merge --checkpoint model.safetensors --lora output/tiny-eps --output merged.safetensors --single_file_config DIR
    lcm-lora world dataset --out data/tiny-world --num_images 2000
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
    from .checkpoint import TrainingStopped
    from .config import ConfigError, parse_train_args, to_yaml
    from .data import DataError
    from .formats import LoraFormatError
    from .hub import HubError

    try:
        config, dry_run = parse_train_args(argv)
        if dry_run:  # every check train makes before loading weights, then the resolved configuration
            from .preflight import check_training, plan_summary

            plan = check_training(config)
            print(to_yaml(config), end="")
            print(f"dry run: every check passed; {plan_summary(config, plan)}", file=sys.stderr)
            return
        from .trainer import train

        train(config)
    except (DataError, ConfigError, LoraFormatError, HubError) as err:  # files written stay; the message says what to do
        sys.exit(f"error: {err}")
    except TrainingStopped as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_code)


def cache_main(argv: list[str] | None = None) -> None:
    """Encode a data source once: the training flags pick teacher, data and resolution; --encodings_dir names the
    folder to write."""
    from .config import RENAMED_FLAGS, ConfigError, parse_train_args
    from .data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        parse_train_args(["--help"], command="cache")
    parser = argparse.ArgumentParser(prog="lcm-lora cache", add_help=False)
    parser.add_argument("--encodings_dir", *(f"--{old}" for old, new in RENAMED_FLAGS.items() if new == "encodings_dir"),
                        dest="encodings_dir", default=None)
    known, rest = parser.parse_known_args(argv)  # here the encodings folder is the output, not a data source
    out = known.encodings_dir
    try:
        config, _ = parse_train_args(rest, command="cache")
        problems = config.validate() + ([] if out else ["--encodings_dir is required: the folder to write to."])
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


def add_model_flags(parser: argparse.ArgumentParser, lora_help: str) -> None:
    parser.add_argument("--pretrained_model", required=True,
                        help="Base model: hub id, folder, teacher-eps, or a single-file .safetensors checkpoint.")
    parser.add_argument("--single_file_config", default=None,
                        help="For a single-file --pretrained_model: a local diffusers folder with its configs.")
    parser.add_argument("--lora", default=None, help=lora_help)


def add_pipeline_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--height", type=int, default=None, help="Default: the model's sample size.")
    parser.add_argument("--width", type=int, default=None, help="Default: the model's sample size.")
    parser.add_argument("--num_ddim_timesteps", type=int, default=None,
                        help="The LoRA's training run's value; default: read from the LoRA's metadata, else 50.")
    parser.add_argument("--timestep_scaling_factor", type=float, default=None,
                        help="The LoRA's training run's value; default: read from the LoRA's metadata, else 10.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda when available, else cpu (here: %(default)s).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="(default: %(default)s)")


def input_paths(args: argparse.Namespace) -> list:
    """The files a generating command reads, which its outputs must never replace."""
    from .models import resolve_teacher
    from .world import assets

    return [resolve_teacher(args.pretrained_model), args.lora and assets.resolve(args.lora),
            args.single_file_config and resolve_teacher(args.single_file_config)]


def generate_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lcm-lora generate", description="Few-step images with an LCM-LoRA.",
        epilog="Writes one PNG per image, p<prompt index>-s<seed>.png (3 and 10 digits, so names sort by prompt, then "
               "seed), with the prompt, negative prompt, seed, steps, guidance, model, LoRA and scheduler in its PNG "
               "text (lcm_lora.* keys, and A1111's `parameters`), then grid.png of them all (a row per prompt when "
               "--num_images_per_prompt is above 1).")
    add_model_flags(parser, "Folder or .safetensors file of the LoRA (omit: no LoRA).")
    parser.add_argument("--prompt", nargs="+", required=True, help="One or more prompts.")
    parser.add_argument("--negative_prompt", nargs="+", default=None,
                        help="One for every prompt, or one per prompt. As in diffusers, used only with "
                             "--guidance_scale above 1.")
    parser.add_argument("--num_images_per_prompt", type=int, default=1,
                        help="Images per prompt (default: %(default)s).")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="Images per pipeline call; larger is faster on a GPU, and an image's pixels may then "
                             "differ by float rounding from those of batch 1 (default: %(default)s).")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="Sampling steps (default: the step count a --method pcm LoRA was made for, else 4).")
    parser.add_argument("--eta", type=float, default=None,
                        help="TCDScheduler's gamma (DDIM's eta); default: the LoRA's metadata (0.3 for a --method tcd "
                             "LoRA), else 0.")
    parser.add_argument("--guidance_scale", type=float, default=1.0,
                        help="diffusers' convention: 1.0 = no classifier-free guidance (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Image k (prompts in order, --num_images_per_prompt each) gets seed + k: a file's "
                             "prompt and seed draw it again (default: %(default)s).")
    add_pipeline_flags(parser)
    parser.add_argument("--output_dir", type=Path, default=Path("generated"),
                        help="Created when missing (default: %(default)s).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace files of these names already in --output_dir; nothing else there is touched.")
    args = parser.parse_args(argv)
    from .export import lora_sampler
    from .inference import draw, image_paths, image_specs, load_lcm_pipeline, save_images, settings_text
    from .safetensors_io import check_outputs
    from .world import assets

    inputs = input_paths(args)
    try:  # the flags and outputs are checked first: a refusal should not come after minutes of loading and sampling
        sampler = lora_sampler(assets.resolve(args.lora)) if args.lora else None
        if args.num_inference_steps is None:
            args.num_inference_steps = (sampler and sampler.steps) or 4
        eta = args.eta if args.eta is not None else sampler.eta if sampler else 0.0
        for flag in ("num_images_per_prompt", "batch_size", "num_inference_steps"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
        specs = image_specs(args.prompt, args.seed, args.num_images_per_prompt, args.negative_prompt)
        check_outputs(image_paths(args.output_dir, specs), inputs, args.overwrite)
        if args.negative_prompt and args.guidance_scale <= 1:
            print(f"warning: --negative_prompt has no effect at --guidance_scale {args.guidance_scale}: diffusers "
                  "uses it only above 1.", file=sys.stderr)
        pipe = load_lcm_pipeline(args.pretrained_model, args.lora, args.device, DTYPES[args.dtype],
                                 args.num_ddim_timesteps, args.timestep_scaling_factor, args.single_file_config)
        images = draw(pipe, specs, args.num_inference_steps, args.guidance_scale, args.height, args.width,
                      args.batch_size, progress=True, eta=eta)
        settings = settings_text(pipe, args.pretrained_model, args.lora, args.num_inference_steps, args.guidance_scale,
                                 eta)
        grid = save_images(images, specs, args.output_dir, settings, overwrite=args.overwrite)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    print(f"wrote {len(images)} image{'s' * (len(images) != 1)} and {grid}")


def export_main(argv: list[str] | None = None) -> None:
    from .config import EXPORT_FORMATS

    parser = argparse.ArgumentParser(prog="lcm-lora export", description="Write a LoRA in the formats each tool loads.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="A checkpoint-N folder, a training output folder, or a LoRA .safetensors (diffusers or kohya).")
    parser.add_argument("--from_checkpoint", default=None, metavar="best|latest|N",
                        help="With --checkpoint naming a training output folder: export its checkpoint with the best "
                             "agreement with the teacher at 4 steps (from its metrics.jsonl), its latest, or step N.")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--formats", nargs="+", choices=EXPORT_FORMATS, default=None,
                        help="diffusers: pytorch_lora_weights.safetensors (kohya keys, as the official LCM-LoRA repos: "
                             "loads in diffusers, ComfyUI, A1111 / Forge); kohya: the same file as "
                             "<output_name>.safetensors; peft: PEFT keys in peft/pytorch_lora_weights.safetensors "
                             "(diffusers only); hub: the old name of diffusers. Default: the run's --export_formats, "
                             "else diffusers kohya.")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the LoRA weights (alpha stays fp32). Default: the run's --export_dtype, else fp16.")
    parser.add_argument("--output_name", default=None, help="kohya file name and title; default lcm-lora-<teacher>.")
    parser.add_argument("--pretrained_teacher_model", default=None,
                        help="The base model, when the source does not record it (a LoRA from elsewhere).")
    parser.add_argument("--single_file_config", default=None, help="Config folder, when that base model is a single file.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace files already in --output_dir (never the source's own files).")
    parser.add_argument("--license", default=None,
                        help="The model card's license (a Hub license id). Default: the run's --license, else that of "
                             "the base model family's reference model.")
    parser.add_argument("--push_to_hub", action="store_true",
                        help="Then upload --output_dir to the Hugging Face Hub (log in first: hf auth login).")
    parser.add_argument("--hub_model_id", default=None,
                        help="The Hub repo for --push_to_hub; default: --output_dir's folder name.")
    args = parser.parse_args(argv)
    from . import hub
    from .config import RunArgs
    from .convert import export_lora_files
    from .model_card import CARD_NAME

    run = RunArgs(output_dir=str(args.output_dir), push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id)
    try:
        problems = hub.hub_problems(run)
        if problems:
            sys.exit(f"error: {problems[0]}")
        repo_id = hub.create_repo_id(hub.repo_name(run)) if args.push_to_hub else None
        source = args.checkpoint
        if args.from_checkpoint is not None:
            from .run_log import select_checkpoint

            source, what = select_checkpoint(args.checkpoint, args.from_checkpoint)
            print(f"exporting {source}: {what}")
        paths = export_lora_files(source, args.output_dir, args.formats, args.dtype and DTYPES[args.dtype],
                                  args.pretrained_teacher_model, args.single_file_config, args.output_name,
                                  args.overwrite, args.license, repo_id)
        for path in [*paths, args.output_dir / CARD_NAME]:
            print(f"wrote {path}")
        if repo_id:
            print(f"uploaded {args.output_dir} to {hub.upload(args.output_dir, repo_id, run.logging_dir)}")
    except (*USER_ERRORS, hub.HubError) as err:
        sys.exit(f"error: {err}")


def compare_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lcm-lora compare",
        description="How close few-step samples come to the model's own many-step sample from the same seed: the "
                    "plain model (DDIM) and, with --lora, the LCM-LoRA (under the scheduler its metadata names, "
                    "LCMScheduler unless trained with --method tcd or pcm), at each step count and "
                    "guidance; PSNR, SSIM, latent MSE and seconds per image.",
        epilog="Writes sheet-<k>-steps.png (a row per prompt, a column per sampler), compare.json and compare.html "
               "(self-contained) in --output_dir.")
    add_model_flags(parser, "An LCM-LoRA folder or .safetensors file (omit: the model alone).")
    parser.add_argument("--prompt", nargs="+", required=True, help="One or more prompts; prompt i gets seed --seed + i.")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8],
                        help="Step counts of the few-step samplers (default: %(default)s).")
    parser.add_argument("--guidance_scale", nargs="+", type=float, default=[1.0],
                        help="The LoRA's guidance scales, diffusers' convention: 1 = no classifier-free guidance "
                             "(default: %(default)s).")
    parser.add_argument("--teacher_guidance_scale", nargs="+", type=float, default=None,
                        help="The plain model's guidance scales at few steps; default: the reference's.")
    parser.add_argument("--reference_steps", type=int, default=25,
                        help="DDIM steps of the reference sample (default: %(default)s).")
    parser.add_argument("--reference_guidance_scale", type=float, default=None,
                        help="Guidance of the reference; default: the one an lcm-lora LoRA was trained to reproduce "
                             "(1 + mean w, from its metadata), else 7.5.")
    parser.add_argument("--fuse_lora", action="store_true",
                        help="Merge the LoRA into the weights (pipe.fuse_lora()) before sampling, as fast serving does.")
    add_pipeline_flags(parser)
    parser.add_argument("--output_dir", type=Path, required=True, help="Created when missing.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace files of these names already in --output_dir; nothing else there is touched.")
    args = parser.parse_args(argv)
    from . import compare
    from .safetensors_io import check_outputs
    from .world import assets

    inputs = input_paths(args)
    try:
        if min(args.steps) < 1 or args.reference_steps < 1:
            raise ValueError(f"--steps and --reference_steps must be at least 1, got {args.steps} and "
                             f"{args.reference_steps}.")
        if (args.height is None) != (args.width is None):
            raise ValueError("give both --height and --width, or neither.")
        check_outputs(compare.output_paths(args.output_dir, args.steps), inputs, args.overwrite)
        result = compare.compare(
            args.pretrained_model, args.lora and str(assets.resolve(args.lora)), args.prompt, args.seed, args.steps,
            args.guidance_scale, args.teacher_guidance_scale, args.reference_steps, args.reference_guidance_scale,
            args.height and (args.height, args.width), args.device, DTYPES[args.dtype], args.single_file_config,
            {"original_inference_steps": args.num_ddim_timesteps, "timestep_scaling": args.timestep_scaling_factor},
            args.fuse_lora)
        print(compare.table(result["summary"]))
        for path in compare.write(result, args.output_dir):
            print(f"wrote {path}")
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")


def merge_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lcm-lora merge",
                                     description="Bake a LoRA into a single-file checkpoint (original SD key layout).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    """`lcm-lora world dataset`: the bundled tiny world's images. Its build, judge and quality sweeps are the
    repository's harness (tiny_world/), run from a clone."""
    from .world import dataset

    if argv[:1] in (["quality"], ["build"], ["probe"], ["community"]):
        sys.exit(f"error: `lcm-lora world {argv[0]}` is the tiny world's harness: from a clone of the repository, run "
                 f"python -m tiny_world.{argv[0]} --help")
    if argv[:1] != ["dataset"]:
        sys.exit("usage: lcm-lora world dataset [--help]")
    dataset.main(argv[1:])


COMMANDS = {"train": train_main, "cache": cache_main, "generate": generate_main, "export": export_main,
            "merge": merge_main, "compare": compare_main, "world": world_main}
SUMMARIES = {
    "train": "distill an LCM-LoRA from a Stable Diffusion teacher (also: python train_lcm_lora.py)",
    "cache": "encode a data set once (VAE latents, text embeddings) for training without the encoders",
    "generate": "few-step images with an LCM-LoRA (its own scheduler), on a hub id, folder or single file",
    "export": "write a LoRA or checkpoint in the diffusers, kohya (ComfyUI / A1111) and PEFT layouts",
    "merge": "bake a LoRA into a single-file checkpoint",
    "compare": "few-step samples (plain and with an LCM-LoRA) against the model's many-step ones: sheets, metrics, speed",
    "world": "the bundled tiny world's images: lcm-lora world dataset --out data/tiny-world",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("lcm-lora")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def usage() -> str:
    lines = ["usage: lcm-lora {" + ",".join(COMMANDS) + "} [--help] ...", "", "Distill and use LCM-LoRA adapters for "
             "Stable Diffusion (SD1.x, SD2.x, SDXL, SSD-1B, Vega).", "", "commands:"]
    lines += [f"  {name:<10}{SUMMARIES[name]}" for name in COMMANDS]
    lines += ["", "options:", "  -h, --help  show this message and exit", "  --version   print the version and exit",
              "", "`lcm-lora COMMAND --help` lists each command's flags with their defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv and argv[0] == "--version":
        print(f"lcm-lora {version()}")
        return
    if not argv or argv[0] not in COMMANDS:
        import difflib

        if not argv:
            sys.exit(usage())
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        sys.exit(f"error: unknown command {argv[0]!r}{hint} (`lcm-lora --help` lists the commands)")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
