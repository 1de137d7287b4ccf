"""The safetensors edge: every LoRA and single-file read or write of the package goes through here."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class UnreadableFileError(ValueError):
    """A file that is not a readable safetensors file: the message names it."""


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError for a bad header
        raise UnreadableFileError(f"{path}: not a readable .safetensors file ({err}).") from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    meta = read_metadata(path)
    return load_file(str(path)), meta


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str]) -> Path:
    """Write to a temporary name and rename, so a kill mid-write never leaves a half file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
    return path
