"""Write the world as a Hugging Face `imagefolder` data set, and its held-out prompt list.

    python -m lcm_lora.world.dataset --out data/tiny-world --num_images 2000

The folder holds PNG files and `metadata.jsonl` ({"file_name", "text"} per line), which is what
`datasets.load_dataset("imagefolder", data_dir=...)` and the trainer's `--train_data_dir` read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from .scene import all_scenes, sample


def write_imagefolder(out_dir: str | Path, num_images: int, first_seed: int = 0) -> Path:
    """Images for seeds [first_seed, first_seed + num_images); the same seeds give the same files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metadata.jsonl", "w") as metadata:
        for seed in range(first_seed, first_seed + num_images):
            scene, image = sample(seed)
            file_name = f"{seed:07d}.png"
            Image.fromarray(image).save(out_dir / file_name, optimize=False, compress_level=1)
            metadata.write(json.dumps({"file_name": file_name, "text": scene.caption}) + "\n")
    return out_dir


def held_out_prompt_list() -> list[str]:
    """Every caption of the world, once: the prompts that quality is measured on."""
    return [scene.caption for scene in all_scenes()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--first_seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_imagefolder(args.out, args.num_images, args.first_seed)
    (args.out / "prompts.txt").write_text("\n".join(held_out_prompt_list()) + "\n")
    print(f"wrote {args.num_images} images to {args.out}")


if __name__ == "__main__":
    main()
