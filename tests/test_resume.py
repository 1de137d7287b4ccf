"""A run is never lost: killed at any moment, it resumes to exactly the LoRA of a run that never stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lcm_lora import trainer
from lcm_lora.checkpoint import checkpoints, find_checkpoint
from lcm_lora.config import TrainConfig
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME
from lcm_lora.world.dataset import write_imagefolder
from tiny_run import cli_args

ROOT = Path(__file__).resolve().parents[1]
# 24 images, batch 4: 6 micro-batches an epoch, so runs cross epochs; flips and emptied prompts use the
# data randomness, a constant LR keeps runs of different lengths comparable step for step.
FLAGS = dict(pretrained_teacher_model="teacher-eps", resolution=64, train_batch_size=4, lora_rank=4, lora_alpha=8,
             learning_rate=1e-3, lr_warmup_steps=0, report_to="none", seed=0, random_flip=True,
             proportion_empty_prompts=0.3, max_train_steps=10, checkpointing_steps=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("world"), 24)


def _flags(data_dir: Path, out: Path, **overrides) -> dict:
    return {**FLAGS, "train_data_dir": str(data_dir), "output_dir": str(out), **overrides}


def _train(data_dir: Path, out: Path, **overrides) -> dict[str, torch.Tensor]:
    done = trainer.train(TrainConfig.from_flat_dict(_flags(data_dir, out, **overrides)))
    return load_file(done / DIFFUSERS_WEIGHT_NAME)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sigkill_after_a_checkpoint_then_resume_gives_the_uninterrupted_lora(data_dir, tmp_path, accumulation):
    # Killed after the checkpoint at micro-batch 8: inside the second epoch, so the resume must restore that
    # epoch's shuffle, not replay the first one's.
    every = 8 // accumulation
    flags = dict(gradient_accumulation_steps=accumulation, checkpointing_steps=every)
    whole = _train(data_dir, tmp_path / "whole", **flags)
    out = tmp_path / "killed"
    argv = [sys.executable, str(ROOT / "train_lcm_lora.py"), *cli_args(_flags(data_dir, out, **flags))]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / f"checkpoint-{every}").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # wherever it is now: a step or two later
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / DIFFUSERS_WEIGHT_NAME).exists()
    resumed = _train(data_dir, out, **flags, resume_from_checkpoint="latest")
    # CPU kernels are deterministic, every random draw is restored or keyed: measured bit-identical.
    assert _same(whole, resumed)


def test_a_save_cut_off_midway_leaves_the_previous_checkpoint_latest(data_dir, tmp_path, monkeypatch):
    # --checkpoints_total_limit 1: the old checkpoint must outlive the cut-off save of the new one.
    limit = dict(max_train_steps=6, checkpointing_steps=3, ema_decay=0.9, checkpoints_total_limit=1)
    whole = _train(data_dir, tmp_path / "whole", **limit)
    real_save = trainer.Accelerator.save_state

    def dies_midway(self, output_dir=None, **kwargs):
        real_save(self, output_dir, **kwargs)
        if Path(output_dir).name.startswith("checkpoint-6"):
            next(Path(output_dir).glob("*.safetensors")).unlink()  # half written, then the machine goes away
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Accelerator, "save_state", dies_midway)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _train(data_dir, out, **limit)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3"]
    assert find_checkpoint(out, "latest") == out / "checkpoint-3"
    monkeypatch.setattr(trainer.Accelerator, "save_state", real_save)
    resumed = _train(data_dir, out, **limit, resume_from_checkpoint="latest")
    assert _same(whole, resumed)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-6"]


def test_the_checkpoint_limit_keeps_the_newest(data_dir, tmp_path):
    _train(data_dir, tmp_path, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
