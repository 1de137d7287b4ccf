"""Cached encodings: VAE latent distributions and text embeddings in safetensors shards + a manifest.

    encodings_dir/manifest.json          teacher fingerprint, resolution, preprocessing, shards, skipped samples
    encodings_dir/empty.safetensors      the empty prompt's embedding (for CFG's unconditional branch)
    encodings_dir/shard-00000.safetensors
        latent_parameters [n, 2C, h, w]  the VAE posterior's (mean, logvar), as diffusers' latent_dist.parameters
        text_embeds [m, L, D]            every caption of every sample, in order
        pooled_embeds [m, P]             SDXL only: each caption's pooled embedding (the second text encoder's)
        caption_offsets [n + 1]          sample i's captions are text_embeds[offsets[i]:offsets[i + 1]]
        original_size, crop_top_left [n, 2]

Training draws x0 ~ N(mean, std) each step from the stored distribution with the same call diffusers'
`latent_dist.sample()` makes, and picks captions with the same random calls as the image loader, so a
cached run matches an uncached one with the same seed. Writing the cache lives in `lcm_lora.caching`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import DataArgs
from .loader import pick_caption, sample_rng, shuffled_loader
from .sources import DataError

FORMAT = "lcm-lora-cache/1"
MANIFEST = "manifest.json"
EMPTY = "empty.safetensors"
STORED_NAMES = {"context": "text_embeds", "pooled": "pooled_embeds"}  # conditioning key -> per-caption tensor
EMPTY_NAMES = {"text_embeds": "empty_embed", "pooled_embeds": "empty_pooled"}  # the empty prompt's, in EMPTY
BATCH_NAMES = {"text_embeds": "encoder_hidden_states", "pooled_embeds": "pooled_embeds"}


def read_manifest(encodings_dir: str | Path, fingerprint: dict, resolution: int) -> dict:
    """The manifest, after refusing a cache written for another teacher or resolution."""
    path = Path(encodings_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"--encodings_dir {encodings_dir}: no {MANIFEST}. Write a cache with `lcm-lora cache`.")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"--encodings_dir {encodings_dir}: format {manifest.get('format')!r}, this version reads {FORMAT!r}. "
                        "Write the cache again with `lcm-lora cache`.")
    written_for = {"family": "sd", "vae": None, **manifest["teacher"]}  # caches older than those keys: SD, own VAE
    for key, value in fingerprint.items():
        if written_for.get(key) != value:
            raise DataError(f"--encodings_dir {encodings_dir} was written for another teacher ({key}: "
                            f"{written_for.get(key)!r}, this run: {value!r}). Write a cache for this "
                            "teacher with `lcm-lora cache`, or train with the cache's teacher.")
    if manifest["resolution"] != resolution:
        raise DataError(f"--encodings_dir {encodings_dir} holds --resolution {manifest['resolution']}, this run asks for "
                        f"{resolution}. Write a cache at {resolution} or train at {manifest['resolution']}.")
    return manifest


class CachedEncodings(torch.utils.data.Dataset):
    """Sample i -> (latent parameters, caption embeddings, geometry), read lazily from the shards."""

    def __init__(self, encodings_dir: str | Path, manifest: dict) -> None:
        self.dir, self.shards = Path(encodings_dir), [s["file"] for s in manifest["shards"]]
        sizes = torch.tensor([s["num_samples"] for s in manifest["shards"]])
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        self.handles: dict[int, object] = {}  # opened per worker process

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int):
        if k not in self.handles:
            self.handles[k] = safe_open(str(self.dir / self.shards[k]), framework="pt")
        return self.handles[k]

    def __getitem__(self, index: int) -> dict:
        k = int(torch.searchsorted(self.starts, torch.tensor(index), right=True)) - 1
        f, i = self._shard(k), index - int(self.starts[k])
        begin, end = f.get_slice("caption_offsets")[i : i + 2].tolist()
        return {
            "latent_parameters": f.get_slice("latent_parameters")[i],
            **{key: f.get_slice(key)[begin:end] for key in EMPTY_NAMES if key in f.keys()},
            "original_size": f.get_slice("original_size")[i],
            "crop_top_left": f.get_slice("crop_top_left")[i],
        }

    def __getstate__(self) -> dict:  # file handles do not pickle into workers; reopen there
        return {**self.__dict__, "handles": {}}


class CachedCollate:
    def __init__(self, empty: dict[str, torch.Tensor], proportion_empty: float, seed: int) -> None:
        """`empty`: the empty prompt's encodings by stored name (text_embeds, for SDXL also pooled_embeds)."""
        self.empty, self.proportion_empty, self.seed = empty, proportion_empty, seed

    def __call__(self, items: list[tuple[int, int, dict]]) -> dict:
        samples, chosen = [s for _, _, s in items], []
        for epoch, index, s in items:  # the image loader's draws for the same sample: the same caption
            choice = pick_caption(list(range(len(s["text_embeds"]))), self.proportion_empty,
                                  sample_rng(self.seed, epoch, index))
            chosen.append({key: empty if choice == "" else s[key][choice] for key, empty in self.empty.items()})
        return {
            "latent_parameters": torch.stack([s["latent_parameters"] for s in samples]),
            **{BATCH_NAMES[key]: torch.stack([c[key] for c in chosen]) for key in self.empty},
            "original_size": torch.stack([s["original_size"] for s in samples]),
            "crop_top_left": torch.stack([s["crop_top_left"] for s in samples]),
            "skipped": [],
        }


def make_cached_dataloader(args: DataArgs, manifest: dict, batch_size: int, seed: int):
    """(data loader, the empty prompt's conditioning {"context": [1, L, D]}) over a cache; shuffled like the image
    loader."""
    stored = load_file(str(Path(args.encodings_dir) / EMPTY))
    empty = {key: stored[EMPTY_NAMES[key]] for key in EMPTY_NAMES if EMPTY_NAMES[key] in stored}  # by stored name
    loader = shuffled_loader(CachedEncodings(args.encodings_dir, manifest),
                             CachedCollate({k: v[0] for k, v in empty.items()}, args.proportion_empty_prompts, seed),
                             args, batch_size, seed)
    return loader, {key: empty[name] for key, name in STORED_NAMES.items() if name in empty}


def sample_latents(parameters: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """x0 = scaled sample of the stored posterior: the call `vae.encode(x).latent_dist.sample()` makes."""
    return DiagonalGaussianDistribution(parameters.float()).sample() * scaling_factor
