"""A run's output folder to the Hugging Face Hub (--push_to_hub), as diffusers' training scripts do it
(examples/consistency_distillation/train_lcm_distill_lora_sdxl.py: `create_repo(..., exist_ok=True)` before training,
so a bad token or repo id stops the run at once, and `upload_folder` of the output folder after it).

What goes up: the LoRA files, the model card (README.md), the validation images and sheets, and the plots. What stays:
checkpoints (optimizer state, resumable only here), the tracker logs, metrics.jsonl and config.yaml (logs and the
config hold this machine's paths; the card carries the configuration with local paths cut to their last part), the
validation exports' own LoRA files and the teacher's kept samples, and the run's lock and temporary files.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .config import RunArgs
from .model_ref import hub_offline


class HubError(RuntimeError):
    """The Hub refused or could not be reached: the message says what was kept locally and what to do."""


def repo_name(run: RunArgs) -> str:
    """--hub_model_id, else the output folder's name (diffusers' default)."""
    return run.hub_model_id or Path(run.output_dir).resolve().name


def ignore_patterns(logging_dir: str) -> list[str]:
    """upload_folder's patterns of what stays local (fnmatch on paths relative to the folder; `*` crosses `/`)."""
    patterns = ["checkpoint-*", "config.yaml", "metrics.jsonl", ".*", "validation/*.safetensors"]  # .*: lock, temp files
    if not Path(logging_dir).is_absolute():  # an absolute --logging_dir lies outside the folder anyway
        patterns.append(f"{Path(logging_dir).as_posix().strip('/')}/*")
    return patterns


def hub_problems(run: RunArgs) -> list[str]:
    """What can be checked of --push_to_hub without the network: the repo id's form, that the Hub is not switched
    off (HF_HUB_OFFLINE) and that a token is saved. Whether the token may write to the repo is known only when the
    run starts and creates the repo."""
    if not run.push_to_hub:
        return []
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = repo_name(run)
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        flag = "--hub_model_id" if run.hub_model_id else "--push_to_hub: the repo named after --output_dir,"
        return [f"{flag} {name!r} is not a Hub repo id ({err}). Give --hub_model_id owner/name."]
    if hub_offline():
        return ["--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or drop --push_to_hub "
                "and upload the folder later with `hf upload`."]
    if get_token() is None:
        return ["--push_to_hub: not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN) first."]
    return []


def create_repo_id(name: str) -> str:
    """The full repo id (owner/name) of `name`, the repo created when missing."""
    from huggingface_hub import create_repo

    try:
        return create_repo(name, exist_ok=True).repo_id
    except Exception as err:  # HTTP, connection and validation errors alike: the message is what matters
        raise HubError(f"--push_to_hub: cannot create or open the Hub repo {name} ({_reason(err)}). Nothing was "
                       "trained: check `hf auth whoami` and --hub_model_id, or drop --push_to_hub.") from None


def upload(folder: str | Path, repo_id: str, logging_dir: str) -> str:
    """Upload `folder` (minus ignore_patterns) to `repo_id`; returns the repo's URL."""
    from huggingface_hub import upload_folder

    patterns = ignore_patterns(logging_dir)
    try:
        commit = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="End of training",
                               ignore_patterns=patterns)
    except Exception as err:
        excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in patterns)
        raise HubError(f"--push_to_hub: the upload to {repo_id} failed ({_reason(err)}). Every file is still in "
                       f"{folder}; upload it with: hf upload {repo_id} {shlex.quote(str(folder))} . {excludes}") from None
    return str(getattr(commit, "repo_url", f"https://huggingface.co/{repo_id}"))


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
