"""Build the bundled tiny world from scratch: tokenizer, judge, VAE and three trained teachers (SD1-like,
SD2-like and SDXL-like).

    python -m tiny_world.build --out lcm_lora/world/assets          # everything, in order; then
    mv lcm_lora/world/assets/judge.safetensors tiny_world/assets/    # the judge is the harness's, not the package's
    python -m tiny_world.build --out DIR --stages teacher-eps       # one stage; reads the earlier ones

Every step is seeded; `build_info.json` records the command, versions and time of each phase.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from lcm_lora.conditioning import Cond, fixed_time_ids, text_conditioning, unet_kwargs
from .architecture import make_scheduler, make_text_encoder, make_tiny_sdxl_pipeline, make_unet, make_vae
from .judge import render_set, to_tensor, train_judge
from lcm_lora.world.scene import SIZE
from .tokenizer import learn_clip_tokenizer

# v first: the epsilon teacher can be fine-tuned from it (Recipe.eps_finetune_steps).
TEACHERS = {"teacher-vpred": "v_prediction", "teacher-eps": "epsilon"}
SDXL_TEACHER = "teacher-sdxl"  # epsilon prediction, as SDXL base 1.0


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
    # The epsilon teacher starts from the trained v teacher (UNet and text encoder) and is fine-tuned
    # with the epsilon objective: the way SD 2's v models were resumed from an epsilon model, here in
    # the other direction. Measured at 50 DDIM steps, g=4: trained from scratch for 4000 steps the
    # tiny epsilon UNet put 60% of objects in the wrong quadrant (31% prompts right even with the
    # 1/abar_t weighting below); fine-tuned from v for 1500 steps it drew 94.3% right.
    # 0 trains the epsilon teacher from scratch for `teacher_steps`.
    eps_finetune_steps: int = 1500
    eps_finetune_warmup_steps: int = 50
    # Weight the epsilon loss by 1 / abar_t, which is exactly the v-prediction loss since
    # v - v_hat = (eps - eps_hat) / alpha_t. Off: fine-tuned from v the plain loss measured better
    # (94.3% vs 90.1% prompt accuracy at 50 steps; 76.6% vs 83.3% at 4 trailing steps).
    epsilon_v_weighting: bool = False
    # teacher-sdxl is trained from scratch with the SD teachers' lr, batch and warm-up. 3000 steps fit the stage's
    # half-hour budget on 2 shared cores: 20 steps at batch 32 measured 0.45 s a step on one thread (0.55 s beside
    # two test processes; two threads beside one took 11-20 s a step). The run took 1745 s (0.58 s a step) and drew
    # 86.2% prompts right at 50 DDIM steps, g=4, where the SD epsilon UNet from scratch drew 24.7%.
    sdxl_teacher_steps: int = 3000


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))

    return f


def optimizer_step(loss: torch.Tensor, opt, sched, clip: list[torch.Tensor] | None = None) -> None:
    """Backward, clip `clip`'s gradient norm to 1 when given, then step the optimizer and the LR schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()


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
        optimizer_step(loss, opt, sched)
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            print(f"vae step {step}/{recipe.vae_steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return vae.eval()


@torch.no_grad()
def posterior_moments(vae: AutoencoderKL, images: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), 512):
        dist = vae.encode(to_tensor(images[i : i + 512]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def encode_latents(vae: AutoencoderKL, images: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled), and set the VAE's unit-variance scaling."""
    mean, std = posterior_moments(vae, images, device)
    # Stable Diffusion scales latents to roughly unit variance (0.18215 for SD1/2): measure ours.
    total_var = mean.var() + std.square().mean()
    vae.register_to_config(scaling_factor=float(1.0 / total_var.sqrt()))
    return mean, std


def caption_ids(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every caption and of the empty caption, padded to the 77-token context."""
    def encode(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

    return encode(captions), encode([""])


def draw_batch(gen: torch.Generator, latents, batch_size: int, empty_caption_fraction: float,
               num_train_timesteps: int):
    """One batch's draws: latents from their posteriors, the captions' indices `idx` and which to `drop`
    (a fraction), noise, timesteps. Draws from `gen` in a fixed order, so a seeded run is reproducible."""
    mean, std = latents
    idx = torch.randint(len(mean), (batch_size,), generator=gen)
    x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
    drop = torch.rand(batch_size, generator=gen) < empty_caption_fraction
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=gen)
    return x0, idx, drop, noise, t


def training_batch(gen: torch.Generator, latents, ids: torch.Tensor, empty_ids: torch.Tensor, batch_size: int,
                   empty_caption_fraction: float, num_train_timesteps: int):
    """draw_batch with the captions' token ids, the dropped ones replaced by the empty caption's: SD's
    unconditional input."""
    x0, idx, drop, noise, t = draw_batch(gen, latents, batch_size, empty_caption_fraction, num_train_timesteps)
    return x0, torch.where(drop[:, None], empty_ids, ids[idx]), noise, t


def denoising_loss(unet, cond: torch.Tensor | Cond, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   noise_schedule: DDPMScheduler, prediction_type: str) -> torch.Tensor:
    """The ordinary diffusion loss per example: MSE to the noise (epsilon) or the velocity (v). `cond` is SD's
    text context or a conditioning dict (lcm_lora.conditioning; SDXL's adds the pooled text and time ids)."""
    z_t = noise_schedule.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else noise_schedule.get_velocity(x0, noise, t)
    c = cond if isinstance(cond, dict) else {"context": cond}
    return (unet(z_t, t, **unet_kwargs(c, z_t.dtype)).sample - target).square().flatten(1).mean(1)


def fit(params: list[torch.Tensor], batch_loss, recipe: Recipe, steps: int, warmup: int, ema_warmup: bool,
        label: str) -> None:
    """Minimise `batch_loss()` (a fresh batch's loss per call) over `params` with AdamW (linear warm-up, cosine
    decay, gradient norm clipped to 1), then load an EMA of `params` into them. `ema_warmup` reaches
    recipe.ema_decay through diffusers' EMAModel warm-up, (1+n)/(10+n)."""
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=recipe.teacher_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps))
    start = time.time()
    for step in range(steps):
        loss = batch_loss()
        optimizer_step(loss, opt, sched, clip=params)
        with torch.no_grad():
            decay = min(recipe.ema_decay, (1 + step) / (10 + step)) if ema_warmup else recipe.ema_decay
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 200 == 0 or step == steps - 1:
            print(f"{label} step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)


def train_teacher(recipe: Recipe, prediction_type: str, tokenizer, captions: list[str], latents, device: str,
                  init: Path | None = None):
    """Train UNet and text encoder jointly; `init` is a pipeline folder to start from. `latents` are
    the posterior mean and std of every training image, pre-scaled by the VAE's scaling factor."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    text_encoder = make_text_encoder(tokenizer)
    unet = make_unet(prediction_type)
    steps, warmup = recipe.teacher_steps, recipe.warmup_steps
    if init is not None:
        text_encoder.load_state_dict(load_file(str(init / "text_encoder" / "model.safetensors")))
        unet.load_state_dict(load_file(str(init / "unet" / "diffusion_pytorch_model.safetensors")))
        steps, warmup = recipe.eps_finetune_steps, recipe.eps_finetune_warmup_steps
    text_encoder, unet = text_encoder.to(device).train(), unet.to(device).train()
    noise_schedule = DDPMScheduler.from_config(make_scheduler(prediction_type).config)
    ids, empty_ids = caption_ids(tokenizer, captions)

    def batch_loss() -> torch.Tensor:
        batch = training_batch(gen, latents, ids, empty_ids, recipe.teacher_batch, recipe.empty_caption_fraction,
                               noise_schedule.config.num_train_timesteps)
        x0, batch_ids, noise, t = (part.to(device) for part in batch)
        per_example = denoising_loss(unet, text_encoder(batch_ids)[0], x0, noise, t, noise_schedule, prediction_type)
        if prediction_type == "epsilon" and recipe.epsilon_v_weighting:
            per_example = per_example / noise_schedule.alphas_cumprod.to(device)[t]
        return per_example.mean()

    # A fine-tune warms its EMA up: a plain 0.999 EMA still holds 37% of the v weights after 1000 steps, and
    # measured, that blend drew 23% prompts right.
    fit(list(unet.parameters()) + list(text_encoder.parameters()), batch_loss, recipe, steps, warmup,
        ema_warmup=init is not None, label=prediction_type)
    return text_encoder.eval(), unet.eval()


def sdxl_conditioning(text_encoders: tuple, input_ids: tuple[torch.Tensor, ...], drop: torch.Tensor) -> Cond:
    """The conditioning the distillation trainer gives an SDXL UNet (lcm_lora.trainer.encode_batch), with
    gradients through the encoders: zero context and pooled text for the dropped captions, because the saved
    pipeline's unconditional input at inference is zeros (force_zeros_for_empty_prompt, as SDXL base 1.0), and
    the inference default time ids, since the world's images are SIZE x SIZE and never cropped."""
    c = text_conditioning(text_encoders, input_ids)
    keep = (~drop).to(c["context"].dtype)
    return {"context": c["context"] * keep[:, None, None], "pooled": c["pooled"] * keep[:, None],
            "time_ids": fixed_time_ids(SIZE, len(drop)).to(drop.device)}


def train_sdxl_teacher(recipe: Recipe, pipe, captions: list[str], latents, device: str) -> None:
    """Train `pipe`'s (make_tiny_sdxl_pipeline's) two text encoders and UNet jointly, in place, with the epsilon
    loss. `latents` are the posterior mean and std of every training image, pre-scaled by pipe.vae's factor.
    Its EMA warms up: over a run shorter than the SD teachers', a plain 0.999 EMA would keep 0.999^steps of the
    random initialisation (5% after 3000 steps)."""
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    text_encoders = (pipe.text_encoder.to(device).train(), pipe.text_encoder_2.to(device).train())
    unet = pipe.unet.to(device).train()
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = tuple(caption_ids(tokenizer, captions)[0] for tokenizer in (pipe.tokenizer, pipe.tokenizer_2))

    def batch_loss() -> torch.Tensor:
        x0, idx, drop, noise, t = draw_batch(gen, latents, recipe.teacher_batch, recipe.empty_caption_fraction,
                                             noise_schedule.config.num_train_timesteps)
        c = sdxl_conditioning(text_encoders, tuple(i[idx].to(device) for i in ids), drop.to(device))
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        return denoising_loss(unet, c, x0, noise, t, noise_schedule, "epsilon").mean()

    params = [p for module in (*text_encoders, unet) for p in module.parameters()]
    fit(params, batch_loss, recipe, recipe.sdxl_teacher_steps, recipe.warmup_steps, ema_warmup=True, label="sdxl")
    for module in (*text_encoders, unet):
        module.eval()


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
    init = None
    if name == "teacher-eps" and recipe.eps_finetune_steps:
        init = out / "teacher-vpred"
        if not (init / "unet").exists():
            raise SystemExit(f"--eps_finetune_steps needs {init}: build the teacher-vpred stage first.")
    text_encoder, unet = train_teacher(recipe, TEACHERS[name], tokenizer, captions, (mean * scale, std * scale),
                                       device, init)
    save_pipeline(out / name, vae, text_encoder, tokenizer, unet, TEACHERS[name])
    _keep_clip_vocab(out, name, ("tokenizer",))


def _keep_clip_vocab(out: Path, name: str, tokenizer_folders: tuple[str, ...]) -> None:
    """transformers 5 saves only tokenizer.json; keep CLIP's vocab.json + merges.txt for every reader."""
    for folder in tokenizer_folders:
        for file_name in ("vocab.json", "merges.txt"):
            shutil.copy(out / "tokenizer" / file_name, out / name / folder / file_name)


def _stage_sdxl_teacher(out: Path, recipe: Recipe, device: str) -> None:
    torch.manual_seed(recipe.seed)  # the text encoders' and UNet's initial weights
    # Both tokenizers are the world's BPE (tokenizer_2 pads with "!"); the VAE is the world's, rescaled to SDXL's
    # scaling factor 0.13025.
    pipe = make_tiny_sdxl_pipeline(out / "tokenizer", AutoencoderKL.from_pretrained(out / "vae"))
    scenes, images = render_set(range(recipe.train_images))
    mean, std = posterior_moments(pipe.vae.to(device), images, device)
    scale = pipe.vae.config.scaling_factor
    train_sdxl_teacher(recipe, pipe, [s.caption for s in scenes], (mean * scale, std * scale), device)
    pipe.to("cpu").save_pretrained(out / SDXL_TEACHER, safe_serialization=True)
    _keep_clip_vocab(out, SDXL_TEACHER, ("tokenizer", "tokenizer_2"))


STAGES = ["judge", "vae", *TEACHERS, SDXL_TEACHER]


def build(out: Path, recipe: Recipe, device: str, stages: list[str]) -> dict:
    """Run `stages` in order; each reads what earlier stages wrote to `out`, so teachers can be
    trained in parallel processes once the tokenizer, judge and VAE exist."""
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "build_info.json"
    info: dict = json.loads(info_path.read_text()) if info_path.exists() else {"seconds": {}, "commands": []}
    info["commands"].append(" ".join(["python", "-m", "tiny_world.build", *sys.argv[1:]]))
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
        elif stage == SDXL_TEACHER:
            _stage_sdxl_teacher(out, recipe, device)
        else:
            _stage_teacher(out, recipe, device, stage)
        # Re-read: a parallel process may have written its own stage and command meanwhile.
        disk = json.loads(info_path.read_text()) if info_path.exists() else {"seconds": {}, "commands": []}
        info["seconds"] = {**disk["seconds"], **info["seconds"], stage: round(time.time() - tick)}
        info["commands"] = list(dict.fromkeys(disk["commands"] + info["commands"]))
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    for name, value in asdict(Recipe()).items():
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", type=kind, default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(Recipe())})
    print(json.dumps(build(args.out, recipe, args.device, args.stages)["seconds"]))


if __name__ == "__main__":
    main()
