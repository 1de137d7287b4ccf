"""--method tcd and pcm: their end times and jumps against the stock schedulers their LoRAs are sampled with
(TCDScheduler, trailing DDIMScheduler), the step's targets, and the sampler a LoRA's metadata names. No model."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, TCDScheduler

from lcm_lora import export, samplers
from lcm_lora.config import ConfigError, DistillArgs, TrainConfig
from lcm_lora.distill import endpoint, lcd_loss
from lcm_lora.schedule import alpha_sigma, ddim_timesteps, phase_edge, tcd_end_timestep
from lcm_lora.solver import consistency_fn, jump_or_stay, to_x0_eps

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
PCM_DDIM = DDIMScheduler.from_config(SD, **samplers.PCM_DDIM)


def abar() -> torch.Tensor:
    return DDPMScheduler(**SD).alphas_cumprod


def our_jump(out, z, t: int, s: int, prediction_type: str) -> torch.Tensor:
    t_, s_ = torch.tensor([t]), torch.tensor([s])
    x0, eps = to_x0_eps(out, z, *alpha_sigma(abar(), t_, z.ndim), prediction_type)
    return jump_or_stay(z, x0, eps, s_ == t_, *alpha_sigma(abar(), s_, z.ndim))


@pytest.mark.parametrize("n, m", [(20, 1), (20, 2), (20, 4), (40, 4), (40, 8), (50, 2)])
def test_phase_edges_are_the_trailing_ddim_steps(n, m):
    """Every grid point's phase edge is where trailing DDIM's M-step sampler goes from the step above it (its prev
    timestep, T/M lower; -1 at the end, which our clamp and DDIM without set_alpha_to_one both read as t = 0)."""
    PCM_DDIM.set_timesteps(m)
    steps = PCM_DDIM.timesteps.tolist()
    tau = ddim_timesteps(1000, n)
    assert set(steps) <= set(tau.tolist())  # each sampling step starts on a training grid point
    for t in tau.tolist():
        start = min(x for x in steps if x >= t)  # the sampling step whose interval holds t
        assert phase_edge(torch.tensor([t]), 1000, m).item() == max(start - 1000 // m, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_a_pcm_jump_is_the_ddim_step_its_lora_is_sampled_with(prediction_type, m):
    """The student's jump to its phase edge equals DDIMScheduler's step under PCM's loading settings, at every step
    of an M-step trailing schedule (the last one ending at alphas_cumprod[0], as set_alpha_to_one=False makes it)."""
    scheduler = DDIMScheduler.from_config({**SD, "prediction_type": prediction_type}, **samplers.PCM_DDIM)
    scheduler.set_timesteps(m)
    gen = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps.tolist():
        z, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        expected = scheduler.step(out, t, z, eta=0.0).prev_sample
        s = phase_edge(torch.tensor([t]), 1000, m).item()
        torch.testing.assert_close(our_jump(out, z, t, s, prediction_type), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_tcd_at_gamma_0_is_trailing_ddim_and_each_step_is_our_jump(steps):
    """On the N=40 grid TCDScheduler's timesteps are trailing DDIM's, and at gamma 0 its step is the jump of the
    trajectory consistency function to the next timestep, which is DDIMScheduler's trailing step."""
    tcd = TCDScheduler.from_config(SD, original_inference_steps=40)
    tcd.set_timesteps(steps)
    PCM_DDIM.set_timesteps(steps)
    assert tcd.timesteps.tolist() == PCM_DDIM.timesteps.tolist()
    gen = torch.Generator().manual_seed(1)
    timesteps = tcd.timesteps.tolist()
    for i, t in enumerate(timesteps):
        z, out = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        s = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        got = tcd.step(out, t, z, eta=0.0, generator=gen).prev_sample
        torch.testing.assert_close(got, our_jump(out, z, t, s, "epsilon"), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, PCM_DDIM.step(out, t, z, eta=0.0).prev_sample, atol=1e-5, rtol=1e-5)


def test_tcd_at_gamma_1_is_lcm_at_one_step():
    """At one step TCD (any gamma) and LCM both return the x0 estimate's jump to the end: the 1-step image of a
    LoRA does not depend on which of them samples it (LCM's boundary scalings are ~(0, 1) at t = 999)."""
    tcd, lcm = (cls.from_config(SD, original_inference_steps=20) for cls in (TCDScheduler, LCMScheduler))
    tcd.set_timesteps(1)
    lcm.set_timesteps(1)
    gen = torch.Generator().manual_seed(2)
    z, out = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    x0 = lcm.step(out, 999, z, generator=gen).denoised
    jump = tcd.step(out, 999, z, eta=1.0, generator=gen).prev_sample
    torch.testing.assert_close(jump, our_jump(out, z, 999, 0, "epsilon"), atol=1e-5, rtol=1e-5)
    assert (jump - x0).abs().max() < 0.05 * x0.abs().max()  # x0 against alpha_0 x0 + sigma_0 eps: sigma_0 ~ 0.03


def test_tcd_end_times_cover_the_grid_below_t_n_and_the_zero_share_is_kept():
    k, gen = 50, torch.Generator().manual_seed(0)
    t_n = torch.full((20000,), 449)  # tau_8: end points 0, 49, 99, ..., 449
    s = tcd_end_timestep(t_n, k, 0.0, gen)
    assert sorted(set(s.tolist())) == [0] + [j * k - 1 for j in range(1, 10)]
    counts = torch.bincount((s + 1) // k)
    assert counts.min() > 0.8 * counts.float().mean()  # uniform over the 10 end points
    assert tcd_end_timestep(torch.zeros(8, dtype=torch.long), k, 0.0, gen).eq(0).all()  # t_n = 0: s = 0
    share = tcd_end_timestep(t_n, k, 0.5, gen).eq(0).float().mean().item()
    assert abs(share - (0.5 + 0.5 / 10)) < 0.02  # the forced half, plus the draws that land on 0 anyway
    assert tcd_end_timestep(t_n, k, 1.0, gen).eq(0).all()


def test_the_endpoint_is_lcms_consistency_function_for_lcm_and_the_state_itself_at_s_equal_t():
    gen = torch.Generator().manual_seed(3)
    z, out, t = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([999, 49, 0])
    from lcm_lora.schedule import boundary_scalings

    x0, _ = to_x0_eps(out, z, *alpha_sigma(abar(), t, 4), "epsilon")
    lcm = endpoint(z, t, out, None, abar(), DistillArgs(), "epsilon")
    assert torch.equal(lcm, consistency_fn(z, x0, *boundary_scalings(t, 0.5, 10.0, 4)))
    assert torch.equal(endpoint(z, t, out, t.clone(), abar(), DistillArgs(method="tcd"), "epsilon"), z)


def linear_unet(weight: float):
    return lambda z, t, c: weight * z + c.mean((1, 2)).view(-1, 1, 1, 1)


def step_loss(d: DistillArgs, target_weight: float, seed: int = 0) -> torch.Tensor:
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c, uncond = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(6, 5, 16)
    torch.manual_seed(seed)
    return lcd_loss(linear_unet(0.9), linear_unet(0.5), linear_unet(target_weight), x0, c, uncond, abar(),
                    ddim_timesteps(1000, d.num_ddim_timesteps), d, "epsilon")


def test_with_every_grid_point_a_phase_edge_the_target_is_the_teachers_step():
    """--multiphase N puts s = t_n for every example: the target is the teacher's DDIM step itself, whatever the
    target network says, as in PCM where t_n is an edge."""
    d = DistillArgs(method="pcm", multiphase=20, num_ddim_timesteps=20, loss_type="l2")
    assert torch.equal(step_loss(d, 0.3), step_loss(d, 2.0))
    fewer = DistillArgs(method="pcm", multiphase=2, num_ddim_timesteps=20, loss_type="l2")
    assert not torch.equal(step_loss(fewer, 0.3), step_loss(fewer, 2.0))  # within a phase the target network counts


@pytest.mark.parametrize("d", [DistillArgs(method="tcd", tcd_zero_share=0.25), DistillArgs(method="pcm", multiphase=2)])
def test_the_step_runs_for_each_method_and_is_deterministic_for_a_seed(d):
    d.num_ddim_timesteps = 20
    loss = step_loss(d, 0.9)
    assert loss.shape == (6,) and torch.isfinite(loss).all() and (loss > 0).any()
    assert torch.equal(loss, step_loss(d, 0.9))


@pytest.mark.parametrize("flags, needle", [
    ({"method": "rcm"}, "--method must be one of"),
    ({"multiphase": 2}, "--multiphase 2 applies to --method pcm only"),
    ({"method": "pcm", "multiphase": 3, "num_ddim_timesteps": 20}, "--multiphase 3 must divide --num_ddim_timesteps 20"),
    ({"tcd_zero_share": 0.5}, "--tcd_zero_share 0.5 applies to --method tcd only"),
])
def test_method_flags_that_do_not_fit_are_named(flags, needle):
    base = {"pretrained_teacher_model": "teacher-eps", "train_data_dir": "data"}
    problems = TrainConfig.from_flat_dict({**base, **flags}).validate()
    assert any(needle in p for p in problems), problems


def test_method_is_a_flag():
    from lcm_lora.config import parse_train_args

    config, _ = parse_train_args(["--pretrained_teacher_model", "teacher-eps", "--train_data_dir", "d", "--method",
                                  "pcm", "--multiphase", "4", "--num_ddim_timesteps", "40"])
    assert (config.distill.method, config.distill.multiphase) == ("pcm", 4)
    with pytest.raises((ConfigError, SystemExit)):
        parse_train_args(["--pretrained_teacher_model", "teacher-eps", "--train_data_dir", "d", "--multiphase", "x"])


@pytest.mark.parametrize("flat, scheduler, settings, eta, steps", [
    ({"num_ddim_timesteps": 20, "timestep_scaling_factor": 10.0}, "LCMScheduler",
     {"original_inference_steps": 20, "timestep_scaling": 10.0}, 0.0, None),
    ({"method": "tcd", "num_ddim_timesteps": 40}, "TCDScheduler", {"original_inference_steps": 40}, 0.3, None),
    ({"method": "pcm", "multiphase": 2, "num_ddim_timesteps": 20}, "DDIMScheduler",
     {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False}, 0.0, 2),
])
def test_the_sampler_round_trips_through_the_metadata(flat, scheduler, settings, eta, steps):
    meta = export.metadata(flat, "teacher-eps", "epsilon", 10)
    assert meta["lcm_lora.scheduler"] == scheduler
    got = samplers.from_metadata(meta, {"original_inference_steps": 20, "timestep_scaling": 10.0})
    assert (got.scheduler, got.settings, got.eta, got.steps) == (scheduler, settings, eta, steps)


def test_a_lora_without_method_metadata_is_sampled_with_lcm():
    got = samplers.from_metadata({"format": "pt"}, {"original_inference_steps": 20})
    assert (got.scheduler, got.settings) == ("LCMScheduler", {"original_inference_steps": 20})
    with pytest.raises(ValueError, match="lcm_lora.method 'xyz'"):
        samplers.from_metadata({"lcm_lora.method": "xyz"}, {})


# -- a run of each method, end to end: the files name its sampler and every loader uses it ---------------------

@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    from lcm_lora.trainer import train
    from lcm_lora.world.dataset import write_imagefolder
    from tiny_run import tiny_config

    data = write_imagefolder(tmp_path_factory.mktemp("world"), 8)
    runs = {}
    for name, flags in {"pcm": dict(method="pcm", multiphase=2, num_ddim_timesteps=20),
                        "tcd": dict(method="tcd", num_ddim_timesteps=20, tcd_zero_share=0.25)}.items():
        out = tmp_path_factory.mktemp(name)
        train(tiny_config(data, out, **flags, max_train_steps=2, checkpointing_steps=2, validation_steps=2,
                          validation_prompts=["a red circle at the top left on a plain background"],
                          validation_inference_steps=[2], validation_teacher_steps=4))
        runs[name] = out
    return runs


@pytest.mark.parametrize("name, scheduler, eta, settings", [
    ("pcm", "DDIMScheduler", 0.0, {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False}),
    ("tcd", "TCDScheduler", 0.3, {"original_inference_steps": 20}),
])
def test_a_methods_lora_loads_with_its_scheduler_everywhere(method_runs, name, scheduler, eta, settings):
    from lcm_lora.inference import load_lcm_pipeline
    from lcm_lora.run_log import MetricsLog

    out = method_runs[name]
    pipe = load_lcm_pipeline("teacher-eps", out)
    assert type(pipe.scheduler).__name__ == scheduler
    assert {k: pipe.scheduler.config[k] for k in settings} == settings
    validation = [r for r in MetricsLog(out).records() if "validation" in r][-1]["validation"]
    assert (validation["lora_scheduler"], validation["lora_eta"]) == (scheduler, eta)
    card = (out / "README.md").read_text()
    assert f"from diffusers import {scheduler}, StableDiffusionPipeline" in card
    assert f"pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config" in card
    assert f"`{name}`" in card  # the Method row


def test_generate_samples_a_pcm_lora_in_its_phases_and_a_tcd_lora_at_its_gamma(method_runs, tmp_path):
    from PIL import Image

    from lcm_lora.cli import generate_main

    for name, steps, eta in (("pcm", "2", None), ("tcd", "4", "0.3")):
        generate_main(["--pretrained_model", "teacher-eps", "--lora", str(method_runs[name]), "--prompt", "a circle",
                       "--output_dir", str(tmp_path / name)])
        text = Image.open(tmp_path / name / "p000-s0000000000.png").text
        assert text["lcm_lora.num_inference_steps"] == steps  # pcm: its 2 phases by default; else 4
        assert text.get("lcm_lora.eta") == eta
    assert text["lcm_lora.scheduler"] == "TCDScheduler"
