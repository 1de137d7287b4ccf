"""Prediction-type adapter, guidance, the DDIM solver step and the consistency function."""

from __future__ import annotations

import torch

from .config import PREDICTION_TYPES


def to_x0_eps(model_output: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a UNet output y at z_t = alpha_t x0 + sigma_t eps, for every prediction type.

    epsilon: y = eps.  v_prediction: y = alpha_t eps - sigma_t x0 (Salimans & Ho 2022).  sample: y = x0.
    """
    y = model_output
    if prediction_type == "epsilon":
        return (z_t - sigma_t * y) / alpha_t, y
    if prediction_type == "v_prediction":
        return alpha_t * z_t - sigma_t * y, alpha_t * y + sigma_t * z_t
    if prediction_type == "sample":
        return y, (z_t - alpha_t * y) / sigma_t
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}.")


def guide(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in the LCM paper's form (Eq. 12): cond + w (cond - uncond).

    w = 0 is the conditional estimate; this equals diffusers' uncond + g (cond - uncond) with g = w + 1.
    """
    return cond + w * (cond - uncond)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor, sigma_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) to the earlier time t_n: z_{t_n} = alpha_{t_n} x0 + sigma_{t_n} eps."""
    return alpha_prev * x0 + sigma_prev * eps


def jump_or_stay(z_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, at_s: torch.Tensor, alpha_s: torch.Tensor,
                 sigma_s: torch.Tensor) -> torch.Tensor:
    """The trajectory consistency function f(z_t, t, s) = alpha_s x0_hat + sigma_s eps_hat, a DDIM jump from t to s
    (TCD, arXiv 2402.19159, its exponential-integrator form at first order; PCM, arXiv 2405.18407, with the DDIM
    solver). Where s = t (`at_s`, boolean per example) it is z_t exactly, the boundary condition f(z, t, t) = z."""
    return torch.where(at_s.reshape(-1, *[1] * (z_t.ndim - 1)), z_t, ddim_step(x0, eps, alpha_s, sigma_s))


def consistency_fn(z_t: torch.Tensor, x0: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
    """f(z_t, t) = c_skip(t) z_t + c_out(t) x0_hat (LCM Eq. 9)."""
    return c_skip * z_t + c_out * x0
