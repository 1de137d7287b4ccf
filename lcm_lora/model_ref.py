"""What a model reference names, found once before any weight loads: a bundled tiny model, a local diffusers folder,
a single-file checkpoint (with the folder of its configs) or a Hugging Face Hub id (with its configs fetched or
found in the local cache). Every command resolves its models here; a reference that names nothing usable is one
ConfigError that says what was tried and what to do.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .world import assets

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# What diffusers reads of a pipeline before its weights: model_index.json, component configs and tokenizer files.
CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ModelRef:
    """`name` as given; `kind` bundled, folder, file or hub; `location` the local path or the hub id that loaders
    read; `configs` a local folder with model_index.json and each component's config (for a single file, its
    --single_file_config folder)."""

    name: str
    kind: str
    location: str
    configs: str

    @property
    def single_file(self) -> bool:
        return is_single_file(self.location)


def is_single_file(source: str | Path) -> bool:
    """A community checkpoint: one file in the original SD key layout rather than a diffusers folder."""
    return Path(str(source)).suffix in SINGLE_FILE_SUFFIXES


def looks_like_hub_id(name: str) -> bool:
    """owner/name, as every Stable Diffusion repo on the Hub is named; never a file name, a path that exists or one
    in a local folder that exists (out/run is a path when ./out is a folder)."""
    return (bool(HUB_ID.fullmatch(name)) and not is_single_file(name) and not Path(name).exists()
            and not Path(name.split("/")[0]).is_dir())


def resolve_model(name: str, single_file_config: str | None = None, revision: str | None = None,
                  flag: str = "--pretrained_teacher_model") -> ModelRef:
    """The ModelRef of `name`, or a ConfigError naming `flag`. A hub id is tried only when it looks like one; its
    configs come from the local cache first, then from the Hub (config files only, a few kB), once per process."""
    if name in assets.BUNDLED_FILES:
        path = assets.resolve(name)
        return _local(name, path, single_file_config, flag, kind="bundled")
    path = Path(name).expanduser()
    if path.exists():
        return _local(name, path, single_file_config, flag, kind="folder" if path.is_dir() else "file")
    if looks_like_hub_id(name):
        return ModelRef(name, "hub", name, str(hub_configs(name, revision, flag)))
    raise ConfigError(f"{flag} {name}: {_what_is_missing(name)}{did_you_mean(name)}")


def _local(name: str, path: Path, single_file_config: str | None, flag: str, kind: str) -> ModelRef:
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ConfigError(f"{flag} {name}: a folder, but not a diffusers pipeline (no model_index.json); give the "
                              "folder that save_pretrained wrote, or a single-file checkpoint.")
        return ModelRef(name, kind, str(path), str(path))
    if not is_single_file(path):
        raise ConfigError(f"{flag} {name}: a file, but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); give a "
                          "diffusers pipeline folder or a single-file checkpoint.")
    from .single_file import config_folder

    try:
        configs = config_folder(single_file_config, path)
    except ConfigError as err:
        raise ConfigError(f"{flag} {name}: {err}") from None
    return ModelRef(name, kind, str(path), str(configs))


@functools.lru_cache(maxsize=32)
def hub_configs(repo_id: str, revision: str | None, flag: str) -> Path:
    """The local folder of a hub repo's config files: the cache's copy, else fetched (configs only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=CONFIG_PATTERNS))
    except (OSError, ValueError):
        pass  # not in the cache
    if hub_offline():
        raise ConfigError(f"{flag} {repo_id}: no local folder of that name, and as a hub id it is not in the local "
                          "Hugging Face cache while HF_HUB_OFFLINE is set: download it once online, or give a local "
                          "folder or file.")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CONFIG_PATTERNS))
    except GatedRepoError:
        raise ConfigError(f"{flag} {repo_id}: a gated repo on the Hub: accept its license on huggingface.co and log "
                          "in (`hf auth login`), or give a local folder.") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{flag} {repo_id}: no such model on the Hugging Face Hub (or it is private: log in "
                          f"with `hf auth login`).{did_you_mean(repo_id)}") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{flag} {repo_id}: no revision {revision!r} on the Hub.") from None
    except Exception as err:  # huggingface_hub wraps a failed connection in LocalEntryNotFoundError
        cause = err.__cause__ or err.__context__ or err
        reason = " ".join(str(cause).split())[:200]
        raise ConfigError(f"{flag} {repo_id}: cannot reach the Hugging Face Hub ({type(cause).__name__}: {reason}) "
                          "and the model is not in the local cache: connect to the internet, or give a local folder "
                          "or file.") from None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it: 1, true, yes or on."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _what_is_missing(name: str) -> str:
    if is_single_file(name) or name.startswith((".", "/", "~")) or "/" in name or os.sep in name:
        return "no such file or folder."
    return (f"not a bundled model ({', '.join(assets.BUNDLED_FILES)}), an existing folder or file, or a hub id "
            "(owner/name).")


def did_you_mean(name: str) -> str:
    """' Did you mean X?' for a close bundled name or a close entry of the named parent folder, else ''."""
    path = Path(name).expanduser()
    candidates = list(assets.BUNDLED_FILES)
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    if parent.is_dir():
        candidates += [str(parent / p.name) if str(path.parent) not in ("", ".") else p.name
                       for p in parent.iterdir() if not p.name.startswith(".")]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    return f" Did you mean {close[0]}?" if close else ""
