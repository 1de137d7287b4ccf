"""A short run with validation on the bundled teacher: metrics.jsonl, sheets and plots, the best step named and
exported, the teacher's samples drawn once per run (a resume too), and `lcm-lora compare` on the same LoRA agreeing
with the run's own numbers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lcm_lora.cli import compare_main, export_main
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME
from lcm_lora.run_log import MetricsLog
from lcm_lora.safetensors_io import read_metadata
from lcm_lora.trainer import train
from lcm_lora.world.dataset import write_imagefolder
from tiny_run import tiny_config

PROMPTS = ["a red circle at the top left on a plain background",
           "a blue striped square at the bottom right on a checkered background"]
VALIDATION = dict(max_train_steps=4, checkpointing_steps=2, validation_steps=2, validation_prompts=PROMPTS,
                  validation_inference_steps=[1, 4], validation_teacher_steps=6, w_min=1.0, w_max=3.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = write_imagefolder(tmp_path_factory.mktemp("world"), 16)
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(data, out, **VALIDATION, report_to="tensorboard"))
    return data, out


def test_each_validation_logs_the_loras_and_the_teachers_agreement(run):
    _, out = run
    records = MetricsLog(out).records()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    validations = [r for r in records if "validation" in r]
    assert [r["step"] for r in validations] == [2, 4]
    v = validations[-1]["validation"]
    assert v["reference"] == {"scheduler": "DDIM trailing", "steps": 6, "guidance_scale": 3.0}  # 1 + mean w
    assert set(v["lora"]) == set(v["teacher"]) == {"1", "4"}
    assert set(v["lora"]["4"]) == {"psnr", "ssim", "latent_mse"} and v["seconds"] > 0
    # the teacher's samples are drawn at the first validation only
    assert validations[0]["validation"]["teacher_samples_drawn"] == ["reference", "ddim-1", "ddim-4"]
    assert v["teacher_samples_drawn"] == []
    assert v["teacher"] == validations[0]["validation"]["teacher"]


def test_each_validation_writes_its_lora_and_sheets_and_the_run_its_plots(run):
    _, out = run
    for step in (2, 4):
        folder = out / "validation" / f"step-{step}"
        assert {p.name for p in folder.glob("*.png")} == {"1-steps.png", "4-steps.png", "sheet-1-steps.png",
                                                          "sheet-4-steps.png"}
        assert read_metadata(folder / DIFFUSERS_WEIGHT_NAME)["lcm_lora.steps_trained"] == str(step)
    pytest.importorskip("matplotlib")
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "psnr.png", "ssim.png", "latent_mse.png"}


def test_the_agreement_goes_to_the_trackers(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = run
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    tags = events.Tags()
    assert {"agreement/psnr/lora_4_steps", "agreement/ssim/teacher_1_steps", "loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("agreement/psnr/lora_4_steps")] == [2, 4]
    assert {"validation/1_steps", "validation/4_steps"} <= set(tags["images"])


def test_overwrite_replaces_the_earlier_runs_numbers_and_plots_too(run, tmp_path):
    from lcm_lora.run_dir import plan_run

    data, out = run
    plan = plan_run(tiny_config(data, out, **VALIDATION, overwrite=True))
    assert {out / "metrics.jsonl", out / "validation"} <= set(plan.replace)
    assert (out / "plots" in plan.replace) == (out / "plots").exists()  # plots/ needs matplotlib


def test_validation_leaves_the_training_unchanged(run, tmp_path):
    """Validation loads pipelines and a LoRA between steps: the run's random stream must not move, so a run trains
    the same LoRA whether it is watched or not."""
    data, out = run
    plain = train(tiny_config(data, tmp_path, **{**VALIDATION, "validation_steps": 0}))
    assert not (plain / "validation").exists()
    watched, unwatched = (load_file(str(folder / DIFFUSERS_WEIGHT_NAME)) for folder in (out, plain))
    assert watched.keys() == unwatched.keys()
    assert all(torch.equal(watched[k], unwatched[k]) for k in watched)


def test_a_resume_draws_no_teacher_sample_again_and_logs_each_step_once(run, tmp_path):
    data, out = run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    train(tiny_config(data, copy, **{**VALIDATION, "max_train_steps": 6},
                      resume_from_checkpoint=str(copy / "checkpoint-2")))
    records = MetricsLog(copy).records()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 3, 4 logged once, not twice
    validations = [r for r in records if "validation" in r]
    assert [r["step"] for r in validations] == [2, 4, 6]
    assert all(r["validation"]["teacher_samples_drawn"] == [] for r in validations[1:])


def test_the_run_names_its_best_step_and_export_from_checkpoint_best_writes_it(run, tmp_path, capsys):
    _, out = run
    validations = MetricsLog(out).validations()
    best = max(validations, key=lambda r: r["validation"]["lora"]["4"]["psnr"])
    export_main(["--checkpoint", str(out), "--from_checkpoint", "best", "--output_dir", str(tmp_path / "best")])
    printed = capsys.readouterr().out
    assert f"checkpoint-{best['step']}: best agreement with the teacher at 4 steps: step {best['step']}" in printed
    meta = read_metadata(tmp_path / "best" / DIFFUSERS_WEIGHT_NAME)
    assert meta["lcm_lora.steps_trained"] == str(best["step"])


def test_compare_with_a_fused_lora_gives_the_same_numbers_within_float_rounding(run, tmp_path):
    _, out = run
    rows = {}
    for fused in (False, True):
        compare_main(["--pretrained_model", "teacher-eps", "--lora", str(out / "validation" / "step-4"), "--prompt",
                      *PROMPTS, "--steps", "1", "--reference_steps", "6", "--output_dir", str(tmp_path / str(fused)),
                      *(["--fuse_lora"] if fused else [])])
        summary = json.loads((tmp_path / str(fused) / "compare.json").read_text())
        assert summary["fused"] is fused
        rows[fused] = next(r for r in summary["results"] if r["sampler"] == "lora")
    assert rows[True]["psnr"] == pytest.approx(rows[False]["psnr"], abs=0.05)


@pytest.mark.parametrize("with_lora", [True, False])
def test_compare_writes_sheets_json_and_html_and_matches_the_runs_numbers(run, tmp_path, with_lora, capsys):
    _, out = run
    lora = ["--lora", str(out / "validation" / "step-4")] if with_lora else []
    compare_main(["--pretrained_model", "teacher-eps", *lora, "--prompt", *PROMPTS, "--steps", "1", "4",
                  "--reference_steps", "6", "--reference_guidance_scale", "3", "--output_dir", str(tmp_path)])
    assert "| teacher (DDIM trailing) | 4 | 3 |" in capsys.readouterr().out
    summary = json.loads((tmp_path / "compare.json").read_text())
    rows = {(r["sampler"], r["steps"]): r for r in summary["results"]}
    assert set(rows) == {("teacher", 1), ("teacher", 4)} | ({("lora", 1), ("lora", 4)} if with_lora else set())
    assert all(r["seconds_per_image"] > 0 for r in summary["results"])
    run_numbers = MetricsLog(out).validations()[-1]["validation"]  # the same prompts, seeds, reference and LoRA
    for who in ("teacher", "lora") if with_lora else ("teacher",):
        for k in (1, 4):
            for metric in ("psnr", "ssim", "latent_mse"):
                assert rows[(who, k)][metric] == pytest.approx(run_numbers[who][str(k)][metric], rel=1e-4)
    page = (tmp_path / "compare.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    assert {p.name for p in tmp_path.glob("sheet-*.png")} == {"sheet-1-steps.png", "sheet-4-steps.png"}
    with pytest.raises(SystemExit, match="sheet-1-steps.png exists: pass --overwrite"):  # nothing replaced unasked
        compare_main(["--pretrained_model", "teacher-eps", "--prompt", "x", "--steps", "1", "4",
                      "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "0"], "--steps and --reference_steps must be at least 1"),
    (["--height", "64"], "give both --height and --width, or neither"),
    (["--pretrained_model", "teacher-epss"], "teacher-epss"),
    (["--lora", "no/such/lora"], "no/such/lora"),
])
def test_a_compare_mistake_is_one_line_and_writes_nothing(tmp_path, extra, needle):
    argv = ["--pretrained_model", "teacher-eps", "--prompt", "x", "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as stop:
        compare_main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and needle in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_compare_runs_on_a_single_file_checkpoint(tmp_path, capsys):
    compare_main(["--pretrained_model", "community-dusk", "--single_file_config", "teacher-eps", "--prompt", PROMPTS[0],
                  "--steps", "2", "--reference_steps", "4", "--output_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["pretrained_model"] == "community-dusk" and summary["reference"]["guidance_scale"] == 7.5
    assert [(r["sampler"], r["steps"]) for r in summary["results"]] == [("teacher", 2)]


def test_the_plan_says_what_validation_will_do(tmp_path):
    from lcm_lora.preflight import validation_summary

    config = tiny_config(tmp_path, tmp_path / "out", **VALIDATION)
    assert validation_summary(config) == (
        "Validation every 2 steps and at the last: 2 prompts at 1, 4 steps against the teacher's 6 DDIM steps at "
        f"guidance 3, into {tmp_path / 'out'}/metrics.jsonl.")
    assert validation_summary(tiny_config(tmp_path, tmp_path / "out")).startswith("No validation: --validation_steps "
                                                                                    "with --validation_prompts")
