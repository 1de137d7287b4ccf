"""Where samples come from: every source becomes rows with an image column and a caption column.

- `--train_data_dir` with metadata.jsonl / .csv / .parquet: a Hugging Face `imagefolder`.
- `--train_data_dir` without metadata: images found recursively, each captioned by a same-name
  `.txt` or `.caption` file (kohya's layout); every non-empty line is one caption.
- `--dataset_name`: a hub data set, a local folder `datasets` can load, a `save_to_disk` folder,
  or a single .parquet / .arrow / .csv / .jsonl file.

Images stay undecoded (paths or bytes) here: the loader decodes each one and skips bad ones.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataArgs

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
    """Rows {image: path, text: [captions]} for every image under `root` (sorted, recursive)."""
    import datasets

    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"{where}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no metadata file "
                        f"({', '.join(METADATA_FILES)}) in it or its subfolders.")
    captions = [read_captions(p) for p in images]
    if not any(captions):
        raise DataError(f"{where}: none of its {len(images)} images has a caption file. Put one next to each "
                        "image with the same name and a .txt or .caption suffix, one caption per line.")
    return datasets.Dataset.from_dict({image_column: [str(p) for p in images], caption_column: captions})


def read_captions(image: Path) -> list[str]:
    """The non-empty lines of the image's caption file; [] when there is none."""
    for suffix in CAPTION_SUFFIXES:
        file = image.with_suffix(suffix)
        if file.is_file():
            return caption_lines(file.read_bytes())
    return []


def caption_lines(data: bytes) -> list[str]:
    """Captions of a caption file (folder or shard member): its non-empty lines, stripped."""
    text = data.decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]
