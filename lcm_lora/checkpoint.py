"""Checkpoints that survive any kill: LoRA-only Accelerate state, written atomically, with the data position.

A checkpoint is `output_dir/checkpoint-N`: Accelerate's optimizer, LR schedule and RNG states, the LoRA (never
the frozen UNet) and every object registered for checkpointing (the EMA target, the data position). It is
written as `checkpoint-N.partial` and renamed when complete, so `latest` is always loadable, and it records the
sha256 of every file, so a damaged one is refused on resume instead of half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from . import export
from .config import ConfigError
from .safetensors_io import save_safetensors_atomic

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
            save_safetensors_atomic({k: v.contiguous() for k, v in tensors.items()},
                                    Path(output_dir) / export.LORA_CHECKPOINT_NAME, {})
        weights.clear()

    def load_hook(models, input_dir):
        model = accelerator.unwrap_model(models.pop())
        result = set_peft_model_state_dict(model, load_file(str(Path(input_dir) / export.LORA_CHECKPOINT_NAME)))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{input_dir}: unexpected LoRA keys {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


CHECKPOINT = re.compile(r"checkpoint-(\d+)")
RECORD = "lcm_lora_checkpoint.json"  # the step, the run's config and its recorded changes, every file's sha256


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


def read_record(checkpoint: Path) -> dict:
    """The checkpoint's record; {} for a checkpoint written before records existed (no config, no checksums)."""
    path = checkpoint / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's files against the checksums it was saved with; None when intact."""
    try:
        record = read_record(checkpoint)
    except (OSError, ValueError) as err:
        return f"{RECORD} is unreadable ({err})"
    for name, digest in record.get("sha256", {}).items():
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match the checksum it was saved with"
    return None


def check_intact(checkpoint: Path) -> None:
    """Refuse a damaged checkpoint before Accelerate reads it (a corrupt RNG file it would skip with a warning,
    and the resume would no longer be exact), naming the newest intact one before it."""
    problem = damage(checkpoint)
    if problem is None:
        return
    earlier = [c for c in checkpoints(checkpoint.parent) if checkpoint_step(c) < checkpoint_step(checkpoint)]
    good = next((c for c in reversed(earlier) if damage(c) is None), None)
    offer = (f"The newest intact one is {good}: resume with --resume_from_checkpoint {good}." if good else
             "No intact checkpoint precedes it.")
    raise ConfigError(f"{checkpoint} is damaged: {problem}. {offer}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def disk_report(folder: Path) -> str:
    """'the disk of FOLDER (mounted at M) has N MiB free': what a user needs to free space in the right place."""
    mount = folder.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    return f"the disk of {folder} (mounted at {mount}) has {shutil.disk_usage(folder).free / 2**20:.1f} MiB free"


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, limit: int | None, need_bytes: int = 0,
                    record: dict | None = None) -> Path:
    """Accelerate's state saving into `checkpoint-N.partial`, renamed when every process has written its
    part and the record (`record` plus the sha256 of every file) is written: a kill at any moment leaves the
    previous checkpoint as the latest complete one. Old checkpoints beyond `limit` are removed only after the
    new one is complete. Too little free disk, or any failed write, stops the run with the previous checkpoint
    intact and the partial one removed."""
    final, partial = out / f"checkpoint-{step}", out / f"checkpoint-{step}.partial"
    previous = checkpoints(out)
    intact = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        need = need_bytes
        if previous:  # the last checkpoint's real size, when it is larger than the estimate
            need = max(need, sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file()))
        if shutil.disk_usage(out).free < 2 * need:  # twice: the new checkpoint exists next to the old one until the rename
            raise TrainingStopped(f"--output_dir {out}: {disk_report(out)}, too little for checkpoint-{step} (about "
                                  f"{need / 2**20:.1f} MiB, twice that kept free); {intact}. Free some space and "
                                  "resume with --resume_from_checkpoint latest.")
    accelerator.wait_for_everyone()
    problem = _first_error(accelerator, _attempt(lambda: accelerator.save_state(str(partial))))
    if problem is None:  # every process's files exist now: the main one records their checksums
        write_record = lambda: _write_record(partial, {"step": step, **(record or {})})  # noqa: E731
        problem = _first_error(accelerator, _attempt(write_record) if accelerator.is_main_process else None)
    if problem is not None:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise TrainingStopped(f"saving checkpoint-{step} failed ({problem}); {disk_report(out)}; {intact}. Fix the "
                              "cause and resume with --resume_from_checkpoint latest.")
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a resumed run)
        partial.rename(final)
        for old in checkpoints(out)[: -limit] if limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _attempt(write) -> Exception | None:
    """The exception a write raised, or None. A full disk surfaces as OSError, as RuntimeError from torch.save
    and as SafetensorError, so every Exception counts."""
    try:
        write()
    except Exception as err:
        return err
    return None


def _first_error(accelerator: Accelerator, error: Exception | None) -> str | None:
    """The first process's error as 'Type: message', the same on every process (a collective: all call it)."""
    errors = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
    return next((e for e in errors if e), None)


def _write_record(folder: Path, record: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    record = {**record, "sha256": {p.relative_to(folder).as_posix(): _sha256(p) for p in files}}
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")


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
