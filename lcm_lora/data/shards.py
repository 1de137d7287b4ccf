"""webdataset tar shards (`--train_shards_path_or_url`), streamed and split across ranks and workers.

A shard is a tar of samples: members sharing a key (`00042.jpg`, `00042.txt`, `00042.json`) are one
sample. The image is the first of .jpg/.jpeg/.png/.webp; the captions are the lines of .txt/.text/
.caption, else the json's "caption" or "text" (LAION's layout). Shards are local paths, globs, brace
patterns (`data/{00000..00099}.tar`) or `pipe:` commands (`pipe:aws s3 cp s3://b/{0..9}.tar -`),
several joined with `::`, and are read with webdataset's own tar reader (an optional extra).

Splitting: every epoch all ranks shuffle the shard list with the same seed, rank r takes shards
r, r + R, ...; within a rank, worker k of K takes every K-th of those. Ranks and workers therefore
read disjoint shards. A shard that cannot be read, holds no sample, or is no regular file (a FIFO a glob
matched would block its reader for ever) is skipped and counted like a bad sample; a rank that gets no
complete batch from a whole epoch stops with an error, never waits.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import random
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch

from ..config import DataArgs
from .images import BadSample, describe_error, require_regular_file
from .loader import decode_row, ignore_stop_signals, make_batch, pick_caption, sample_rng
from .sources import DataError, caption_lines

FLAG = "--train_shards_path_or_url"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "text", "caption")
JSON_CAPTION_FIELDS = ("caption", "text")
GLOB_CHARS = set("*?[")
NAME = "__name__"  # the row's "shard:key", for warnings


def require_webdataset() -> None:
    if importlib.util.find_spec("webdataset") is None:
        raise DataError(f"{FLAG} reads tar shards with webdataset: pip install 'lcm-lora[webdataset]'.")


def expand_shards(spec: str) -> list[str]:
    """Every shard `spec` names, in order: '::'-joined parts, braces expanded, local globs matched."""
    import braceexpand

    urls = []
    for part in spec.split("::"):
        for url in braceexpand.braceexpand(part.strip()):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif GLOB_CHARS & set(url):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise DataError(f"{FLAG}: '{url}' matches no file.")
                urls.extend(matches)
            else:
                if not Path(url).exists():
                    raise DataError(f"{FLAG}: no such shard '{url}'. Give tar files, a glob, a brace "
                                    "pattern or a pipe: command.")
                try:
                    require_regular_file(url)
                except BadSample as err:
                    raise DataError(f"{FLAG}: {err}; give tar files, a glob, a brace pattern or a pipe: "
                                    "command.") from None
                urls.append(url)
    if not urls:
        raise DataError(f"{FLAG} '{spec}' names no shard.")
    return urls


def shard_rows(url: str, args: DataArgs, problems: list[tuple[str, str]]) -> Iterator[dict]:
    """The samples of one shard as rows {image_column: {bytes, path}, caption_column: [captions]}.

    An unreadable or sample-less shard appends (url, reason) to `problems` instead of raising."""
    require_webdataset()
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[Exception] = []

    def stop_reading(err: Exception) -> bool:
        errors.append(err)
        return False  # a broken tar stream cannot be resynchronised: give up on this shard

    count = 0
    try:
        local = local_path(url)
        if local is not None:
            require_regular_file(local)  # a glob can match a FIFO, which would block gopen forever
        stream = gopen(url)
        files = tar_file_expander([{"url": url, "stream": stream}], handler=stop_reading)
        for sample in group_by_keys(files, handler=stop_reading):
            count += 1
            yield _row(sample, args)
        stream.close()  # a pipe: command reports a failed exit status here
    except BadSample as err:
        problems.append((url, str(err)))
        return
    except Exception as err:  # openers and pipes raise whatever their scheme raises
        errors.append(err)
    if errors:
        problems.append((url, f"unreadable shard after {count} samples ({describe_error(errors[0])})"))
    elif count == 0:
        problems.append((url, "empty shard (no samples)"))


def local_path(url: str) -> str | None:
    """The file a shard url names when it is local (a path or a file: url, as webdataset's gopen reads them);
    None for remote urls and pipe: commands."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    return url2pathname(parsed.path) if parsed.scheme == "file" else None


def _row(sample: dict, args: DataArgs) -> dict:
    name = f"{sample['__url__']}:{sample['__key__']}"
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    return {args.image_column: {"bytes": image, "path": name} if image else None,
            args.caption_column: _captions(sample), NAME: name}


def _captions(sample: dict) -> list[str]:
    for key in CAPTION_KEYS:
        if key in sample:
            return caption_lines(sample[key])
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return []
        for field in JSON_CAPTION_FIELDS:
            if isinstance(meta, dict) and isinstance(meta.get(field), str):
                return [meta[field]]
    return []


class ShardStream(torch.utils.data.IterableDataset):
    """Full batches from this rank's share of the shards; runs in data-loader workers (picklable)."""

    def __init__(self, urls: list[str], args: DataArgs, tokenizer, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        readers = world_size * max(1, args.dataloader_num_workers)
        if len(urls) < readers:
            raise DataError(f"{FLAG}: {len(urls)} shards cannot feed {world_size} processes x "
                            f"{max(1, args.dataloader_num_workers)} data-loader workers; give at least {readers} "
                            "shards or fewer --dataloader_num_workers.")
        self.urls, self.args, self.tokenizer, self.batch_size = urls, args, tokenizer, batch_size
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """This rank's and worker's shards for the current epoch (same shuffle on every rank)."""
        order = list(self.urls)
        random.Random(self.seed + self.epoch).shuffle(order)
        return order[self.rank::self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        shards = self.shards(*(0, 1) if info is None else (info.id, info.num_workers))
        samples, skipped = [], []
        for url in shards:
            for row in shard_rows(url, self.args, skipped):
                rng = sample_rng(self.seed, self.epoch, row[NAME])
                try:
                    pixels, geometry, captions = decode_row(row, self.args, rng)
                except BadSample as err:
                    skipped.append((row[NAME], str(err)))
                    continue
                samples.append((pixels, geometry, pick_caption(captions, self.args.proportion_empty_prompts, rng)))
                if len(samples) == self.batch_size:
                    yield make_batch(samples, skipped, self.tokenizer)
                    samples, skipped = [], []
        if skipped:  # skips after the last full batch still count: a batch without samples carries them
            yield {"skipped": skipped}


def make_shard_dataloader(args: DataArgs, tokenizer, batch_size: int, seed: int, rank: int,
                          world_size: int) -> torch.utils.data.DataLoader:
    """Batches are made in the workers (batch_size=None here); workers restart each epoch to see it. The
    loader's own generator keeps each epoch's iterator from drawing on the global RNG, which the training
    step's noise comes from: a resumed run must draw the same noise as an uninterrupted one."""
    require_webdataset()
    stream = ShardStream(expand_shards(args.train_shards_path_or_url), args, tokenizer, batch_size, seed,
                         rank, world_size)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.dataloader_num_workers,
                                       worker_init_fn=ignore_stop_signals,
                                       generator=torch.Generator().manual_seed(seed))
