"""Few-step generation with an exported LCM-LoRA: diffusers' pipeline with the LoRA's scheduler swapped in."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import diffusers
from diffusers import DiffusionPipeline
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from .config import ModelArgs
from .export import check_lora_for_diffusers, lora_sampler
from .formats import LoraFormatError, number
from .model_ref import resolve_model
from .models import unet_config
from .samplers import Sampler
from .safetensors_io import check_outputs, read_metadata
from .single_file import load_single_file_pipeline
from .world import assets


def load_lcm_pipeline(pretrained_model: str, lora: str | Path | None, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, original_inference_steps: int | None = None,
                      timestep_scaling: float | None = None, single_file_config: str | None = None):
    """The base pipeline with the LoRA's scheduler (`use_lcm_lora`: LCMScheduler unless the LoRA's metadata names
    another) and the LoRA loaded exactly as a user would load it.

    `pretrained_model` is a hub id, a folder, a bundled teacher, or a single-file checkpoint (then
    `single_file_config` names the local folder with its configs). `original_inference_steps` and
    `timestep_scaling` must equal the training run's num_ddim_timesteps and timestep_scaling_factor:
    None takes them from the LoRA's metadata, else LCMScheduler's defaults (50 and 10). The LoRA is checked
    against the model's UNet config before any weight loads (export.check_lora_for_diffusers): a LoRA that does
    not fit is refused, never silently left out.
    """
    resolve_model(pretrained_model, single_file_config, flag="--pretrained_model")  # one line if it names nothing
    lora = assets.resolve(lora) if lora is not None else None  # a path, or the bundled style-dusk example
    if lora is not None:  # checked before the base model's weights load
        model = ModelArgs(pretrained_teacher_model=pretrained_model, single_file_config=single_file_config)
        check_lora_for_diffusers(lora, unet_config(model))
    pipe = load_base_pipeline(pretrained_model, single_file_config)
    use_lcm_lora(pipe, lora, original_inference_steps, timestep_scaling)
    pipe.set_progress_bar_config(disable=True)
    return place(pipe, device, dtype)


def place(pipe, device: str, dtype: torch.dtype):
    """`pipe` on `device`, cast only when its dtype differs (diffusers warns on every cast, even to the same dtype)."""
    return pipe.to(device) if pipe.dtype == dtype else pipe.to(device, dtype)


def use_lcm_lora(pipe, lora: str | Path | None, original_inference_steps: int | None = None,
                 timestep_scaling: float | None = None) -> Sampler:
    """The LoRA's own scheduler on `pipe` (LCMScheduler, or the TCDScheduler / trailing DDIMScheduler its metadata
    names for --method tcd / pcm; settings as in `load_lcm_pipeline`), and the LoRA loaded with load_lora_weights
    after export.check_lora_for_diffusers checked it against the pipeline's UNet. Returns the sampler: its `eta`
    goes to the pipeline call (see `draw`)."""
    lora = assets.resolve(lora) if lora is not None else None
    sampler = lora_sampler(lora) if lora is not None else Sampler()
    settings = dict(sampler.settings)
    overrides = (("original_inference_steps", original_inference_steps, True), ("timestep_scaling", timestep_scaling, False))
    for name, value, integer in overrides:
        if value is not None and (name in settings or sampler.method == "lcm"):
            settings[name] = number(value, name, integer)
    pipe.scheduler = getattr(diffusers, sampler.scheduler).from_config(pipe.scheduler.config, **settings)
    sampler = dataclasses.replace(sampler, settings=settings)
    if lora is None:
        return sampler
    lora_path = check_lora_for_diffusers(lora, dict(pipe.unet.config))
    try:
        pipe.load_lora_weights(str(lora_path))
    except Exception as err:  # diffusers raises IndexError, KeyError, ValueError... on what it cannot convert
        raise LoraFormatError(f"{lora_path}: diffusers' load_lora_weights failed ({type(err).__name__}: "
                              f"{' '.join(str(err).split())}).") from None
    return sampler


def load_base_pipeline(pretrained_model: str, single_file_config: str | None = None):
    """A diffusers pipeline from a hub id, folder, bundled teacher or single-file checkpoint, safetensors only; a
    reference that names nothing, or a file with a broken header, is a one-line error naming it."""
    ref = resolve_model(pretrained_model, single_file_config, flag="--pretrained_model")
    if ref.single_file:
        read_metadata(ref.location)
        return load_single_file_pipeline(ref.location, single_file_config)
    return DiffusionPipeline.from_pretrained(ref.location, safety_checker=None, use_safetensors=True)


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


@dataclass(frozen=True)
class ImageSpec:
    """One image of a run: its prompt (and index among the prompts), negative prompt and own seed."""
    prompt_index: int
    prompt: str
    negative_prompt: str | None
    seed: int

    @property
    def file_name(self) -> str:  # fixed widths, so names sort by prompt, then seed
        return f"p{self.prompt_index:03d}-s{self.seed:010d}.png"


def image_specs(prompts: list[str], seed: int, num_images_per_prompt: int = 1,
                negative_prompts: list[str] | None = None) -> list[ImageSpec]:
    """Image k of the run (prompts in order, `num_images_per_prompt` each) gets seed + k, its own: `draw` seeds its
    noise with it alone, so its prompt and seed draw it again in any run. `negative_prompts`: None, one for every
    prompt, or one per prompt."""
    negatives = negative_prompts or [None]
    if len(negatives) not in (1, len(prompts)):
        raise ValueError(f"give one negative prompt, or one per prompt ({len(prompts)}); got {len(negatives)}.")
    if not 0 <= seed <= 2**64 - len(prompts) * num_images_per_prompt:  # torch seeds are 64-bit unsigned
        raise ValueError(f"the seed must be at least 0 and its images' seeds below 2**64, got {seed}.")
    negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    return [ImageSpec(i, prompt, negative, seed + i * num_images_per_prompt + j)
            for i, (prompt, negative) in enumerate(zip(prompts, negatives)) for j in range(num_images_per_prompt)]


@torch.no_grad()
def draw(pipe, specs: list[ImageSpec], num_inference_steps: int, guidance_scale: float, height: int | None = None,
         width: int | None = None, batch_size: int = 1, progress: bool = False, eta: float = 0.0) -> list[Image.Image]:
    """The images of `specs`, `batch_size` per pipeline call. Each image's noise comes from a CPU generator seeded with
    its own seed, the same on every device and in every batch; its pixels match across batch sizes up to the float
    rounding of batched kernels (a rare pixel may move by one level in 255). `eta` is TCDScheduler's gamma (and DDIM's
    eta); LCMScheduler takes none."""
    images = []
    with tqdm(total=len(specs), unit="image", desc="generate", disable=not progress) as bar:
        for start in range(0, len(specs), batch_size):
            batch = specs[start:start + batch_size]
            negative = [s.negative_prompt for s in batch] if batch[0].negative_prompt is not None else None
            out = pipe([s.prompt for s in batch], negative_prompt=negative, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, generator=[torch.Generator().manual_seed(s.seed) for s in batch],
                       height=height, width=width, output_type="np", eta=eta)
            images += [Image.fromarray((im * 255).round().clip(0, 255).astype(np.uint8)) for im in out.images]
            bar.update(len(batch))
    return images


def generate(pipe, prompts: list[str], num_inference_steps: int, guidance_scale: float, seed: int,
             height: int | None = None, width: int | None = None, eta: float = 0.0) -> list[Image.Image]:
    """One image per prompt, all in one pipeline call; prompt i gets seed + i."""
    return draw(pipe, image_specs(prompts, seed), num_inference_steps, guidance_scale, height, width, len(prompts),
                eta=eta)


def settings_text(pipe, model: str, lora: str | None, steps: int, guidance_scale: float,
                  eta: float = 0.0) -> dict[str, str]:
    """The run's settings for `png_info`: with an image's prompts and seed, what draws it again."""
    scheduler = pipe.scheduler.config
    return {"num_inference_steps": str(steps), "guidance_scale": str(guidance_scale), "model": model,
            "lora": lora or "", "scheduler": type(pipe.scheduler).__name__,
            "original_inference_steps": str(scheduler.get("original_inference_steps", "")),
            "timestep_scaling": str(scheduler.get("timestep_scaling", "")),
            # LCMScheduler and TCDScheduler place their steps on the original_inference_steps grid instead
            **({} if "original_inference_steps" in scheduler else {"timestep_spacing": scheduler.timestep_spacing}),
            **({"eta": str(eta)} if eta else {})}


def image_paths(output_dir: str | Path, specs: list[ImageSpec]) -> list[Path]:
    """The files `save_images` writes: one PNG per image (`ImageSpec.file_name`), then grid.png."""
    output_dir = Path(output_dir)
    return [output_dir / spec.file_name for spec in specs] + [output_dir / "grid.png"]


def png_info(spec: ImageSpec, settings: dict[str, str], size: tuple[int, int]) -> PngInfo:
    """What made the image, as PNG text: a lcm_lora.<field> key per field, and A1111's `parameters` text that image
    UIs read. (No plain `prompt` key: ComfyUI reads that one as its workflow JSON.)"""
    fields = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt or "", "seed": str(spec.seed), **settings}
    info = PngInfo()
    for key, value in fields.items():
        info.add_text(f"lcm_lora.{key}", value)  # text that is not Latin-1 goes to an iTXt chunk, as UTF-8
    a1111 = {"Steps": fields["num_inference_steps"], "Sampler": fields["scheduler"],
             "CFG scale": fields["guidance_scale"], "Seed": fields["seed"], "Size": "{}x{}".format(*size),
             "Model": fields["model"], "Lora": fields["lora"]}
    lines = [spec.prompt] + [f"Negative prompt: {spec.negative_prompt}"] * bool(spec.negative_prompt)
    lines.append(", ".join(f"{key}: {_a1111_quote(value)}" for key, value in a1111.items() if value))
    info.add_text("parameters", "\n".join(lines))
    return info


def _a1111_quote(value: str) -> str:  # as A1111 writes a value holding its separators
    return json.dumps(value) if any(c in value for c in ",:\n") else value


def save_images(images: list[Image.Image], specs: list[ImageSpec], output_dir: str | Path, settings: dict[str, str],
                overwrite: bool = False) -> Path:
    """A PNG per image, with `png_info`, plus grid.png (a row per prompt when prompts have several images); returns
    the grid's path. An existing file is replaced only with `overwrite`, and nothing else in `output_dir` is touched.
    `settings`: from `settings_text`."""
    *paths, grid_path = image_paths(output_dir, specs)
    check_outputs([*paths, grid_path], [], overwrite)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    for path, image, spec in zip(paths, images, specs):
        image.save(path, pnginfo=png_info(spec, settings, image.size))
    per_prompt = sum(spec.prompt_index == specs[0].prompt_index for spec in specs)
    make_grid(images, columns=per_prompt if per_prompt > 1 else min(len(images), 8)).save(grid_path)
    return grid_path
