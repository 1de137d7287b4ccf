"""Score samplers on the tiny world: prompt accuracy and Fréchet distance on held-out prompts.

    python -m tiny_world.quality --teacher teacher-eps              # the tables of docs/results.md
    python -m tiny_world.quality --teacher /path/to/pipeline --steps 1 2 4 8
    python -m tiny_world.quality --teacher output/community/teacher-eps-dusk --palette dusk   # shifted world

The held-out set is every scene of the world (192 prompts), `samples_per_prompt` images each from
fixed seeds; the Fréchet reference is images rendered from seeds that training never used.
With `--palette dusk` the reference and the real-image row are rendered in that palette and every row
gains a judge-free style column: the share of images whose background is nearer the palette than the
base world's (scene.style_score).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler

from lcm_lora.export import lcm_scheduler_settings
from . import JUDGE
from .judge import Judge, accuracy, frechet_distance, judge_images, render_set
from lcm_lora.world.scene import PALETTES, Scene, all_scenes, render, style_score

HELD_OUT_SEED = 1_000_000  # training images use seeds below this
REFERENCE_IMAGES = 2000

SAMPLERS = {  # extra keyword arguments (`scheduler_kwargs` of `sweep`) override these settings
    "ddim-leading": lambda config, **kw: DDIMScheduler.from_config(config, **{"timestep_spacing": "leading", **kw}),
    "ddim-trailing": lambda config, **kw: DDIMScheduler.from_config(config, **{"timestep_spacing": "trailing", **kw}),
    "dpm++2m-trailing": lambda config, **kw: DPMSolverMultistepScheduler.from_config(
        config, **{"algorithm_type": "dpmsolver++", "timestep_spacing": "trailing", "final_sigmas_type": "zero", **kw}
    ),
    "lcm": lambda config, **kw: LCMScheduler.from_config(config, **kw),
    "tcd": lambda config, **kw: TCDScheduler.from_config(config, **kw),
}


def sampler_and_eta(name: str) -> tuple[str, float | None]:
    """"tcd-g0.3" is TCDScheduler sampled with gamma (the pipeline's eta) 0.3; other names take no eta."""
    if name.startswith("tcd-g"):
        return "tcd", float(name[len("tcd-g"):])
    return name, None


@dataclass
class Score:
    sampler: str
    steps: int
    guidance_scale: float
    prompt_accuracy: float
    mean_attribute_accuracy: float
    frechet_distance: float
    per_attribute: dict
    style_score: float | None = None  # only when scored against a shifted palette

    def row(self) -> str:
        row = (
            f"| {self.sampler} | {self.steps} | {self.guidance_scale:g} | {100 * self.prompt_accuracy:.1f} "
            f"| {100 * self.mean_attribute_accuracy:.1f} | {self.frechet_distance:.2f} |"
        )
        return row if self.style_score is None else f"{row} {100 * self.style_score:.1f} |"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not (k == "style_score" and v is None)}


TABLE_HEADER = (
    "| sampler | steps | guidance | prompt acc. % | attribute acc. % | Fréchet distance |\n"
    "|---|---:|---:|---:|---:|---:|"
)
STYLE_TABLE_HEADER = (
    "| sampler | steps | guidance | prompt acc. % | attribute acc. % | Fréchet distance | style % |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


def held_out_prompts(samples_per_prompt: int) -> list[Scene]:
    return [scene for scene in all_scenes() for _ in range(samples_per_prompt)]


def load_judge(path: str | Path | None = None) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(str(path or JUDGE)))
    return judge.eval()


def load_pipeline(path: str | Path, vae: str | Path | None = None, single_file_config: str = "teacher-eps"):
    """A pipeline folder, a bundled model, or a single file (its configs from `single_file_config`; the bundled
    community-dusk is a fine-tune of teacher-eps); `vae` swaps in another VAE folder (e.g. a community one)."""
    from lcm_lora.inference import load_base_pipeline

    pipe = load_base_pipeline(str(path), single_file_config)
    if vae:
        pipe.vae = AutoencoderKL.from_pretrained(str(vae))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, scenes: list[Scene], steps: int, guidance_scale: float, seed: int = 0, batch: int = 96,
             eta: float | None = None) -> np.ndarray:
    """uint8 images [N, 64, 64, 3], one per scene, from one seeded generator per batch; `eta` goes to the scheduler's
    step (TCD's gamma) when given."""
    extra = {} if eta is None else {"eta": eta}
    images = []
    for i in range(0, len(scenes), batch):
        prompts = [s.caption for s in scenes[i : i + batch]]
        generator = torch.Generator(pipe.device).manual_seed(seed + i)
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                   output_type="np", **extra)
        images.append((out.images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images)


class Scorer:
    """Holds the judge and the real-image reference features, so each score costs one judge pass.
    A `palette` other than "base" scores against that shifted world and adds the style score."""

    def __init__(self, judge: Judge | None = None, reference_images: int = REFERENCE_IMAGES,
                 palette: str = "base") -> None:
        self.judge = judge or load_judge()
        self.palette = palette
        _, real = render_set(range(HELD_OUT_SEED, HELD_OUT_SEED + reference_images), palette)
        self.reference = judge_images(self.judge, real)[1]

    def score(self, images: np.ndarray, scenes: list[Scene], sampler: str, steps: int, guidance_scale: float) -> Score:
        preds, feats = judge_images(self.judge, images)
        acc = accuracy(preds, scenes)
        per_attribute = {k: v for k, v in acc.items() if k not in ("prompt", "mean_attribute")}
        style = None if self.palette == "base" else style_score(images, self.palette)
        return Score(sampler, steps, guidance_scale, acc["prompt"], acc["mean_attribute"],
                     frechet_distance(feats, self.reference), per_attribute, style)


def sweep(pipe, scorer: Scorer, samplers: list[str], steps: list[int], guidance_scale: float,
          samples_per_prompt: int = 2, seed: int = 0, scheduler_kwargs: dict | None = None) -> list[Score]:
    scenes = held_out_prompts(samples_per_prompt)
    original_scheduler = pipe.scheduler
    original = original_scheduler.config
    scores = []
    for sampler in samplers:
        name, eta = sampler_and_eta(sampler)
        pipe.scheduler = SAMPLERS[name](original, **(scheduler_kwargs or {}))
        for n in steps:
            images = generate(pipe, scenes, n, guidance_scale, seed, eta=eta)
            scores.append(scorer.score(images, scenes, sampler, n, guidance_scale))
            print(scores[-1].row(), flush=True)
    pipe.scheduler = original_scheduler
    return scores


def real_baseline(scorer: Scorer, samples_per_prompt: int = 2) -> Score:
    """The judge on real held-out images: the ceiling for accuracy, the floor for the distance."""
    scenes = held_out_prompts(samples_per_prompt)
    images = np.stack([render(s, HELD_OUT_SEED + 500_000 + i, scorer.palette) for i, s in enumerate(scenes)])
    return scorer.score(images, scenes, "real images", 0, 0)


def load_style_lora(pipe, style_lora: str | Path, weight: float) -> None:
    pipe.load_lora_weights(str(style_lora), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[weight])


def stack_lcm_lora(pipe, lcm_lora: str | Path, style_weight: float) -> None:
    """LCM-LoRA's combination recipe: the LCM adapter at weight 1 beside the loaded style adapter."""
    pipe.load_lora_weights(str(lcm_lora), adapter_name="lcm")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, style_weight])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="teacher-eps", help="a bundled teacher name or a pipeline folder")
    parser.add_argument("--samplers", nargs="*", default=["ddim-leading", "ddim-trailing", "dpm++2m-trailing"],
                        help="non-distilled samplers to score; none with --lora scores only the LoRA")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--reference_steps", type=int, default=50, help="DDIM steps of the teacher's reference row")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--samples_per_prompt", type=int, default=2)
    parser.add_argument("--lora", default=None, help="an LCM-LoRA to load; adds the 'lcm' sampler rows")
    parser.add_argument("--lora_guidance_scale", type=float, default=1.0)
    parser.add_argument("--lora_samplers", nargs="+", default=["lcm"],
                        help="samplers of the LoRA rows: lcm, tcd-g<gamma> (TCDScheduler, e.g. tcd-g0.3), ddim-trailing")
    parser.add_argument("--palette", default="base", choices=sorted(PALETTES),
                        help="the world to score against: the reference images, the real row and a style column")
    parser.add_argument("--vae", default=None, help="a VAE folder to use instead of the teacher's")
    parser.add_argument("--style_lora", default=None,
                        help="a style LoRA folder, active in every row; the 'lcm' rows stack it with --lora")
    parser.add_argument("--style_weight", type=float, default=1.0, help="the style adapter's weight")
    parser.add_argument("--judge", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.teacher, args.vae).to(args.device)
    scorer = Scorer(load_judge(args.judge), palette=args.palette)
    print(TABLE_HEADER if args.palette == "base" else STYLE_TABLE_HEADER)
    scores = [real_baseline(scorer, args.samples_per_prompt)]
    print(scores[0].row())
    if args.style_lora:
        load_style_lora(pipe, args.style_lora, args.style_weight)
    if args.reference_steps:
        scores += sweep(pipe, scorer, ["ddim-leading"], [args.reference_steps], args.guidance_scale, args.samples_per_prompt)
    scores += sweep(pipe, scorer, args.samplers, args.steps, args.guidance_scale, args.samples_per_prompt)
    if args.lora:
        if args.style_lora:
            stack_lcm_lora(pipe, args.lora, args.style_weight)
        else:
            pipe.load_lora_weights(args.lora)
        scores += sweep(pipe, scorer, args.lora_samplers, args.steps, args.lora_guidance_scale, args.samples_per_prompt,
                        scheduler_kwargs=lcm_scheduler_settings(args.lora))
    if args.json:
        args.json.write_text(json.dumps([s.to_dict() for s in scores], indent=2))


if __name__ == "__main__":
    main()
