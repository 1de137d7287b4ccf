"""The safetensors edge: every LoRA and single-file read or write of the package goes through here."""

from __future__ import annotations

import os
from collections.abc import Iterable
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
    """Write to a temporary name and rename, so a kill mid-write never leaves a half file. The file gets the mode any
    new file gets under the user's umask (safetensors itself writes 0600), so other users can read it when the umask
    lets them."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        mode = new_file_mode(tmp)
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
    return path


def new_file_mode(path: Path) -> int:
    """The permission bits of a file created at `path` under the current umask (0o666 & ~umask), read by creating it:
    unlike os.umask, this never changes the process-wide umask under other threads."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path.stat().st_mode & 0o777


def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path | None], overwrite: bool) -> None:
    """Refuse, before anything is written, an output that is one of the command's inputs (always) or that already
    exists (unless `overwrite`). `inputs` are files or folders (a folder stands for every file under it); a file
    counts as the same when it is the same file on disk, so symlinks and hard links are caught too."""
    existing = [Path(out) for out in outputs if Path(out).exists()]
    if not existing:
        return
    input_files = {_identity(f): f for f in _files(inputs)}
    for out in existing:
        same = input_files.get(_identity(out))
        if same is not None:
            alias = "" if same.resolve() == out.resolve() else f" (as {same})"
            raise FileExistsError(f"{out} is an input of this command{alias}: inputs are never overwritten; "
                                  "write the output elsewhere.")
        if not overwrite:
            raise FileExistsError(f"{out} exists: pass --overwrite to replace it.")


def _files(paths: Iterable[str | Path | None]) -> list[Path]:
    files = []
    for path in (Path(p) for p in paths if p):  # None or "": no input
        if path.is_dir():
            files += [f for f in path.rglob("*") if f.is_file()]
        elif path.is_file():
            files.append(path)
    return files


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino
