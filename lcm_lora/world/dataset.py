"""Write the world as a Hugging Face `imagefolder` data set or as webdataset shards, and its prompt list.

    python -m lcm_lora.world.dataset --out data/tiny-world --num_images 2000
    python -m lcm_lora.world.dataset --out data/tiny-world-shards --num_images 2000 --format webdataset

The imagefolder holds PNG files and `metadata.jsonl` ({"file_name", "text"} per line), which is what
`datasets.load_dataset("imagefolder", data_dir=...)` and the trainer's `--train_data_dir` read. The
shards (`shard-00000.tar`, ...) hold `<seed>.png` and `<seed>.txt` per sample, for `--train_shards_path_or_url`.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from .scene import PALETTES, all_scenes, sample


def write_imagefolder(out_dir: str | Path, num_images: int, first_seed: int = 0, palette: str = "base") -> Path:
    """Images for seeds [first_seed, first_seed + num_images); the same seeds give the same files. `palette`
    "dusk" draws the same scenes on the community fine-tune's backgrounds (scene.PALETTES)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metadata.jsonl", "w") as metadata:
        for seed in range(first_seed, first_seed + num_images):
            scene, image = sample(seed, palette)
            file_name = f"{seed:07d}.png"
            Image.fromarray(image).save(out_dir / file_name, optimize=False, compress_level=1)
            metadata.write(json.dumps({"file_name": file_name, "text": scene.caption}) + "\n")
    return out_dir


def write_shards(out_dir: str | Path, num_images: int, shard_size: int = 250, first_seed: int = 0) -> list[Path]:
    """The same samples as write_imagefolder, `shard_size` per tar (the last may hold fewer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds, paths = list(range(first_seed, first_seed + num_images)), []
    for k, start in enumerate(range(0, num_images, shard_size)):
        paths.append(out_dir / f"shard-{k:05d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for seed in seeds[start:start + shard_size]:
                scene, image = sample(seed)
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="png", optimize=False, compress_level=1)
                _add_member(tar, f"{seed:07d}.png", png.getvalue())
                _add_member(tar, f"{seed:07d}.txt", scene.caption.encode())
    return paths


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)  # mtime 0 and no owner: the same seeds give byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def held_out_prompt_list() -> list[str]:
    """Every caption of the world, once: the prompts that quality is measured on."""
    return [scene.caption for scene in all_scenes()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--format", choices=["imagefolder", "webdataset"], default="imagefolder")
    parser.add_argument("--shard_size", type=int, default=250, help="Samples per tar (webdataset only).")
    parser.add_argument("--palette", choices=sorted(PALETTES), default="base",
                        help="dusk: the community fine-tune's world (imagefolder only).")
    args = parser.parse_args(argv)
    if args.format == "webdataset":
        if args.palette != "base":
            parser.error("--palette applies to --format imagefolder only.")
        write_shards(args.out, args.num_images, args.shard_size, args.first_seed)
    else:
        write_imagefolder(args.out, args.num_images, args.first_seed, args.palette)
    (args.out / "prompts.txt").write_text("\n".join(held_out_prompt_list()) + "\n")
    print(f"wrote {args.num_images} images to {args.out}")


if __name__ == "__main__":
    main()
