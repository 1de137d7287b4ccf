"""Data: imagefolder loading, preprocessing and captions, with clear errors for unusable sources."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from lcm_lora.config import DataArgs
from lcm_lora.data import DataError, load_source, make_dataloader, pick_caption, preprocess_image
from lcm_lora.world import assets
from lcm_lora.world.dataset import write_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("world"), 16)


def test_imagefolder_batches_have_the_documented_format(folder):
    tokenizer = CLIPTokenizer.from_pretrained(assets.resolve("teacher-eps") / "tokenizer")
    args = DataArgs(train_data_dir=str(folder), resolution=64)
    loader = make_dataloader(load_source(args), tokenizer, args, batch_size=4, seed=0)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["input_ids"].shape == (4, 77) and len(loader) == 4


def test_missing_column_is_named_with_the_columns_that_exist(folder):
    with pytest.raises(DataError, match=r"no column 'caption' \(--caption_column\).*'text'"):
        load_source(DataArgs(train_data_dir=str(folder), caption_column="caption"))


def test_resize_crop_and_flip():
    rng = random.Random(0)
    image = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))  # 200x100 ramp
    center, geometry = preprocess_image(image, 50, center_crop=True, random_flip=False, rng=rng)
    assert center.shape == (3, 50, 50)
    # Short side 100 -> 50 halves the width to 100; the center crop keeps columns 25..75 of the ramp.
    assert center[0, 0, 0] > -0.8 and center[0, 0, -1] < 0.8
    assert geometry == {"original_size": (100, 200), "crop_top_left": (0, 25), "flipped": False}
    flips = {bool(preprocess_image(image, 50, True, True, rng)[0][0, 0, 0] > 0) for _ in range(20)}
    assert flips == {True, False}
    crops = {preprocess_image(image, 50, False, False, rng)[1]["crop_top_left"] for _ in range(20)}
    assert len(crops) > 1


def test_a_flipped_crop_reports_its_left_edge_in_the_flipped_image():
    """SDXL conditions on the crop's top-left: after a flip, a crop at columns 10..60 of the 100-wide resized
    ramp is at columns 40..90 of the image trained on."""
    image = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))
    for seed in range(40):
        pixels, geometry = preprocess_image(image, 50, center_crop=False, random_flip=True, rng=random.Random(seed))
        same, _ = preprocess_image(image, 50, center_crop=False, random_flip=False, rng=random.Random(seed))
        top, left = geometry["crop_top_left"]
        unflipped_left = 100 - 50 - left if geometry["flipped"] else left
        assert top == 0 and 0 <= left <= 50
        assert torch.equal(pixels, same.flip(-1) if geometry["flipped"] else same)
        assert abs(float(same[0, 0, 0]) - (2 * unflipped_left * 2 / 255 - 1)) < 0.05  # ramp value = column


def test_captions_pick_from_lists_and_empty_a_proportion():
    rng = random.Random(0)
    assert {pick_caption(["a", "b"], 0.0, rng) for _ in range(50)} == {"a", "b"}
    emptied = sum(pick_caption(["x"], 0.3, rng) == "" for _ in range(2000)) / 2000
    assert 0.25 < emptied < 0.35
    assert pick_caption(["x"], 0.0, rng) == "x" and pick_caption(["x"], 1.0, rng) == ""
