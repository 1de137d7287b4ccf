"""The model card (README.md) beside every exported LoRA, and --push_to_hub.

A 2-step run on a bundled teacher writes the card; its front matter is what the Hub reads, and its diffusers snippet,
run as written (the bundled teacher's path in place of its name, the run folder in place of the folder's name),
loads the LoRA and draws an image. The upload itself cannot run offline: huggingface_hub's create_repo and
upload_folder are replaced by recorders, so these tests check what would be sent (repo id, folder, what stays local),
never that the Hub accepts it.
"""

from __future__ import annotations

import json
import re
from importlib.util import find_spec
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects

from lcm_lora import cli, hub, model_card
from lcm_lora.cli import export_main
from lcm_lora.config import ConfigError, RunArgs, TrainConfig
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME
from lcm_lora.preflight import check_training
from lcm_lora.trainer import train
from lcm_lora.world import assets
from lcm_lora.world.dataset import write_imagefolder
from tiny_run import tiny_config

TAGS = {"lora", "lcm", "lcm-lora", "text-to-image", "diffusers"}
PROMPT = "a red circle at the top left on a plain background"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("world"), 8)


def _card(out: Path) -> tuple[dict, str]:
    """(front matter, body) of out/README.md."""
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _run_snippet(body: str, teacher: str, lora_name: str, lora_path: Path) -> dict:
    """The card's python block executed with the bundled teacher's path and the LoRA folder's path put in for the
    names it shows; returns its namespace."""
    [code] = re.findall(r"```python\n(.*?)```", body, re.S)
    code = code.replace(json.dumps(teacher), json.dumps(str(assets.resolve(teacher))))
    code = code.replace(json.dumps(lora_name), json.dumps(str(lora_path)))
    namespace = {}
    exec(code, namespace)
    return namespace


def test_a_run_writes_a_card_whose_snippet_loads_the_lora(data_dir, tmp_path, monkeypatch):
    out = train(tiny_config(data_dir, tmp_path / "run", num_ddim_timesteps=20, validation_steps=2,
                            validation_prompts=[PROMPT], validation_inference_steps=[1, 4]))
    front, body = _card(out)
    assert front["library_name"] == "diffusers" and front["license"] == "creativeml-openrail-m"
    assert TAGS | {"stable-diffusion"} <= set(front["tags"]) and "stable-diffusion-xl" not in front["tags"]
    assert "base_model" not in front  # a local teacher: the Hub refuses a path as base_model
    assert front["inference"] is False
    assert "(validation/step-2/4-steps.png)" in body and (out / "validation/step-2/4-steps.png").is_file()
    assert "original_inference_steps=20" in body and "timestep_scaling" not in body.split("```python")[1].split("```")[0]

    monkeypatch.chdir(tmp_path)  # the snippet saves lcm-lora.png where it runs
    ns = _run_snippet(body, "teacher-eps", "run", out)
    assert type(ns["pipe"]).__name__ == "StableDiffusionPipeline"
    assert ns["pipe"].scheduler.config.original_inference_steps == 20
    assert ns["pipe"].get_list_adapters() == {"unet": ["default_0"]}  # the LoRA is on the UNet
    assert ns["image"].size == (64, 64) and (tmp_path / "lcm-lora.png").is_file()

    # The full configuration, with local paths cut to their last part.
    [config] = re.findall(r"```yaml\n(.*?)```", body, re.S)
    config = yaml.safe_load(config)
    assert config["lora_rank"] == 4 and config["num_ddim_timesteps"] == 20
    assert config["train_data_dir"] == data_dir.name and config["output_dir"] == "run"
    assert str(tmp_path) not in (out / "README.md").read_text()


def test_an_sdxl_card_names_the_sdxl_pipeline(data_dir, tmp_path, monkeypatch):
    out = train(tiny_config(data_dir, tmp_path / "xl", pretrained_teacher_model="teacher-sdxl", train_batch_size=2,
                            checkpointing_steps=0))
    front, body = _card(out)
    assert TAGS | {"stable-diffusion-xl"} <= set(front["tags"]) and "stable-diffusion" not in front["tags"]
    assert front["license"] == "openrail++"
    assert "StableDiffusionXLPipeline.from_pretrained(" in body and "LCMScheduler.from_config(pipe.scheduler.config)" \
        in body  # trained on LCMScheduler's default grid: no arguments
    monkeypatch.chdir(tmp_path)
    ns = _run_snippet(body, "teacher-sdxl", "xl", out)
    assert type(ns["pipe"]).__name__ == "StableDiffusionXLPipeline" and ns["image"].size == (64, 64)


# -- the card for what the run does not say: pure render_card ------------------------------------------------------

def _facts(**overrides) -> model_card.CardFacts:
    values = dict(title="lcm-lora-sd15", teacher="stable-diffusion-v1-5/stable-diffusion-v1-5",
                  base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", single_file=False, family="sd1",
                  prediction_type="epsilon", steps=1000, license="openrail++", lora="me/lcm-lora-sd15",
                  files=(DIFFUSERS_WEIGHT_NAME, "lcm-lora-sd15.safetensors"),
                  config={"lora_rank": 64, "lora_alpha": 64.0, "w_min": 5.0, "w_max": 15.0, "num_ddim_timesteps": 50})
    return model_card.CardFacts(**{**values, **overrides})


@pytest.mark.parametrize("overrides, front_needles, body_needles", [
    ({}, {"base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "license": "openrail++"},
     ['StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5"',
      'load_lora_weights("me/lcm-lora-sd15", weight_name="pytorch_lora_weights.safetensors")',
      "LCMScheduler.from_config(pipe.scheduler.config)\n", "<lora:lcm-lora-sd15:1>", "for 1000 optimizer steps"]),
    ({"family": "ssd-1b", "scheduler": {"original_inference_steps": 20, "timestep_scaling": 5.0}},
     {"tags": "stable-diffusion-xl"},
     ["StableDiffusionXLPipeline", "original_inference_steps=20, timestep_scaling=5.0)", "SSD-1B"]),
    ({"teacher": "dreamshaper.safetensors", "base_model": None, "single_file": True},
     {}, ['StableDiffusionPipeline.from_single_file("dreamshaper.safetensors"', "local model"]),
    ({"files": (PEFT_WEIGHT_NAME,)}, {},
     ['subfolder="peft", weight_name="pytorch_lora_weights.safetensors"', "diffusers only"]),
    ({"config": {}, "steps": None}, {}, ["does not record how it was trained", "Not recorded"]),
], ids=["hub-teacher", "ssd-1b-own-grid", "single-file-teacher", "peft-only", "lora-from-elsewhere"])
def test_render_card(overrides, front_needles, body_needles):
    text = model_card.render_card(_facts(**overrides))
    _, front, body = text.split("---\n", 2)
    front = yaml.safe_load(front)
    for key, value in front_needles.items():
        assert value in front[key] if isinstance(front[key], list) else front[key] == value, (key, front)
    if overrides.get("base_model", "") is None:
        assert "base_model" not in front
    for needle in body_needles:
        assert needle in body, needle
    assert text.count(model_card.MARKER) == 1


# -- a README.md that is not the run's own card is never replaced silently ------------------------------------------

def test_a_users_readme_is_replaced_only_with_overwrite(data_dir, tmp_path):
    (tmp_path / "README.md").write_text("# my notes\n")
    config = tiny_config(data_dir, tmp_path, max_train_steps=1, checkpointing_steps=0)
    with pytest.raises(ConfigError, match="holds a README.md that lcm-lora did not write.*add --overwrite"):
        check_training(config)
    train(tiny_config(data_dir, tmp_path, max_train_steps=1, checkpointing_steps=1, overwrite=True))
    assert model_card.is_own_card(tmp_path / "README.md")
    # The run's own card is replaced when the run goes on.
    train(tiny_config(data_dir, tmp_path, max_train_steps=2, resume_from_checkpoint="latest"))
    assert "for 2 optimizer steps" in (tmp_path / "README.md").read_text()


def test_export_writes_a_card_and_refuses_an_existing_one_without_overwrite(data_dir, tmp_path):
    run = train(tiny_config(data_dir, tmp_path / "run", validation_steps=1, validation_prompts=[PROMPT],
                            validation_inference_steps=[4]))
    args = ["--checkpoint", str(run / "checkpoint-1"), "--output_dir", str(tmp_path / "exported"), "--formats", "peft",
            "--license", "other"]
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "README.md").write_text("# mine\n")
    with pytest.raises(SystemExit, match="README.md exists: pass --overwrite"):
        export_main(args)
    assert (tmp_path / "exported" / "README.md").read_text() == "# mine\n"
    export_main([*args, "--overwrite"])
    front, body = _card(tmp_path / "exported")
    assert front["license"] == "other" and "for 1 optimizer steps" in body
    assert "(validation.png)" in body and "Validation at step 1" in body  # the grid of the exported step, copied
    assert (tmp_path / "exported" / "validation.png").read_bytes() == (run / "validation/step-1/4-steps.png").read_bytes()
    assert 'subfolder="peft"' in body
    with pytest.raises(SystemExit, match="--license 'MIT': not a Hub license id"):
        export_main([*args[:-1], "MIT", "--overwrite"])


# -- --push_to_hub ------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch) -> list[tuple]:
    """create_repo and upload_folder recorded instead of sent, a token that is never used, the Hub switched on."""
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(**kwargs):
        calls.append(("upload_folder", kwargs))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0",
                                          commit_message="", commit_description="", oid="0")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # anything that still tried the network would fail
    return calls


def test_push_to_hub_creates_the_repo_first_and_uploads_the_lora_card_and_images(data_dir, tmp_path, fake_hub):
    out = train(tiny_config(data_dir, tmp_path / "tiny-lcm", push_to_hub=True, validation_steps=2,
                            validation_prompts=[PROMPT], validation_inference_steps=[4]))
    [create, upload] = fake_hub
    assert create == ("create_repo", "tiny-lcm", {"exist_ok": True})  # --output_dir's name, as diffusers' default
    assert upload[1]["folder_path"] == str(out) and upload[1]["repo_id"] == "me/tiny-lcm"
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    sent = sorted(filter_repo_objects(files, ignore_patterns=upload[1]["ignore_patterns"]))
    plots = [f"plots/{name}.png" for name in ("latent_mse", "loss", "psnr", "ssim")] if find_spec("matplotlib") else []
    assert sent == ["README.md", "lcm-lora-teacher-eps.safetensors", *plots, DIFFUSERS_WEIGHT_NAME,
                    "validation/step-2/4-steps.png", "validation/step-2/sheet-4-steps.png"]
    # no checkpoints, config.yaml, metrics.jsonl, validation LoRA or teacher samples, lock or temporary files
    assert 'load_lora_weights("me/tiny-lcm", weight_name=' in _card(out)[1]  # the card names the repo

    # A finished run resumed with another repo: nothing trained, its card names the new repo, uploaded.
    fake_hub.clear()
    train(tiny_config(data_dir, tmp_path / "tiny-lcm", push_to_hub=True, hub_model_id="org/lcm",
                      validation_steps=2, validation_prompts=[PROMPT], validation_inference_steps=[4],
                      resume_from_checkpoint="latest"))
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"] and fake_hub[1][1]["repo_id"] == "org/lcm"
    assert 'load_lora_weights("org/lcm"' in _card(out)[1]


def test_a_refused_repo_stops_the_run_before_it_trains_and_a_failed_upload_keeps_the_files(data_dir, tmp_path,
                                                                                            fake_hub, monkeypatch):
    def refuse(repo_id, **kwargs):
        raise OSError("403 Forbidden: no write access")  # what the Hub says to a token without write access

    monkeypatch.setattr(huggingface_hub, "create_repo", refuse)
    with pytest.raises(hub.HubError, match="cannot create or open the Hub repo org/x .*403 Forbidden.*Nothing was "
                                          "trained"):
        train(tiny_config(data_dir, tmp_path / "a", push_to_hub=True, hub_model_id="org/x"))
    assert not list((tmp_path / "a").glob("*.safetensors")) and not list((tmp_path / "a").glob("checkpoint-*"))

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: huggingface_hub.RepoUrl(
        f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: refuse(None))
    with pytest.raises(hub.HubError, match=r"upload to org/x failed .* Every file is still in .*hf upload org/x .* "
                                           r"--exclude 'checkpoint-\*'"):
        train(tiny_config(data_dir, tmp_path / "b", push_to_hub=True, hub_model_id="org/x", checkpointing_steps=0))
    assert (tmp_path / "b" / DIFFUSERS_WEIGHT_NAME).is_file() and model_card.is_own_card(tmp_path / "b" / "README.md")


def test_hub_flags_are_checked_without_the_network(tmp_path, monkeypatch):
    """The --dry-run checks of --push_to_hub: the repo id's form, HF_HUB_OFFLINE, a saved token; nothing else."""
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    run = RunArgs(output_dir=str(tmp_path / "my run"), push_to_hub=True)
    assert "the repo named after --output_dir, 'my run' is not a Hub repo id" in hub.hub_problems(run)[0]
    run.hub_model_id = "me/ok"
    assert hub.hub_problems(run) == ["--push_to_hub: not logged in to the Hugging Face Hub: run `hf auth login` (or "
                                     "set HF_TOKEN) first."]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in hub.hub_problems(run)[0]
    run.push_to_hub = False
    assert hub.hub_problems(run) == []  # --hub_model_id alone uploads nothing and checks nothing
    with pytest.raises(ConfigError, match="--hub_token: log in with `hf auth login` instead"):
        TrainConfig.from_flat_dict({"hub_token": "hf_x"})
    assert "push_to_hub" in TrainConfig.from_flat_dict({"push_to_hub": True, "hub_model_id": "me/x"}).to_flat_dict()


def test_dry_run_says_where_the_run_goes_up_and_sends_nothing(data_dir, tmp_path, fake_hub, capsys):
    cli.main(["train", "--pretrained_teacher_model", "teacher-eps", "--train_data_dir", str(data_dir), "--output_dir",
              str(tmp_path / "out"), "--report_to", "none", "--train_batch_size", "4", "--push_to_hub", "--hub_model_id",
              "me/x", "--dry-run"])
    assert "goes up to the Hub repo me/x (created if missing)" in capsys.readouterr().err
    assert fake_hub == []  # nothing created, nothing uploaded


def test_export_push_to_hub(data_dir, tmp_path, fake_hub):
    run = train(tiny_config(data_dir, tmp_path / "run", max_train_steps=1))
    export_main(["--checkpoint", str(run), "--output_dir", str(tmp_path / "exported"), "--push_to_hub",
                 "--hub_model_id", "me/exported"])
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    assert fake_hub[1][1]["folder_path"] == str(tmp_path / "exported")
    assert 'load_lora_weights("me/exported"' in _card(tmp_path / "exported")[1]
