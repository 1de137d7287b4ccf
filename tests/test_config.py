"""The typed config: flags over YAML over defaults, clear errors, dry-run output."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lcm_lora.config import ConfigError, TrainConfig, build_parser, parse_train_args, to_yaml
from lcm_lora.world import assets
from lcm_lora.world.assets import BUNDLED
from lcm_lora.world.dataset import write_imagefolder
from unet_shapes import SD15_UNET, SD21_UNET, SDXL_UNET, SSD1B_UNET, VEGA_UNET

ROOT = Path(__file__).parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lora_rank: 8\nw_min: 3.0\nw_max: 9.0\ntrain_data_dir: d\n")
    config, dry_run = parse_train_args(["--config", str(preset), "--w_max", "12", "--no-center_crop"])
    assert (config.lora.lora_rank, config.distill.w_min, config.distill.w_max) == (8, 3.0, 12.0)
    assert config.data.center_crop is False and config.data.train_data_dir == "d"
    assert config.optim.learning_rate == TrainConfig().optim.learning_rate and not dry_run


def test_flag_names_follow_the_diffusers_lcm_scripts():
    flags = {a.option_strings[0] for a in build_parser()._actions}
    for name in ("pretrained_teacher_model", "output_dir", "train_data_dir", "dataset_name", "image_column",
                 "caption_column", "resolution", "train_batch_size", "learning_rate", "lr_scheduler",
                 "lr_warmup_steps", "lora_rank", "lora_alpha", "lora_target_modules", "w_min", "w_max",
                 "num_ddim_timesteps", "timestep_scaling_factor", "loss_type", "huber_c", "max_train_steps",
                 "gradient_accumulation_steps", "max_grad_norm", "mixed_precision", "gradient_checkpointing",
                 "seed", "checkpointing_steps", "resume_from_checkpoint", "validation_steps", "report_to",
                 "enable_xformers_memory_efficient_attention", "allow_tf32", "proportion_empty_prompts"):
        assert f"--{name}" in flags, name


def test_unknown_yaml_key_names_the_file_and_suggests(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("lora_rnk: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*lora_rnk.*did you mean 'lora_rank'"):
        parse_train_args(["--config", str(preset)])


def test_bad_value_type_is_named(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("center_crop: maybe\n")
    with pytest.raises(ConfigError, match="center_crop"):
        parse_train_args(["--config", str(preset)])


def test_validate_lists_every_problem_by_flag():
    config = TrainConfig.from_flat_dict({"w_min": 9.0, "w_max": 3.0, "loss_type": "l1", "lora_rank": 0, "ema_decay": 1.0})
    problems = "\n".join(config.validate())
    for flag in ("--pretrained_teacher_model", "--train_data_dir", "--w_min", "--loss_type", "--lora_rank", "--ema_decay"):
        assert flag in problems


def test_yaml_round_trip_is_exact():
    config = TrainConfig.from_flat_dict({"validation_prompts": ["a", "b"], "lora_alpha": 8.0})
    again = TrainConfig.from_flat_dict(yaml.safe_load(to_yaml(config)))
    assert again == config


def _hub_cache_with_configs(cache: Path, repo_id: str, like: Path, unet_config: dict | None) -> None:
    """A Hugging Face cache holding `repo_id`'s config files (no weights), taken from the bundled teacher `like`
    with the real UNet config: what `--dry-run` reads of a hub teacher, offline."""
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(like, snapshot, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    if unet_config is not None:  # the real layout (diffusers' defaults for what it leaves out)
        (snapshot / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                                   **unet_config}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_passes_dry_run_and_prints_itself(preset, tmp_path):
    """Every check train makes before loading weights passes for each preset: its hub teacher read from a local
    cache holding the real UNet config (no network), a data folder and a fresh output folder given."""
    values = yaml.safe_load(preset.read_text())
    teacher, env = values["pretrained_teacher_model"], {**os.environ, "HF_HUB_OFFLINE": "1",
                                                         "HF_HUB_CACHE": str(tmp_path / "hub")}
    if teacher not in BUNDLED:
        family = {"stable-diffusion-xl-base-1.0": SDXL_UNET, "SSD-1B": SSD1B_UNET, "Segmind-Vega": VEGA_UNET,
                  "stable-diffusion-v1-5": SD15_UNET, "stable-diffusion-2-1": SD21_UNET}[teacher.split("/")[1]]
        like = ("teacher-sdxl" if family in (SDXL_UNET, SSD1B_UNET, VEGA_UNET) else
                "teacher-vpred" if family is SD21_UNET else "teacher-eps")
        _hub_cache_with_configs(tmp_path / "hub", teacher, assets.resolve(like), family)
    data = write_imagefolder(tmp_path / "images", 32)  # a full batch of every preset
    flags = ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, str(ROOT / "train_lcm_lora.py"), "--config", str(preset), *flags,
                             "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed == {**TrainConfig().to_flat_dict(), **values, "train_data_dir": str(data),
                       "output_dir": str(tmp_path / "out")}


@pytest.mark.parametrize("flag, value, message", [
    ("checkpoints_total_limit", -1, "--checkpoints_total_limit must be at least 1, got -1."),
    ("max_grad_norm", -1.0, "--max_grad_norm must be at least 0, got -1.0."),
    ("learning_rate", float("nan"), "--learning_rate must be above 0, got nan."),
    ("lora_dropout", 1.0, "--lora_dropout must be within [0, 1), got 1.0."),
    ("seed", -1, "--seed must be within [0, 4294967295], got -1."),
    ("validation_inference_steps", [4, 0], "--validation_inference_steps must be at least 1, got 0."),
    ("dataloader_num_workers", -2, "--dataloader_num_workers must be at least 0, got -2."),
])
def test_every_numeric_flag_is_range_checked(flag, value, message):
    assert message in TrainConfig.from_flat_dict({flag: value}).validate()


def test_whole_number_flags_refuse_fractions_instead_of_rounding(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lora_rank: 4.7\n")
    with pytest.raises(ConfigError, match=r"'lora_rank' = 4.7 is not a valid int \(expected a whole number\)"):
        parse_train_args(["--config", str(preset)])
    assert TrainConfig.from_flat_dict({"lora_rank": 8.0}).lora.lora_rank == 8
    with pytest.raises(ConfigError, match="expected a number, not true"):
        TrainConfig.from_flat_dict({"max_train_steps": True})


def test_a_bad_range_on_the_command_line_is_one_line_before_anything_loads(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_lcm_lora.py"), "--pretrained_teacher_model",
                             "teacher-eps", "--train_data_dir", str(tmp_path), "--checkpoints_total_limit", "-1",
                             "--max_grad_norm", "-1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--checkpoints_total_limit must be at least 1, got -1." in result.stderr
    assert "--max_grad_norm must be at least 0, got -1.0." in result.stderr
