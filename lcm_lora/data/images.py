"""Decode one image safely and preprocess it: anything unusable raises BadSample with a reason.

Real folders hold truncated downloads, non-images with image names, 16-bit and CMYK scans,
transparent PNGs, EXIF-rotated phone photos, thumbnails and the occasional decompression bomb.
Each becomes either a plain RGB image the size it looks, or a BadSample the loader skips and counts.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# A short side below this share of --resolution would be upscaled into mush: skip, don't train on it.
MIN_SIDE_FRACTION = 0.25


class BadSample(Exception):
    """One sample cannot be used; the message is the reason, counted in the run's summary."""


def open_image(value) -> Image.Image:
    """A PIL image, a path, or a datasets {"bytes", "path"} dict -> RGB, upright, fully decoded."""
    if value is None:
        raise BadSample("missing image")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: treat both as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(value)
            image.load()  # decode now: truncated files fail here, not later in a worker
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample(f"decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSample(f"unreadable image ({type(err).__name__}: {err})") from None
    return to_rgb(image)


def _open(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data = value.get("bytes")
        return Image.open(io.BytesIO(data)) if data else Image.open(value["path"])
    return Image.open(value)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float images rescaled, transparency composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / top * 255).clip(0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `resolution`."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def crop_box(resized: tuple[int, int], resolution: int, center_crop: bool, rng: random.Random) -> tuple[int, ...]:
    """(left, top, right, bottom) of the square crop in the image resized to `resized` (resized_size)."""
    new_w, new_h = resized
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left, top = rng.randint(0, new_w - resolution), rng.randint(0, new_h - resolution)
    return left, top, left + resolution, top + resolution


def preprocess_image(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                     rng: random.Random) -> tuple[torch.Tensor, dict]:
    """Resize the short side, crop a square, maybe flip -> ([3, H, W] in [-1, 1], geometry).

    The geometry (original size, crop box) is what SDXL's micro-conditioning needs."""
    w, h = image.size
    if min(w, h) < MIN_SIDE_FRACTION * resolution:
        raise BadSample(f"too small ({w}x{h}, short side under {MIN_SIDE_FRACTION:g} x --resolution {resolution})")
    new_size = resized_size((w, h), resolution)
    box = crop_box(new_size, resolution, center_crop, rng)
    if new_size != (w, h):
        image = image.resize(new_size, Image.BICUBIC)
    image = image.crop(box)
    flipped = random_flip and rng.random() < 0.5
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, {"original_size": (h, w), "crop_top_left": (box[1], box[0]), "flipped": flipped}
