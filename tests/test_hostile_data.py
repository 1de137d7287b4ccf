"""Hostile data: decoding never raises past the skip, never hangs, and never blows up memory or time.

Each case was found by fuzzing or by a run that ended: malformed EXIF, unreadable caption files, extreme aspect
ratios, FIFOs named as samples or shards, and stop signals sent to the whole process group."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from lcm_lora.config import DataArgs
from lcm_lora.data import BadSample, BadSampleLog, DataError, load_source, make_dataloader, open_image, preprocess_image
from lcm_lora.data.images import MAX_RESIZED_CROPS, crop_box, resized_size
from lcm_lora.data.loader import decode_row, shuffled_loader
from lcm_lora.world import assets
from lcm_lora.world.dataset import write_shards
from lcm_lora.world.scene import sample

FORMATS = ("JPEG", "PNG", "WEBP")
MUTANTS = 1000  # per format; before the fix 9 of these 3000 escaped (struct.error, in all three formats)
DEADLINE_S = 20  # a FIFO blocks for ever: past this, the decode is called hung


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(assets.resolve("teacher-eps") / "tokenizer")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _exif_bytes() -> bytes:
    """A phone photo's EXIF: "rotate 90", a maker, dates in the main and the Exif IFD."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    exif[0x010F] = "maker"  # Make
    exif[0x0132] = "2024:01:01 00:00:00"  # DateTime
    exif.get_ifd(0x8769)[0x9003] = "2024:01:01 00:00:00"  # DateTimeOriginal
    return exif.tobytes()


def _row(image) -> dict:
    return {"image": image, "text": "a caption"}


# -- Malformed EXIF and fuzzed files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_a_malformed_exif_block_is_a_bad_sample_naming_the_error(fmt):
    # The Make tag's id rewritten to SampleFormat's: PIL reads the ASCII value, then exif_transpose cannot pack
    # it back as the SHORT that tag should be and raised struct.error, which ended the run.
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "maker"
    malformed = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x53\x00\x02")
    data = _encode(Image.new("RGB", (24, 16)), fmt, exif=malformed)
    with pytest.raises(BadSample, match=r"^unreadable image \(struct\.error: "):
        open_image({"bytes": data, "path": None})


def _mutants(rng: random.Random, fmt: str, count: int) -> list[bytes]:
    """`count` files of `fmt`: three in four carry a byte-mutated EXIF block in a valid container, the others are
    the whole file byte-mutated (PNG's CRCs make most of those unreadable; JPEG and WebP decode many)."""
    image = Image.fromarray(sample(3)[1]).resize((24, 16))
    exif, clean = _exif_bytes(), _encode(image, fmt, exif=_exif_bytes())
    out = []
    for i in range(count):
        mutate_exif = i % 4 != 0
        data = bytearray(exif if mutate_exif else clean)
        start = 6 if mutate_exif else 0  # keep the "Exif\0\0" marker: PIL then parses the mutated block
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(start, len(data))] = rng.randrange(256)
        out.append(_encode(image, fmt, exif=bytes(data)) if mutate_exif else bytes(data))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about each corrupt EXIF block it skips
def test_fuzzed_images_decode_to_rgb_or_become_bad_samples():
    rng, args = random.Random(0), DataArgs(resolution=16, center_crop=False, random_flip=True)
    outcomes, escaped = {"decoded": 0, "bad": 0}, []
    for fmt in FORMATS:
        for n, data in enumerate(_mutants(rng, fmt, MUTANTS)):
            value = {"bytes": data, "path": f"{fmt}-{n}"}
            try:
                image = open_image(value)
                pixels, _, _ = decode_row(_row(value), args, random.Random(n))
            except BadSample:
                outcomes["bad"] += 1
                continue
            except Exception as err:  # the promise broken: this would end a run
                escaped.append(f"{fmt} mutant {n}: {type(err).__module__}.{type(err).__qualname__}: {err}")
                continue
            assert image.mode == "RGB" and min(image.size) > 0
            assert pixels.shape == (3, 16, 16) and pixels.abs().max() <= 1
            outcomes["decoded"] += 1
    assert not escaped, f"{len(escaped)} of {len(FORMATS) * MUTANTS} mutants escaped the skip: {escaped[:5]}"
    assert min(outcomes.values()) > 50, outcomes  # the fuzz reaches both outcomes


# -- Unreadable caption files ------------------------------------------------------------------------------------------

def _caption_folder(root, good: int = 4):
    root.mkdir(parents=True, exist_ok=True)
    for seed in range(good):
        scene, image = sample(seed)
        Image.fromarray(image).save(root / f"good{seed}.png")
        (root / f"good{seed}.txt").write_text(scene.caption)
    return root


def test_an_unreadable_caption_file_is_a_counted_bad_sample(tmp_path, monkeypatch, tokenizer):
    # Tests run as root, so chmod 000 would not stop a read: the read itself is made to fail as it would.
    root = _caption_folder(tmp_path)
    Image.fromarray(sample(9)[1]).save(root / "locked.png")
    (root / "locked.txt").write_text("a caption nobody may read")
    read_bytes = type(root).read_bytes

    def refuse_locked(path):
        if path.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(type(root), "read_bytes", refuse_locked)
    args = DataArgs(train_data_dir=str(root), resolution=64)
    ds = load_source(args)  # the model would load after this: the file must not be read yet
    log, used = BadSampleLog(max_fraction=1.0), 0
    for batch in make_dataloader(ds, tokenizer, args, batch_size=5, seed=0):
        used += len(batch["pixel_values"])
        log.add(len(batch["pixel_values"]), batch["skipped"])
        for name, reason in batch["skipped"]:
            assert name.endswith("locked.png")
            assert reason.startswith("unreadable caption file (PermissionError: [Errno 13] Permission denied")
    assert used == 5 and log.reasons["unreadable caption file"] >= 1 and set(log.reasons) == {"unreadable caption file"}


# -- Extreme aspect ratios ---------------------------------------------------------------------------------------------

def _resize_then_crop(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                      rng: random.Random) -> tuple[torch.Tensor, dict]:
    """preprocess_image as it was before the bounded path: the pipeline the published numbers were made with."""
    w, h = image.size
    new_size = resized_size((w, h), resolution)
    box = crop_box(new_size, resolution, center_crop, rng)
    if new_size != (w, h):
        image = image.resize(new_size, Image.BICUBIC)
    image = image.crop(box)
    flipped = random_flip and rng.random() < 0.5
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    left = new_size[0] - box[2] if flipped else box[0]  # the crop as seen in the flipped image
    return pixels, {"original_size": (h, w), "crop_top_left": (box[1], left), "flipped": flipped}


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(64, 64), (100, 75), (75, 100), (640, 480), (33, 130), (300, 32), (16, 16),
                                  (1024, 64), (64, 999)])
@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_ordinary_images_preprocess_bit_identically_to_resize_then_crop(size, resolution):
    # Noise is the hardest case: any change of a resampling tap or of rounding shows in it. (1024, 64) at 64 is a
    # 16:1 banner, exactly MAX_RESIZED_CROPS crops when resized: still the plain path.
    if min(size) < resolution / 4:
        pytest.skip("refused as too small")
    image = _noise(*size, seed=sum(size) + resolution)
    for center_crop in (True, False):
        for seed in range(3):
            ours = preprocess_image(image, resolution, center_crop, True, random.Random(seed))
            old = _resize_then_crop(image, resolution, center_crop, True, random.Random(seed))
            assert torch.equal(ours[0], old[0]) and ours[1] == old[1], (size, resolution, center_crop, seed)


@pytest.mark.parametrize("size, resolution", [((2000, 24), 64), ((20, 3000), 32), ((4000, 200), 16)])
def test_very_long_images_resample_only_the_crop_and_nearly_match(size, resolution):
    w, h = size
    assert resized_size(size, resolution)[0] * resized_size(size, resolution)[1] > MAX_RESIZED_CROPS * resolution ** 2
    y, x = np.mgrid[0:h, 0:w]
    smooth = (127 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)).astype(np.uint8)  # photo-like: no pixel-level noise
    image = Image.fromarray(np.stack([smooth, smooth[::-1], 255 - smooth], -1))
    for center_crop in (True, False):
        for seed in range(3):
            ours = preprocess_image(image, resolution, center_crop, True, random.Random(seed))
            old = _resize_then_crop(image, resolution, center_crop, True, random.Random(seed))
            assert ours[1] == old[1]  # the same crop box and flip
            assert (ours[0] - old[0]).abs().max() * 127.5 <= 2.5  # within 2 of 255 (float32 box coordinates)


EXTREME_DECODE = """
import json, random, resource, sys, time
from lcm_lora.config import DataArgs
from lcm_lora.data.loader import decode_row
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
pixels, geometry, _ = decode_row({"image": sys.argv[1], "text": "x"}, DataArgs(resolution=32), random.Random(0))
print(json.dumps({"shape": list(pixels.shape), "original_size": geometry["original_size"],
                  "seconds": time.perf_counter() - start,
                  "grown_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_an_extreme_aspect_image_decodes_in_seconds_and_bounded_memory(tmp_path):
    # 4,000,000 x 8 pixels (31 KB of PNG, under PIL's pixel limit; the 8 px short side is exactly a quarter of
    # --resolution 32, so it is used, not refused): resized whole it would be 16,000,000 x 32, gigabytes and
    # tens of seconds. Run in a subprocess to measure its own peak memory and to stop it if it regresses.
    path = tmp_path / "banner.png"
    Image.new("L", (4_000_000, 8), 90).save(path, compress_level=9)
    done = subprocess.run([sys.executable, "-c", EXTREME_DECODE, str(path)], capture_output=True, text=True,
                          timeout=40)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["shape"] == [3, 32, 32] and measured["original_size"] == [8, 4_000_000]
    assert measured["seconds"] < 10 and measured["grown_mb"] < 1024, measured  # resized whole: 17 s, 3 GB here


# -- FIFOs and other non-regular files, in every layout ----------------------------------------------------------------

def _release(fifos) -> None:
    """Open each FIFO for writing and close it: a reader blocked on one gets end-of-file and returns."""
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # nobody is reading it
            pass


def _within_deadline(fn, fifos):
    """fn()'s result; the test fails, instead of hanging, if fn is still blocked after DEADLINE_S."""
    outcome = {}

    def run():
        try:
            outcome["result"] = fn()
        except BaseException as err:  # handed to the test's thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        _release(fifos)
        thread.join(DEADLINE_S)
        pytest.fail(f"still blocked after {DEADLINE_S} s: a FIFO was opened")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _skipped(ds, args: DataArgs, tokenizer) -> dict[str, str]:
    """file name -> reason of the rows the loader's collate skips in one pass over `ds`."""
    collate = make_dataloader(ds, tokenizer, args, batch_size=len(ds), seed=0).collate_fn
    batch = collate([(0, i, ds[i]) for i in range(len(ds))])
    assert len(batch["pixel_values"]) == len(ds)  # replaced, so the batch keeps its size
    return {name.rsplit("/", 1)[-1]: reason for name, reason in batch["skipped"]}


def _fifo(path) -> str:
    os.mkfifo(path)
    return str(path)


def test_a_fifo_named_in_imagefolder_metadata_is_skipped(tmp_path, tokenizer):
    root = _caption_folder(tmp_path / "data")
    fifo = _fifo(root / "pipe.png")
    names = [f"good{seed}.png" for seed in range(4)] + ["pipe.png"]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x"}) + "\n" for n in names))
    args = DataArgs(train_data_dir=str(root), resolution=64)
    skipped = _within_deadline(lambda: _skipped(load_source(args), args, tokenizer), [fifo])
    assert skipped["pipe.png"].startswith("not a regular file (") and "is a FIFO" in skipped["pipe.png"]


def test_a_fifo_path_in_dataset_rows_is_skipped(tmp_path, tokenizer):
    root = _caption_folder(tmp_path / "images")
    fifo = _fifo(root / "pipe.png")
    rows = [{"image": str(root / f"good{seed}.png"), "text": "x"} for seed in range(4)] + [{"image": fifo, "text": "x"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = DataArgs(dataset_name=str(tmp_path / "rows.jsonl"), resolution=64)
    skipped = _within_deadline(lambda: _skipped(load_source(args), args, tokenizer), [fifo])
    assert skipped["pipe.png"].startswith("not a regular file (")


def test_fifos_and_folders_in_a_caption_folder_are_skipped(tmp_path, tokenizer):
    root = _caption_folder(tmp_path)
    image_fifo = _fifo(root / "pipe.png")  # an image that is a FIFO: never a sample
    (root / "pipe.txt").write_text("a caption")
    Image.fromarray(sample(5)[1]).save(root / "piped.png")
    caption_fifo = _fifo(root / "piped.txt")  # a caption file that is a FIFO
    Image.fromarray(sample(6)[1]).save(root / "foldered.png")
    (root / "foldered.txt").mkdir()  # a caption "file" that is a folder
    args = DataArgs(train_data_dir=str(root), resolution=64)
    ds = _within_deadline(lambda: load_source(args), [image_fifo, caption_fifo])
    assert len(ds) == 6 and not any(path.endswith("pipe.png") for path in ds[:][args.image_column])
    skipped = _within_deadline(lambda: _skipped(ds, args, tokenizer), [image_fifo, caption_fifo])
    assert "is a FIFO" in skipped["piped.png"] and "is a folder" in skipped["foldered.png"]
    assert all(reason.startswith("not a regular file (") for reason in skipped.values())


def test_a_fifo_among_shards_is_a_counted_skip_or_refused_by_name(tmp_path, tokenizer):
    pytest.importorskip("webdataset")
    from lcm_lora.data.shards import ShardStream, expand_shards

    write_shards(tmp_path, 2, shard_size=2)  # shard-00000.tar
    fifo = _fifo(tmp_path / "shard-00001.tar")
    args = DataArgs(train_shards_path_or_url=str(tmp_path / "*.tar"), resolution=64)
    stream = ShardStream(expand_shards(args.train_shards_path_or_url), args, tokenizer, 1, seed=0)
    batches = _within_deadline(lambda: list(stream), [fifo])
    skipped = [s for batch in batches for s in batch["skipped"]]
    assert sum("pixel_values" in batch for batch in batches) == 2
    assert skipped == [(fifo, f"not a regular file ({fifo} is a FIFO)")]
    with pytest.raises(DataError, match=r"--train_shards_path_or_url: not a regular file \(.*01\.tar is a FIFO\)"):
        expand_shards(fifo)


# -- Data-loader workers and stop signals ------------------------------------------------------------------------------

def _indices(items: list[tuple[int, int, int]]) -> list[int]:
    return [value for _, _, value in items]


def _signal_from_another_process(pids: list[int], *signals: signal.Signals) -> None:
    """As Slurm, systemd or a shell send them: from a process that is not the workers' parent (whose SIGTERM
    is the loader's own shutdown and must still end a worker)."""
    for sig in signals:
        subprocess.run(["kill", f"-{sig.name[3:]}", *map(str, pids)], check=True)


def _survives_stop_signals(loader, num_workers: int = 2) -> list:
    """Every batch of one epoch, SIGTERM and SIGINT having been sent to each worker once each has made a batch;
    the workers are gone after the loader's shutdown."""
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(num_workers)]  # batch k comes from worker k: all are set up
    workers = list(iterator._workers)
    _signal_from_another_process([w.pid for w in workers], signal.SIGTERM, signal.SIGINT)
    time.sleep(0.5)  # let the signals land before the workers are asked for more
    batches += list(iterator)  # a worker killed by them: RuntimeError "DataLoader worker ... exited unexpectedly"
    iterator._shutdown_workers()  # what deleting the loader (or the end of a run) does
    assert not any(worker.is_alive() for worker in workers)
    return batches


def test_map_style_loader_workers_ignore_stop_signals():
    loader = shuffled_loader(list(range(16)), _indices, DataArgs(dataloader_num_workers=2), batch_size=2, seed=0)
    batches = _survives_stop_signals(loader)
    assert sorted(i for batch in batches for i in batch) == list(range(16))


def test_shard_loader_workers_ignore_stop_signals(tmp_path, tokenizer):
    pytest.importorskip("webdataset")
    from lcm_lora.data.shards import make_shard_dataloader

    write_shards(tmp_path, 8, shard_size=2)
    args = DataArgs(train_shards_path_or_url=str(tmp_path / "*.tar"), resolution=64, dataloader_num_workers=2)
    batches = _survives_stop_signals(make_shard_dataloader(args, tokenizer, 1, seed=0, rank=0, world_size=1))
    assert sum(len(batch["pixel_values"]) for batch in batches) == 8


def _shuffle_orders(loader, epochs) -> list[list[int]]:
    """Each epoch's sample order, the epoch set as the trainer sets it."""
    orders = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        orders.append([i for batch in loader for i in batch])
    return orders


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_shuffles_as_the_uninterrupted_run_with_or_without_workers(workers):
    # The trainer resumes by restoring the loader generator's state at the epoch's start. Persistent workers
    # drew their base seed from it in the first epoch only, so with workers a resumed epoch was shuffled
    # differently from the uninterrupted run (which also shuffled differently from a run without workers).
    def make(num_workers: int):
        return shuffled_loader(list(range(16)), _indices, DataArgs(dataloader_num_workers=num_workers), 4, seed=0)

    whole = make(workers)
    uninterrupted, epoch_2_start = _shuffle_orders(whole, range(2)), whole.generator.get_state()
    uninterrupted += _shuffle_orders(whole, [2])
    resumed = make(workers)
    resumed.generator.set_state(epoch_2_start)
    assert _shuffle_orders(resumed, [2]) == uninterrupted[2:]
    assert uninterrupted == _shuffle_orders(make(0), range(3))  # the same as without workers


EXIT_WITH_LIVE_WORKERS = """
import os, subprocess, sys
from lcm_lora.config import DataArgs
from lcm_lora.data.loader import shuffled_loader
loader = shuffled_loader(list(range(16)), lambda items: items, DataArgs(dataloader_num_workers=2), 2, 0)
iterator = iter(loader)
next(iterator), next(iterator)
subprocess.run(["kill", "-TERM", *(str(w.pid) for w in iterator._workers)], check=True)  # the group's SIGTERM
print(" ".join(str(w.pid) for w in iterator._workers), flush=True)
sys.exit(3)  # the iterator still referenced: multiprocessing's exit handler terminates and joins the workers
"""


def test_a_process_exiting_with_live_workers_still_exits(tmp_path):
    # Ignoring every SIGTERM would hang here for ever: the exit handler's terminate() would be ignored too.
    done = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3, done.stderr[-2000:]
    for pid in map(int, done.stdout.split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone
