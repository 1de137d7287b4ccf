"""Training data: an imagefolder or a Hugging Face dataset -> batches of pixels and token ids.

Batch format (every source): {"pixel_values": float [B, 3, H, W] in [-1, 1], "input_ids": long [B, L]}.
The encoders are not imported here: the trainer passes the tokenizer in.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from .config import DataArgs


class DataError(ValueError):
    """The data source is unusable as a whole: the message names it and says what to do."""


def load_source(args: DataArgs):
    """The training split, with the image and caption columns checked before training starts."""
    import datasets

    if args.train_data_dir:
        ds = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
        where = f"--train_data_dir {args.train_data_dir}"
    else:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
        where = f"--dataset_name {args.dataset_name}"
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in ds.column_names:
            raise DataError(f"{where}: no column '{column}' ({flag}); columns are {ds.column_names}. "
                            f"Pass {flag} with one of them.")
    if len(ds) == 0:
        raise DataError(f"{where}: the data set is empty.")
    if args.max_train_samples is not None:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    return ds


def preprocess_image(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                     rng: random.Random) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, maybe flip; -> [3, H, W] in [-1, 1]."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left, top = rng.randint(0, new_w - resolution), rng.randint(0, new_h - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def pick_caption(caption, proportion_empty: float, rng: random.Random) -> str:
    """One caption: a random one of several, or '' for `proportion_empty` of samples (for CFG)."""
    if rng.random() < proportion_empty:
        return ""
    if isinstance(caption, (list, tuple)):
        caption = rng.choice(caption) if caption else ""
    return caption if isinstance(caption, str) else ""


class Collate:
    """Turns dataset rows into a batch; a picklable object so data-loader workers can use it."""

    def __init__(self, args: DataArgs, tokenizer, seed: int) -> None:
        self.args, self.tokenizer, self.rng = args, tokenizer, random.Random(seed)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        a = self.args
        pixels = [preprocess_image(r[a.image_column], a.resolution, a.center_crop, a.random_flip, self.rng)
                  for r in rows]
        captions = [pick_caption(r[a.caption_column], a.proportion_empty_prompts, self.rng) for r in rows]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return {"pixel_values": torch.stack(pixels), "input_ids": ids}


def make_dataloader(ds, tokenizer, args: DataArgs, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=Collate(args, tokenizer, seed),
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        persistent_workers=args.dataloader_num_workers > 0,
    )
