"""Bad input never stops a run: each bad sample is skipped, counted and named; too many stop it clearly."""

import io
import logging

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer

import lcm_lora.data.loader as loader
from lcm_lora.config import DataArgs, TrainConfig
from lcm_lora.data import BadSample, BadSampleLog, DataError, load_source, make_dataloader, open_image
from lcm_lora.trainer import train
from lcm_lora.world import assets
from lcm_lora.world.scene import sample


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def test_odd_but_valid_images_become_upright_rgb(tmp_path):
    gray = Image.fromarray(np.full((40, 60), 128, np.uint8), mode="L")
    sixteen = Image.fromarray(np.full((40, 60), 65535 // 2, np.uint16))  # mode I;16
    cmyk = Image.new("CMYK", (60, 40), (0, 255, 255, 0))  # red in ink
    rgba = Image.new("RGBA", (60, 40), (255, 0, 0, 0))  # fully transparent red
    palette = Image.new("P", (60, 40), 3)
    for image, fmt in ((gray, "PNG"), (sixteen, "PNG"), (cmyk, "JPEG"), (rgba, "PNG"), (palette, "PNG")):
        decoded = open_image({"bytes": _png(image, format=fmt), "path": None})
        assert decoded.mode == "RGB" and decoded.size == (60, 40), image.mode
    assert open_image({"bytes": _png(sixteen)}).getpixel((0, 0)) == (127, 127, 127)  # 32767 of 65535: rescaled, not clipped
    assert open_image({"bytes": _png(cmyk, format="JPEG")}).getpixel((0, 0))[0] > 200
    assert open_image({"bytes": _png(rgba)}).getpixel((0, 0)) == (255, 255, 255)  # composited onto white

    # A phone photo stored landscape with EXIF "rotate 90" comes out portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = open_image({"bytes": _png(Image.new("RGB", (60, 40)), format="JPEG", exif=exif)})
    assert rotated.size == (40, 60)


@pytest.mark.parametrize("case, reason", [
    ("corrupt", "unreadable image"),
    ("truncated", "unreadable image"),
    ("not_an_image", "unreadable image"),
    ("bomb", "decompression bomb"),
])
def test_unreadable_files_raise_bad_sample(tmp_path, monkeypatch, case, reason):
    good = _png(Image.fromarray(sample(0)[1]))
    data = {"corrupt": bytes(range(256)) * 4, "truncated": good[: len(good) // 2],
            "not_an_image": b"<html>404 not found</html>", "bomb": good}[case]
    if case == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 pixels is "too many" here
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with pytest.raises(BadSample, match=reason):
        open_image(str(path))


def _folder(root, bad: dict[str, bytes | None], good: int = 8):
    """`good` world images with captions, plus bad ones: name -> image bytes (None: caption problem)."""
    root.mkdir(parents=True, exist_ok=True)
    for seed in range(good):
        scene, image = sample(seed)
        Image.fromarray(image).save(root / f"good{seed}.png")
        (root / f"good{seed}.txt").write_text(scene.caption)
    for name, data in bad.items():
        (root / name).write_bytes(data if data is not None else _png(Image.fromarray(sample(99)[1])))
        if name != "nocaption.png":
            (root / name).with_suffix(".txt").write_text("" if name == "emptycaption.png" else "a caption")
    return root


BAD = {
    "corrupt.png": bytes(range(256)) * 4,
    "tiny.png": _png(Image.new("RGB", (4, 4))),
    "notes.jpg": b"plain text with an image name",
    "nocaption.png": None,
    "emptycaption.png": None,
}


def test_bad_samples_are_replaced_counted_and_named(tmp_path, caplog):
    args = DataArgs(train_data_dir=str(_folder(tmp_path, BAD)), resolution=64)
    ds = load_source(args)
    tokenizer = CLIPTokenizer.from_pretrained(assets.resolve("teacher-eps") / "tokenizer")
    batch = make_dataloader(ds, tokenizer, args, batch_size=len(ds), seed=0).collate_fn([(0, i, row) for i, row in enumerate(ds)])
    assert batch["pixel_values"].shape[0] == len(ds) == 13  # replaced, so the batch keeps its size
    named = {name.rsplit("/", 1)[-1]: reason for name, reason in batch["skipped"]}
    assert set(BAD) <= set(named)
    assert named["corrupt.png"].startswith("unreadable image") and named["notes.jpg"].startswith("unreadable image")
    assert named["tiny.png"].startswith("too small (4x4")
    assert named["nocaption.png"] == named["emptycaption.png"] == "missing or empty caption"

    log = BadSampleLog(max_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        log.add(len(batch["pixel_values"]), batch["skipped"])
    assert "corrupt.png" in caplog.text and log.skipped == len(batch["skipped"])
    # Replacements are drawn at random and may be bad too, so each reason counts at least its files.
    assert set(log.reasons) == {"unreadable image", "too small", "missing or empty caption"}
    assert log.reasons["missing or empty caption"] >= 2 and "used 13" in log.summary()


def test_warnings_are_rate_limited(caplog):
    log = BadSampleLog(max_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        for i in range(250):
            log.add(1000, [(f"f{i}", "unreadable image (x)")])
    assert len(caplog.records) == loader.WARN_FIRST + 2  # the first ten, then the 100th and 200th
    assert log.summary() == "skipped 250 samples (250 unreadable image); used 250000"


def test_too_many_bad_samples_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    data = _folder(tmp_path / "data", {f"bad{i}.png": b"junk" for i in range(8)})
    monkeypatch.setattr(loader, "MIN_SAMPLES_FOR_FRACTION", 4)
    config = TrainConfig.from_flat_dict(dict(
        pretrained_teacher_model="teacher-eps", train_data_dir=str(data), resolution=64, train_batch_size=4,
        max_train_steps=4, lora_rank=4, report_to="none", seed=0, output_dir=str(tmp_path / "out"),
        max_bad_samples_fraction=0.2))
    with pytest.raises(DataError, match=r"were bad \(skipped .* unreadable image.*--max_bad_samples_fraction 0.2"):
        train(config)


def test_a_run_with_a_few_bad_samples_finishes_and_reports_them(tmp_path, capsys):
    data = _folder(tmp_path / "data", {"corrupt.png": BAD["corrupt.png"]})
    config = TrainConfig.from_flat_dict(dict(
        pretrained_teacher_model="teacher-eps", train_data_dir=str(data), resolution=64, train_batch_size=9,
        max_train_steps=1, lora_rank=4, report_to="none", seed=0, output_dir=str(tmp_path / "out")))
    out = train(config)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "data: skipped 1 samples (1 unreadable image); used 9" in capsys.readouterr().out
