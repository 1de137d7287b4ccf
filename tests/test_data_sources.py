"""Every source gives the same rows and batches: imagefolder, caption files, parquet, arrow, jsonl."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from lcm_lora.config import DataArgs
from lcm_lora.data import DataError, load_source, make_dataloader, open_image
from lcm_lora.world import assets
from lcm_lora.world.dataset import write_imagefolder
from lcm_lora.world.scene import sample

N = 8


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(assets.resolve("teacher-eps") / "tokenizer")


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"), N)


def _pairs(ds, args: DataArgs) -> set:
    """(pixels, caption) of every row, decoded the way the loader decodes them."""
    out = set()
    for row in ds:
        caption = row[args.caption_column]
        caption = caption if isinstance(caption, str) else caption[0]
        out.add((np.asarray(open_image(row[args.image_column])).tobytes(), caption))
    return out


def _truth() -> set:
    return {(sample(seed)[1].tobytes(), sample(seed)[0].caption) for seed in range(N)}


def test_caption_files_are_found_recursively_with_txt_or_caption(tmp_path):
    for seed in range(N):
        scene, image = sample(seed)
        folder = tmp_path / ("a" if seed % 2 else "b/deeper")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{seed}.png")
        (folder / f"{seed}.{'txt' if seed % 3 else 'caption'}").write_text(scene.caption + "\n\n")
    (tmp_path / "notes.md").write_text("not data")
    args = DataArgs(train_data_dir=str(tmp_path), resolution=64)
    ds = load_source(args)
    assert len(ds) == N and _pairs(ds, args) == _truth()


def test_several_caption_lines_are_several_captions(tmp_path, tokenizer):
    Image.fromarray(sample(0)[1]).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a red circle\na round red thing\n")
    args = DataArgs(train_data_dir=str(tmp_path), resolution=64)
    ds = load_source(args)
    assert ds[0]["text"] == ["a red circle", "a round red thing"]
    collate = make_dataloader(ds, tokenizer, args, batch_size=1, seed=0).collate_fn
    per_epoch = [tuple(collate([(epoch, 0, ds[0])])["input_ids"][0, 1:4].tolist()) for epoch in range(30)]
    assert len(set(per_epoch)) == 2  # both captions drawn, one per epoch
    assert per_epoch == [tuple(collate([(e, 0, ds[0])])["input_ids"][0, 1:4].tolist()) for e in range(30)]


@pytest.mark.parametrize("kind", ["parquet", "arrow_folder", "jsonl"])
def test_local_dataset_files_load_like_the_imagefolder(imagefolder, tmp_path, kind):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(imagefolder), split="train")
    if kind == "parquet":
        path = tmp_path / "train.parquet"
        ds.to_parquet(str(path))
    elif kind == "arrow_folder":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    else:
        path = tmp_path / "train.jsonl"
        rows = [{"image": str(imagefolder / r["file_name"]), "text": r["text"]}
                for r in map(json.loads, (imagefolder / "metadata.jsonl").read_text().splitlines())]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = DataArgs(dataset_name=str(path), resolution=64)
    assert _pairs(load_source(args), args) == _truth()


def test_every_source_gives_the_same_batch(imagefolder, tmp_path, tokenizer):
    import datasets

    datasets.load_dataset("imagefolder", data_dir=str(imagefolder), split="train").to_parquet(str(tmp_path / "t.parquet"))
    batches = []
    for args in (DataArgs(train_data_dir=str(imagefolder), resolution=64),
                 DataArgs(dataset_name=str(tmp_path / "t.parquet"), resolution=64)):
        batches.append(next(iter(make_dataloader(load_source(args), tokenizer, args, batch_size=4, seed=0))))
    for key in ("pixel_values", "input_ids", "original_size", "crop_top_left"):
        assert torch.equal(batches[0][key], batches[1][key]), key


def test_unusable_sources_fail_before_training_with_the_flag_named(tmp_path):
    with pytest.raises(DataError, match="--train_data_dir .*: no such folder"):
        load_source(DataArgs(train_data_dir=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="no images .* and no metadata file"):
        load_source(DataArgs(train_data_dir=str(tmp_path)))
    Image.new("RGB", (64, 64)).save(tmp_path / "lonely.png")
    with pytest.raises(DataError, match="none of its 1 images has a caption file"):
        load_source(DataArgs(train_data_dir=str(tmp_path)))
    (tmp_path / "data.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match=r"--dataset_name .*data.xlsx: cannot read .xlsx files"):
        load_source(DataArgs(dataset_name=str(tmp_path / "data.xlsx")))


def test_random_draws_do_not_depend_on_the_number_of_workers(imagefolder, tokenizer):
    # Each sample's flip and emptied caption are keyed by (epoch, index), so workers neither repeat each
    # other's draws nor change them: 0 and 2 workers give the same batches.
    args = DataArgs(train_data_dir=str(imagefolder), resolution=64, random_flip=True, proportion_empty_prompts=0.5)
    ds = load_source(args)
    epochs = []
    for workers in (0, 2):
        args.dataloader_num_workers = workers
        loader = make_dataloader(ds, tokenizer, args, batch_size=2, seed=0)
        epochs.append([(b["pixel_values"], b["input_ids"]) for b in loader])
    assert len(epochs[0]) == len(epochs[1]) == N // 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*epochs))
    unflipped = DataArgs(train_data_dir=str(imagefolder), resolution=64)  # same shuffle, no flips
    plain = torch.cat([b["pixel_values"] for b in make_dataloader(ds, tokenizer, unflipped, batch_size=2, seed=0)])
    drawn = torch.cat([pixels for pixels, _ in epochs[0]])
    flipped = sum(torch.equal(d, p.flip(-1)) and not torch.equal(d, p) for d, p in zip(drawn, plain))
    assert 0 < flipped < N  # the draws really happen
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    emptied = sum(torch.equal(ids, empty[0]) for _, batch_ids in epochs[0] for ids in batch_ids)
    assert 0 < emptied < N
