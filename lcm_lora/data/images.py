"""Decode one image safely and preprocess it: anything unusable raises BadSample with a reason.

Real folders hold truncated downloads, non-images with image names, 16-bit and CMYK scans,
transparent PNGs, EXIF-rotated phone photos, thumbnails, malformed EXIF blocks, FIFOs with image
names, extreme aspect ratios and the occasional decompression bomb. Each becomes either a plain RGB
image the size it looks, or a BadSample the loader skips and counts: no exception from decoding a
sample gets past the skip.
"""

from __future__ import annotations

import io
import math
import os
import random
import stat
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

# A short side below this share of --resolution would be upscaled into mush: skip, don't train on it.
MIN_SIDE_FRACTION = 0.25
# A resized image over this many crops' worth of pixels is not made whole: only the crop is resampled. Up to it,
# resize-then-crop stays as it was, bit for bit (resampling a box of the source differs in the last bit).
MAX_RESIZED_CROPS = 16
BICUBIC_SUPPORT = 2  # source pixels either side of a bicubic tap's centre, at scale 1
FILE_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


class BadSample(Exception):
    """One sample cannot be used; the message is the reason, counted in the run's summary."""


def describe_error(err: Exception) -> str:
    """'Type: message', the type named by its module unless built in ('struct.error', not a bare 'error')."""
    kind = type(err)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {err}"


def require_regular_file(path) -> None:
    """BadSample unless `path` is a regular file (symlinks followed); OSError when it cannot be looked at.

    Opening a FIFO blocks until something writes to it, and a device may never end: either would hang a worker,
    and the run with it, beyond SIGTERM."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise BadSample(f"not a regular file ({path} is {FILE_KINDS.get(stat.S_IFMT(mode), 'a special file')})")


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
            return to_rgb(ImageOps.exif_transpose(image))
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample(f"decompression bomb ({err})") from None
    except Exception as err:
        # Not only OSError: exif_transpose raises struct.error when it writes back an EXIF block whose tags have
        # the wrong types, and fuzzing finds such files in JPEG, PNG and WebP (tests/test_hostile_data.py).
        # Whatever a hostile file raises, it must cost one sample, never the run.
        raise BadSample(f"unreadable image ({describe_error(err)})") from None


def _open(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data = value.get("bytes")
        return Image.open(io.BytesIO(data)) if data else _open_path(value["path"])
    return _open_path(value)


def _open_path(path) -> Image.Image:
    require_regular_file(path)
    return Image.open(path)


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


def resized_crop(image: Image.Image, resized: tuple[int, int], box: tuple[int, ...]) -> Image.Image:
    """The `box` crop of `image` resized to `resized`: resize, then crop, unless the resized image would be far
    larger than the crop (a 4,000,000 x 8 PNG at --resolution 32 would take gigabytes and a minute)."""
    if resized == image.size:
        return image.crop(box)
    if resized[0] * resized[1] <= MAX_RESIZED_CROPS * (box[2] - box[0]) * (box[3] - box[1]):
        return image.resize(resized, Image.BICUBIC).crop(box)
    return _resample_crop_only(image, resized, box)


def _resample_crop_only(image: Image.Image, resized: tuple[int, int], box: tuple[int, ...]) -> Image.Image:
    """What resized_crop gives, resampling only the source pixels the crop depends on, with `resize(box=...)`
    (https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.Image.resize). PIL passes that box
    as float32, which is coarse a million pixels in, so a window around it is cut out first: wider than the
    bicubic filter reaches, so no tap is lost, and small, so the box's coordinates stay exact."""
    scale_x, scale_y = image.width / resized[0], image.height / resized[1]
    source = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
    reach = math.ceil(BICUBIC_SUPPORT * max(scale_x, scale_y, 1.0)) + 1
    window = (max(0, math.floor(source[0]) - reach), max(0, math.floor(source[1]) - reach),
              min(image.width, math.ceil(source[2]) + reach), min(image.height, math.ceil(source[3]) + reach))
    in_window = (source[0] - window[0], source[1] - window[1], source[2] - window[0], source[3] - window[1])
    return image.crop(window).resize((box[2] - box[0], box[3] - box[1]), Image.BICUBIC, box=in_window)


def preprocess_image(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                     rng: random.Random) -> tuple[torch.Tensor, dict]:
    """Resize the short side, crop a square, maybe flip -> ([3, H, W] in [-1, 1], geometry).

    The geometry (original size, crop box) is what SDXL's micro-conditioning needs."""
    w, h = image.size
    if min(w, h) < MIN_SIDE_FRACTION * resolution:
        raise BadSample(f"too small ({w}x{h}, short side under {MIN_SIDE_FRACTION:g} x --resolution {resolution})")
    new_size = resized_size((w, h), resolution)
    box = crop_box(new_size, resolution, center_crop, rng)
    try:
        image = resized_crop(image, new_size, box)
    except Exception as err:  # e.g. MemoryError, or a mode PIL cannot resample: one sample, never the run
        raise BadSample(f"cannot resize image ({describe_error(err)})") from None
    flipped = random_flip and rng.random() < 0.5
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    # SDXL's crop conditioning describes the image trained on: after a flip the crop's left edge is mirrored
    # (resized width - right edge), which the public SDXL trainers get wrong.
    left = new_size[0] - box[2] if flipped else box[0]
    return pixels, {"original_size": (h, w), "crop_top_left": (box[1], left), "flipped": flipped}
