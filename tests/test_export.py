"""The exported LoRA loads with diffusers' own loader and reproduces the in-memory student."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from lcm_lora.config import LoraArgs
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME, save_diffusers_lora, to_diffusers
from lcm_lora.models import attach_lora, resolve_teacher

TEACHER = resolve_teacher("teacher-eps")


def _student(rank: int, alpha: float):
    unet = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None).unet
    attach_lora(unet, LoraArgs(lora_rank=rank, lora_alpha=alpha))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-identity LoRA: B = 0 would make every comparison trivially pass
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return unet.eval()


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([999, 259]), torch.randn(2, 77, 64, generator=gen)


@pytest.mark.parametrize("rank, alpha", [(4, 4.0), (4, 16.0), (8, 2.0)])
def test_load_lora_weights_reproduces_student(tmp_path, rank, alpha):
    student = _student(rank, alpha)
    z, t, c = _inputs()
    with torch.no_grad():
        expected = student(z, t, c).sample
        base = student.disable_adapters() or student(z, t, c).sample
    student.enable_adapters()
    save_diffusers_lora(student, tmp_path, rank, alpha, {"format": "pt"})

    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        loaded = pipe.unet(z, t, c).sample
    assert (expected - base).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)


def test_every_unet_lora_module_is_in_the_file(tmp_path):
    student = _student(4, 8.0)
    save_diffusers_lora(student, tmp_path, 4, 8.0, {"format": "pt", "lcm_lora.rank": "4"})
    with safe_open(str(tmp_path / DIFFUSERS_WEIGHT_NAME), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    lora_modules = {n for n, m in student.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in keys} == lora_modules
    assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert meta["lcm_lora.rank"] == "4"


def test_to_diffusers_bakes_alpha_over_rank_into_lora_b():
    sd = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(5, 2)}
    out = to_diffusers(sd, rank=2, alpha=6.0)
    assert torch.equal(out["unet.m.lora_A.weight"], torch.ones(2, 3))
    assert torch.equal(out["unet.m.lora_B.weight"], torch.full((5, 2), 3.0))
    with pytest.raises(KeyError, match="not a LoRA weight"):
        to_diffusers({"m.alpha": torch.ones(())}, 2, 2.0)


def test_generation_reads_the_training_grid_from_the_lora_metadata(tmp_path):
    from lcm_lora.export import lcm_scheduler_settings, metadata
    from lcm_lora.inference import load_lcm_pipeline

    flat = {"lora_rank": 4, "lora_alpha": 4.0, "w_min": 2.0, "w_max": 6.0, "num_ddim_timesteps": 20,
            "timestep_scaling_factor": 5.0}
    save_diffusers_lora(_student(4, 4.0), tmp_path, 4, 4.0, metadata(flat, "teacher-eps", "epsilon", 7))
    assert lcm_scheduler_settings(tmp_path) == {"original_inference_steps": 20, "timestep_scaling": 5.0}
    pipe = load_lcm_pipeline("teacher-eps", tmp_path)
    assert (pipe.scheduler.config.original_inference_steps, pipe.scheduler.config.timestep_scaling) == (20, 5.0)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # the 20-point training grid
    explicit = load_lcm_pipeline("teacher-eps", tmp_path, original_inference_steps=50)
    assert explicit.scheduler.config.original_inference_steps == 50  # an explicit value wins
    assert lcm_scheduler_settings(tmp_path / "missing.safetensors") == {}
