"""Build the bundled tiny world from scratch: tokenizer, judge, VAE and two trained teachers.

    python -m lcm_lora.world.build --out lcm_lora/world/assets          # everything, in order
    # or, on 2 cores, the two teachers in parallel after the shared stages:
    python -m lcm_lora.world.build --out DIR --stages judge vae
    OMP_NUM_THREADS=1 python -m lcm_lora.world.build --out DIR --stages teacher-eps &
    OMP_NUM_THREADS=1 python -m lcm_lora.world.build --out DIR --stages teacher-vpred

Every step is seeded; `build_info.json` records the command, versions and time of each phase.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from .architecture import make_scheduler, make_text_encoder, make_unet, make_vae
from .judge import render_set, to_tensor, train_judge
from .tokenizer import learn_clip_tokenizer

TEACHERS = {"teacher-eps": "epsilon", "teacher-vpred": "v_prediction"}


@dataclass
class Recipe:
    seed: int = 0
    judge_images: int = 20_000
    judge_steps: int = 1500
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_kl_weight: float = 1e-5
    train_images: int = 40_000  # seeds [0, train_images); held-out seeds start at 1_000_000
    teacher_steps: int = 4000
    teacher_batch: int = 32
    teacher_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    empty_caption_fraction: float = 0.1  # dropped captions teach the unconditional branch for CFG


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))

    return f


def train_vae(recipe: Recipe, images: np.ndarray, device: str) -> AutoencoderKL:
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    vae = make_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, recipe.vae_steps))
    x_all = to_tensor(images)
    start = time.time()
    for step in range(recipe.vae_steps):
        x = x_all[torch.randint(len(x_all), (recipe.vae_batch,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = loss + recipe.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            print(f"vae step {step}/{recipe.vae_steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return vae.eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled), and set the VAE's unit-variance scaling."""
    means, stds = [], []
    for i in range(0, len(images), 512):
        dist = vae.encode(to_tensor(images[i : i + 512]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    # Stable Diffusion scales latents to roughly unit variance (0.18215 for SD1/2): measure ours.
    total_var = mean.var() + std.square().mean()
    vae.register_to_config(scaling_factor=float(1.0 / total_var.sqrt()))
    return mean, std


def train_teacher(recipe: Recipe, prediction_type: str, tokenizer, captions: list[str], latents, device: str):
    mean, std = latents
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    text_encoder = make_text_encoder(tokenizer).to(device).train()
    unet = make_unet(prediction_type).to(device).train()
    noise_schedule = DDPMScheduler.from_config(make_scheduler(prediction_type).config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=recipe.teacher_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, recipe.teacher_steps))
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    scaling = 1.0  # latents are pre-scaled by the caller
    start = time.time()
    for step in range(recipe.teacher_steps):
        idx = torch.randint(len(mean), (recipe.teacher_batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        drop = torch.rand(recipe.teacher_batch, generator=gen) < recipe.empty_caption_fraction
        batch_ids = torch.where(drop[:, None], empty_ids, ids[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (recipe.teacher_batch,), generator=gen)
        x0, noise, t, batch_ids = x0.to(device), noise.to(device), t.to(device), batch_ids.to(device)
        z_t = noise_schedule.add_noise(x0, noise, t)
        target = noise if prediction_type == "epsilon" else noise_schedule.get_velocity(x0, noise, t)
        cond = text_encoder(batch_ids)[0]
        loss = F.mse_loss(unet(z_t, t, cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - recipe.ema_decay)
        if step % 200 == 0 or step == recipe.teacher_steps - 1:
            elapsed = time.time() - start
            print(f"{prediction_type} step {step}/{recipe.teacher_steps} loss {loss.item():.4f} ({elapsed:.0f}s)", flush=True)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return text_encoder.eval(), unet.eval()


def save_pipeline(path: Path, vae, text_encoder, tokenizer, unet, prediction_type: str) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(),
        text_encoder=text_encoder.cpu(),
        tokenizer=tokenizer,
        unet=unet.cpu(),
        scheduler=make_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)


def _stage_judge(out: Path, recipe: Recipe, device: str) -> None:
    judge = train_judge(recipe.judge_images, recipe.judge_steps, 128, recipe.seed, device)
    save_file(judge.state_dict(), str(out / "judge.safetensors"))


def _stage_vae(out: Path, recipe: Recipe, device: str) -> None:
    _, images = render_set(range(recipe.train_images))
    vae = train_vae(recipe, images, device)
    encode_latents(vae, images, device)  # sets the scaling factor
    vae.cpu().save_pretrained(out / "vae")


def _stage_teacher(out: Path, recipe: Recipe, device: str, name: str) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    vae = AutoencoderKL.from_pretrained(out / "vae").to(device)
    scenes, images = render_set(range(recipe.train_images))
    mean, std = encode_latents(vae, images, device)
    scale = vae.config.scaling_factor
    captions = [s.caption for s in scenes]
    text_encoder, unet = train_teacher(recipe, TEACHERS[name], tokenizer, captions, (mean * scale, std * scale), device)
    save_pipeline(out / name, vae, text_encoder, tokenizer, unet, TEACHERS[name])


STAGES = ["judge", "vae", *TEACHERS]


def build(out: Path, recipe: Recipe, device: str, stages: list[str]) -> dict:
    """Run `stages` in order; each reads what earlier stages wrote to `out`, so teachers can be
    trained in parallel processes once the tokenizer, judge and VAE exist."""
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "build_info.json"
    info: dict = json.loads(info_path.read_text()) if info_path.exists() else {"seconds": {}, "commands": []}
    info["commands"].append(" ".join(["python", "-m", "lcm_lora.world.build", *sys.argv[1:]]))
    info.update(
        recipe=asdict(recipe),
        device=device if device == "cpu" else torch.cuda.get_device_name(),
        cpu_threads=torch.get_num_threads(),
        versions={"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
    )
    if not (out / "tokenizer" / "vocab.json").exists():
        learn_clip_tokenizer(out / "tokenizer")
    for stage in stages:
        tick = time.time()
        if stage == "judge":
            _stage_judge(out, recipe, device)
        elif stage == "vae":
            _stage_vae(out, recipe, device)
        else:
            _stage_teacher(out, recipe, device, stage)
        # Re-read: a parallel process may have written its own stage's time meanwhile.
        info["seconds"] = {**(json.loads(info_path.read_text())["seconds"] if info_path.exists() else {}),
                           **info["seconds"], stage: round(time.time() - tick)}
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    for name, value in asdict(Recipe()).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(Recipe())})
    print(json.dumps(build(args.out, recipe, args.device, args.stages)["seconds"]))


if __name__ == "__main__":
    main()
