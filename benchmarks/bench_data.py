"""Samples per second each data source delivers, with N data-loader workers, through the trainer's loaders.

    python benchmarks/bench_data.py                                   # 512 JPEGs of 640x640 at --resolution 512
    python benchmarks/bench_data.py --image_size 64 --resolution 64 --batch_size 32   # the tiny world's case

Writes the same images (the tiny world, upscaled to --image_size, JPEG quality 95 like web data) as every
source the trainer reads: an imagefolder, a caption-file folder, a parquet file, webdataset shards and cached
encodings (made with the bundled tiny teacher's encoders). Each loader is the trainer's own; the first batch
(worker start-up) is timed apart from the rest. Compare the rates with what a training step consumes:
batch size / step time (`benchmarks/bench_step.py`), per process.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image
from transformers import CLIPTokenizer

from lcm_lora.caching import write_cache
from lcm_lora.config import DataArgs, TrainConfig
from lcm_lora.data import load_source, make_dataloader
from lcm_lora.data.cache import make_cached_dataloader, read_manifest
from lcm_lora.data.shards import make_shard_dataloader
from lcm_lora.models import teacher_fingerprint
from lcm_lora.world import assets
from lcm_lora.world.scene import sample

SHARDS = 8


def jpegs(n: int, size: int) -> list[tuple[str, bytes, str]]:
    """(file name, JPEG bytes, caption) of world seeds 0..n-1, upscaled to size x size."""
    out = []
    for seed in range(n):
        scene, pixels = sample(seed)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(buffer, format="jpeg", quality=95)
        out.append((f"{seed:07d}.jpg", buffer.getvalue(), scene.caption))
    return out


def write_sources(root: Path, files: list[tuple[str, bytes, str]]) -> dict[str, dict]:
    """Every source holding `files`: name -> the DataArgs fields that select it."""
    import datasets

    folder, captions, shards = root / "imagefolder", root / "captions", root / "shards"
    for path in (folder, captions, shards):
        path.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for name, data, caption in files:
            (folder / name).write_bytes(data)
            (captions / name).write_bytes(data)
            (captions / name).with_suffix(".txt").write_text(caption)
            metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    table = datasets.Dataset.from_dict({"image": [{"bytes": d, "path": None} for _, d, _ in files],
                                        "text": [c for _, _, c in files]}).cast_column("image", datasets.Image())
    table.to_parquet(str(root / "data.parquet"))
    per_shard = -(-len(files) // SHARDS)
    for k in range(SHARDS):
        with tarfile.open(shards / f"{k:05d}.tar", "w") as tar:
            for name, data, caption in files[k * per_shard:(k + 1) * per_shard]:
                for member, payload in ((name, data), (Path(name).with_suffix(".txt").name, caption.encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return {"imagefolder": {"train_data_dir": str(folder)}, "caption files": {"train_data_dir": str(captions)},
            "parquet": {"dataset_name": str(root / "data.parquet")},
            "webdataset": {"train_shards_path_or_url": str(shards / "*.tar")}}


def loader_for(source: dict, args: DataArgs, tokenizer, batch_size: int, cache_manifest: dict | None):
    if cache_manifest is not None:
        return make_cached_dataloader(args, cache_manifest, batch_size, seed=0)[0]
    if "train_shards_path_or_url" in source:
        return make_shard_dataloader(args, tokenizer, batch_size, seed=0, rank=0, world_size=1)
    return make_dataloader(load_source(args), tokenizer, args, batch_size, seed=0)


def timed_pass(loader, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over the rest of one epoch)."""
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    rest = sum(1 for _ in batches)
    return first - start, rest * batch_size / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=640)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="Epochs timed per source and worker count.")
    parser.add_argument("--root", type=Path, default=None, help="Where to write the sources (default: a temp dir).")
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="lcm-lora-bench-data-"))
    tokenizer = CLIPTokenizer.from_pretrained(assets.resolve("teacher-eps") / "tokenizer")
    sources = write_sources(root, jpegs(args.num_images, args.image_size))
    config = TrainConfig.from_flat_dict({"pretrained_teacher_model": "teacher-eps", "resolution": args.resolution,
                                         **sources["imagefolder"]})
    start = time.perf_counter()
    manifest = write_cache(config, root / "cache")
    print(f"wrote {args.num_images} JPEGs of {args.image_size}px to {root}; cache at {args.resolution}px took "
          f"{time.perf_counter() - start:.1f} s")
    read_manifest(root / "cache", teacher_fingerprint(config.model), args.resolution)
    sources["cache"] = {"encodings_dir": str(root / "cache")}

    print(f"batch {args.batch_size}, resolution {args.resolution}, median of {args.repeats} epochs")
    print("| source | workers | first batch s | samples/s |")
    print("|---|---:|---:|---:|")
    for name, source in sources.items():
        for workers in args.workers:
            data = DataArgs(resolution=args.resolution, dataloader_num_workers=workers, **source)
            loader = loader_for(source, data, tokenizer, args.batch_size, manifest if name == "cache" else None)
            firsts, rates = zip(*(timed_pass(loader, args.batch_size) for _ in range(args.repeats)))
            print(f"| {name} | {workers} | {statistics.median(firsts):.2f} | {statistics.median(rates):.0f} |")


if __name__ == "__main__":
    main()
