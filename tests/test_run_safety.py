"""Nothing trained is lost and nothing a run did not create is replaced: output folders are claimed, resumes
are checked against the checkpoint, damaged checkpoints are refused, signals to a whole process group
checkpoint, and a cache never deletes the folder it is pointed at."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lcm_lora import caching, trainer
from lcm_lora.checkpoint import RECORD, checkpoint_step, checkpoints, damage, read_record
from lcm_lora.config import ConfigError, TrainConfig
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME
from lcm_lora.run_dir import LOCK_NAME, OutputLock
from lcm_lora.safetensors_io import read_metadata
from lcm_lora.world.dataset import write_imagefolder
from tiny_run import ROOT, TrainingProcess, cli_args, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("world"), 16)


def refuse_weights(monkeypatch) -> None:
    """From here on, loading weights fails the test: what is checked must be checked before any weight loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(trainer, "load_teacher", refuse)
    monkeypatch.setattr(caching, "load_teacher", refuse)


def _config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    return tiny_config(data_dir, out, **{"checkpointing_steps": 2, **overrides})


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its modification time and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _argv(config: TrainConfig, **overrides) -> list[str]:
    return [sys.executable, str(ROOT / "train_lcm_lora.py"), *cli_args({**config.to_flat_dict(), **overrides})]


# -- resuming -----------------------------------------------------------------------------------------------

def test_resuming_a_finished_run_is_a_no_op_that_says_so(data_dir, tmp_path, monkeypatch, capsys):
    out = trainer.train(_config(data_dir, tmp_path))
    before = _snapshot(out)
    refuse_weights(monkeypatch)
    assert trainer.train(_config(data_dir, tmp_path, resume_from_checkpoint="latest")) == out
    assert "holds the finished run (checkpoint-2, --max_train_steps 2, LoRA exported): nothing to do" in \
        capsys.readouterr().out
    assert _snapshot(out) == before  # not one file touched


def test_a_finished_run_can_be_extended_by_raising_max_train_steps(data_dir, tmp_path):
    trainer.train(_config(data_dir, tmp_path))
    out = trainer.train(_config(data_dir, tmp_path, max_train_steps=3, resume_from_checkpoint="latest"))
    assert [checkpoint_step(c) for c in checkpoints(out)] == [2]  # checkpointing every 2: none at 3
    whole = load_file(trainer.train(_config(data_dir, tmp_path / "whole", max_train_steps=3)) / DIFFUSERS_WEIGHT_NAME)
    extended = load_file(out / DIFFUSERS_WEIGHT_NAME)
    assert all(torch.equal(whole[k], extended[k]) for k in whole)


@pytest.mark.parametrize("change", [{}, {"pretrained_teacher_model": "teacher-vpred"}, {"lora_rank": 8}])
def test_latest_with_nothing_to_resume_never_replaces_a_finished_run(data_dir, tmp_path, monkeypatch, change):
    out = trainer.train(_config(data_dir, tmp_path, checkpointing_steps=0))
    assert (out / DIFFUSERS_WEIGHT_NAME).is_file() and not checkpoints(out)
    before = _snapshot(out)
    refuse_weights(monkeypatch)
    with pytest.raises(ConfigError, match=r"--resume_from_checkpoint latest: .* has no checkpoint to resume but "
                                          r"holds .*pytorch_lora_weights\.safetensors.*--overwrite"):
        trainer.train(_config(data_dir, out, checkpointing_steps=0, resume_from_checkpoint="latest", **change))
    assert _snapshot(out) == before


def test_a_resume_with_another_config_is_refused_by_field_unless_allowed(data_dir, tmp_path, monkeypatch):
    trainer.train(_config(data_dir, tmp_path))
    saved_config = (tmp_path / "config.yaml").read_text()
    changed = dict(max_train_steps=4, lora_alpha=16.0, w_min=3.0, resume_from_checkpoint="latest")
    refuse_weights(monkeypatch)
    with pytest.raises(ConfigError, match=r"checkpoint-2 was trained with another configuration: lora_alpha: 8\.0 -> "
                                          r"16\.0; w_min: 5\.0 -> 3\.0\. .*--allow_config_change"):
        trainer.train(_config(data_dir, tmp_path, **changed))
    assert (tmp_path / "config.yaml").read_text() == saved_config
    monkeypatch.undo()
    out = trainer.train(_config(data_dir, tmp_path, **changed, allow_config_change=True))
    record = read_record(out / "checkpoint-4")
    assert record["config_changes"] == ["step 2: lora_alpha: 8.0 -> 16.0", "step 2: w_min: 5.0 -> 3.0"]
    assert record["config"]["lora_alpha"] == 16.0
    assert json.loads(read_metadata(out / DIFFUSERS_WEIGHT_NAME)["lcm_lora.config_changes"]) == record["config_changes"]


def test_a_damaged_checkpoint_is_refused_and_the_previous_intact_one_named(data_dir, tmp_path, monkeypatch):
    trainer.train(_config(data_dir, tmp_path, max_train_steps=4))
    assert damage(tmp_path / "checkpoint-4") is None and RECORD in os.listdir(tmp_path / "checkpoint-4")
    states = next((tmp_path / "checkpoint-4").glob("random_states_*.pkl"))
    states.write_bytes(states.read_bytes()[:-7] + b"garbage")  # Accelerate would skip it with a warning
    refuse_weights(monkeypatch)
    with pytest.raises(ConfigError, match=rf"checkpoint-4 is damaged: {states.name} does not match the checksum it "
                                          r"was saved with\. The newest intact one is .*checkpoint-2: resume with "
                                          r"--resume_from_checkpoint .*checkpoint-2\."):
        trainer.train(_config(data_dir, tmp_path, max_train_steps=6, resume_from_checkpoint="latest"))


# -- one run per folder -------------------------------------------------------------------------------------

def test_a_second_run_on_a_busy_output_dir_is_refused_naming_the_first(data_dir, tmp_path):
    config = _config(data_dir, tmp_path, max_train_steps=200, checkpointing_steps=200)
    first = TrainingProcess(_argv(config))
    try:
        first.wait_for_step(200)
        with pytest.raises(ConfigError, match=rf"--output_dir {tmp_path} is in use by another run \(pid "
                                              rf"{first.process.pid} on host {os.uname().nodename}, since "):
            trainer.train(_config(data_dir, tmp_path, max_train_steps=200, checkpointing_steps=200))
    finally:
        first.process.send_signal(signal.SIGTERM)
        assert first.finish() == 128 + signal.SIGTERM, first.log[-2000:]
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end


def test_a_lock_left_by_a_killed_run_does_not_block_the_next():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / LOCK_NAME).write_text('{"pid": 1, "host": "gone", "since": "then"}')  # held by no one
        with OutputLock(folder):
            assert OutputLock(folder).held_elsewhere()
        assert not OutputLock(folder).held_elsewhere()


def test_a_new_run_never_replaces_another_without_overwrite(data_dir, tmp_path):
    trainer.train(_config(data_dir, tmp_path, max_train_steps=4))
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"holds a run with this configuration \(checkpoint-2, checkpoint-4, "
                                          r"pytorch_lora_weights\.safetensors, .*add --overwrite to replace it"):
        trainer.train(_config(data_dir, tmp_path, max_train_steps=4))
    assert _snapshot(tmp_path) == before
    out = trainer.train(_config(data_dir, tmp_path, max_train_steps=2, overwrite=True))
    assert [c.name for c in checkpoints(out)] == ["checkpoint-2"]  # the earlier run's checkpoint-4 is gone
    assert _snapshot(out)[DIFFUSERS_WEIGHT_NAME] != before[DIFFUSERS_WEIGHT_NAME]


# -- signals to the whole process group ---------------------------------------------------------------------

def test_sigterm_to_the_process_group_with_workers_checkpoints_and_resumes(data_dir, tmp_path):
    """What Slurm preemption, systemd and `kill -TERM -PGID` do: every process, data-loader workers included,
    gets the signal. The workers ignore it; the main process finishes the step, checkpoints and exits 143."""
    steps = 40
    config = _config(data_dir, tmp_path / "whole", max_train_steps=steps, checkpointing_steps=steps,
                     dataloader_num_workers=2)
    whole = load_file(trainer.train(config) / DIFFUSERS_WEIGHT_NAME)
    out = tmp_path / "stopped"
    run = TrainingProcess(_argv(config, output_dir=str(out)), session=True)
    run.wait_for_step(steps)
    os.killpg(run.process.pid, signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.log[-3000:]
    assert "killed by signal" not in run.log
    [stopped] = checkpoints(out)
    assert f"stopped by SIGTERM after step {checkpoint_step(stopped)}" in run.log and damage(stopped) is None
    assert not list(out.glob("*.partial"))
    resumed = trainer.train(TrainConfig.from_flat_dict({**config.to_flat_dict(), "output_dir": str(out),
                                                       "resume_from_checkpoint": "latest"}))
    final = load_file(resumed / DIFFUSERS_WEIGHT_NAME)
    assert all(torch.equal(whole[k], final[k]) for k in whole)


# -- caches -------------------------------------------------------------------------------------------------

def _cache_config(data_dir: Path, **overrides) -> TrainConfig:
    return tiny_config(data_dir, data_dir.parent / "unused", **overrides)


def test_a_cache_pointed_at_the_data_folder_refuses_and_deletes_nothing(data_dir, monkeypatch):
    before = _snapshot(data_dir)
    refuse_weights(monkeypatch)
    with pytest.raises(FileExistsError, match=rf"--encodings_dir {data_dir} holds files that are not a cache .*Nothing "
                                              "was changed"):
        caching.write_cache(_cache_config(data_dir), data_dir)
    assert _snapshot(data_dir) == before


def test_a_partial_folder_the_cache_did_not_write_is_refused(data_dir, tmp_path, monkeypatch):
    refuse_weights(monkeypatch)
    mine = tmp_path / "cache.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"cache\.partial exists and was not written by `lcm-lora cache`"):
        caching.write_cache(_cache_config(data_dir), tmp_path / "cache")
    assert (mine / "notes.txt").read_text() == "my notes"


def test_an_existing_cache_is_replaced_only_with_overwrite(data_dir, tmp_path):
    cache = tmp_path / "cache"
    caching.write_cache(_cache_config(data_dir), cache)
    stale = tmp_path / "cache.partial"  # what a cache killed midway leaves
    stale.mkdir()
    (stale / LOCK_NAME).write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a cache; .*--overwrite"):
        caching.write_cache(_cache_config(data_dir), cache)
    manifest = caching.write_cache(_cache_config(data_dir, overwrite=True), cache)
    assert manifest["num_samples"] == 16 and not stale.exists() and not (cache / LOCK_NAME).exists()
