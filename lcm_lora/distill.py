"""One latent consistency distillation step (LCM, arXiv 2310.04378, Algorithm 1; LoRA: arXiv 2311.05556).

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
from .schedule import alpha_sigma, boundary_scalings, sample_timestep_pair
from .solver import consistency_fn, ddim_step, guide, to_x0_eps

UNetFn = Callable[[torch.Tensor, torch.Tensor, Cond | torch.Tensor], torch.Tensor]


def lcd_loss(student: UNetFn, teacher: UNetFn, target: UNetFn, x0: torch.Tensor, c: Cond | torch.Tensor,
             c_uncond: Cond | torch.Tensor, alphas_cumprod: torch.Tensor, tau: torch.Tensor, d: DistillArgs,
             prediction_type: str) -> torch.Tensor:
    b = x0.shape[0]
    # 1. Sample t_{n+k} from the skipping grid tau, and t_n = t_{n+k} - k.
    t_n_plus_k, t_n = sample_timestep_pair(tau, b)
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
        # 5. Target (LoRA on, no grad): f_theta(z_{t_n}, t_n), the student's own estimate one step later.
        c_skip_n, c_out_n = boundary_scalings(t_n, d.sigma_data, d.timestep_scaling_factor, x0.ndim)
        x0_target, _ = to_x0_eps(target(z_prev, t_n, c), z_prev, alpha_n, sigma_n, prediction_type)
        f_target = consistency_fn(z_prev, x0_target, c_skip_n, c_out_n)

    # 6. Student (LoRA on, with grad): f_theta(z_{t_{n+k}}, t_{n+k}) = c_skip z + c_out x0_hat. Last, as in
    #    Algorithm 1 (solver, then loss), so that no activation kept for its backward is alive during the
    #    no-grad calls. Same loss and gradients bit for bit; benchmarks/bench_step.py on the tiny teacher
    #    measured a step at 1.22x the UNet calls alone with the student first, 1.10x in this order (docs/performance.md).
    c_skip, c_out = boundary_scalings(t_n_plus_k, d.sigma_data, d.timestep_scaling_factor, x0.ndim)
    x0_student, _ = to_x0_eps(student(z, t_n_plus_k, c), z, alpha_nk, sigma_nk, prediction_type)
    f_student = consistency_fn(z, x0_student, c_skip, c_out)

    # 7. Per-example distance d(f_student, f_target).
    return consistency_loss(f_student.float(), f_target.float(), d.loss_type, d.huber_c)
