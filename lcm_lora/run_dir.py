"""An output folder belongs to one run: claimed with a lock, never replaced without --overwrite, and resumed only
with the configuration its checkpoints were trained with.

A run's folder holds `config.yaml`, `checkpoint-N` folders, `validation/`, `metrics.jsonl`, `plots/`, the exported
LoRA files and their model card, README.md.
`plan_run` reads it before any weight loads and decides what a `train` command does there: start a new run,
resume one, or nothing at all, because the run is finished.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpoint import check_intact, checkpoint_step, checkpoints, find_checkpoint, read_record
from .config import ConfigError, TrainConfig
from .export import DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME
from .model_card import CARD_NAME, is_own_card
from .run_log import LOG_NAME, PLOTS_DIR
from .safetensors_io import read_metadata

LOCK_NAME = ".lcm-lora.lock"
# Flags that change how a run is watched, saved, published or sped up, never what it computes: a resume may change
# them.
# --max_train_steps is among them so that a finished run can be extended.
NEUTRAL_FLAGS = frozenset({
    "output_dir", "resume_from_checkpoint", "allow_config_change", "overwrite", "max_train_steps",
    "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "validation_prompts",
    "validation_inference_steps", "validation_teacher_steps", "export_formats", "export_dtype", "output_name",
    "report_to", "logging_dir",
    "dataloader_num_workers", "max_consecutive_nonfinite_steps", "max_bad_samples_fraction",
    "gradient_checkpointing", "enable_xformers_memory_efficient_attention", "allow_tf32", "torch_compile",
    "allow_pickle_weights",
    "license", "push_to_hub", "hub_model_id",
})


class OutputLock:
    """An exclusive claim on a folder for one process's lifetime: `flock` on `.lcm-lora.lock`, which holds the
    owner's pid, host and start time for the message a second claimant gets. The kernel drops the lock when the
    owner dies, however it dies, so a stale file never blocks a later run."""

    def __init__(self, folder: str | Path, flag: str = "--output_dir") -> None:
        self.folder, self.flag, self.fd = Path(folder), flag, None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> "OutputLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(self.in_use_message()) from None
        os.ftruncate(fd, 0)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(owner).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def held_elsewhere(self) -> bool:
        """True when another process holds the claim (checked without taking it)."""
        if not self.path.is_file():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # drops the shared lock taken by the check

    def in_use_message(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
            who = f"pid {owner['pid']} on host {owner['host']}, since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process that did not say which"
        return (f"{self.flag} {self.folder} is in use by another run ({who}). Wait for it to end, stop it, or "
                f"choose another {self.flag}.")


@dataclass
class RunPlan:
    """What `train` does in its output folder: resume from `checkpoint` (None: a new run), or nothing when
    `finished`; `config_changes` are the deliberate changes so far, recorded in checkpoints and the LoRA."""

    checkpoint: Path | None = None
    finished: bool = False
    config_changes: list[str] = field(default_factory=list)
    replace: list[Path] = field(default_factory=list)  # with --overwrite: the earlier run's files, removed first


def plan_run(config: TrainConfig) -> RunPlan:
    """Check the output folder and the resume target against this run's config; ConfigError names what to do."""
    out = Path(config.run.output_dir)
    lock = OutputLock(out)
    if lock.held_elsewhere():
        raise ConfigError(lock.in_use_message())
    checkpoint = find_checkpoint(out, config.run.resume_from_checkpoint)
    plan = RunPlan() if checkpoint is None else _resume_plan(config, checkpoint)
    if checkpoint is None or checkpoint.parent.resolve() != out.resolve():
        plan.replace = _earlier_run(config, out)
    _check_card(config, out)
    return plan


def _check_card(config: TrainConfig, out: Path) -> None:
    """The run writes its model card to README.md: a README.md there that lcm-lora did not write is the user's,
    replaced only with --overwrite."""
    card = out / CARD_NAME
    if card.is_file() and not is_own_card(card) and not config.run.overwrite:
        how = ("move it elsewhere" if config.run.resume_from_checkpoint is not None else
               "move it elsewhere, or add --overwrite to replace it")
        raise ConfigError(f"--output_dir {out} holds a README.md that lcm-lora did not write, and the run writes its "
                          f"model card there: {how}.")


def _resume_plan(config: TrainConfig, checkpoint: Path) -> RunPlan:
    check_intact(checkpoint)
    step, record = checkpoint_step(checkpoint), read_record(checkpoint)
    if step > config.optim.max_train_steps:
        raise ConfigError(f"{checkpoint} is past --max_train_steps {config.optim.max_train_steps}: raise it to "
                          f"{step} or more to train on, or export this checkpoint with `lcm-lora export`.")
    before = record.get("config") or _saved_config(checkpoint.parent)
    changes = config_changes(before, config) if before is not None else []
    if changes and not config.run.allow_config_change:
        raise ConfigError(f"{checkpoint} was trained with another configuration: {'; '.join(changes)}. Resume with "
                          "its flags, or add --allow_config_change to go on with these (recorded in the LoRA's "
                          "metadata).")
    history = record.get("config_changes", []) + [f"step {step}: {c}" for c in changes]
    out = Path(config.run.output_dir)
    finished = (step == config.optim.max_train_steps and checkpoint.parent.resolve() == out.resolve()
                and _lora_steps(out) == step)
    return RunPlan(checkpoint, finished, history)


def config_changes(before: dict, config: TrainConfig) -> list[str]:
    """'flag: old -> new' for every flag outside NEUTRAL_FLAGS whose value differs."""
    now = config.to_flat_dict()
    before = {**TrainConfig().to_flat_dict(), **before}  # flags added since `before` was written: their defaults
    return [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in now
            if k not in NEUTRAL_FLAGS and _normal(before.get(k)) != _normal(now[k])]


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _saved_config(folder: Path) -> dict | None:
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def _lora_steps(folder: Path) -> int | None:
    """The steps_trained recorded in the folder's exported LoRA; None when there is none."""
    path = folder / DIFFUSERS_WEIGHT_NAME
    candidates = [path] if path.is_file() else [*sorted(folder.glob("*.safetensors")), folder / PEFT_WEIGHT_NAME]
    for candidate in candidates:
        try:
            return int(read_metadata(candidate)["lcm_lora.steps_trained"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def _earlier_run(config: TrainConfig, out: Path) -> list[Path]:
    """The files of another run in `out` that a new run would replace: refused, or with --overwrite returned to
    be removed. A folder holding only the same config.yaml (a run stopped before its first checkpoint) is free."""
    saved = _saved_config(out)
    found = checkpoints(out) + sorted(out.glob("checkpoint-*.partial")) + _lora_files(out, saved)
    now, before = _run_flags(config.to_flat_dict()), _run_flags(saved or {})
    differs = [k for k in now if before.get(k) != now[k]] if saved is not None else []
    if saved is not None and (found or differs):
        found.append(out / "config.yaml")
    if found:
        found += [p for p in (out / "validation", out / LOG_NAME, out / PLOTS_DIR) if p.exists()]
    if found and is_own_card(out / CARD_NAME):
        found.append(out / CARD_NAME)
    if not found or config.run.overwrite:
        return found
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    what = (f"another run (its config.yaml differs in {', '.join(differs)}: {names})" if differs else
            f"a run with this configuration ({names})")
    if config.run.resume_from_checkpoint == "latest":
        raise ConfigError(f"--resume_from_checkpoint latest: {out} has no checkpoint to resume but holds {what}. "
                          "Choose another --output_dir, or replace that run with --overwrite instead of resuming.")
    raise ConfigError(f"--output_dir {out} holds {what}. Resume it with --resume_from_checkpoint latest, choose "
                      "another --output_dir, or add --overwrite to replace it.")


def _run_flags(flat: dict) -> dict:
    """A config's flags, defaults filled in, without those that say how this command treats the folder."""
    flat = {**TrainConfig().to_flat_dict(), **flat}
    return {k: _normal(v) for k, v in flat.items() if k not in ("resume_from_checkpoint", "overwrite",
                                                                 "allow_config_change")}


def _lora_files(out: Path, saved: dict | None) -> list[Path]:
    names = {DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME, f"hub/{DIFFUSERS_WEIGHT_NAME}"}  # hub/: the former "hub" format
    if saved and saved.get("output_name"):
        names.add(f"{saved['output_name']}.safetensors")
    found = [out / n for n in sorted(names) if (out / n).is_file()]
    return found + [p for p in sorted(out.glob("*.safetensors")) if p not in found and _has_run_metadata(p)]


def _has_run_metadata(path: Path) -> bool:
    try:
        return "lcm_lora.steps_trained" in read_metadata(path)
    except (OSError, ValueError):
        return False


def remove_earlier_run(paths: list[Path]) -> None:
    """--overwrite: the earlier run's own files go before the new run writes any."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

