"""Where samples come from: every source becomes rows with an image column and a caption column.

- `--train_data_dir` with metadata.jsonl / .csv / .parquet: a Hugging Face `imagefolder`.
- `--train_data_dir` without metadata: images found recursively, each captioned by a same-name
  `.txt` or `.caption` file (kohya's layout); every non-empty line is one caption. Caption files are
  read when their row is read, so one that cannot be read costs one sample, not the run.
- `--dataset_name`: a hub data set, a local folder `datasets` can load, a `save_to_disk` folder,
  or a single .parquet / .arrow / .csv / .jsonl file.

Images stay undecoded (paths or bytes) here: the loader decodes each one and skips bad ones.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..config import DataArgs
from .images import BadSample, describe_error, require_regular_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class DataError(ValueError):
    """The data source is unusable as a whole: the message names it and says what to do."""


def load_source(args: DataArgs):
    """The training rows, with the image and caption columns checked before training starts."""
    import datasets

    if args.train_data_dir:
        root, where = Path(args.train_data_dir), f"--train_data_dir {args.train_data_dir}"
        if not root.is_dir():
            raise DataError(f"{where}: no such folder.")
        if any((root / name).exists() for name in METADATA_FILES):
            ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
        else:
            ds = caption_folder(root, args.image_column, args.caption_column, where)
    else:
        where = f"--dataset_name {args.dataset_name}"
        ds = _load_named(args.dataset_name, args.dataset_config_name, where)
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in ds.column_names:
            raise DataError(f"{where}: no column '{column}' ({flag}); columns are {ds.column_names}. "
                            f"Pass {flag} with one of them.")
    if len(ds) == 0:
        raise DataError(f"{where}: the data set is empty.")
    if isinstance(ds.features[args.image_column], datasets.Image):
        ds = ds.cast_column(args.image_column, datasets.Image(decode=False))  # we decode, and skip bad files
    if args.max_train_samples is not None:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    return ds


def _load_named(name: str, config_name: str | None, where: str):
    import datasets

    path = Path(name)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{where}: cannot read {path.suffix} files; give one of {sorted(FILE_BUILDERS)}, "
                                "a folder, or a hub data set.")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(name, config_name, split="train")
    except DataError:
        raise
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DataError(f"{where}: cannot load it ({type(err).__name__}: {err}).") from err


def caption_folder(root: Path, image_column: str, caption_column: str, where: str):
    """Rows {image: path, text: [captions]} for every image under `root` (sorted, recursive).

    The rows store each caption file's path, read by a datasets transform whenever a row is read (in the
    data-loader workers): a caption file that cannot be read then gives that row a BadSample, which the loader
    counts and replaces, where reading every file here would end the run before its first step."""
    import datasets

    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"{where}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no metadata file "
                        f"({', '.join(METADATA_FILES)}) in it or its subfolders.")
    files = [caption_file(p) for p in images]
    if not any(files):
        raise DataError(f"{where}: none of its {len(images)} images has a caption file. Put one next to each "
                        "image with the same name and a .txt or .caption suffix, one caption per line.")
    ds = datasets.Dataset.from_dict({image_column: [str(p) for p in images], caption_column: files})
    return ds.with_transform(functools.partial(read_caption_column, column=caption_column))


def caption_file(image: Path) -> str | None:
    """The image's caption file (same name, .txt, else .caption), None when it has none."""
    for suffix in CAPTION_SUFFIXES:
        file = image.with_suffix(suffix)
        if file.exists():
            return str(file)
    return None


def read_caption_column(batch: dict, column: str) -> dict:
    """A caption-folder batch with each caption file replaced by its captions (caption_folder's transform)."""
    return {**batch, column: [read_captions(file) for file in batch[column]]}


def read_captions(file: str | None) -> list[str] | BadSample:
    """The caption file's non-empty lines ([] without a file), or the BadSample saying why it cannot be read:
    loader.row_captions raises it, so it is counted under its own reason."""
    if file is None:
        return []
    try:
        require_regular_file(file)
        return caption_lines(Path(file).read_bytes())
    except BadSample as err:
        return err
    except OSError as err:  # permissions, a vanished file, an I/O error of the disk or network share
        return BadSample(f"unreadable caption file ({describe_error(err)})")


def caption_lines(data: bytes) -> list[str]:
    """Captions of a caption file (folder or shard member): its non-empty lines, stripped."""
    text = data.decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]
