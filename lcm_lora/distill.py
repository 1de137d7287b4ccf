"""One latent consistency distillation step (LCM, arXiv 2310.04378, Algorithm 1; LoRA: arXiv 2311.05556).

The method picks where the student's jump ends: at the data through the consistency function (lcm), or at an
earlier time s through a DDIM jump of its own estimate, s random on the grid below t_n (tcd, arXiv 2402.19159) or
the edge of t's phase (pcm, arXiv 2405.18407). Student and target end at the same s and are compared there.

`student`, `teacher` and `target` are callables (z_t, t, c) -> UNet output. The trainer makes them
from one UNet: LoRA on with grad, LoRA off without grad, LoRA on without grad. c is the text context, or
for SDXL a dict with its pooled embedding and time ids (lcm_lora.conditioning); every call gets it. Returns
per-example losses; the trainer reduces, scales for accumulation and logs.
"""

from __future__ import annotations

from typing import Callable

import torch

from .conditioning import Cond, cat_cond
from .config import DistillArgs
from .losses import consistency_loss, sample_guidance_scale
from .schedule import alpha_sigma, boundary_scalings, phase_edge, sample_timestep_pair, tcd_end_timestep
from .solver import consistency_fn, ddim_step, guide, jump_or_stay, to_x0_eps

UNetFn = Callable[[torch.Tensor, torch.Tensor, Cond | torch.Tensor], torch.Tensor]


def lcd_loss(student: UNetFn, teacher: UNetFn, target: UNetFn, x0: torch.Tensor, c: Cond | torch.Tensor,
             c_uncond: Cond | torch.Tensor, alphas_cumprod: torch.Tensor, tau: torch.Tensor, d: DistillArgs,
             prediction_type: str) -> torch.Tensor:
    b = x0.shape[0]
    # 1. Sample t_{n+k} from the skipping grid tau, t_n = t_{n+k} - k, and the end time s of the jump (none for lcm).
    t_n_plus_k, t_n = sample_timestep_pair(tau, b)
    s = end_timestep(d, t_n_plus_k, t_n, len(alphas_cumprod), int(tau[0]) + 1)
    alpha_nk, sigma_nk = alpha_sigma(alphas_cumprod, t_n_plus_k, x0.ndim)
    alpha_n, sigma_n = alpha_sigma(alphas_cumprod, t_n, x0.ndim)
    # 2. Diffuse: z_{t_{n+k}} = alpha x0 + sigma eps.
    z = alpha_nk * x0 + sigma_nk * torch.randn_like(x0)
    # 3. Sample the guidance scale w ~ U[w_min, w_max] per example.
    w = sample_guidance_scale(b, d.w_min, d.w_max).to(x0).view(b, *[1] * (x0.ndim - 1))

    with torch.no_grad():
        # 4. Teacher (LoRA off): cond and uncond in one call of batch 2B, CFG on x0 and eps,
        #    then one DDIM step from t_{n+k} to t_n.
        out = teacher(torch.cat([z, z]), torch.cat([t_n_plus_k, t_n_plus_k]), cat_cond(c, c_uncond))
        x0_both, eps_both = to_x0_eps(out, torch.cat([z, z]), torch.cat([alpha_nk, alpha_nk]),
                                      torch.cat([sigma_nk, sigma_nk]), prediction_type)
        (x0_c, x0_u), (eps_c, eps_u) = x0_both.chunk(2), eps_both.chunk(2)
        z_prev = ddim_step(guide(x0_c, x0_u, w), guide(eps_c, eps_u, w), alpha_n, sigma_n)
        # 5. Target (LoRA on, no grad): f_theta(z_{t_n}, t_n[, s]), the student's own estimate one step later.
        out = target(z_prev, t_n, c)
        f_target = endpoint(z_prev, t_n, out, s, alphas_cumprod, d, prediction_type)

    # 6. Student (LoRA on, with grad): f_theta(z_{t_{n+k}}, t_{n+k}[, s]). Last, as in
    #    Algorithm 1 (solver, then loss), so that no activation kept for its backward is alive during the
    #    no-grad calls. Same loss and gradients bit for bit; benchmarks/bench_step.py on the tiny teacher
    #    measured a step at 1.22x the UNet calls alone with the student first, 1.10x in this order (docs/performance.md).
    f_student = endpoint(z, t_n_plus_k, student(z, t_n_plus_k, c), s, alphas_cumprod, d, prediction_type)

    # 7. Per-example distance d(f_student, f_target), at the data (lcm) or at s.
    return consistency_loss(f_student.float(), f_target.float(), d.loss_type, d.huber_c)


def end_timestep(d: DistillArgs, t_n_plus_k: torch.Tensor, t_n: torch.Tensor, num_train_timesteps: int,
                 k: int) -> torch.Tensor | None:
    """s for --method tcd and pcm; None for lcm, whose consistency function maps to the data."""
    if d.method == "tcd":
        return tcd_end_timestep(t_n, k, d.tcd_zero_share)
    if d.method == "pcm":
        return phase_edge(t_n_plus_k, num_train_timesteps, d.multiphase)
    return None


def endpoint(z: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor, s: torch.Tensor | None,
             alphas_cumprod: torch.Tensor, d: DistillArgs, prediction_type: str) -> torch.Tensor:
    """Where the LoRA'd UNet's output at (z, t) says the trajectory goes: f(z, t) = c_skip z + c_out x0_hat
    (LCM Eq. 9) when s is None, else the DDIM jump of (x0_hat, eps_hat) from t to s (z itself where s = t)."""
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t, z.ndim)
    x0_hat, eps_hat = to_x0_eps(model_output, z, alpha_t, sigma_t, prediction_type)
    if s is None:
        c_skip, c_out = boundary_scalings(t, d.sigma_data, d.timestep_scaling_factor, z.ndim)
        return consistency_fn(z, x0_hat, c_skip, c_out)
    return jump_or_stay(z, x0_hat, eps_hat, s == t, *alpha_sigma(alphas_cumprod, s, z.ndim))
