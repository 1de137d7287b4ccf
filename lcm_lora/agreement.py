"""Few-step agreement with the teacher: distillation should make the student's k-step sample from a noise and a
prompt match the teacher's many-step sample from the same noise and prompt (the consistency property, LCM paper
arXiv 2310.04378, eq. 5). The teacher defines the target, so this needs no other model.

Three samplers share each prompt's initial noise: the reference (the teacher, guided DDIM over many steps), the
plain teacher at k steps (the baseline a LoRA must beat), and the LCM-LoRA at k steps under its own scheduler. DDIM uses
trailing timesteps, whose first step starts at the last training timestep (Lin et al., arXiv 2305.08891, sec. 3.3),
so k-step DDIM is a fair baseline at 1 and 2 steps too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image, ImageDraw

from .metrics import latent_mse, psnr, ssim
from .safetensors_io import UnreadableFileError, read_safetensors, save_safetensors_atomic

METRICS = ("psnr", "ssim", "latent_mse")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "latent_mse": False}
SHEET_MIN_WIDTH = 128


def reference_guidance(w_min: float, w_max: float) -> float:
    """The diffusers guidance_scale whose samples a LoRA trained on w ~ U[w_min, w_max] reproduces: the LoRA has no
    w input, so it learns the guided teacher at the mean w (LCM-LoRA, arXiv 2311.05556, sec. 3), and the LCM
    paper's w is diffusers' guidance_scale - 1."""
    return 1.0 + (w_min + w_max) / 2


def ddim_trailing(pipe) -> DDIMScheduler:
    return DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")


@torch.no_grad()
def sample(pipe, scheduler, prompts: list[str], seeds: list[int], size: tuple[int, int], steps: int,
           guidance_scale: float, eta: float = 0.0) -> torch.Tensor:
    """The final latents (fp32, CPU) of `pipe` under `scheduler`, prompt i drawn from a CPU generator seeded with
    seeds[i]: its initial noise first, then any noise the scheduler adds (LCMScheduler between steps, TCDScheduler's
    at gamma `eta` > 0), as the pipeline draws them for that generator, so the sample is the one
    `pipe(..., generator=..., eta=...)` makes."""
    height, width = size
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn(shape, generator=g) for g in generators])
    pipe.scheduler = scheduler
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
               latents=noise.to(pipe.device, pipe.unet.dtype), generator=generators, output_type="latent",
               eta=eta)
    return out.images.float().cpu()


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] (fp32, CPU), decoded as the SD and SDXL pipelines decode: latents unscaled (and
    de-normalized when the VAE has latents_mean / latents_std), never rounded to 8 bits."""
    vae = pipe.vae
    latents = latents.to(pipe.device, vae.dtype)
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    images = torch.cat([vae.decode(z[None]).sample for z in latents])  # one at a time: bounded VAE memory
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


def scores(latents: torch.Tensor, images: torch.Tensor, ref_latents: torch.Tensor,
           ref_images: torch.Tensor) -> dict[str, list[float]]:
    """Each metric per prompt: PSNR (dB) and SSIM of the decoded images, MSE of the latents."""
    return {"psnr": psnr(images, ref_images).tolist(), "ssim": ssim(images, ref_images).tolist(),
            "latent_mse": latent_mse(latents, ref_latents).tolist()}


def mean_scores(per_prompt: dict[str, list[float]]) -> dict[str, float]:
    return {name: float(np.mean(values)) for name, values in per_prompt.items()}


@dataclass(frozen=True)
class ReferenceSpec:
    """What the teacher's samples depend on: a cache made for another spec is not reused."""
    teacher: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    height: int
    width: int
    guidance_scale: float
    reference_steps: int

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class TeacherSamples:
    """The teacher's latents for one ReferenceSpec: the reference, and DDIM at each k drawn so far, kept
    in one safetensors file, so a run (and a resumed run) draws each only once."""

    def __init__(self, path: str | Path, spec: ReferenceSpec) -> None:
        self.path, self.spec, self.latents, self.drawn = Path(path), spec, {}, []
        try:
            tensors, metadata = read_safetensors(self.path)
        except (FileNotFoundError, UnreadableFileError):  # none yet, or cut short: drawn again
            return
        if metadata.get("lcm_lora.reference_spec") == spec.key():
            self.latents = tensors

    def get(self, pipe, steps: int | None = None) -> torch.Tensor:
        """The reference latents (steps None) or the teacher's k-step DDIM latents, drawn with `pipe` (the teacher,
        no LoRA) when not kept yet."""
        name = "reference" if steps is None else f"ddim-{steps}"
        if name not in self.latents:
            s = self.spec
            self.latents[name] = sample(pipe, ddim_trailing(pipe), list(s.prompts), list(s.seeds), (s.height, s.width),
                                        steps or s.reference_steps, s.guidance_scale)
            self.drawn.append(name)
            save_safetensors_atomic(self.latents, self.path, {"lcm_lora.reference_spec": self.spec.key()})
        return self.latents[name]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def sheet(columns: dict[str, list[Image.Image]]) -> Image.Image:
    """One row per prompt, one labelled column per sampler (e.g. reference, teacher at k, LoRA at k). Images under
    128 pixels wide are enlarged (nearest neighbour) so that the labels fit."""
    w, h = next(iter(columns.values()))[0].size
    scale = max(1, -(-SHEET_MIN_WIDTH // w))
    columns = {label: [im.resize((w * scale, h * scale), Image.NEAREST) for im in images]
               for label, images in columns.items()}
    w, h = w * scale, h * scale
    label_h = 12
    rows = len(next(iter(columns.values())))
    out = Image.new("RGB", (len(columns) * w, label_h + rows * h), "white")
    draw = ImageDraw.Draw(out)
    for j, (label, images) in enumerate(columns.items()):
        draw.text((j * w + 2, 1), _fit(draw, label, w - 4), fill="black")
        for i, image in enumerate(images):
            out.paste(image, (j * w, label_h + i * h))
    return out


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    while text and draw.textlength(text) > width:
        text = text[:-1]
    return text
