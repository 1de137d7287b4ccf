"""Write cached encodings (`lcm-lora cache`): each usable sample encoded once by the teacher's VAE
and text encoder, in the layout `lcm_lora.data.cache` documents. Bad samples are skipped and counted
exactly as in training; the cache is written to a temporary folder, claimed with a lock, and renamed when
complete. It never replaces a folder it did not write."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .config import DataArgs, TrainConfig
from .data import BadSample, BadSampleLog, load_source
from .conditioning import encode_text
from .data.cache import EMPTY, EMPTY_NAMES, FORMAT, MANIFEST, STORED_NAMES
from .data.loader import decode_row, sample_name, tokenize
from .data.shards import NAME, expand_shards, shard_rows
from .models import load_teacher, teacher_fingerprint
from .run_dir import OutputLock
from .safetensors_io import save_safetensors_atomic

SHARD_SIZE = 4096


@torch.no_grad()
def _encode_text(teacher, captions: list[str], device) -> dict[str, torch.Tensor]:
    """Each caption's encodings under their stored names: text_embeds, and for SDXL pooled_embeds."""
    c = encode_text(teacher.text_encoders, tuple(tokenize(t, captions).to(device) for t in teacher.tokenizers))
    return {STORED_NAMES[key]: value.float().cpu() for key, value in c.items()}


class ShardWriter:
    def __init__(self, out: Path) -> None:
        self.out, self.shards, self.rows = out, [], []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) == SHARD_SIZE:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        offsets = torch.tensor([0] + [len(r["text"]["text_embeds"]) for r in self.rows]).cumsum(0)
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_safetensors_atomic({
            "latent_parameters": torch.stack([r["latent_parameters"] for r in self.rows]).contiguous(),
            **{key: torch.cat([r["text"][key] for r in self.rows]).contiguous() for key in self.rows[0]["text"]},
            "caption_offsets": offsets,
            "original_size": torch.tensor([r["original_size"] for r in self.rows]),
            "crop_top_left": torch.tensor([r["crop_top_left"] for r in self.rows]),
        }, self.out / name, {})
        self.shards.append({"file": name, "num_samples": len(self.rows)})
        self.rows = []


def source_rows(args: DataArgs, skipped: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
    """(name, row) of every sample of the data source, in order: a data set, or every shard in turn
    (an unreadable or empty shard is appended to `skipped`, as in training)."""
    if args.train_shards_path_or_url:
        for url in expand_shards(args.train_shards_path_or_url):
            for row in shard_rows(url, args, skipped):
                yield row[NAME], row
        return
    ds = load_source(args)
    for index in range(len(ds)):
        row = ds[index]
        yield sample_name(row, args.image_column, index), row


@torch.no_grad()
def write_cache(config: TrainConfig, encodings_dir: str | Path, batch_size: int = 64, device: str = "cpu") -> dict:
    """Encode `config`'s data source with its teacher into `encodings_dir`; returns the manifest."""
    final = Path(encodings_dir)
    check_cache_target(final, config.run.overwrite)
    tmp = final.with_name(final.name + ".partial")
    _remove_cut_off_cache(tmp)
    with OutputLock(tmp, "--encodings_dir") as lock:
        manifest = _write_shards(config, tmp, batch_size, device)
        lock.path.unlink()  # the finished cache holds no lock file; the claim lasts until the rename
        check_cache_target(final, config.run.overwrite)  # again: files may have appeared while encoding
        if final.exists():  # empty, or with --overwrite an earlier cache
            shutil.rmtree(final)
        tmp.rename(final)
    return manifest


def check_cache_target(final: Path, overwrite: bool) -> None:
    """The cache folder must be new, empty, or (with --overwrite) an earlier cache: never anything else, which
    could be the user's data (--encodings_dir equal to --train_data_dir)."""
    if final.is_file():
        raise FileExistsError(f"--encodings_dir {final} is a file; name a folder.")
    if not final.is_dir() or not any(final.iterdir()):
        return
    if not (final / MANIFEST).is_file():
        example = next(iter(sorted(final.iterdir()))).name
        raise FileExistsError(f"--encodings_dir {final} holds files that are not a cache (e.g. {example}); name a new or "
                              "empty folder. Nothing was changed.")
    if not overwrite:
        raise FileExistsError(f"--encodings_dir {final} already holds a cache; choose another folder, or add --overwrite "
                              "to replace it.")


def _remove_cut_off_cache(tmp: Path) -> None:
    """A `.partial` folder left by a cache that was cut off is removed; one that another cache is writing, or one
    this command did not create (it has no lock file), is refused."""
    if not tmp.exists():
        return
    lock = OutputLock(tmp, "--encodings_dir")
    if lock.held_elsewhere():
        raise FileExistsError(lock.in_use_message())
    if not lock.path.is_file():
        raise FileExistsError(f"{tmp} exists and was not written by `lcm-lora cache`; move it away or choose "
                              "another --encodings_dir.")
    shutil.rmtree(tmp)


def _write_shards(config: TrainConfig, tmp: Path, batch_size: int, device: str) -> dict:
    """Encode every usable sample into shards under `tmp`, then the empty prompt and the manifest."""
    a = config.data
    teacher = load_teacher(config.model, unet=False)
    teacher.vae.to(device).eval()
    teacher.text_encoder.to(device).eval()
    log, writer, rng = BadSampleLog(a.max_bad_samples_fraction), ShardWriter(tmp), random.Random(0)
    fixed = dataclasses.replace(a, center_crop=True, random_flip=False)  # the one crop a cache holds
    skipped: list[tuple[str, str]] = []
    rows = source_rows(a, skipped)
    for chunk in tqdm(iter(lambda: list(itertools.islice(rows, batch_size)), []), desc="cache", unit="batch"):
        good = []
        for name, row in chunk:
            try:
                good.append(decode_row(row, fixed, rng))
            except BadSample as err:
                skipped.append((name, str(err)))
        log.add(len(good), skipped)
        skipped.clear()
        if not good:
            continue
        pixels = torch.stack([g[0] for g in good]).to(device)
        parameters = torch.cat([teacher.vae.encode(part).latent_dist.parameters.float().cpu()
                                for part in pixels.split(config.data.vae_encode_batch_size)])
        counts = [len(g[2]) for g in good]
        encoded = _encode_text(teacher, [c for g in good for c in g[2]], device)
        per_sample = [dict(zip(encoded, parts)) for parts in zip(*(v.split(counts) for v in encoded.values()))]
        for (_, geometry, _), params, text in zip(good, parameters, per_sample):
            writer.add({"latent_parameters": params, "text": text,
                        "original_size": geometry["original_size"], "crop_top_left": geometry["crop_top_left"]})
    writer.flush()
    save_safetensors_atomic({EMPTY_NAMES[k]: v for k, v in _encode_text(teacher, [""], device).items()}, tmp / EMPTY, {})
    manifest = {
        "format": FORMAT,
        "teacher": teacher_fingerprint(config.model),
        "resolution": a.resolution,
        "preprocessing": {"center_crop": True, "random_flip": False},
        "scaling_factor": teacher.vae.config.scaling_factor,
        "source": {"train_data_dir": a.train_data_dir, "dataset_name": a.dataset_name,
                   "train_shards_path_or_url": a.train_shards_path_or_url,
                   "image_column": a.image_column, "caption_column": a.caption_column},
        "num_samples": sum(s["num_samples"] for s in writer.shards),
        "shards": writer.shards,
        "skipped": dict(log.reasons),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
