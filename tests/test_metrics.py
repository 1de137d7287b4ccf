"""The agreement metrics (lcm_lora.metrics): PSNR, SSIM and latent MSE, in milliseconds and without any model."""

import math

import pytest
import torch

from lcm_lora.metrics import latent_mse, psnr, ssim


def _pair(seed: int = 0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, 32, 48, generator=g, dtype=torch.float64)
    return a, (a + noise * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)


def test_ssim_equals_scikit_image_on_the_same_images():
    """Reference values from scikit-image 0.26, `structural_similarity(a[i], b[i], channel_axis=0,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)`, Wang et al.'s setting, on these
    seeded images (measured once; scikit-image is not a dependency)."""
    a, b = _pair()
    torch.testing.assert_close(ssim(a, b), torch.tensor([0.946370226708832, 0.9444497401542943]), atol=1e-6, rtol=0)


def test_ssim_equals_scikit_image_live_where_it_is_installed():
    skimage = pytest.importorskip("skimage.metrics")
    a, b = _pair()
    live = [skimage.structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False, data_range=1.0) for i in range(2)]
    torch.testing.assert_close(ssim(a, b), torch.tensor(live, dtype=torch.float32), atol=1e-6, rtol=0)


def test_ssim_is_one_for_equal_images_symmetric_and_falls_with_noise():
    a, b = _pair()
    torch.testing.assert_close(ssim(a, a), torch.ones(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(ssim(a, b), ssim(b, a), atol=1e-7, rtol=0)
    scores = [ssim(*_pair(noise=n)).mean().item() for n in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]
    tiny = torch.rand(1, 3, 8, 8)  # smaller than the 11x11 window: the window shrinks to 7x7
    assert ssim(tiny, tiny).item() == pytest.approx(1.0, abs=1e-6)


def test_psnr_and_latent_mse_follow_their_definitions():
    a = torch.zeros(2, 4, 8, 8)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1, :, :4] += 0.5  # half the values off by 0.5: MSE 0.125
    torch.testing.assert_close(latent_mse(a, b), torch.tensor([0.01, 0.125]))
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 10 * math.log10(1 / 0.125)]))
    assert psnr(a, a).isinf().all()
    assert psnr(a * 255, b * 255, data_range=255.0).allclose(psnr(a, b))
