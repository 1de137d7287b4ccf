"""`lcm-lora generate` on the bundled tiny teachers: images named by prompt and seed, each drawn from its own seed
whatever the batch, their settings in PNG text, no file replaced without --overwrite, files under the user's umask,
and a user's mistakes as one line `error: ...`."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_lora.cli import generate_main
from lcm_lora.inference import draw, image_specs, load_lcm_pipeline, save_images
from lcm_lora.safetensors_io import save_safetensors_atomic

PROMPTS = ["a red circle", "a blue square"]


def _generate(out, *extra, model="teacher-eps", lora=("--lora", "style-dusk")):
    return ["--pretrained_model", model, *lora, "--prompt", *PROMPTS, "--num_inference_steps", "2",
            "--output_dir", str(out), "--device", "cpu", *extra]


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.fixture(scope="module")
def eps_pipe():
    return load_lcm_pipeline("teacher-eps", "style-dusk")


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_each_image_comes_from_its_own_seed_whatever_the_batch(eps_pipe, guidance_scale):
    specs = image_specs(PROMPTS, seed=7, num_images_per_prompt=2, negative_prompts=["blurry"])
    assert [(s.prompt_index, s.seed) for s in specs] == [(0, 7), (0, 8), (1, 9), (1, 10)]
    one = _pixels(draw(eps_pipe, specs, 2, guidance_scale, batch_size=1))
    three = _pixels(draw(eps_pipe, specs, 2, guidance_scale, batch_size=3))  # calls of images [0, 1, 2] and [3]
    alone = _pixels(draw(eps_pipe, specs[2:3], 2, guidance_scale))
    assert np.array_equal(alone[0], one[2])  # its prompt and seed alone draw image 2 again, bit for bit
    # The same noise in any batch; batched float kernels round differently, so a rare pixel moves by one level.
    diff = np.abs(one - three)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    assert np.abs(one[0] - one[1]).mean() > 5  # the next seed is another image


def test_a_negative_prompt_acts_only_above_guidance_1_as_in_diffusers(eps_pipe):
    plain, negative = image_specs(PROMPTS[:1], 3), image_specs(PROMPTS[:1], 3, negative_prompts=["a blue square"])
    for guidance_scale, same in ((1.0, True), (2.0, False)):
        a, b = _pixels(draw(eps_pipe, plain, 2, guidance_scale)), _pixels(draw(eps_pipe, negative, 2, guidance_scale))
        assert np.array_equal(a, b) == same, guidance_scale


def test_images_are_named_by_prompt_and_seed_and_carry_their_settings(tmp_path, capsys):
    generate_main(_generate(tmp_path, "--num_images_per_prompt", "2", "--batch_size", "3", "--seed", "41",
                            "--guidance_scale", "1.5", "--negative_prompt", "blurry", "a circle"))
    names = ["p000-s0000000041.png", "p000-s0000000042.png", "p001-s0000000043.png", "p001-s0000000044.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", *names]
    text = Image.open(tmp_path / "p001-s0000000044.png").text
    assert {k: v for k, v in text.items() if k != "parameters"} == {
        "lcm_lora.prompt": "a blue square", "lcm_lora.negative_prompt": "a circle", "lcm_lora.seed": "44",
        "lcm_lora.num_inference_steps": "2", "lcm_lora.guidance_scale": "1.5", "lcm_lora.model": "teacher-eps",
        "lcm_lora.lora": "style-dusk", "lcm_lora.scheduler": "LCMScheduler",
        "lcm_lora.original_inference_steps": "50", "lcm_lora.timestep_scaling": "10.0"}
    assert text["parameters"] == ("a blue square\nNegative prompt: a circle\nSteps: 2, Sampler: LCMScheduler, "
                                  "CFG scale: 1.5, Seed: 44, Size: 64x64, Model: teacher-eps, Lora: style-dusk")
    assert Image.open(tmp_path / "grid.png").size == (2 * 64, 2 * 64)  # a row per prompt
    out, err = capsys.readouterr()
    assert out == f"wrote 4 images and {tmp_path / 'grid.png'}\n"
    assert "4/4" in err and "warning" not in err  # the progress bar; guidance 1.5 uses the negative prompt


def test_sdxl_images_with_a_negative_prompt_at_guidance_1_warn_once(tmp_path, capsys):
    generate_main(_generate(tmp_path, "--batch_size", "2", "--negative_prompt", "blurry", "--prompt", "a 😀 star",
                            model="teacher-sdxl", lora=()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "p000-s0000000000.png"]
    text = Image.open(tmp_path / "p000-s0000000000.png").text
    assert text["lcm_lora.prompt"] == "a 😀 star" and text["lcm_lora.model"] == "teacher-sdxl"
    assert text["lcm_lora.lora"] == "" and "Lora" not in text["parameters"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: --negative_prompt has no effect at --guidance_scale 1.0: diffusers uses it only "
                        "above 1."]


def test_existing_files_are_replaced_only_with_overwrite_and_nothing_else_is_touched(tmp_path, monkeypatch):
    mine, grid = tmp_path / "p001-s0000000001.png", tmp_path / "grid.png"
    others = {tmp_path / "notes.txt": b"keep", tmp_path / "p000-s0000000099.png": b"an earlier run's image"}
    for path, data in others.items():
        path.write_bytes(data)
    grid.write_bytes(b"old grid")
    mine.write_bytes(b"old image")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the outputs were checked")

    monkeypatch.setattr("lcm_lora.inference.load_lcm_pipeline", no_loading)
    with pytest.raises(SystemExit, match=f"^error: {mine} exists: pass --overwrite to replace it.$"):
        generate_main(_generate(tmp_path))  # the first existing file of p000-s0, p001-s1, grid
    monkeypatch.undo()
    generate_main(_generate(tmp_path, "--overwrite"))
    assert Image.open(mine).text["lcm_lora.seed"] == "1" and Image.open(grid).size == (128, 64)
    assert all(path.read_bytes() == data for path, data in others.items())
    assert len(list(tmp_path.iterdir())) == 5


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_are_written_under_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        specs = image_specs(PROMPTS, seed=0)
        grid = save_images([Image.new("RGB", (8, 8))] * 2, specs, tmp_path / "images", {"num_inference_steps": "4",
                           "guidance_scale": "1.0", "model": "m", "lora": "", "scheduler": "LCMScheduler"})
        lora = save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "lora.safetensors", {"format": "pt"})
    finally:
        os.umask(old)
    files = [grid, *(tmp_path / "images" / s.file_name for s in specs), lora]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in files} == {path.name: oct(mode) for path in files}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "lora.safetensors"]  # no temporary file left


@pytest.mark.parametrize("extra, needle", [
    (["--lora", "missing.safetensors"], "missing.safetensors: no such LoRA file."),
    (["--lora", "JUNK"], "junk.safetensors: not a readable .safetensors file"),
    (["--pretrained_model", "./no-such-model"], "--pretrained_model ./no-such-model: no such file or folder."),
    (["--pretrained_model", "JUNK", "--single_file_config", "teacher-eps"],
     "junk.safetensors: not a readable .safetensors file"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0."),
    (["--num_images_per_prompt", "-2"], "--num_images_per_prompt must be at least 1, got -2."),
    (["--negative_prompt", "a", "b", "c"], "give one negative prompt, or one per prompt (2); got 3."),
    (["--seed", "-1"], "the seed must be at least 0 and its images' seeds below 2**64, got -1."),
    (["--seed", str(2**64 - 1)], f"below 2**64, got {2**64 - 1}."),  # the second image's seed would overflow
])
def test_a_users_mistake_is_one_line_and_writes_nothing(tmp_path, extra, needle):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    extra = [str(junk) if arg == "JUNK" else arg for arg in extra]
    with pytest.raises(SystemExit) as exit_:
        generate_main(_generate(tmp_path / "out", *extra))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message and needle in message, message
    assert not (tmp_path / "out").exists()


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        generate_main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("Sampling steps (default: the step count a --method pcm LoRA was made for, else 4)", "(default: 1.0)", "Images per prompt (default: 1)",
                    "p<prompt index>-s<seed>.png"):
        assert default in text, default
