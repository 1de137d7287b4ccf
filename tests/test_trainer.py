"""Short real training runs on the bundled teacher: checkpoints, export, resume, clipping, CLI."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lcm_lora.cli import export_main, generate_main
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME, LORA_CHECKPOINT_NAME
from lcm_lora.models import resolve_teacher
from lcm_lora.trainer import train
from lcm_lora.world.dataset import write_imagefolder
from tiny_run import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("world"), 32)


def test_run_writes_lora_only_checkpoints_config_and_a_loadable_lora(data_dir, tmp_path):
    out = train(tiny_config(data_dir, tmp_path, checkpoints_total_limit=1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the limit removed checkpoint-1
    files = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert LORA_CHECKPOINT_NAME in files and not any("unet" in f or f.startswith("model") for f in files), files
    assert (out / "config.yaml").is_file()
    with safe_open(str(out / DIFFUSERS_WEIGHT_NAME), "pt") as f:
        meta = f.metadata()
    assert meta["lcm_lora.steps_trained"] == "2" and meta["lcm_lora.w_range"] == "5.0,15.0"
    assert meta["lcm_lora.num_ddim_timesteps"] == "50" and "w + 1" in meta["lcm_lora.w_convention"]
    pipe = StableDiffusionPipeline.from_pretrained(resolve_teacher("teacher-eps"), safety_checker=None)
    pipe.load_lora_weights(str(out))  # loads, and the LoRA moved away from zero
    lora = load_file(out / DIFFUSERS_WEIGHT_NAME)
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in lora.items())

    # The run wrote the default formats; the export command reproduces them from the last checkpoint.
    kohya_name = "lcm-lora-teacher-eps.safetensors"
    assert (out / kohya_name).is_file() and not (out / "peft").exists()
    # No --dtype: the run's --export_dtype (fp32 here) is the default.
    export_main(["--checkpoint", str(out / "checkpoint-2"), "--output_dir", str(tmp_path / "exported"),
                 "--formats", "diffusers", "kohya"])
    same_tensors = [(DIFFUSERS_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME), (kohya_name, kohya_name),
                    (DIFFUSERS_WEIGHT_NAME, kohya_name)]  # the default file: the kohya file's keys
    for exported_name, run_name in same_tensors:
        final, exported = load_file(out / run_name), load_file(tmp_path / "exported" / exported_name)
        assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final), exported_name

    # generate: PNGs and a grid, with the LoRA and LCMScheduler.
    generate_main(["--pretrained_model", "teacher-eps", "--lora", str(out), "--prompt", "a red circle", "a blue square",
                   "--num_inference_steps", "2", "--output_dir", str(tmp_path / "gen"), "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["grid.png", "p000-s0000000000.png",
                                                                    "p001-s0000000001.png"]


def test_resume_continues_from_the_checkpoint_step(data_dir, tmp_path):
    train(tiny_config(data_dir, tmp_path, max_train_steps=1))
    out = train(tiny_config(data_dir, tmp_path, max_train_steps=3, resume_from_checkpoint="latest"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    with safe_open(str(out / DIFFUSERS_WEIGHT_NAME), "pt") as f:
        assert f.metadata()["lcm_lora.steps_trained"] == "3"


def _update_norm(data_dir: Path, out: Path, max_grad_norm: float) -> float:
    # With a huge Adam epsilon the update is ~ lr * gradient / epsilon, so clipping shows in the weights.
    train(tiny_config(data_dir, out, max_train_steps=1, max_grad_norm=max_grad_norm, adam_epsilon=1e3,
                  learning_rate=1.0, checkpointing_steps=0))
    return sum(v.float().norm() ** 2 for k, v in load_file(out / DIFFUSERS_WEIGHT_NAME).items() if "lora_up" in k) ** 0.5


def test_gradient_clipping_really_clips(data_dir, tmp_path):
    unclipped = _update_norm(data_dir, tmp_path / "a", max_grad_norm=0.0)
    clipped = _update_norm(data_dir, tmp_path / "b", max_grad_norm=1e-4)
    assert unclipped > 0 and clipped < unclipped / 10, (clipped, unclipped)


def test_target_ema_updates_swaps_in_and_restores_exactly():
    from lcm_lora.models import TargetEMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = TargetEMA({"p": p}, decay=0.9)
    p.data.fill_(1.0)
    ema.update()  # theta- = 0.9 * 0 + 0.1 * 1
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.1))
    with ema.swapped_in():
        assert torch.equal(p.data, ema.shadow[0])  # the target call sees theta-
    assert torch.equal(p.data, torch.ones(3))  # and theta comes back bit for bit
    other = TargetEMA({"p": torch.nn.Parameter(torch.zeros(3))}, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0])


def test_ema_target_is_checkpointed_and_lags_the_student(data_dir, tmp_path):
    out = train(tiny_config(data_dir, tmp_path, ema_decay=0.9))
    # Accelerate saved theta- next to the LoRA: the first object registered for checkpointing (the data
    # position is the second)
    shadow = torch.load(out / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=True)["shadow"]
    shadow_b = sum(v.abs().sum() for k, v in shadow.items() if "lora_B" in k)
    live_b = sum(v.abs().sum() for k, v in load_file(out / "checkpoint-2" / LORA_CHECKPOINT_NAME).items() if "lora_B" in k)
    # B starts at zero; after 2 steps theta-_B = 0.09 B_1 + 0.1 B_2: it moved, and lags the student.
    assert 0 < shadow_b < 0.5 * live_b, (shadow_b, live_b)
    # Resuming restores theta- and continues.
    out = train(tiny_config(data_dir, tmp_path, ema_decay=0.9, max_train_steps=3, resume_from_checkpoint="latest"))
    assert (out / "checkpoint-3").is_dir()
