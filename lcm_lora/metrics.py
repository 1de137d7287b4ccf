"""Agreement of a few-step sample with the teacher's many-step sample from the same noise and prompt: pure functions
of image or latent tensors, no model and no download.

Images are float tensors [B, C, H, W] with values in [0, 1]; each function returns one value per image, [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample, over every other dimension."""
    return (x.float() - y.float()).pow(2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE); +inf for identical images."""
    return 10 * torch.log10(data_range**2 / latent_mse(x, y))


def _gaussian_window(size: int, sigma: float, channels: int, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang, Bovik, Sheikh and Simoncelli 2004, eq. 13) with their 11x11 Gaussian window of
    sigma 1.5 and constants K1 = 0.01, K2 = 0.03, averaged over the valid positions and channels. A window larger
    than the image shrinks to the image's smaller side (odd)."""
    x, y = x.double(), y.double()
    channels, side = x.shape[1], min(x.shape[-2:])
    size = min(window, side if side % 2 else side - 1)
    w = _gaussian_window(size, sigma, channels, x.dtype).to(x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=channels)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()
