"""Rows -> training batches, skipping bad samples with a count instead of stopping the run.

Batch format (every source): {"pixel_values": float [B, 3, H, W] in [-1, 1], "input_ids": long [B, L] (and
"input_ids_2" for SDXL's second tokenizer),
"original_size": long [B, 2] (h, w), "crop_top_left": long [B, 2], "skipped": [(name, reason), ...]}.
A bad sample is replaced by a randomly drawn other one, so batches keep their size (DDP and gradient
accumulation stay in step); what was skipped travels with the batch to the trainer's BadSampleLog.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections import Counter
from typing import Iterator

import torch

from ..config import DataArgs
from .images import BadSample, open_image, preprocess_image
from .sources import DataError

logger = logging.getLogger(__name__)
MAX_REPLACEMENTS = 32  # bad samples in a row before the source is called unusable
WARN_FIRST, WARN_EVERY = 10, 100  # per reason: warn for the first ten, then every hundredth
MIN_SAMPLES_FOR_FRACTION = 200  # --max_bad_samples_fraction is enforced once this many were read


def pick_caption(captions: list[str], proportion_empty: float, rng: random.Random) -> str:
    """One caption: a random one of several, or '' for `proportion_empty` of samples (for CFG).

    Always one rng.choice, even of one caption, so a cache (captions stored as lists) draws the
    same random numbers as the image loader."""
    if rng.random() < proportion_empty:
        return ""
    return rng.choice(captions)


def row_captions(value) -> list[str]:
    """A row's caption cell (one string or a list) as a list; BadSample when none is usable."""
    if isinstance(value, BadSample):  # a caption file that could not be read (sources.read_captions)
        raise value
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, (list, tuple)) or not any(isinstance(c, str) and c.strip() for c in captions):
        raise BadSample("missing or empty caption")
    return list(captions)


def decode_row(row: dict, args: DataArgs, rng: random.Random) -> tuple[torch.Tensor, dict, list[str]]:
    """(pixels, geometry, captions) of one row, or BadSample: the one decoding of training and caching."""
    captions = row_captions(row.get(args.caption_column))
    image = open_image(row[args.image_column])
    pixels, geometry = preprocess_image(image, args.resolution, args.center_crop, args.random_flip, rng)
    return pixels, geometry, captions


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids [N, L], padded to the tokenizer's full context as Stable Diffusion's text encoder expects."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def make_batch(samples: list[tuple[torch.Tensor, dict, str]], skipped: list[tuple[str, str]], tokenizer) -> dict:
    """The batch format above from (pixels, geometry, caption) samples. `tokenizer` may be a tuple: SDXL's two
    tokenizers give "input_ids" and "input_ids_2"."""
    pixels, geometry, captions = zip(*samples)
    tokenizers = tokenizer if isinstance(tokenizer, tuple) else (tokenizer,)
    return {
        "pixel_values": torch.stack(pixels),
        **{input_ids_key(i): tokenize(t, list(captions)) for i, t in enumerate(tokenizers)},
        "original_size": torch.tensor([g["original_size"] for g in geometry]),
        "crop_top_left": torch.tensor([g["crop_top_left"] for g in geometry]),
        "skipped": skipped,
    }


def input_ids_key(index: int) -> str:
    """The batch key of the i-th tokenizer's ids: input_ids, input_ids_2 (diffusers' SDXL naming)."""
    return "input_ids" if index == 0 else f"input_ids_{index + 1}"


def sample_name(row: dict, image_column: str, index: int) -> str:
    value = row.get(image_column)
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return str(value) if isinstance(value, str) else f"row {index}"


def sample_rng(seed: int, epoch: int, key) -> random.Random:
    """One sample's random stream in one epoch (crop, flip, caption, replacement). Keyed by the sample, not
    drawn from a running stream, so it is the same whatever the number of workers, the order they run in, or
    the step a run was resumed at. (A str seed is hashed with SHA-512: the same in every process.)"""
    return random.Random(f"{seed}/{epoch}/{key}")


class Collate:
    """Decodes, preprocesses and tokenizes rows; runs in the data-loader workers (picklable)."""

    def __init__(self, ds, args: DataArgs, tokenizer, seed: int) -> None:
        self.ds, self.args, self.tokenizer, self.seed = ds, args, tokenizer, seed

    def _sample(self, row: dict, rng: random.Random) -> tuple[torch.Tensor, dict, str]:
        pixels, geometry, captions = decode_row(row, self.args, rng)
        return pixels, geometry, pick_caption(captions, self.args.proportion_empty_prompts, rng)

    def __call__(self, items: list[tuple[int, int, dict]]) -> dict:
        samples, skipped = [], []
        for epoch, index, row in items:
            rng = sample_rng(self.seed, epoch, index)
            for _ in range(MAX_REPLACEMENTS):
                try:
                    samples.append(self._sample(row, rng))
                    break
                except BadSample as err:
                    skipped.append((sample_name(row, self.args.image_column, index), str(err)))
                    index = rng.randrange(len(self.ds))
                    row = self.ds[index]
            else:
                raise DataError(f"{MAX_REPLACEMENTS} bad samples in a row, last: {skipped[-1][0]}: "
                                f"{skipped[-1][1]}. Check the data source.")
        return make_batch(samples, skipped, self.tokenizer)


class EpochShuffle(torch.utils.data.RandomSampler):
    """PyTorch's shuffle, yielding (epoch, index): the epoch keys each sample's randomness. The trainer
    sets the epoch (Accelerate forwards `set_epoch` to the sampler)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in super().__iter__():
            yield epoch, index


class Keyed(torch.utils.data.Dataset):
    """(epoch, index) -> (epoch, index, item): the collate keys randomness by them and names bad samples."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, dict]:
        epoch, index = key
        return epoch, index, self.ds[index]


def ignore_stop_signals(worker_id: int) -> None:
    """Every data loader's worker_init_fn: the workers ignore SIGINT, and SIGTERM unless their parent sends it.

    Slurm preemption, systemd, `kill -TERM -PGID` and Ctrl-C signal the whole process group. A worker killed by
    one ends the run ("DataLoader worker ... killed by signal") before the main process, which handles the
    signal, can finish its step and checkpoint; the main process then shuts its workers down itself. Its own
    SIGTERM must still end a worker: at exit, multiprocessing terminates daemonic children and joins them without
    a timeout, so a worker ignoring it would hang the exit. PyTorch's worker handler tells the two apart by the
    sender, exiting quietly for the parent (handler_SIGTERM in
    https://github.com/pytorch/pytorch/blob/main/torch/csrc/DataLoader.cpp), but dies for anyone else. A Python
    handler is not told the sender, so a thread takes SIGTERM with sigwaitinfo, which is. PyTorch sets its
    handlers before it calls worker_init_fn (torch/utils/data/_utils/worker.py), so these take effect."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: PyTorch's handler stays, and a group SIGTERM ends the worker
        return
    # Blocked in this thread, and so in every thread it starts, SIGTERM waits for the thread below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from_parent, name="sigterm-from-parent", daemon=True).start()


def _exit_on_sigterm_from_parent() -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
            os._exit(0)  # as PyTorch's handler does: exit code 0, so the loader reports no dead worker



def shuffled_loader(dataset, collate, args: DataArgs, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """The one loader shape of every map-style source: seeded shuffle, full batches, optional workers. The
    generator is the loader's own: the trainer checkpoints its state at each epoch start to resume exactly.

    Workers are started for each epoch, not kept: each new iterator draws its workers' base seed from the
    generator before the epoch's shuffle, so a run resumed in epoch k shuffles it as the run that never stopped
    did. Persistent workers would draw that seed in the first epoch only, and a resume with workers would
    shuffle differently from then on."""
    generator = torch.Generator().manual_seed(seed)
    keyed = Keyed(dataset)
    return torch.utils.data.DataLoader(
        keyed,
        batch_size=batch_size,
        sampler=EpochShuffle(keyed, generator=generator),
        generator=generator,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        worker_init_fn=ignore_stop_signals,
        drop_last=True,
    )


def make_dataloader(ds, tokenizer, args: DataArgs, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return shuffled_loader(ds, Collate(ds, args, tokenizer, seed), args, batch_size, seed)


class BadSampleLog:
    """Counts skipped samples by reason, warns at a limited rate, and stops past the allowed share."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction, self.used, self.reasons = max_fraction, 0, Counter()

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def add(self, used: int, skipped: list[tuple[str, str]]) -> None:
        """`used` samples went into a batch; `skipped` are (name, reason) of those replaced."""
        self.used += used
        for name, reason in skipped:
            kind = reason.split(" (")[0]
            self.reasons[kind] += 1
            n = self.reasons[kind]
            if n <= WARN_FIRST or n % WARN_EVERY == 0:
                logger.warning("skipped %s: %s (%d skipped for this reason so far)", name, reason, n)
        read = self.used + self.skipped
        if read >= MIN_SAMPLES_FOR_FRACTION and self.skipped > self.max_fraction * read:
            raise DataError(f"{self.skipped} of {read} samples read were bad ({self.summary()}), more than "
                            f"--max_bad_samples_fraction {self.max_fraction:g}. Fix or remove them, or raise the "
                            "flag; checkpoints written so far are kept.")

    @classmethod
    def combined(cls, logs: list["BadSampleLog"]) -> "BadSampleLog":
        """One log for several processes' logs (the end-of-run summary of a multi-process run)."""
        total = cls(logs[0].max_fraction)
        for log in logs:
            total.used += log.used
            total.reasons.update(log.reasons)
        return total

    def summary(self) -> str:
        if not self.reasons:
            return f"no samples skipped ({self.used} used)"
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.reasons.most_common())
        return f"skipped {self.skipped} samples ({kinds}); used {self.used}"
