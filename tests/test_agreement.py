"""Agreement with the teacher on the bundled epsilon teacher: the samples are the pipeline's own for each seed, the
teacher's samples are drawn once and kept, and the sheet and scores have the documented form."""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler
from PIL import Image

from lcm_lora import agreement
from lcm_lora.inference import load_base_pipeline

PROMPTS = ["a red circle at the top left on a plain background", "a blue square at the bottom right on a plain background"]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_base_pipeline("teacher-eps")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe():
    pipe = load_base_pipeline("teacher-sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("teacher", ["eps", "sdxl"])
@pytest.mark.parametrize("scheduler", ["lcm", "ddim"])
def test_a_sample_is_what_the_pipeline_draws_for_that_seed(request, teacher, scheduler):
    """LCMScheduler adds fresh noise between steps: it must come from the same generator as the initial noise. The
    SDXL pipeline decodes as the SD one does (its VAE in fp32 here)."""
    pipe = request.getfixturevalue("pipe" if teacher == "eps" else "sdxl_pipe")
    sched = (LCMScheduler.from_config(pipe.scheduler.config) if scheduler == "lcm" else agreement.ddim_trailing(pipe))
    latents = agreement.sample(pipe, sched, PROMPTS, [5, 9], (64, 64), 3, 2.0)
    ours = agreement.decode(pipe, latents).permute(0, 2, 3, 1).numpy()
    pipe.scheduler = sched
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.0, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in (5, 9)]).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_the_reference_guidance_is_the_mean_w_in_diffusers_convention():
    assert agreement.reference_guidance(1.0, 2.0) == 2.5
    assert agreement.reference_guidance(3.0, 15.0) == 10.0


def _spec(**changes):
    values = dict(teacher="teacher-eps", prompts=tuple(PROMPTS), seeds=(0, 1), height=64, width=64,
                  guidance_scale=2.5, reference_steps=5)
    return agreement.ReferenceSpec(**{**values, **changes})


def test_teacher_samples_are_drawn_once_and_kept_for_the_same_spec_only(pipe, tmp_path, monkeypatch):
    path = tmp_path / "teacher-samples.safetensors"
    first = agreement.TeacherSamples(path, _spec())
    reference, two = first.get(pipe), first.get(pipe, 2)
    assert first.drawn == ["reference", "ddim-2"] and path.is_file()

    def no_drawing(*args, **kwargs):
        raise AssertionError("a kept sample was drawn again")

    with monkeypatch.context() as patch:
        patch.setattr(agreement, "sample", no_drawing)
        again = agreement.TeacherSamples(path, _spec())
        assert torch.equal(again.get(pipe), reference) and torch.equal(again.get(pipe, 2), two)
        assert again.drawn == []
    other = agreement.TeacherSamples(path, _spec(guidance_scale=4.0))  # another spec: nothing kept is used
    assert not torch.equal(other.get(pipe), reference) and other.drawn == ["reference"]
    path.write_bytes(b"cut short")  # a file a kill cut short is drawn again, not an error
    assert torch.equal(agreement.TeacherSamples(path, _spec()).get(pipe), reference)


def test_identical_samples_score_perfectly_and_different_ones_do_not():
    x = torch.rand(2, 3, 16, 16)
    z = torch.randn(2, 4, 2, 2)
    same = agreement.scores(z, x, z, x)
    assert same["psnr"] == [float("inf")] * 2 and same["ssim"] == pytest.approx([1, 1]) and same["latent_mse"] == [0, 0]
    other = agreement.mean_scores(agreement.scores(z + 0.1, (x + 0.1).clamp(0, 1), z, x))
    assert other["psnr"] < 40 and other["ssim"] < 1 and other["latent_mse"] == pytest.approx(0.01)


def test_a_sheet_has_a_labelled_column_per_sampler_and_a_row_per_prompt():
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    sheet = agreement.sheet({"teacher 25": [red, blue], "teacher 4": [red, blue], "LoRA 4": [blue, red]})
    assert sheet.size == (3 * 128, 12 + 2 * 128)  # 64-pixel images doubled so the labels fit
    assert sheet.getpixel((2 * 128 + 64, 12 + 64)) == (0, 0, 255) and sheet.getpixel((64, 12 + 128 + 64)) == (0, 0, 255)
    assert len(set(sheet.crop((0, 0, 128, 12)).getdata())) > 1  # a label is drawn
