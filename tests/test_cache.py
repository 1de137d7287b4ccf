"""Cached encodings: training from a cache matches training from images, without the encoders."""

import pytest
import torch
from safetensors.torch import load_file

import lcm_lora.trainer as trainer
from lcm_lora.caching import write_cache
from lcm_lora.config import TrainConfig
from lcm_lora.data import DataError
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME
from lcm_lora.world.dataset import write_imagefolder

REAL_LOSS, REAL_LOAD = trainer.lcd_loss, trainer.load_teacher


def _config(**values) -> TrainConfig:
    base = dict(pretrained_teacher_model="teacher-eps", resolution=64, train_batch_size=4, max_train_steps=3,
                lora_rank=4, lora_alpha=8, learning_rate=1e-3, lr_warmup_steps=0, report_to="none", seed=0,
                proportion_empty_prompts=0.3)
    return TrainConfig.from_flat_dict({**base, **values})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    images = write_imagefolder(root / "images", 16)
    write_cache(_config(train_data_dir=str(images)), root / "cache")
    return images, root / "cache"


def _run(monkeypatch, config: TrainConfig) -> tuple[list[float], dict, object]:
    """Losses of each step, the exported LoRA, and the teacher the trainer loaded."""
    losses, loaded = [], {}

    def recording_loss(*args, **kwargs):
        loss = REAL_LOSS(*args, **kwargs)
        losses.append(loss.mean().item())
        return loss

    def recording_load(*args, **kwargs):
        loaded["teacher"] = REAL_LOAD(*args, **kwargs)
        return loaded["teacher"]

    monkeypatch.setattr(trainer, "lcd_loss", recording_loss)
    monkeypatch.setattr(trainer, "load_teacher", recording_load)
    out = trainer.train(config)
    return losses, load_file(out / DIFFUSERS_WEIGHT_NAME), loaded["teacher"]


def test_training_from_a_cache_gives_the_same_losses_without_the_encoders(world, monkeypatch, tmp_path):
    images, cache = world
    losses_a, lora_a, _ = _run(monkeypatch, _config(train_data_dir=str(images), output_dir=str(tmp_path / "a")))
    losses_b, lora_b, teacher = _run(monkeypatch, _config(encodings_dir=str(cache), output_dir=str(tmp_path / "b")))
    assert teacher.vae is None and teacher.text_encoder is None and teacher.tokenizer is None
    assert len(losses_a) == len(losses_b) == 3
    # Same batches, captions, emptied prompts and posterior samples: measured bit-identical on CPU;
    # the tolerance leaves room for GPU kernels that differ with batch composition.
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    assert lora_a.keys() == lora_b.keys()
    assert all(torch.allclose(lora_a[k], lora_b[k], atol=1e-6) for k in lora_a)


def test_a_cache_for_another_teacher_or_resolution_is_refused(world, tmp_path):
    _, cache = world
    with pytest.raises(DataError, match="written for another teacher.*teacher-eps.*teacher-vpred"):
        trainer.train(_config(encodings_dir=str(cache), pretrained_teacher_model="teacher-vpred",
                              output_dir=str(tmp_path)))
    with pytest.raises(DataError, match="holds --resolution 64, this run asks for 32"):
        trainer.train(_config(encodings_dir=str(cache), resolution=32, output_dir=str(tmp_path)))
    with pytest.raises(DataError, match="no manifest.json"):
        trainer.train(_config(encodings_dir=str(tmp_path), output_dir=str(tmp_path / "out")))


def test_cache_flags_that_it_cannot_honour_are_rejected():
    problems = _config(encodings_dir="c", random_flip=True).validate()
    assert any("--encodings_dir holds one center crop" in p for p in problems)
    assert any("only one of --train_data_dir, --encodings_dir" in p
               for p in _config(encodings_dir="c", train_data_dir="d").validate())


def test_a_cache_from_shards_holds_the_same_encodings_as_from_the_folder(world, tmp_path):
    pytest.importorskip("webdataset")
    from lcm_lora.world.dataset import write_shards

    _, cache = world
    write_shards(tmp_path / "shards", 16, shard_size=5)  # the same 16 samples, in the same order
    manifest = write_cache(_config(train_shards_path_or_url=str(tmp_path / "shards" / "*.tar")), tmp_path / "c")
    assert manifest["num_samples"] == 16 and manifest["skipped"] == {}
    ours, theirs = load_file(tmp_path / "c" / "shard-00000.safetensors"), load_file(cache / "shard-00000.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_data_source_on_the_command_line_replaces_the_presets(tmp_path):
    from lcm_lora.config import parse_train_args

    preset = tmp_path / "preset.yaml"
    preset.write_text("pretrained_teacher_model: teacher-eps\ntrain_data_dir: data/tiny-world\n")
    config, _ = parse_train_args(["--config", str(preset), "--encodings_dir", "cache/x"])
    assert (config.data.encodings_dir, config.data.train_data_dir) == ("cache/x", None)
    config, _ = parse_train_args(["--config", str(preset)])
    assert (config.data.encodings_dir, config.data.train_data_dir) == (None, "data/tiny-world")


def test_the_cache_command_keeps_the_presets_source(world, tmp_path):
    from lcm_lora.cli import cache_main

    images, cache = world
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"pretrained_teacher_model: teacher-eps\ntrain_data_dir: {images}\nresolution: 64\n")
    cache_main(["--config", str(preset), "--encodings_dir", str(tmp_path / "c")])  # --encodings_dir: the output here
    written = load_file(tmp_path / "c" / "shard-00000.safetensors")
    assert torch.equal(written["latent_parameters"], load_file(cache / "shard-00000.safetensors")["latent_parameters"])


def test_the_cache_command_checks_the_teacher_before_loading_it(tmp_path, monkeypatch):
    from lcm_lora import caching
    from lcm_lora.cli import cache_main

    monkeypatch.setattr(caching, "load_teacher", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(SystemExit, match="--resolution 63 is not a multiple of the VAE's downsampling factor 4"):
        cache_main(["--pretrained_teacher_model", "teacher-eps", "--train_data_dir", str(tmp_path),
                    "--resolution", "63", "--encodings_dir", str(tmp_path / "c")])
