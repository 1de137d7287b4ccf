"""End to end: distill each bundled teacher with its tiny preset, then judge the exported LoRA.

The LoRA is loaded the way users load it (`load_lora_weights` + `LCMScheduler`) and must beat the
teacher's best non-distilled sampler (DDIM with leading or trailing spacing, at the best of three
guidance scales) at the same step counts, and come close to its 50-step sampling at 4 steps. A LoRA
of zeros (the teacher itself under LCMScheduler) must fail the first check. Thresholds are set from
measured runs with headroom (README, "Results on the tiny world").
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
PRESETS = {"teacher-eps": "tiny.yaml", "teacher-vpred": "tiny-vpred.yaml"}
STEPS = [1, 2, 4]
# Step counts at which the distilled LoRA is clearly better than the best non-distilled sampler, as
# measured (README): at 4 steps trailing DDIM with guidance 2 reaches 90.1% (epsilon) and 94.3% (v)
# prompt accuracy, so 4 steps is not among them.
GAP_STEPS = {"teacher-eps": [1, 2], "teacher-vpred": [1, 2]}
TEACHER_GUIDANCE = 4.0  # diffusers convention; the teachers' best 50-step setting (world README)
BASELINE_GUIDANCE = [1.0, 2.0, 4.0]  # few-step samplers do best at low guidance
MARGIN_ACCURACY = 0.05  # LoRA prompt accuracy must beat the best baseline by this much (absolute)
MARGIN_FRECHET = 0.75  # ... and have at most this fraction of its Fréchet distance
CLOSE_TO_50 = 0.10  # at 4 steps: prompt accuracy within this of the teacher's 50-step accuracy
COMMUNITY_MARGIN_ACCURACY = 0.04  # on the community fine-tune, at 2 steps (measured +8.3 points)


def beats_baselines(lcm: dict, baselines: dict, gap_steps: list[int]) -> None:
    """Raise AssertionError unless the LCM rows clearly beat every baseline at `gap_steps`."""
    for n in gap_steps:
        best_acc = max(baselines[s][n].prompt_accuracy for s in baselines)
        best_fd = min(baselines[s][n].frechet_distance for s in baselines)
        assert lcm[n].prompt_accuracy >= best_acc + MARGIN_ACCURACY, (n, lcm[n], best_acc)
        assert lcm[n].frechet_distance <= MARGIN_FRECHET * best_fd, (n, lcm[n], best_fd)


def close_to_50_steps(lcm: dict, reference) -> None:
    assert lcm[4].prompt_accuracy >= reference.prompt_accuracy - CLOSE_TO_50, (lcm[4], reference)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("tiny-world"), 2000)


@pytest.fixture(scope="module")
def distilled(world, tmp_path_factory):
    """teacher -> the output folder of its preset's run, each trained once for the module."""
    runs = {}

    def run(teacher: str) -> Path:
        if teacher not in runs:
            tmp = tmp_path_factory.mktemp("distill")
            values = {**load_yaml(ROOT / "configs" / PRESETS[teacher]), "train_data_dir": str(world),
                      "output_dir": str(tmp / "run"), "report_to": "none"}
            runs[teacher] = train(TrainConfig.from_flat_dict(values))
        return runs[teacher]

    return run


@pytest.fixture(scope="module", params=list(PRESETS))
def scores(request, distilled, tmp_path_factory) -> dict:
    """Distill one teacher with its preset; score the teacher's samplers, the LoRA and a zero LoRA."""
    teacher, tmp = request.param, tmp_path_factory.mktemp("zero")
    out = distilled(teacher)

    pipe, scorer = load_pipeline(teacher), Scorer(reference_images=1000)
    result = {"teacher": teacher,
              "reference": sweep(pipe, scorer, ["ddim-leading"], [50], TEACHER_GUIDANCE, samples_per_prompt=1)[0],
              "baselines": {(s, g): dict(zip(STEPS, sweep(pipe, scorer, [s], STEPS, g, samples_per_prompt=1)))
                            for s in ("ddim-leading", "ddim-trailing") for g in BASELINE_GUIDANCE}}
    zeros = {k: torch.zeros_like(v) for k, v in load_file(out / DIFFUSERS_WEIGHT_NAME).items()}
    (tmp / "zero").mkdir()
    save_file(zeros, str(tmp / "zero" / DIFFUSERS_WEIGHT_NAME))
    for name, lora in (("zero", tmp / "zero"), ("trained", out)):
        pipe.load_lora_weights(str(lora))
        result[name] = dict(zip(STEPS, sweep(pipe, scorer, ["lcm"], STEPS, 1.0, samples_per_prompt=1,
                                             scheduler_kwargs=lcm_scheduler_settings(out))))
        pipe.unload_lora_weights()
    return result


@pytest.mark.slow
def test_distilled_lora_beats_the_teachers_few_step_samplers(scores):
    gap_steps = GAP_STEPS[scores["teacher"]]
    with pytest.raises(AssertionError):  # the control: the check must reject a LoRA of zeros
        beats_baselines(scores["zero"], scores["baselines"], gap_steps)
    beats_baselines(scores["trained"], scores["baselines"], gap_steps)


@pytest.mark.slow
def test_distilled_lora_at_4_steps_is_close_to_the_teachers_50_steps(scores):
    # No zero-LoRA control here: the teacher itself under LCMScheduler already comes within 10 points
    # at 4 steps on this world (85.4% epsilon, 93.2% v, measured); the first test holds the control.
    close_to_50_steps(scores["trained"], scores["reference"])


@pytest.mark.slow
def test_the_base_lora_keeps_its_few_step_gain_on_a_community_fine_tune(distilled):
    """LCM-LoRA's universality claim on the tiny world: the LoRA distilled from teacher-eps, loaded onto the bundled
    community-dusk checkpoint (a fine-tune with its own UNet and VAE, read from a single file) and scored against the
    dusk world. Measured (README): +8.3 points over the best DDIM at 2 steps (+7.8 on the base model), +3.6 at 1
    step; Fréchet distance 0.57x and 0.45x the best DDIM's at 1 and 2 steps; 98-100% of images in the dusk look."""
    lora = distilled("teacher-eps")
    pipe, scorer = load_pipeline("community-dusk"), Scorer(reference_images=1000, palette="dusk")
    steps = [1, 2]
    baselines = [score for sampler in ("ddim-leading", "ddim-trailing") for g in BASELINE_GUIDANCE
                 for score in sweep(pipe, scorer, [sampler], steps, g, samples_per_prompt=1)]
    pipe.load_lora_weights(str(lora))
    lcm = dict(zip(steps, sweep(pipe, scorer, ["lcm"], steps, 1.0, samples_per_prompt=1,
                                scheduler_kwargs=lcm_scheduler_settings(lora))))
    for n in steps:
        best_fd = min(b.frechet_distance for b in baselines if b.steps == n)
        assert lcm[n].frechet_distance <= MARGIN_FRECHET * best_fd, (n, lcm[n], best_fd)
        assert lcm[n].style_score >= 0.9, lcm[n]  # the LoRA keeps the fine-tune's look
    best_acc = max(b.prompt_accuracy for b in baselines if b.steps == 2)
    assert lcm[2].prompt_accuracy >= best_acc + COMMUNITY_MARGIN_ACCURACY, (lcm[2], best_acc)
