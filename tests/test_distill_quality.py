"""End to end: distill each bundled teacher with configs/tiny.yaml, then judge the exported LoRA.

The LoRA is loaded the way users load it (`load_lora_weights` + `LCMScheduler`) and must beat the
teacher's non-distilled samplers at the same step counts, and come close to its 50-step sampling
at 4 steps. A LoRA of zeros (the teacher itself under LCMScheduler) must fail the same check.
Thresholds are set from measured runs with headroom (README, "Results on the tiny world").
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lcm_lora.config import TrainConfig, load_yaml
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME, lcm_scheduler_settings
from lcm_lora.trainer import train
from lcm_lora.world.dataset import write_imagefolder
from lcm_lora.world.quality import Scorer, load_pipeline, sweep

ROOT = Path(__file__).parents[1]
STEPS = [1, 2, 4]
TEACHER_GUIDANCE = 4.0  # diffusers convention; the teachers' best 50-step setting (world README)
MARGIN_ACCURACY = 0.10  # LoRA prompt accuracy must beat the best baseline by this much (absolute)
MARGIN_FRECHET = 0.7  # ... and have at most this fraction of its Fréchet distance
CLOSE_TO_50 = 0.15  # at 4 steps: prompt accuracy within this of the teacher's 50-step accuracy


def check_distilled(lcm: dict, baselines: dict, reference) -> None:
    """Raise AssertionError unless the LCM rows beat every baseline and approach 50-step quality."""
    for n in STEPS:
        best_acc = max(baselines[s][n].prompt_accuracy for s in baselines)
        best_fd = min(baselines[s][n].frechet_distance for s in baselines)
        assert lcm[n].prompt_accuracy >= best_acc + MARGIN_ACCURACY, (n, lcm[n], best_acc)
        assert lcm[n].frechet_distance <= MARGIN_FRECHET * best_fd, (n, lcm[n], best_fd)
    assert lcm[4].prompt_accuracy >= reference.prompt_accuracy - CLOSE_TO_50, (lcm[4], reference)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("tiny-world"), 2000)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["teacher-eps", "teacher-vpred"])
def test_distilled_lora_beats_the_teachers_few_step_samplers(teacher, world, tmp_path):
    values = {**load_yaml(ROOT / "configs" / "tiny.yaml"), "pretrained_teacher_model": teacher,
              "train_data_dir": str(world), "output_dir": str(tmp_path / "run"), "report_to": "none"}
    out = train(TrainConfig.from_flat_dict(values))

    pipe, scorer = load_pipeline(teacher), Scorer(reference_images=1000)
    reference = sweep(pipe, scorer, ["ddim-leading"], [50], TEACHER_GUIDANCE, samples_per_prompt=1)[0]
    baselines = {s: dict(zip(STEPS, sweep(pipe, scorer, [s], STEPS, TEACHER_GUIDANCE, samples_per_prompt=1)))
                 for s in ("ddim-leading", "ddim-trailing")}
    lcm = {}
    zeros = {k: torch.zeros_like(v) for k, v in load_file(out / DIFFUSERS_WEIGHT_NAME).items()}
    (tmp_path / "zero").mkdir()
    save_file(zeros, str(tmp_path / "zero" / DIFFUSERS_WEIGHT_NAME))
    for name, lora in (("zero", tmp_path / "zero"), ("trained", out)):
        pipe.load_lora_weights(str(lora))
        lcm[name] = dict(zip(STEPS, sweep(pipe, scorer, ["lcm"], STEPS, 1.0, samples_per_prompt=1,
                                          scheduler_kwargs=lcm_scheduler_settings(out))))
        pipe.unload_lora_weights()
    with pytest.raises(AssertionError):  # the control: the check must reject a LoRA of zeros
        check_distilled(lcm["zero"], baselines, reference)
    check_distilled(lcm["trained"], baselines, reference)
