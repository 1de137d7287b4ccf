"""The consistency math against closed forms and diffusers' LCMScheduler: milliseconds, no model."""

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler

from lcm_lora.config import DistillArgs
from lcm_lora.distill import lcd_loss
from lcm_lora.losses import consistency_loss, l2, pseudo_huber, pseudo_huber_per_sample, sample_guidance_scale
from lcm_lora.schedule import alpha_sigma, boundary_scalings, ddim_timesteps, sample_timestep_pair
from lcm_lora.solver import consistency_fn, ddim_step, guide, to_x0_eps

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def abar() -> torch.Tensor:
    return DDPMScheduler(**SD).alphas_cumprod.double()


def test_grid_equals_lcm_scheduler_and_its_four_step_timesteps():
    tau = ddim_timesteps(1000, 50)
    assert torch.equal(tau, torch.arange(1, 51) * 20 - 1)
    scheduler = LCMScheduler(**SD, original_inference_steps=50)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
    assert set(scheduler.timesteps.tolist()) <= set(tau.tolist())
    for steps in (1, 2, 8):
        scheduler.set_timesteps(steps)
        assert set(scheduler.timesteps.tolist()) <= set(tau.tolist())


@pytest.mark.parametrize("n", [0, 3, 2000])
def test_grid_rejects_sizes_that_do_not_divide(n):
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        ddim_timesteps(1000, n)


def test_timestep_pairs_are_one_skip_apart_and_clamped():
    tau = ddim_timesteps(1000, 50)
    t_nk, t_n = sample_timestep_pair(tau, 4096, torch.Generator().manual_seed(0))
    assert set(t_nk.tolist()) == set(tau.tolist())  # every grid point is drawn
    assert torch.equal(t_n, (t_nk - 20).clamp_min(0)) and t_n.min() == 0


def test_boundary_scalings_equal_lcm_scheduler():
    scheduler = LCMScheduler(**SD)
    t = torch.arange(0, 1000)
    c_skip, c_out = boundary_scalings(t, sigma_data=0.5, timestep_scaling=10.0)
    ref_skip, ref_out = zip(*(scheduler.get_scalings_for_boundary_condition_discrete(int(i)) for i in t))
    torch.testing.assert_close(c_skip, torch.tensor(ref_skip, dtype=torch.float32))
    torch.testing.assert_close(c_out, torch.tensor(ref_out, dtype=torch.float32))
    assert c_skip[0] == 1 and c_out[0] == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_adapter_recovers_x0_and_eps_exactly(prediction_type):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64), torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.randint(1, 1000, (8,), generator=gen)
    alpha, sigma = alpha_sigma(abar(), t, 4)
    alpha, sigma = alpha.double(), sigma.double()
    z = alpha * x0 + sigma * eps
    output = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
    x0_hat, eps_hat = to_x0_eps(output, z, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(eps_hat, eps, atol=1e-9, rtol=1e-9)


def test_v_prediction_matches_diffusers_velocity():
    scheduler = DDPMScheduler(**SD, prediction_type="v_prediction")
    x0, eps, t = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2), torch.tensor([10, 250, 600, 999])
    v = scheduler.get_velocity(x0, eps, t)
    alpha, sigma = alpha_sigma(scheduler.alphas_cumprod, t, 4)
    x0_hat, eps_hat = to_x0_eps(v, scheduler.add_noise(x0, eps, t), alpha, sigma, "v_prediction")
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="'flow'"):
        to_x0_eps(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), "flow")


def test_ddim_step_with_true_estimates_lands_on_the_true_trajectory():
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 4, 2, 2, generator=gen, dtype=torch.float64), torch.randn(6, 4, 2, 2, generator=gen, dtype=torch.float64)
    t_nk, t_n = sample_timestep_pair(ddim_timesteps(), 6, gen)
    a_nk, s_nk = (x.double() for x in alpha_sigma(abar(), t_nk, 4))
    a_n, s_n = (x.double() for x in alpha_sigma(abar(), t_n, 4))
    z_nk = a_nk * x0 + s_nk * eps
    x0_hat, eps_hat = to_x0_eps(eps, z_nk, a_nk, s_nk, "epsilon")
    torch.testing.assert_close(ddim_step(x0_hat, eps_hat, a_n, s_n), a_n * x0 + s_n * eps, atol=1e-10, rtol=0)


def test_guidance_convention_is_diffusers_scale_minus_one():
    cond, uncond, w = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([[0.0], [2.5], [7.0]])
    assert torch.equal(guide(cond, uncond, torch.zeros(3, 1)), cond)
    g = w + 1  # diffusers/Imagen guidance_scale
    torch.testing.assert_close(guide(cond, uncond, w), uncond + g * (cond - uncond))


def test_consistency_fn_is_identity_at_t_zero():
    z, x0 = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    c_skip, c_out = boundary_scalings(torch.tensor([0, 0]), ndim=4)
    assert torch.equal(consistency_fn(z, x0, c_skip, c_out), z)


def test_pseudo_huber_limits_and_shape():
    pred, target = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(5, 4, 3, 3, dtype=torch.float64)
    assert pseudo_huber(pred, target, 1e-3).shape == (5,) and l2(pred, target).shape == (5,)
    c = 1e4  # large c: sqrt(d^2 + c^2) - c ~ d^2 / 2c
    torch.testing.assert_close(pseudo_huber(pred, target, c) * 2 * c, l2(pred, target), rtol=1e-6, atol=0)
    torch.testing.assert_close(pseudo_huber(pred, target, 1e-9), (pred - target).abs().flatten(1).mean(1), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="'l1'"):
        consistency_loss(pred, target, "l1", 0.1)


def test_per_sample_pseudo_huber_is_icts_distance_scaled_and_has_the_same_limits():
    pred, target = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    c, dims = 0.00054, 4 * 3 * 3
    ict = ((pred - target).flatten(1).square().sum(1) + (c * dims**0.5) ** 2).sqrt() - c * dims**0.5
    torch.testing.assert_close(pseudo_huber_per_sample(pred, target, c) * dims**0.5, ict, rtol=1e-6, atol=0)
    rms = (pred - target).flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(pseudo_huber_per_sample(pred, target, 1e-9), rms, rtol=1e-6, atol=1e-8)  # large d: RMS
    small = pred.double() * 1e-3  # float64: in float32 sqrt(1 + 1e-6) - 1 loses most digits
    torch.testing.assert_close(pseudo_huber_per_sample(small, 0 * small, 1.0) * 2, l2(small, 0 * small), rtol=1e-5,
                               atol=0)  # small d: l2 / 2c
    assert torch.equal(consistency_loss(pred, target, "huber_sample", c), pseudo_huber_per_sample(pred, target, c))


def test_guidance_scale_samples_cover_the_range_deterministically():
    w = sample_guidance_scale(10_000, 2.0, 6.0, torch.Generator().manual_seed(0))
    assert w.shape == (10_000,) and 2.0 <= w.min() and w.max() <= 6.0 and w.max() - w.min() > 3.9
    torch.testing.assert_close(w, sample_guidance_scale(10_000, 2.0, 6.0, torch.Generator().manual_seed(0)))


def test_the_step_runs_the_no_grad_networks_first_and_differentiates_only_the_student():
    """The order of lcd_loss's network calls (teacher, target, then student: no activation kept for the backward is
    alive during the no-grad calls) and the stop-gradient on the target, with three linear 'UNets' sharing theta."""
    theta, calls = torch.tensor(0.9, requires_grad=True), []

    def network(name, weight=theta):
        def fn(z, t, c):
            calls.append((name, torch.is_grad_enabled(), z.shape[0]))
            return weight * z + c.mean((1, 2)).view(-1, 1, 1, 1)
        return fn

    b, x0 = 3, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c, c_uncond = torch.randn(b, 5, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(b, 5, 16)
    args, grid = DistillArgs(loss_type="l2"), ddim_timesteps(1000, 50)
    torch.manual_seed(0)  # the step's own draws (t, noise, w): the same in both calls
    loss = lcd_loss(network("student"), network("teacher"), network("target"), x0, c, c_uncond, abar().float(), grid,
                    args, "epsilon")
    assert calls == [("teacher", False, 2 * b), ("target", False, b), ("student", True, b)]
    assert loss.shape == (b,) and loss.requires_grad
    loss.sum().backward()
    # Only the student's branch carries the gradient: the same step with teacher and target on a detached copy of
    # theta (so no path through them could exist) gives the same gradient.
    grad, theta.grad, fixed = theta.grad.clone(), None, theta.detach().clone()
    torch.manual_seed(0)
    lcd_loss(network("student"), network("teacher", fixed), network("target", fixed), x0, c, c_uncond,
             abar().float(), grid, args, "epsilon").sum().backward()
    assert torch.allclose(grad, theta.grad)
