"""An objective judge of generated images: attribute accuracy and a Fréchet distance.

A small CNN is trained on the world's ground truth (rendered images and their attributes). Its
per-attribute predictions score whether an image follows its prompt; its 128-d penultimate
features are the fixed space in which Fréchet distances between image sets are measured, as
Inception features are for FID. Training augments with mild noise, blur and colour shift so that
decoder artefacts are not mistaken for errors, while blur strong enough to erase stripes is not.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lcm_lora.world.scene import ATTRIBUTES, Scene, sample

FEATURES = 128


class Judge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 64, 96, 128)  # 64 -> 32 -> 16 -> 8 -> 4
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        # Flatten the 4x4 map rather than pooling it: position is one of the attributes.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(v)) for name, v in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, 64, 64] in [-1, 1] -> [B, 128]."""
        return self.embed(self.conv(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


def to_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 [N, 64, 64, 3] -> float [N, 3, 64, 64] in [-1, 1]."""
    array = np.stack(images) if isinstance(images, list) else images
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_set(seeds: range | list[int], palette: str = "base") -> tuple[list[Scene], np.ndarray]:
    scenes, images = zip(*(sample(s, palette) for s in seeds))
    return list(scenes), np.stack(images)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.8  # blur in pixels: keeps 8-px stripes legible
    radius = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(radius**2)[None, :] / (2 * sigma.view(b, 1).clamp_min(1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, 5]
    x = _separable_blur(x, kernel)
    x = x + 0.1 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5)  # colour shift
    x = x + 0.08 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def _separable_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    k = kernel.repeat_interleave(c, 0)  # one 1-d kernel per (image, channel)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k.view(b * c, 1, 1, 5), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k.view(b * c, 1, 5, 1), groups=b * c)
    return y.view(b, c, h, w)


def train_judge(num_images: int, steps: int, batch_size: int, seed: int, device: str = "cpu") -> Judge:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    scenes, images = render_set(range(num_images))
    x_all = to_tensor(images)
    y_all = {n: torch.tensor([s.labels()[n] for s in scenes]) for n in ATTRIBUTES}
    judge = Judge().to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(num_images, (batch_size,), generator=gen)
        logits = judge(_augment(x_all[idx], gen).to(device))
        loss = sum(F.cross_entropy(logits[n], y_all[n][idx].to(device)) for n in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"judge step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return judge.eval().cpu()


@torch.no_grad()
def judge_images(judge: Judge, images: np.ndarray, batch_size: int = 256) -> tuple[dict, torch.Tensor]:
    """Predicted attribute indices per image and the feature vectors."""
    preds: dict[str, list[torch.Tensor]] = {n: [] for n in ATTRIBUTES}
    feats = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i : i + batch_size])
        h = judge.features(x)
        feats.append(h)
        for name, head in judge.heads.items():
            preds[name].append(head(h).argmax(1))
    return {n: torch.cat(p) for n, p in preds.items()}, torch.cat(feats).double()


def accuracy(preds: dict[str, torch.Tensor], scenes: list[Scene]) -> dict[str, float]:
    """Per-attribute accuracy, their mean, and prompt accuracy (every attribute right)."""
    correct = {n: preds[n] == torch.tensor([s.labels()[n] for s in scenes]) for n in ATTRIBUTES}
    out = {n: c.double().mean().item() for n, c in correct.items()}
    out["mean_attribute"] = float(np.mean([out[n] for n in ATTRIBUTES]))
    out["prompt"] = torch.stack(list(correct.values())).all(0).double().mean().item()
    return out


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), Heusel et al. 2017 (FID)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = torch.cov(feats_a.T), torch.cov(feats_b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return ((mu_a - mu_b).square().sum() + torch.trace(s_a + s_b - 2 * cross)).item()
