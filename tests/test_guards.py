"""Problems are found before any weight loads; non-finite steps, full disks and preemption never lose a run."""

import json
import logging
import os
import resource
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lcm_lora import trainer
from lcm_lora.checkpoint import TrainingStopped, checkpoint_step, checkpoints
from lcm_lora.config import ConfigError, TrainConfig
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME, LORA_CHECKPOINT_NAME
from lcm_lora.world import assets
from lcm_lora.world.dataset import write_imagefolder
from tiny_run import TrainingProcess, cli_args, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("world"), 16)


def _config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    return tiny_config(data_dir, out, **{"max_train_steps": 4, "checkpointing_steps": 2, **overrides})


@pytest.fixture
def no_weights(monkeypatch):
    """Validation must finish before any weight loads: loading fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the configuration was validated")

    monkeypatch.setattr(trainer, "load_teacher", refuse)


def _teacher_copy(tmp_path: Path, edit=None) -> Path:
    copy = tmp_path / "teacher"
    shutil.copytree(assets.resolve("teacher-eps"), copy)
    if edit:
        edit(copy)
    return copy


def _problem(config: TrainConfig) -> str:
    with pytest.raises(ConfigError) as err:
        trainer.train(config)
    return str(err.value)


def test_the_solver_grid_must_divide_the_teachers_timesteps(data_dir, tmp_path, no_weights):
    message = _problem(_config(data_dir, tmp_path, num_ddim_timesteps=30))
    assert "--num_ddim_timesteps 30 does not divide the teacher's 1000 training timesteps" in message


def test_resolution_must_be_a_multiple_of_the_vae_factor(data_dir, tmp_path, no_weights):
    message = _problem(_config(data_dir, tmp_path, resolution=63))  # the tiny VAE downsamples by 4
    assert "--resolution 63 is not a multiple of the VAE's downsampling factor 4; use 60 or 64." in message


def test_a_missing_teacher_folder_or_subfolder_is_named(data_dir, tmp_path, no_weights):
    message = _problem(_config(data_dir, tmp_path, pretrained_teacher_model=str(tmp_path / "nowhere")))
    assert f"--pretrained_teacher_model {tmp_path / 'nowhere'}: no such file or folder." in message
    teacher = _teacher_copy(tmp_path, lambda t: shutil.rmtree(t / "vae"))
    message = _problem(_config(data_dir, tmp_path / "out", pretrained_teacher_model=str(teacher)))
    assert "no vae subfolder" in message


def test_an_unknown_prediction_type_is_refused(data_dir, tmp_path, no_weights):
    def edit(teacher):
        path = teacher / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "flow"}))

    teacher = _teacher_copy(tmp_path, edit)
    message = _problem(_config(data_dir, tmp_path / "out", pretrained_teacher_model=str(teacher)))
    assert "prediction type 'flow' is not one of" in message and "--prediction_type" in message


def test_an_output_dir_holding_another_run_is_refused_unless_resuming(data_dir, tmp_path):
    trainer.train(_config(data_dir, tmp_path, max_train_steps=2))
    message = _problem(_config(data_dir, tmp_path, max_train_steps=2, learning_rate=5e-4))
    assert "holds another run (its config.yaml differs in learning_rate" in message
    assert "--resume_from_checkpoint latest" in message
    trainer.train(_config(data_dir, tmp_path, max_train_steps=3, resume_from_checkpoint="latest"))  # allowed


def test_pickle_weights_are_refused_unless_allowed(data_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    def to_pickle(teacher):
        unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
        (teacher / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        unet.save_pretrained(teacher / "unet", safe_serialization=False)

    teacher = _teacher_copy(tmp_path, to_pickle)
    message = _problem(_config(data_dir, tmp_path / "a", pretrained_teacher_model=str(teacher), max_train_steps=1))
    assert "pickle weights" in message and "--allow_pickle_weights" in message
    out = trainer.train(_config(data_dir, tmp_path / "b", pretrained_teacher_model=str(teacher), max_train_steps=1,
                                allow_pickle_weights=True))
    assert (out / DIFFUSERS_WEIGHT_NAME).is_file()


def _nan_at(monkeypatch, steps: set[int]):
    """lcd_loss, made NaN at the given (1-based) optimizer steps."""
    real, calls = trainer.lcd_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls[0] in steps else value

    monkeypatch.setattr(trainer, "lcd_loss", loss)


def test_non_finite_steps_are_skipped_and_counted(data_dir, tmp_path, monkeypatch, caplog):
    _nan_at(monkeypatch, {2, 3})
    with caplog.at_level(logging.WARNING, logger="lcm_lora.trainer"):
        out = trainer.train(_config(data_dir, tmp_path, max_train_steps=5))
    lora = load_file(out / DIFFUSERS_WEIGHT_NAME)
    assert all(torch.isfinite(v).all() for v in lora.values())  # a NaN update would have spread everywhere
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert skipped == ["step 2: non-finite loss or gradient, update skipped (1 in a row, 1 in all)",
                       "step 3: non-finite loss or gradient, update skipped (2 in a row, 2 in all)"]


def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    _nan_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(TrainingStopped, match=r"2 optimizer steps in a row had a non-finite loss .* up to "
                                                      r"step 4\. The last checkpoint, .*checkpoint-2, holds finite"):
        trainer.train(_config(data_dir, tmp_path, max_train_steps=10, max_consecutive_nonfinite_steps=2))
    state = load_file(tmp_path / "checkpoint-2" / LORA_CHECKPOINT_NAME)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_too_little_disk_stops_before_writing_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: SimpleNamespace(free=0) if (Path(path) / "checkpoint-2").exists() else real(path))
    with pytest.raises(TrainingStopped, match=r"MiB free, too little for checkpoint-4 .*checkpoint-2 is "
                                                      r"intact\. Free some space"):
        trainer.train(_config(data_dir, tmp_path))
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_write_is_reported_and_the_previous_checkpoint_kept(data_dir, tmp_path, monkeypatch):
    real = trainer.Accelerator.save_state

    def disk_full(self, output_dir=None, **kwargs):
        if "checkpoint-4" in str(output_dir):
            raise OSError(28, "No space left on device")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(trainer.Accelerator, "save_state", disk_full)
    with pytest.raises(TrainingStopped, match=r"saving checkpoint-4 failed \(OSError: \[Errno 28\] No space left "
                                              r"on device\); the disk of .* has [\d.]+ MiB free; .*checkpoint-2 is intact"):
        trainer.train(_config(data_dir, tmp_path))
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not list(tmp_path.glob("*.partial"))


def test_a_write_that_really_fails_midway_is_reported_cleaned_up_and_resumable(data_dir, tmp_path, monkeypatch):
    """A full disk fails inside safetensors and torch.save, which raise their own errors, not OSError: here the
    process's file-size limit makes every write of checkpoint-4 really fail partway, as a full disk would."""
    whole = load_file(trainer.train(_config(data_dir, tmp_path / "whole")) / DIFFUSERS_WEIGHT_NAME)
    real = trainer.Accelerator.save_state

    def size_limited(self, output_dir=None, **kwargs):
        if "checkpoint-4" not in str(output_dir):
            return real(self, output_dir, **kwargs)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
        try:
            return real(self, output_dir, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(trainer.Accelerator, "save_state", size_limited)
    out = tmp_path / "full"
    with pytest.raises(TrainingStopped, match=r"saving checkpoint-4 failed \(\w+: .*\); the disk of .* has [\d.]+ MiB "
                                              r"free; .*checkpoint-2 is intact\. Fix the cause"):
        trainer.train(_config(data_dir, out))
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"] and not list(out.glob("*.partial"))
    monkeypatch.setattr(trainer.Accelerator, "save_state", real)
    resumed = trainer.train(_config(data_dir, out, resume_from_checkpoint="latest"))
    final = load_file(resumed / DIFFUSERS_WEIGHT_NAME)
    assert all(torch.equal(whole[k], final[k]) for k in whole)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_checkpoints_and_says_how_to_resume(data_dir, tmp_path, sig):
    steps = 24  # enough that the run cannot end between seeing its first step and the signal arriving
    config = _config(data_dir, tmp_path / "whole", max_train_steps=steps, checkpointing_steps=steps)
    whole = load_file(trainer.train(config) / DIFFUSERS_WEIGHT_NAME)
    out = tmp_path / "stopped"
    flags = {**config.to_flat_dict(), "output_dir": str(out)}
    run = TrainingProcess([sys.executable, str(ROOT / "train_lcm_lora.py"), *cli_args(flags)])
    run.wait_for_step(steps)
    run.process.send_signal(sig)
    assert run.finish() == 128 + sig, run.log[-2000:]
    log = run.log
    stopped = checkpoints(out)
    assert len(stopped) == 1, stopped
    step = checkpoint_step(stopped[0])
    assert step < steps and f"stopped by {sig.name} after step {step}" in log
    assert "Resume with the same command plus --resume_from_checkpoint latest." in log
    resumed = trainer.train(TrainConfig.from_flat_dict({**config.to_flat_dict(), "output_dir": str(out),
                                                       "resume_from_checkpoint": "latest"}))
    final = load_file(resumed / DIFFUSERS_WEIGHT_NAME)
    assert all(torch.equal(whole[k], final[k]) for k in whole)


def test_a_stop_signal_on_a_checkpointing_step_reuses_that_checkpoint(data_dir, tmp_path, monkeypatch):
    """The signal arrives while step 2 writes its periodic checkpoint: the stop path must not save step 2 again,
    and the checkpoint it names must resume to the same LoRA as a run that was never stopped."""
    config = _config(data_dir, tmp_path / "whole")
    whole = load_file(trainer.train(config) / DIFFUSERS_WEIGHT_NAME)
    real, saves = trainer.save_checkpoint, []

    def save_then_signal(accelerator, out, step, *args, **kwargs):
        saves.append(step)
        path = real(accelerator, out, step, *args, **kwargs)
        if saves == [2]:  # once: a second signal would meet the default handler and end pytest itself
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the trainer's handler, as a preemption would be
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_signal)
    out = tmp_path / "stopped"
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM after step 2; the state is in .*checkpoint-2\. "
                                              r"Resume") as stopped:
        trainer.train(TrainConfig.from_flat_dict({**config.to_flat_dict(), "output_dir": str(out)}))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert saves == [2], saves  # the periodic save only: the stop path reused it
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    resumed = trainer.train(TrainConfig.from_flat_dict({**config.to_flat_dict(), "output_dir": str(out),
                                                       "resume_from_checkpoint": "latest"}))
    final = load_file(resumed / DIFFUSERS_WEIGHT_NAME)
    assert all(torch.equal(whole[k], final[k]) for k in whole)
