"""metrics.jsonl: records kept through a resume, the best step, the choice of --from_checkpoint, and the plots."""

import json
import sys

import pytest

from lcm_lora.export import DIFFUSERS_WEIGHT_NAME
from lcm_lora.run_log import (MetricsLog, best_summary, best_validation, judged_steps, select_checkpoint,
                              write_plots)


def _validation(step, psnr4, teacher4=20.0, ks=(1, 4)):
    scores = lambda p: {"psnr": p, "ssim": p / 40, "latent_mse": 1 / p}  # noqa: E731
    return {"step": step, "validation": {
        "reference": {"scheduler": "DDIM trailing", "steps": 25, "guidance_scale": 2.5},
        "lora": {str(k): scores(psnr4 - (4 - k)) for k in ks}, "teacher": {str(k): scores(teacher4) for k in ks}}}


def _run(tmp_path, psnrs: dict[int, float], checkpoints=(), lora_files=()):
    log = MetricsLog(tmp_path)
    for step in range(1, max(psnrs) + 1):
        log.append({"step": step, "loss": 1 / step, "lr": 1e-3})
        if step in psnrs:
            log.append(_validation(step, psnrs[step]))
    for step in checkpoints:
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in lora_files:
        (tmp_path / "validation" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "validation" / f"step-{step}" / DIFFUSERS_WEIGHT_NAME).write_bytes(b"")
    return log


def test_a_resume_drops_what_was_logged_after_its_checkpoint_and_a_cut_line(tmp_path):
    log = _run(tmp_path, {2: 20.0, 4: 22.0})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    assert [r["step"] for r in log.records()][-1] == 4
    log.keep_up_to(3)
    assert [r["step"] for r in log.records()] == [1, 2, 2, 3]
    assert log.path.read_text().endswith("\n") and len(log.validations()) == 1
    log.keep_up_to(0)
    assert log.records() == []


def test_the_best_step_has_the_highest_psnr_at_4_steps_among_those_still_there(tmp_path):
    records = _run(tmp_path, {2: 20.0, 4: 25.0, 6: 23.0}).records()
    assert best_validation(records)["step"] == 4
    assert best_validation(records, {2, 6})["step"] == 6
    assert best_validation(records, set()) is None
    assert "step 4 (psnr 25 for the LoRA against 20 for the teacher's own 4 DDIM steps)" in best_summary(
        best_validation(records))


def test_without_4_steps_the_nearest_step_count_is_judged():
    assert judged_steps(_validation(1, 20, ks=(1, 2, 8))["validation"]) == "2"
    assert judged_steps(_validation(1, 20, ks=(1, 8))["validation"]) == "1"
    assert judged_steps(_validation(1, 20, ks=(2, 6))["validation"]) == "2"  # a tie: the fewer steps


def test_from_checkpoint_best_takes_the_checkpoint_else_the_validations_lora(tmp_path):
    _run(tmp_path, {2: 20.0, 4: 25.0, 6: 23.0}, checkpoints=(2, 6), lora_files=(2, 4, 6))
    path, what = select_checkpoint(tmp_path, "best")
    assert path == tmp_path / "validation" / "step-4" / DIFFUSERS_WEIGHT_NAME and "step 4" in what
    (tmp_path / "checkpoint-4").mkdir()
    assert select_checkpoint(tmp_path, "best")[0] == tmp_path / "checkpoint-4"
    assert select_checkpoint(tmp_path, "latest")[0] == tmp_path / "checkpoint-6"
    assert select_checkpoint(tmp_path, "2")[0] == tmp_path / "checkpoint-2"


@pytest.mark.parametrize("which, needle", [
    ("3", "no checkpoint-3 (it has: checkpoint-2)"),
    ("final", "give best, latest or a step number"),
])
def test_from_checkpoint_names_what_is_missing(tmp_path, which, needle):
    _run(tmp_path, {2: 20.0}, checkpoints=(2,))
    with pytest.raises((ValueError, FileNotFoundError), match=needle.replace("(", r"\(").replace(")", r"\)")):
        select_checkpoint(tmp_path, which)


def test_from_checkpoint_best_without_validations_says_how_to_get_them(tmp_path):
    MetricsLog(tmp_path).append({"step": 1, "loss": 0.1, "lr": 1e-3})
    with pytest.raises(FileNotFoundError, match="--validation_steps and --validation_prompts"):
        select_checkpoint(tmp_path, "best")


def test_plots_show_the_loss_and_each_metric(tmp_path):
    pytest.importorskip("matplotlib")
    _run(tmp_path, {2: 20.0, 4: 25.0})
    written = write_plots(tmp_path)
    assert [p.name for p in written] == ["loss.png", "psnr.png", "ssim.png", "latent_mse.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_without_matplotlib_plots_are_skipped_with_a_message(tmp_path, monkeypatch):
    _run(tmp_path, {2: 20.0})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    message = write_plots(tmp_path)
    assert "matplotlib is not installed" in message and not (tmp_path / "plots").exists()


def test_records_are_one_json_object_per_line(tmp_path):
    log = _run(tmp_path, {1: 20.0})
    lines = log.path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 1]
