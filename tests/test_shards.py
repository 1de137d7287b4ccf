"""webdataset shards: the same samples as the other sources, split by rank and worker, bad shards counted."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from lcm_lora.config import DataArgs
from lcm_lora.data import BadSampleLog, DataError
from lcm_lora.data import shards as shards_module
from lcm_lora.data.shards import ShardStream, expand_shards, make_shard_dataloader
from lcm_lora.world import assets
from lcm_lora.world.dataset import write_shards
from lcm_lora.world.scene import sample

pytest.importorskip("webdataset")
N, SHARD = 12, 3


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(assets.resolve("teacher-eps") / "tokenizer")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, N, shard_size=SHARD)
    return out


def _args(spec, **kw) -> DataArgs:
    return DataArgs(train_shards_path_or_url=str(spec), resolution=64, **kw)


def _tar(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(sample(seed)[1]).save(out, format="png")
    return out.getvalue()


def _stream_rows(args: DataArgs, tokenizer, batch_size=1, **kw) -> tuple[list[dict], BadSampleLog]:
    """Every batch of one pass (one process, no workers) and the skip log they fill."""
    stream = ShardStream(expand_shards(args.train_shards_path_or_url), args, tokenizer, batch_size, seed=0, **kw)
    batches, log = list(stream), BadSampleLog(1.0)
    for batch in batches:
        log.add(len(batch.get("pixel_values", [])), batch["skipped"])
    return [b for b in batches if "pixel_values" in b], log


def test_shards_hold_the_same_samples_as_the_world(shard_dir, tokenizer):
    batches, log = _stream_rows(_args(shard_dir / "shard-*.tar"), tokenizer)
    decoded = {tokenizer.decode(b["input_ids"][0], skip_special_tokens=True) for b in batches}
    pixels = {np.round((b["pixel_values"][0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8).tobytes()
              for b in batches}
    assert len(batches) == N and log.skipped == 0
    assert decoded == {sample(seed)[0].caption for seed in range(N)}
    assert pixels == {sample(seed)[1].tobytes() for seed in range(N)}


def test_globs_braces_joins_and_pipes_name_the_same_shards(shard_dir):
    every = sorted(str(p) for p in shard_dir.glob("*.tar"))
    assert expand_shards(str(shard_dir / "shard-*.tar")) == every
    assert expand_shards(str(shard_dir / "shard-{00000..00003}.tar")) == every
    assert expand_shards(f"{every[0]}::{shard_dir}/shard-0000{{1,2,3}}.tar") == every
    assert expand_shards(f"pipe:cat {shard_dir}/shard-{{00000..00001}}.tar") == [f"pipe:cat {p}" for p in every[:2]]


def test_pipe_commands_are_read(shard_dir, tokenizer):
    batches, log = _stream_rows(_args(f"pipe:cat {shard_dir}/shard-{{00000..00003}}.tar"), tokenizer)
    assert len(batches) == N and log.skipped == 0


@pytest.mark.parametrize("spec, message", [
    ("missing/shard-000.tar", "no such shard 'missing/shard-000.tar'"),
    ("missing/*.tar", "'missing/*.tar' matches no file"),
])
def test_missing_shards_are_refused_naming_the_flag(spec, message):
    with pytest.raises(DataError, match="--train_shards_path_or_url") as err:
        expand_shards(spec)
    assert message in str(err.value)


def test_without_webdataset_the_error_says_what_to_install(shard_dir, tokenizer, monkeypatch):
    monkeypatch.setattr(shards_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install 'lcm-lora\[webdataset\]'"):
        make_shard_dataloader(_args(shard_dir / "*.tar"), tokenizer, 1, 0, 0, 1)


def test_ranks_and_workers_read_disjoint_shards_covering_all(shard_dir, tokenizer):
    urls = expand_shards(str(shard_dir / "*.tar"))
    args = _args(shard_dir / "*.tar", dataloader_num_workers=2)
    for epoch in range(3):
        taken = []
        for rank in range(2):
            stream = ShardStream(urls, args, tokenizer, 1, seed=0, rank=rank, world_size=2)
            stream.set_epoch(epoch)
            taken += [url for worker in range(2) for url in stream.shards(worker, 2)]
        assert sorted(taken) == sorted(urls)  # each shard read by exactly one reader
    orders = []
    for epoch in range(3):
        stream = ShardStream(urls, args, tokenizer, 1, seed=0)
        stream.set_epoch(epoch)
        orders.append(stream.shards())
    assert len({tuple(o) for o in orders}) > 1  # a new shard order each epoch


def test_too_few_shards_for_the_readers_is_refused_before_training(shard_dir, tokenizer):
    urls = expand_shards(str(shard_dir / "*.tar"))
    with pytest.raises(DataError, match="4 shards cannot feed 2 processes x 3 data-loader workers"):
        ShardStream(urls, _args(shard_dir / "*.tar", dataloader_num_workers=3), tokenizer, 1, seed=0,
                    rank=0, world_size=2)


def test_bad_shards_and_bad_samples_are_counted_skips(tmp_path, tokenizer):
    good = _tar(tmp_path / "good.tar", {"0.png": _png(0), "0.txt": b"a caption", "1.png": _png(1),
                                        "1.json": json.dumps({"caption": "laion style"}).encode()})
    bad_samples = _tar(tmp_path / "samples.tar", {"2.png": b"not an image", "2.txt": b"x", "3.txt": b"no image",
                                                  "4.png": _png(4), "4.txt": b"  \n"})
    _tar(tmp_path / "empty.tar", {})
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file at all" * 50)
    with tarfile.open(good) as tar:
        cut = tar.getmember("1.png").offset_data + 100  # inside the second sample's image
    (tmp_path / "truncated.tar").write_bytes(open(good, "rb").read()[:cut])
    spec = "::".join(str(tmp_path / n) for n in ("good.tar", "samples.tar", "empty.tar", "garbage.tar",
                                                 "truncated.tar"))
    batches, log = _stream_rows(_args(spec), tokenizer)
    captions = sorted(tokenizer.decode(b["input_ids"][0], skip_special_tokens=True) for b in batches)
    assert captions == ["a caption", "a caption", "laion style"]  # the truncated shard's first sample stays
    assert log.reasons == {"unreadable image": 1, "missing image": 1, "missing or empty caption": 1,
                           "empty shard": 1, "unreadable shard after 0 samples": 1,
                           "unreadable shard after 1 samples": 1}, log.reasons
    names = [name for batch in _stream_rows(_args(spec), tokenizer, batch_size=2)[0] for name, _ in batch["skipped"]]
    assert f"{bad_samples}:2" in names


def test_a_process_without_a_full_batch_in_an_epoch_stops_with_an_error(tmp_path):
    from lcm_lora import trainer
    from lcm_lora.config import TrainConfig

    spec = "::".join(_tar(tmp_path / f"empty{k}.tar", {}) for k in range(2))
    config = TrainConfig.from_flat_dict({"pretrained_teacher_model": "teacher-eps", "train_shards_path_or_url": spec,
                                         "resolution": 64, "train_batch_size": 2, "max_train_steps": 1,
                                         "lora_rank": 4, "report_to": "none", "output_dir": str(tmp_path / "out")})
    with pytest.raises(DataError, match=r"process 0 got no complete batch in a whole epoch \(skipped 2 samples "
                                        r"\(2 empty shard\)"):
        trainer.train(config)


def _train_from_shards(spec: str, out, **overrides):
    from lcm_lora import trainer
    from lcm_lora.config import TrainConfig

    values = dict(pretrained_teacher_model="teacher-eps", train_shards_path_or_url=spec, resolution=64,
                  train_batch_size=2, lora_rank=4, lora_alpha=8, learning_rate=1e-3, lr_warmup_steps=0,
                  report_to="none", seed=0, output_dir=str(out), checkpointing_steps=0)
    return trainer.train(TrainConfig.from_flat_dict({**values, **overrides}))


def test_resuming_a_stream_continues_exactly_where_it_stopped(shard_dir, tmp_path):
    from safetensors.torch import load_file

    from lcm_lora.export import DIFFUSERS_WEIGHT_NAME

    spec = str(shard_dir / "*.tar")  # 12 samples, batch 2: 6 batches per epoch
    whole = load_file(_train_from_shards(spec, tmp_path / "whole", max_train_steps=8) / DIFFUSERS_WEIGHT_NAME)
    for stop in (3, 7):  # within the first epoch, and within the second
        out = tmp_path / f"stop{stop}"
        _train_from_shards(spec, out, max_train_steps=stop, checkpointing_steps=stop)
        resumed = load_file(_train_from_shards(spec, out, max_train_steps=8, resume_from_checkpoint="latest")
                            / DIFFUSERS_WEIGHT_NAME)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), f"resumed at step {stop}"
