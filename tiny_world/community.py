"""A "community fine-tune" of the tiny world and a style LoRA: the test bed for LCM-LoRA's claim that
a LoRA distilled from a base model also speeds up fine-tunes of that model.

    python -m tiny_world.community --out output/community              # everything, seeded
    python -m tiny_world.community --out output/community --steps 200  # shorter UNet and LoRA runs

The community's world is the base world in the "dusk" palette (scene.PALETTES): the same scenes and
captions on rose-tinted backgrounds. It writes, next to `community_info.json` (recipe and seconds):

    teacher-eps-dusk/  teacher-eps with its UNet fine-tuned on dusk images (ordinary epsilon loss) and
                       the extended VAE below; text encoder, tokenizer and scheduler are teacher-eps's
    style-dusk/        a rank-8 LoRA on teacher-eps's UNet trained the same way: the style adapter for
                       stacking with an LCM-LoRA (`pipeline.load_lora_weights(dir, adapter_name=...)`);
                       decode with teacher-eps-dusk/vae (quality.py --vae)

Why the VAE is extended: the bundled VAE only ever saw the base palette, and its encoder maps every
background tint to the base greys (measured: dusk backgrounds reconstruct to within 1 level of the
base colours, style score 0%; even latents optimised through the decoder reach only 37%). No UNet can
then draw dusk, so the checkpoint ships the bundled VAE fine-tuned on base and dusk images, with the
base images' latents held where they were (`vae_anchor_weight`), so teacher-eps and the base
LCM-LoRA keep (nearly) their latent space and the look is carried by the UNet, as in Stable Diffusion,
whose VAE represents any style. Measured: the community UNet decodes 0% dusk through the bundled VAE,
91% through the extended one; teacher-eps decodes 14% dusk through it (50 DDIM steps, guidance 4) and
loses 1.5 to 2.6 points of prompt accuracy in the base world (few-step rows; world README).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lcm_lora.world import assets
from .build import _lr_lambda, caption_ids, denoising_loss, optimizer_step, posterior_moments, training_batch
from .judge import render_set, to_tensor
from .quality import HELD_OUT_SEED
from lcm_lora.world.scene import style_score

STYLE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2")


@dataclass
class CommunityRecipe:
    seed: int = 0
    teacher: str = "teacher-eps"
    palette: str = "dusk"
    train_images: int = 8000  # seeds [0, train_images), inside the base world's training range
    # Measured (4000 images): at lr 3e-4 the VAE still hedged after 400 steps (reconstructions 17% dusk
    # for base images, 50% for dusk ones); at 1e-3 the tint is learnt between steps 300 and 400 of 800.
    vae_steps: int = 800
    vae_batch: int = 32  # half base, half dusk images of the same scenes
    vae_lr: float = 1e-3
    vae_anchor_weight: float = 1.0  # MSE between new and old posterior means of base images
    steps: int = 400  # of the UNet fine-tune, and of the style LoRA
    batch: int = 32
    lr: float = 2e-4  # full fine-tune; low enough to keep prompt following
    warmup_steps: int = 20
    ema_decay: float = 0.999  # reached through diffusers' (1+n)/(10+n) warm-up, as build.py's fine-tune
    empty_caption_fraction: float = 0.1  # keeps the unconditional branch trained for guidance
    lora_rank: int = 8
    lora_lr: float = 1e-3
    check_images: int = 200  # held-out images whose reconstructions check the extended VAE


def extend_vae(vae: AutoencoderKL, base: np.ndarray, shifted: np.ndarray, recipe: CommunityRecipe,
               device: str) -> AutoencoderKL:
    """Fine-tune encoder and decoder on paired base and shifted images (the loss of build.train_vae),
    pinning the base images' posterior means to the original encoder's."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 3)
    anchors = posterior_moments(vae.to(device), base, device)[0]
    vae = copy.deepcopy(vae).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, recipe.vae_steps))
    x_base, x_shifted = to_tensor(base), to_tensor(shifted)
    half = recipe.vae_batch // 2
    start = time.time()
    for step in range(recipe.vae_steps):
        idx = torch.randint(len(base), (half,), generator=gen)
        x = torch.cat([x_base[idx], x_shifted[idx]]).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-5 * posterior.kl().mean()
        loss = loss + recipe.vae_anchor_weight * F.mse_loss(posterior.mean[:half], anchors[idx].to(device))
        optimizer_step(loss, opt, sched)
        _log("vae", step, recipe.vae_steps, loss, start)
    return vae.eval()


def fine_tune(unet, teacher: StableDiffusionPipeline, latents, captions: list[str], recipe: CommunityRecipe,
              lr: float, device: str, label: str):
    """The ordinary epsilon diffusion loss on `latents` (scaled posterior mean and std) for the UNet's
    trainable parameters (all of them, or a LoRA's), with the teacher's frozen text encoder and its
    noise schedule. Ends on the EMA of the trained parameters."""
    gen = torch.Generator().manual_seed(recipe.seed + 4)
    noise_schedule = DDPMScheduler.from_config(teacher.scheduler.config)
    text_encoder = teacher.text_encoder
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, recipe.steps))
    ids, empty_ids = caption_ids(teacher.tokenizer, captions)
    unet.to(device).train()
    text_encoder.to(device).eval().requires_grad_(False)
    start = time.time()
    for step in range(recipe.steps):
        batch = training_batch(gen, latents, ids, empty_ids, recipe.batch, recipe.empty_caption_fraction,
                               noise_schedule.config.num_train_timesteps)
        x0, batch_ids, noise, t = (part.to(device) for part in batch)
        with torch.no_grad():
            cond = text_encoder(batch_ids)[0]
        loss = denoising_loss(unet, cond, x0, noise, t, noise_schedule, "epsilon").mean()
        optimizer_step(loss, opt, sched, clip=params)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(recipe.ema_decay, (1 + step) / (10 + step)))
        _log(label, step, recipe.steps, loss, start)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval()


@torch.no_grad()
def reconstruction_style(vae: AutoencoderKL, palette: str, device: str, num_images: int) -> dict[str, float]:
    """Style score of the VAE's reconstructions of held-out base and shifted images: 0 and 1 when the
    VAE can carry the palette (the bundled VAE scores 0 and 0)."""
    seeds = range(HELD_OUT_SEED, HELD_OUT_SEED + num_images)
    scores = {}
    for name in ("base", palette):
        images = render_set(seeds, name)[1]
        recon = vae.decode(vae.encode(to_tensor(images).to(device)).latent_dist.mean).sample.clamp(-1, 1).cpu()
        recon = ((recon + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
        scores[name] = style_score(recon, palette)
    return scores


def _log(label: str, step: int, steps: int, loss: torch.Tensor, start: float) -> None:
    if step % 50 == 0 or step == steps - 1:
        print(f"{label} step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)


def _teacher_dir(recipe: CommunityRecipe) -> Path:
    return assets.resolve(recipe.teacher)


def load_teacher(recipe: CommunityRecipe) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(_teacher_dir(recipe)), safety_checker=None)


def shifted_latents(vae: AutoencoderKL, images: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std, scaled by the VAE's (unchanged) scaling factor, as build.py trains on."""
    mean, std = posterior_moments(vae, images, device)
    scale = vae.config.scaling_factor
    return mean * scale, std * scale


def add_style_lora(unet, recipe: CommunityRecipe):
    """A PEFT LoRA on attention, projections and resnet convs; alpha = rank, so its scale is 1 in any
    loader whether or not it reads alpha. Gaussian A, zero B: training starts exactly at the teacher."""
    torch.manual_seed(recipe.seed)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_rank, init_lora_weights="gaussian",
                                target_modules=list(STYLE_LORA_TARGETS)))
    return unet


def save_checkpoint(path: Path, recipe: CommunityRecipe, unet, vae: AutoencoderKL) -> None:
    """teacher-eps's folder, byte for byte, with the UNet and VAE replaced (safetensors)."""
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(_teacher_dir(recipe), path)
    unet.cpu().save_pretrained(path / "unet", safe_serialization=True)
    vae.cpu().save_pretrained(path / "vae", safe_serialization=True)


def save_style_lora(path: Path, unet) -> None:
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)


def build(out: Path, recipe: CommunityRecipe, device: str = "cpu") -> dict:
    """The extended VAE, the community checkpoint and the style LoRA; returns the seconds of each."""
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    tick = time.time()
    seeds = range(recipe.train_images)
    scenes, base = render_set(seeds)
    shifted = render_set(seeds, recipe.palette)[1]
    captions = [s.caption for s in scenes]
    teacher = load_teacher(recipe)
    seconds["render"] = round(time.time() - tick)

    tick = time.time()
    vae = extend_vae(teacher.vae, base, shifted, recipe, device)
    latents = shifted_latents(vae, shifted, device)
    seconds["vae"] = round(time.time() - tick)
    vae_style = reconstruction_style(vae, recipe.palette, device, recipe.check_images)
    print(f"extended VAE, style score of reconstructions: {vae_style}", flush=True)

    tick = time.time()
    unet = fine_tune(copy.deepcopy(teacher.unet), teacher, latents, captions, recipe, recipe.lr, device, "unet")
    save_checkpoint(out / f"{recipe.teacher}-{recipe.palette}", recipe, unet, vae)
    seconds["unet"] = round(time.time() - tick)

    tick = time.time()
    lora_unet = add_style_lora(teacher.unet, recipe)
    fine_tune(lora_unet, teacher, latents, captions, recipe, recipe.lora_lr, device, "style lora")
    save_style_lora(out / f"style-{recipe.palette}", lora_unet)
    seconds["style_lora"] = round(time.time() - tick)

    info = {"recipe": asdict(recipe), "seconds": seconds, "vae_reconstruction_style": vae_style, "device": device,
            "cpu_threads": torch.get_num_threads()}
    (out / "community_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    for name, value in asdict(CommunityRecipe()).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = CommunityRecipe(**{k: getattr(args, k) for k in asdict(CommunityRecipe())})
    print(json.dumps(build(args.out, recipe, args.device)["seconds"]))


if __name__ == "__main__":
    main()
