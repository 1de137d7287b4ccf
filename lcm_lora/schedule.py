"""The teacher's noise schedule and the skipping-step DDIM grid (pure functions of tensors).

Notation (LCM, arXiv 2310.04378): abar_t = alphas_cumprod[t], alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), z_t = alpha_t x0 + sigma_t eps.
"""

from __future__ import annotations

import torch


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dims in all, to broadcast over latents."""
    return x.reshape(x.shape[0], *[1] * (ndim - 1))


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) at integer timesteps t [B], shaped to broadcast over `ndim`-dim latents."""
    abar = alphas_cumprod[t]  # keep its dtype: v-prediction inverts exactly only if alpha^2 + sigma^2 = 1
    return append_dims(abar.sqrt(), ndim), append_dims((1 - abar).sqrt(), ndim)


def ddim_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """The solver grid tau_i = (i + 1) k - 1, i = 0..N-1, k = T / N (LCM Sec. 4.3, "skipping-step").

    Equals LCMScheduler's `lcm_origin_timesteps` for original_inference_steps = N, so training and
    inference sample the same timesteps.
    """
    T, N = num_train_timesteps, num_ddim_timesteps
    if not 0 < N <= T or T % N:
        raise ValueError(f"num_ddim_timesteps={N} must divide the teacher's num_train_timesteps={T} "
                         f"(e.g. 50 for 1000); pick a divisor.")
    k = T // N
    return torch.arange(1, N + 1) * k - 1


def sample_timestep_pair(tau: torch.Tensor, batch_size: int,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n): t_{n+k} = tau_i with i ~ U{0..N-1}, t_n = t_{n+k} - k clamped at 0."""
    k = int(tau[0]) + 1
    i = torch.randint(len(tau), (batch_size,), generator=generator, device=tau.device if generator is None else "cpu")
    t_n_plus_k = tau[i.to(tau.device)]
    return t_n_plus_k, (t_n_plus_k - k).clamp_min(0)


def phase_edge(t: torch.Tensor, num_train_timesteps: int, num_phases: int) -> torch.Tensor:
    """s, the lower edge of t's phase (PCM, arXiv 2405.18407): the T timesteps split into M phases
    [j T/M, (j+1) T/M), and each phase ends at s = j T/M - 1 (0 for the last phase, which ends at the data).

    These edges are trailing DDIM's M-step timesteps (T - 1, T - 1 - T/M, ..., T/M - 1), so a LoRA that jumps from
    any t to its phase edge is sampled with DDIMScheduler(timestep_spacing="trailing") in M steps.
    """
    width = num_train_timesteps // num_phases
    return (t // width * width - 1).clamp_min(0)


def tcd_end_timestep(t_n: torch.Tensor, k: int, zero_share: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """s, drawn uniformly per example from {0} and the grid points tau_j <= t_n (TCD, arXiv 2402.19159:
    the trajectory consistency function maps t to any s <= t_n). With probability `zero_share`, s = 0 (LCM's
    endpoint), which keeps the one-step jump in the training mix."""
    b = t_n.shape[0]
    options = (t_n + 1) // k + 1  # {0} and tau_0 .. tau_{m-1} = t_n: m + 1 end points
    e = (torch.rand(b, generator=generator) * options.cpu()).long().to(t_n.device)
    s = (e * k - 1).clamp_min(0)
    zero = torch.rand(b, generator=generator).to(t_n.device) < zero_share
    return torch.where(zero, torch.zeros_like(s), s)


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                      ndim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) of the consistency parameterisation (CM arXiv 2303.01469 Eq. 7; LCM Eq. 9).

    c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2), so that
    f(z, 0) = z (c_skip(0) = 1, c_out(0) = 0). Same as LCMScheduler.get_scalings_for_boundary_condition_discrete.
    """
    st = t.to(torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return append_dims(c_skip, ndim), append_dims(c_out, ndim)
