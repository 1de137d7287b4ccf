"""Checkpoints that survive any kill: LoRA-only Accelerate state, written atomically, with the data position.

A checkpoint is `output_dir/checkpoint-N`: Accelerate's optimizer, LR schedule and RNG states, the LoRA (never
the frozen UNet) and every object registered for checkpointing (the EMA target, the data position). It is
written as `checkpoint-N.partial` and renamed when complete, so `latest` is always loadable.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from . import export
from .config import ConfigError, TrainConfig, to_yaml

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped before max_train_steps: preempted, or it could not go on. The message says what to do;
    `exit_code` is what the command exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def register_lora_checkpointing(accelerator: Accelerator) -> None:
    """Checkpoints hold the LoRA only (MBs), never the frozen UNet (GBs); Accelerate keeps the rest."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            tensors = export.peft_state_dict(accelerator.unwrap_model(models[0]))
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(output_dir) / export.LORA_CHECKPOINT_NAME))
        weights.clear()

    def load_hook(models, input_dir):
        model = accelerator.unwrap_model(models.pop())
        result = set_peft_model_state_dict(model, load_file(str(Path(input_dir) / export.LORA_CHECKPOINT_NAME)))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{input_dir}: unexpected LoRA keys {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: Path) -> int | None:
    """N of a `checkpoint-N` folder; None for anything else (a cut-off `checkpoint-N.partial`)."""
    match = CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None),
                  key=checkpoint_step)


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"--resume_from_checkpoint {resume}: no such folder.")
        if checkpoint_step(path) is None:  # the step trained so far is read from the name
            raise ConfigError(f"--resume_from_checkpoint {resume}: not a checkpoint-N folder of a training run.")
        return path
    found = checkpoints(out)
    return found[-1] if found else None


def output_dir_problems(config: TrainConfig) -> list[str]:
    """A new run must not mix its checkpoints into another run's folder: refuse unless resuming."""
    out, resuming = Path(config.run.output_dir), config.run.resume_from_checkpoint is not None
    saved = out / "config.yaml"
    if resuming or not saved.is_file():
        return []
    before, now = yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(to_yaml(config))
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if not differ:
        return []
    return [f"--output_dir {out} holds a run with another configuration (differs in {', '.join(differ)}). "
            "Add --resume_from_checkpoint latest to continue it, or choose another --output_dir."]


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, limit: int | None, need_bytes: int = 0) -> Path:
    """Accelerate's state saving into `checkpoint-N.partial`, renamed when every process has written its
    part: a kill at any moment leaves the previous checkpoint as the latest complete one. Old checkpoints
    beyond `limit` are removed only after the new one is complete. Too little free disk, or a failed write,
    stops the run with the previous checkpoint intact."""
    final, partial = out / f"checkpoint-{step}", out / f"checkpoint-{step}.partial"
    previous = checkpoints(out)
    intact = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        need = need_bytes
        if previous:  # the last checkpoint's real size, when it is larger than the estimate
            need = max(need, sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file()))
        free = shutil.disk_usage(out).free
        if free < 2 * need:  # twice: the new checkpoint exists next to the old one until the rename
            raise TrainingStopped(f"--output_dir {out}: {free / 2**20:.0f} MiB free, too little for checkpoint-{step} "
                                  f"(about {need / 2**20:.1f} MiB, twice that kept free); {intact}. Free some space "
                                  "and resume with --resume_from_checkpoint latest.")
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise TrainingStopped(f"saving checkpoint-{step} failed ({err}); {intact}. Fix the cause and resume with "
                              "--resume_from_checkpoint latest.") from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a resumed run)
        partial.rename(final)
        for old in checkpoints(out)[: -limit] if limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


class DataPosition:
    """Where this process's data stands: the epoch, the batches of it used so far, and the shuffle generator's
    state at the epoch's start. Checkpointed with the run (every process's: shard streams reach epoch ends at
    different steps), so a resume draws the same batches as a run that never stopped."""

    def __init__(self) -> None:
        self.epoch, self.batches, self.shuffle_state = 0, 0, None

    def state_dict(self) -> dict:  # Accelerate calls it on every process and writes the main one's
        return {"processes": gather_object([(self.epoch, self.batches, self.shuffle_state)])}

    def load_state_dict(self, state: dict) -> None:
        state_, processes = PartialState(), state["processes"]
        if len(processes) != state_.num_processes:
            logger.warning("the checkpoint was written by %d processes, this run has %d: every process resumes "
                           "at the data position of the first", len(processes), state_.num_processes)
        mine = processes[state_.process_index if len(processes) == state_.num_processes else 0]
        self.epoch, self.batches, self.shuffle_state = mine

    def start_epoch(self, dataloader, stream: bool) -> None:
        """Tell the loader its epoch; for a shuffled loader, put its generator where this epoch began."""
        if stream:
            dataloader.dataset.set_epoch(self.epoch)
            return
        dataloader.set_epoch(self.epoch)
        if self.shuffle_state is not None:
            dataloader.generator.set_state(self.shuffle_state)
        self.shuffle_state = dataloader.generator.get_state()

    def end_epoch(self, dataloader, stream: bool) -> None:
        self.epoch, self.batches = self.epoch + 1, 0
        self.shuffle_state = None if stream else dataloader.generator.get_state()
