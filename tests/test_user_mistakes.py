"""The mistakes users make at the command line, each answered in one line before any weight loads.

Each row of MISTAKES is a command (run in-process through `lcm_lora.cli.main`, offline), the text its message's
first line must contain, and the seconds it may take. Loading any model weights fails the row: every answer comes
from flags, config files and file headers alone. The positive rows below show the flags users bring from diffusers'
LCM scripts working.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import diffusers
import pytest
import transformers
import yaml

from lcm_lora import cli, single_file
from lcm_lora.world.dataset import write_imagefolder
from tiny_run import tiny_config

# The SD1.5 LCM-LoRA command of diffusers' examples/consistency_distillation/README.md, its data flag adapted
# (their webdataset URL becomes a local folder) and the teacher the bundled one.
DIFFUSERS_README_COMMAND = [
    "--pretrained_teacher_model={teacher}", "--output_dir={out}", "--mixed_precision=fp16", "--resolution=512",
    "--lora_rank=64", "--learning_rate=1e-4", "--loss_type=huber", "--adam_weight_decay=0.0",
    "--max_train_steps=1000", "--max_train_samples=4000000", "--dataloader_num_workers=8",
    "--train_data_dir={data}", "--validation_steps=200", "--checkpointing_steps=200",
    "--checkpoints_total_limit=10", "--train_batch_size=12", "--gradient_checkpointing",
    "--enable_xformers_memory_efficient_attention", "--gradient_accumulation_steps=1", "--use_8bit_adam",
    "--resume_from_checkpoint=latest", "--report_to=wandb", "--seed=453645634", "--push_to_hub",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Paths the rows refer to: data, an empty folder, an imagefolder without captions, a finished tiny run, a
    broken YAML file, an existing generate output."""
    root = tmp_path_factory.mktemp("mistakes")
    paths = {"root": root, "data": write_imagefolder(root / "data", 16), "empty": root / "empty",
             "out": root / "out", "run": root / "run", "gen": root / "gen"}
    paths["empty"].mkdir()
    no_text = root / "no-text"
    no_text.mkdir()
    for image in sorted(paths["data"].glob("*.png"))[:4]:
        (no_text / image.name).write_bytes(image.read_bytes())
    (no_text / "metadata.jsonl").write_text("".join(json.dumps({"file_name": p.name, "caption": "a red circle"}) + "\n"
                                                    for p in sorted(no_text.glob("*.png"))))
    paths["no_text"] = no_text
    paths["bad_yaml"] = root / "bad.yaml"
    paths["bad_yaml"].write_text("lora_rank: 4\nw_min: [1, 2\n")
    (root / "output" / "tiny-eps").mkdir(parents=True)
    paths["gen"].mkdir()
    (paths["gen"] / "p000-s0000000000.png").write_bytes(b"an earlier image")
    from lcm_lora.trainer import train  # a finished 2-step run with a checkpoint, rank 4

    train(tiny_config(paths["data"], paths["run"]))
    return paths


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the row: diffusers' and transformers' from_pretrained, and single-file loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the mistake was reported")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr(single_file, "load_single_file_pipeline", refuse)


T = "--pretrained_teacher_model"


def tiny_args(data: str, out: str) -> list[str]:
    """tiny_config's flags, as the CLI takes them."""
    return [T, "teacher-eps", "--train_data_dir", data, "--output_dir", out, "--resolution", "64",
            "--train_batch_size", "4", "--lora_alpha", "8", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--checkpointing_steps", "1", "--report_to", "none", "--seed", "0", "--export_dtype", "fp32",
            "--lora_rank", "4", "--max_train_steps", "2"]


TRAIN = ["train", T, "teacher-eps", "--train_data_dir", "{data}", "--output_dir", "{out}", "--report_to", "none"]
GEN = ["generate", "--pretrained_model", "teacher-eps", "--prompt", "a red circle", "--output_dir", "{root}/gen-new"]

# (id, command, expected in the first line of the message, seconds)
MISTAKES = [
    ("bundled-name-typo", ["train", T, "teacher-epss", "--train_data_dir", "{data}", "--dry-run"],
     "teacher-epss: not a bundled model (teacher-eps, teacher-vpred, teacher-sdxl, community-dusk), an existing "
     "folder or file, or a hub id (owner/name). Did you mean teacher-eps?", 10),
    ("local-path-without-dot", ["train", T, "output/tiny-epsilon", "--train_data_dir", "{data}", "--dry-run"],
     "output/tiny-epsilon: no such file or folder.", 10),
    ("missing-path-with-dot", ["train", T, "{root}/run/nope", "--train_data_dir", "{data}", "--dry-run"],
     "run/nope: no such file or folder.", 10),
    ("relative-path-near-a-folder", ["train", T, "output/tiny-ep", "--train_data_dir", "{data}", "--dry-run"],
     "output/tiny-ep: no such file or folder. Did you mean output/tiny-eps?", 10),
    ("hub-id-offline", ["train", T, "someone/sd-model", "--train_data_dir", "{data}", "--dry-run"],
     "someone/sd-model: no local folder of that name, and as a hub id it is not in the local Hugging Face cache "
     "while HF_HUB_OFFLINE is set", 10),
    ("hub-unreachable", ["train", T, "someone/sd-model", "--train_data_dir", "{data}", "--dry-run"],
     "someone/sd-model: cannot reach the Hugging Face Hub", 20),
    ("generate-missing-lora", [*GEN, "--lora", "{root}/nope"], "{root}/nope", 10),
    ("generate-model-typo", ["generate", "--pretrained_model", "teacher-vpre", "--prompt", "x", "--output_dir",
                             "{root}/gen-new"], "Did you mean teacher-vpred?", 10),
    ("generate-existing-output", ["generate", "--pretrained_model", "teacher-eps", "--prompt", "a red circle",
                                  "--output_dir", "{gen}"], "exists: pass --overwrite to replace it.", 10),
    ("empty-data-folder", [*TRAIN[:3], "--train_data_dir", "{empty}", "--output_dir", "{out}"],
     "--train_data_dir {empty}: no images", 10),
    ("missing-caption-column", [*TRAIN[:3], "--train_data_dir", "{no_text}", "--output_dir", "{out}"],
     "no column 'text' (--caption_column)", 20),
    ("missing-resume-target", [*TRAIN, "--resume_from_checkpoint", "{root}/checkpoint-7"], "checkpoint-7", 10),
    ("resume-with-another-rank", ["train", *tiny_args("{data}", "{run}"), "--lora_rank", "8",
                                  "--max_train_steps", "4", "--resume_from_checkpoint", "latest"],
     "was trained with another configuration: lora_rank: 4 -> 8", 10),
    ("dry-run-bad-precision", [*TRAIN, "--mixed_precision", "fp17", "--dry-run"],
     "--mixed_precision must be one of ('no', 'fp16', 'bf16'), got 'fp17'.", 10),
    ("dry-run-bad-resolution", [*TRAIN, "--resolution", "63", "--dry-run"],
     "--resolution 63 is not a multiple of the VAE's downsampling factor 4; use 60 or 64.", 10),
    ("fp16-on-cpu", [*TRAIN, "--mixed_precision", "fp16", "--dry-run"], "--mixed_precision fp16: no GPU here", 10),
    ("yaml-syntax-error", ["train", "--config", "{bad_yaml}", "--dry-run"],
     "{bad_yaml}: not valid YAML at line 3, column 1", 10),
    ("tracker-typo", [*TRAIN[:-1], "tensorbord", "--dry-run"], "--report_to tensorbord: not a tracker", 10),
    ("tracker-not-installed", [*TRAIN[:-1], "wandb", "--dry-run"],
     "--report_to wandb: wandb is not installed (pip install wandb), or pass --report_to none.", 10),
    ("target-module-typo", [*TRAIN, "--lora_target_modules", "to_q,to_kk", "--dry-run"],
     "--lora_target_modules to_kk: no Linear or Conv2d of the teacher's UNet is named so", 10),
    ("push-to-hub-offline", [*TRAIN, "--push_to_hub", "--dry-run"],
     "--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded", 10),
    ("hub-token-on-the-command-line", [*TRAIN, "--hub_token", "hf_x", "--dry-run"],
     "--hub_token: log in with `hf auth login` instead", 10),
    ("license-not-a-hub-id", [*TRAIN, "--license", "MIT", "--dry-run"], "--license 'MIT': not a Hub license id", 10),
    ("cast-teacher-unet", [*TRAIN, "--cast_teacher_unet", "--dry-run"],
     "--cast_teacher_unet: the teacher always runs in --mixed_precision's dtype here", 10),
    ("8bit-adam-without-bitsandbytes", [*TRAIN, "--use_8bit_adam", "--dry-run"],
     "--use_8bit_adam needs bitsandbytes: pip install 'lcm-lora[bnb]'", 10),
    ("bool-value-typo", [*TRAIN, "--center_crop", "maybe", "--dry-run"],
     "--center_crop: expected true or false, got 'maybe'.", 10),
    ("old-cache-flag-is-not-the-download-cache", [*TRAIN[:3], "--cache_dir", "{empty}", "--dry-run"],
     "--encodings_dir {empty}: no manifest.json", 10),
    ("no-data-source", ["train", T, "teacher-eps", "--dry-run"],
     "give --train_data_dir (a folder), --dataset_name, --train_shards_path_or_url or --encodings_dir.", 10),
    ("unknown-command", ["trian"], "unknown command 'trian'; did you mean 'train'?", 5),
    ("whole-number-flag", [*TRAIN, "--lora_rank", "4.5", "--dry-run"], "invalid int value: '4.5'", 5),
    ("fewer-samples-than-a-batch", [*TRAIN, "--train_batch_size", "32", "--dry-run"],
     "the data has 16 samples, fewer than one batch (--train_batch_size 32)", 10),
    ("diffusers-readme-command", ["train", *DIFFUSERS_README_COMMAND, "--dry-run"],
     "--report_to wandb: wandb is not installed", 10),
    ("export-missing-checkpoint", ["export", "--checkpoint", "{root}/nope", "--output_dir", "{root}/exp"],
     "{root}/nope", 10),
    ("merge-missing-model", ["merge", "--checkpoint", "{root}/nope.safetensors", "--lora", "{run}", "--output",
                             "{root}/merged.safetensors", "--single_file_config", "teacher-eps"], "nope.safetensors", 10),
]


def _run(argv: list[str], capsys) -> tuple[str, float]:
    """(the message: SystemExit's text, else the last stderr line argparse wrote; seconds)."""
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    seconds = time.monotonic() - start
    code = exit_info.value.code
    assert code not in (0, None), f"exit status {code}: the mistake was accepted"
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    return message, seconds


def _filled(parts: list[str], paths: dict[str, Path]) -> list[str]:
    return [p.format(**{k: str(v) for k, v in paths.items()}, teacher="teacher-eps") for p in parts]


@pytest.mark.parametrize("command, expected, seconds", [row[1:] for row in MISTAKES], ids=[row[0] for row in MISTAKES])
def test_each_mistake_gets_one_line_before_any_weight_loads(command, expected, seconds, world, no_weights, capsys,
                                                            monkeypatch, request):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if request.node.callspec.id == "hub-unreachable" else "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: a refused connection
    monkeypatch.setenv("HF_HUB_CACHE", str(world["root"] / "hub-cache"))
    monkeypatch.chdir(world["root"])  # relative paths as a user types them, next to an output/ folder
    message, took = _run(_filled(command, world), capsys)
    first_line = message.removeprefix("error: ").removeprefix("invalid configuration:").strip().splitlines()[0]
    assert _filled([expected], world)[0] in first_line, message
    assert took < seconds, f"{took:.1f} s"


def test_the_table_covers_at_least_25_mistakes():
    assert len(MISTAKES) >= 25 and len({row[0] for row in MISTAKES}) == len(MISTAKES)


# -- what users bring from diffusers works ------------------------------------------------------------------------

def _dry_run(argv: list[str], capsys) -> dict:
    cli.main(["train", *argv, "--dry-run"])
    return yaml.safe_load(capsys.readouterr().out)


def test_the_diffusers_readme_command_runs_once_its_unavailable_extras_are_dropped(world, no_weights, capsys,
                                                                                   monkeypatch):
    """Without the flags this machine cannot honour (fp16 needs a GPU; xformers, bitsandbytes and wandb are not
    installed; --push_to_hub needs the Hub, switched off here), the README command passes every check, its values
    as given."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "")
    dropped = ("--mixed_precision", "--enable_xformers", "--use_8bit_adam", "--report_to", "--push_to_hub")
    argv = [a for a in _filled(DIFFUSERS_README_COMMAND, world) if not a.startswith(dropped)]
    printed = _dry_run([*argv, "--report_to", "none"], capsys)
    assert (printed["lora_rank"], printed["train_batch_size"], printed["checkpoints_total_limit"]) == (64, 12, 10)
    assert printed["loss_type"] == "huber" and printed["gradient_checkpointing"] is True
    assert printed["resume_from_checkpoint"] == "latest" and printed["seed"] == 453645634


def test_diffusers_flag_forms_are_accepted(world, no_weights, capsys):
    printed = _dry_run([*_filled(TRAIN[1:], world), "--lora_target_modules", "to_q,to_k", "--center_crop", "false",
                        "--random_flip", "--teacher_revision", "main", "--scale_lr", "--tracker_project_name", "mine",
                        "--vae_encode_batch_size", "2", "--local_rank", "0", "--num_train_epochs", "3",
                        "--train_batch_size", "4"], capsys)
    assert printed["lora_target_modules"] == ["to_q", "to_k"]
    assert (printed["center_crop"], printed["random_flip"], printed["revision"]) == (False, True, "main")
    assert (printed["scale_lr"], printed["tracker_project_name"], printed["vae_encode_batch_size"]) == (True, "mine", 2)
    assert printed["max_train_steps"] == 3 * 4  # 16 images in batches of 4, three epochs


def test_mixed_precision_defaults_to_the_accelerate_config(world, no_weights, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr("accelerate.commands.config.config_args.default_config_file",
                        str(tmp_path / "default_config.yaml"))
    (tmp_path / "default_config.yaml").write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: bf16\n")
    assert _dry_run(_filled(TRAIN[1:], world), capsys)["mixed_precision"] == "bf16"
    assert _dry_run([*_filled(TRAIN[1:], world), "--mixed_precision", "no"], capsys)["mixed_precision"] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch --mixed_precision no` sets
    assert _dry_run(_filled(TRAIN[1:], world), capsys)["mixed_precision"] == "no"


def test_dry_run_says_what_train_would_do(world, no_weights, capsys):
    cli.main(["train", *tiny_args(str(world["data"]), str(world["root"] / "fresh")), "--resume_from_checkpoint",
              "latest", "--dry-run"])
    assert "no checkpoint in" in capsys.readouterr().err
    cli.main(["train", *tiny_args(str(world["data"]), str(world["run"])), "--resume_from_checkpoint", "latest",
              "--dry-run"])
    assert "holds the finished run (checkpoint-2): nothing to train." in capsys.readouterr().err


def test_help_lists_the_commands_and_each_command_has_its_own(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.COMMANDS)
    cli.main(["--version"])
    assert capsys.readouterr().out.startswith("lcm-lora ")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cache", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lcm-lora cache") and "The folder to write the encodings to" in out


def test_8bit_adam_scale_lr_and_vae_chunks_reach_the_trainer(monkeypatch):
    """--use_8bit_adam builds bitsandbytes' AdamW8bit (a stand-in here: bitsandbytes needs CUDA), --scale_lr scales
    the rate as diffusers' scripts do, and --vae_encode_batch_size bounds each VAE call."""
    import sys
    import types

    import torch

    from lcm_lora.trainer import encode_images, make_optimizer

    class AdamW8bit(torch.optim.AdamW):
        pass

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=types.SimpleNamespace(
        AdamW8bit=AdamW8bit)))
    o = tiny_config(Path("d"), Path("o"), use_8bit_adam=True, scale_lr=True, gradient_accumulation_steps=2,
                    learning_rate=1e-4).optim
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], o, num_processes=3)
    assert type(optimizer) is AdamW8bit
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 4 * 2 * 3)  # batch 4 x accumulation 2 x 3

    sizes = []

    class FakeVAE:
        def encode(self, x):
            sizes.append(len(x))
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda: x[:, :1]))

    latents = encode_images(FakeVAE(), torch.arange(5.0).view(5, 1, 1, 1), chunk=2)
    assert sizes == [2, 2, 1] and latents.flatten().tolist() == [0, 1, 2, 3, 4]
