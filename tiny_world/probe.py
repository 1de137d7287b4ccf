"""Where along the trajectory a model errs: its one-step output from noised real images, per timestep.

    python -m tiny_world.probe --teacher teacher-vpred --lora output/tiny-vpred       # the LoRA vs the teacher
    python -m tiny_world.probe --teacher teacher-vpred --solver_w 3 --num_ddim_timesteps 20

Real held-out images are encoded and diffused to z_t = alpha_t x0 + sigma_t eps. A model maps z_t to x0 in
one call, as a multi-step LCM sampler does at each of its steps: the consistency function
f(z_t, t) = c_skip z_t + c_out x0_hat (LCM Eq. 9) at guidance 1. The judge scores the decoded images, so
a row says how often one step from t keeps every attribute of the image it started from. `--solver_w`
adds what distillation converges to: the teacher's guided DDIM solver on the training grid, run from the
same z_t down to 0 (the consistency targets chain these solver steps).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lcm_lora.config import DistillArgs
from lcm_lora.export import lcm_scheduler_settings
from lcm_lora.schedule import alpha_sigma, boundary_scalings
from lcm_lora.solver import consistency_fn, ddim_step, guide, to_x0_eps
from .judge import to_tensor
from .quality import HELD_OUT_SEED, Score, Scorer, held_out_prompts, load_pipeline
from lcm_lora.world.scene import ATTRIBUTES, Scene, render

BATCH = 96


def unet_x0_eps(pipe, z: torch.Tensor, t: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) of the pipeline's UNet at one timestep, in batches."""
    tt = torch.full((len(z),), t)
    out = torch.cat([pipe.unet(z[i : i + BATCH], tt[i : i + BATCH], encoder_hidden_states=c[i : i + BATCH]).sample
                     for i in range(0, len(z), BATCH)])
    alpha, sigma = alpha_sigma(pipe.scheduler.alphas_cumprod, tt, z.ndim)
    return to_x0_eps(out, z, alpha, sigma, pipe.scheduler.config.prediction_type)


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def real_latents(pipe, scenes: list[Scene]) -> torch.Tensor:
    """x0: latents of real held-out renders of `scenes` (seeds disjoint from training)."""
    images = np.stack([render(s, HELD_OUT_SEED + 700_000 + i) for i, s in enumerate(scenes)])
    return pipe.vae.encode(to_tensor(images)).latent_dist.mean * pipe.vae.config.scaling_factor


def diffuse(pipe, x0: torch.Tensor, t: int, seed: int = 0) -> torch.Tensor:
    """z_t = alpha_t x0 + sigma_t eps, with noise seeded per t."""
    alpha, sigma = alpha_sigma(pipe.scheduler.alphas_cumprod, torch.full((len(x0),), t), x0.ndim)
    return alpha * x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t))


def one_step(pipe, z: torch.Tensor, t: int, c: torch.Tensor, timestep_scaling: float) -> torch.Tensor:
    """f(z_t, t): the consistency function at guidance 1, as LCMScheduler applies it."""
    x0, _ = unet_x0_eps(pipe, z, t, c)
    c_skip, c_out = boundary_scalings(torch.full((len(z),), t), timestep_scaling=timestep_scaling, ndim=z.ndim)
    return consistency_fn(z, x0, c_skip, c_out)


def solver_endpoint(pipe, z: torch.Tensor, t: int, c: torch.Tensor, c_uncond: torch.Tensor, w: float,
                    num_ddim_timesteps: int) -> torch.Tensor:
    """The teacher's guided DDIM solver (w in the LCM convention) from z_t down the grid tau to x0."""
    k = pipe.scheduler.config.num_train_timesteps // num_ddim_timesteps
    while True:
        x0_c, eps_c = unet_x0_eps(pipe, z, t, c)
        x0_u, eps_u = unet_x0_eps(pipe, z, t, c_uncond)
        x0, eps = guide(x0_c, x0_u, w), guide(eps_c, eps_u, w)
        if t - k < 0:
            return x0
        t -= k
        alpha, sigma = alpha_sigma(pipe.scheduler.alphas_cumprod, torch.full((len(z),), t), z.ndim)
        z = ddim_step(x0, eps, alpha, sigma)


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((images.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


@torch.no_grad()
def probe(pipe, scorer: Scorer, scenes: list[Scene], timesteps: list[int], name: str,
          timestep_scaling: float = DistillArgs.timestep_scaling_factor, solver: tuple[float, int] | None = None) -> list[Score]:
    """One score per t: the model's one step from z_t, or with `solver` = (w, N) the guided solver's endpoint."""
    c = encode_prompts(pipe, [s.caption for s in scenes])
    c_uncond = encode_prompts(pipe, [""] * len(scenes)) if solver else None
    x0_real = real_latents(pipe, scenes)  # rendered and encoded once, noised per t
    scores = []
    for t in timesteps:
        z = diffuse(pipe, x0_real, t)
        x0 = solver_endpoint(pipe, z, t, c, c_uncond, *solver) if solver else one_step(pipe, z, t, c, timestep_scaling)
        scores.append(scorer.score(decode(pipe, x0), scenes, name, t, 1.0))
    return scores


def row(score: Score) -> str:
    attributes = " | ".join(f"{v * 100:.1f}" for v in score.per_attribute.values())
    return f"| {score.sampler} | {score.steps} | {score.prompt_accuracy * 100:.1f} | {attributes} | {score.frechet_distance:.2f} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="teacher-vpred", help="a bundled teacher name or a pipeline folder")
    parser.add_argument("--lora", default=None, help="an LCM-LoRA folder; its rows follow the teacher's")
    parser.add_argument("--timesteps", nargs="+", type=int, default=[99, 249, 499, 749, 999])
    parser.add_argument("--solver_w", type=float, default=None, help="add the guided solver's endpoint at this w")
    parser.add_argument("--num_ddim_timesteps", type=int, default=20, help="the solver grid N for --solver_w")
    args = parser.parse_args(argv)

    pipe, scorer, scenes = load_pipeline(args.teacher), Scorer(), held_out_prompts(1)
    names = list(ATTRIBUTES)
    print(f"| model | t | prompt acc. % | {' | '.join(names)} | Fréchet distance |")
    print("|---|---:|---:|" + "---:|" * len(names) + "---:|")
    scores = probe(pipe, scorer, scenes, args.timesteps, "teacher")
    if args.solver_w is not None:
        scores += probe(pipe, scorer, scenes, args.timesteps,
                        f"teacher, guided DDIM w={args.solver_w:g} N={args.num_ddim_timesteps}",
                        solver=(args.solver_w, args.num_ddim_timesteps))
    if args.lora:
        pipe.load_lora_weights(args.lora)
        scaling = lcm_scheduler_settings(args.lora).get("timestep_scaling", DistillArgs.timestep_scaling_factor)
        scores += probe(pipe, scorer, scenes, args.timesteps, "LoRA", scaling)
    for score in scores:
        print(row(score))


if __name__ == "__main__":
    main()
