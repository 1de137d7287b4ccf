"""SDXL-family teachers through the trainer, on a tiny random SDXL pipeline: every UNet call of a step gets the
pipeline's conditioning (two encoders, pooled embedding, time ids; zeros for the uncond branch), a cache gives
the same run, and the exported LoRA loads into StableDiffusionXLPipeline with LCMScheduler."""

from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file

from lcm_lora import trainer
from lcm_lora.caching import write_cache
from lcm_lora.conditioning import encode_text
from lcm_lora.config import TrainConfig
from lcm_lora.data import DataError
from lcm_lora.data.loader import tokenize
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME
from lcm_lora.models import load_teacher
from lcm_lora.world.dataset import write_imagefolder
from sdxl_tiny import save_tiny_sdxl


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sdxl")
    return save_tiny_sdxl(root / "teacher"), write_imagefolder(root / "images", 8)


def _config(teacher: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(pretrained_teacher_model=str(teacher), resolution=64, train_batch_size=2, max_train_steps=2,
                  lora_rank=4, lora_alpha=8, learning_rate=1e-3, lr_warmup_steps=0, checkpointing_steps=2,
                  report_to="none", seed=0, export_dtype="fp32", output_dir=str(out), num_ddim_timesteps=20,
                  proportion_empty_prompts=0.5)
    return TrainConfig.from_flat_dict({**values, **overrides})


def _recorded_unet_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every UNet forward the trainer makes."""
    calls, real_prepare = [], trainer.prepare_models

    def prepare(*args, **kwargs):
        unet = real_prepare(*args, **kwargs)
        unet.register_forward_pre_hook(lambda module, a, kw: calls.append(kw), with_kwargs=True)
        return unet

    monkeypatch.setattr(trainer, "prepare_models", prepare)
    return calls


def test_every_unet_call_gets_the_pipelines_conditioning(world, tmp_path, monkeypatch):
    teacher, images = world
    calls = _recorded_unet_calls(monkeypatch)
    trainer.train(_config(teacher, tmp_path, max_train_steps=1, checkpointing_steps=0, train_data_dir=str(images)))
    assert len(calls) == 3  # student, teacher (cond and uncond in one batch of 2B), target
    fixed = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0])
    for kw in calls:
        added = kw["added_cond_kwargs"]
        b = len(kw["encoder_hidden_states"])
        assert kw["encoder_hidden_states"].shape[1:] == (77, 96) and added["text_embeds"].shape == (b, 48)
        assert torch.equal(added["time_ids"], fixed.expand(b, 6))  # --use_fix_crop_and_size, the default
    student, both, target = calls[2], calls[0], calls[1]  # the student runs last (LCM Algorithm 1's order)
    assert len(both["encoder_hidden_states"]) == 4
    assert not both["encoder_hidden_states"][2:].any() and not both["added_cond_kwargs"]["text_embeds"][2:].any()
    assert torch.equal(both["encoder_hidden_states"][:2], student["encoder_hidden_states"])
    assert torch.equal(target["added_cond_kwargs"]["text_embeds"], student["added_cond_kwargs"]["text_embeds"])


def test_real_size_mode_conditions_on_each_images_size_and_crop(world, tmp_path, monkeypatch):
    teacher, images = world
    calls = _recorded_unet_calls(monkeypatch)
    trainer.train(_config(teacher, tmp_path, max_train_steps=1, checkpointing_steps=0, resolution=32,
                          use_fix_crop_and_size=False, train_data_dir=str(images)))
    # the world's images are 64 x 64, resized to 32 and center-cropped: original (64, 64), crop (0, 0), target 32
    assert torch.equal(calls[2]["added_cond_kwargs"]["time_ids"], torch.tensor([[64.0, 64, 0, 0, 32, 32]] * 2))


def test_text_conditioning_equals_the_pipelines_encode_prompt(world):
    teacher_dir, _ = world
    teacher = load_teacher(_config(teacher_dir, Path("unused")).model, unet=False)
    captions = ["a red striped circle at the top left", ""]
    c = encode_text(teacher.text_encoders, tuple(tokenize(t, captions) for t in teacher.tokenizers))
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher_dir, local_files_only=True)
    context, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert torch.equal(c["context"], context) and torch.equal(c["pooled"], pooled)
    assert teacher.force_zeros_for_empty_prompt


def test_training_from_a_cache_gives_the_same_losses(world, tmp_path, monkeypatch):
    teacher, images = world
    losses = {"images": [], "cache": []}
    real = trainer.lcd_loss
    for source, extra in (("images", {"train_data_dir": str(images)}), ("cache", {"encodings_dir": str(tmp_path / "c")})):
        if source == "cache":
            write_cache(_config(teacher, tmp_path / "unused", train_data_dir=str(images)), tmp_path / "c")
        monkeypatch.setattr(trainer, "lcd_loss", lambda *a, _l=losses[source], **k: _l.append(real(*a, **k)) or _l[-1])
        trainer.train(_config(teacher, tmp_path / source, **extra))
    assert len(losses["cache"]) == 2
    assert [x.mean().item() for x in losses["cache"]] == pytest.approx([x.mean().item() for x in losses["images"]],
                                                                       rel=1e-5)


def test_the_exported_lora_loads_into_the_sdxl_pipeline_and_samples(world, tmp_path):
    teacher, images = world
    out = trainer.train(_config(teacher, tmp_path, train_data_dir=str(images)))
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher, local_files_only=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=20)
    pipe.load_lora_weights(out)
    lora = load_file(out / DIFFUSERS_WEIGHT_NAME)
    loaded = {n for n, _ in pipe.unet.named_parameters() if "lora_" in n}
    modules = {k.split(".")[0] for k in lora}  # kohya keys: lora_down, lora_up and alpha per module
    assert len(lora) == 3 * len(modules)
    assert len(loaded) == 2 * len(modules)  # every module of the file became a LoRA: nothing left unmatched
    images_out = pipe(["a red striped circle"], num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images_out.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(images_out)).all()


def test_the_sdxl_vae_encodes_in_fp32_under_fp16_unless_it_is_fp16_safe(world):
    teacher_dir, _ = world
    teacher = load_teacher(_config(teacher_dir, Path("unused")).model)
    assert trainer.vae_dtype(teacher, torch.float16) == torch.float32  # SDXL's VAE overflows in fp16
    assert trainer.vae_dtype(teacher, torch.bfloat16) == torch.bfloat16
    teacher.vae.register_to_config(force_upcast=False)  # what an fp16-safe VAE's config says
    assert trainer.vae_dtype(teacher, torch.float16) == torch.float16


def test_a_cache_of_another_family_is_refused(world, tmp_path):
    teacher, images = world
    write_cache(_config(teacher, tmp_path / "unused", train_data_dir=str(images)), tmp_path / "c")
    sd = TrainConfig.from_flat_dict({**_config(teacher, tmp_path / "out").to_flat_dict(),
                                     "pretrained_teacher_model": "teacher-eps", "encodings_dir": str(tmp_path / "c")})
    with pytest.raises(DataError, match=r"written for another teacher \(.*'sdxl'.*'sd'"):
        trainer.train(sd)


def test_an_sdxl_single_file_teacher_trains_the_same_lora_and_generates(world, tmp_path):
    """A community SDXL fine-tune ships as one file in the original SGM layout: distilling it (with the base
    model's config folder) gives the LoRA the diffusers folder gives, bit for bit, and generate samples with it."""
    from lcm_lora.cli import generate_main
    from single_file_writer import save_single_file

    teacher, images = world
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher, local_files_only=True)
    single_file = save_single_file(pipe, tmp_path / "community-xl.safetensors", {"modelspec.title": "tiny xl"})
    from_folder = trainer.train(_config(teacher, tmp_path / "folder", train_data_dir=str(images)))
    from_file = trainer.train(_config(single_file, tmp_path / "file", train_data_dir=str(images),
                                      single_file_config=str(teacher)))
    a, b = load_file(from_folder / DIFFUSERS_WEIGHT_NAME), load_file(from_file / DIFFUSERS_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    generate_main(["--pretrained_model", str(single_file), "--single_file_config", str(teacher), "--lora",
                   str(from_file), "--prompt", "a red circle", "--num_inference_steps", "2", "--height", "64", "--width", "64",
                   "--output_dir", str(tmp_path / "gen"), "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["grid.png", "p000-s0000000000.png"]
