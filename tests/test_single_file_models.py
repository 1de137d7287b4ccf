"""Community checkpoints: a single-file model as teacher and for generation, and `merge` baking a LoRA into one.
The single file is the bundled teacher written in the original SD layout."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from lcm_lora import export
from lcm_lora.cli import generate_main, merge_main
from lcm_lora.config import LoraArgs
from lcm_lora.models import attach_lora, resolve_teacher, teacher_problems
from lcm_lora.ldm_keys import UNET_PREFIX, unet_ldm_names
from lcm_lora.single_file import load_single_file_pipeline
from single_file_writer import save_single_file
from lcm_lora.trainer import train
from lcm_lora.world.dataset import write_imagefolder
from lora_helpers import randomize_lora
from tiny_run import tiny_config

TEACHER = resolve_teacher("teacher-eps")


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("community") / "tiny.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    return save_single_file(pipe, path, {"modelspec.title": "tiny community model"})


def _lora(tmp_path):
    """A random rank-4 alpha-8 LoRA on the teacher, exported as kohya; (file, student, number of modules)."""
    unet = attach_lora(StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None).unet,
                       LoraArgs(lora_rank=4, lora_alpha=8.0))
    randomize_lora(unet)
    info = export.ExportInfo(config_flat={}, teacher="teacher-eps", prediction_type="epsilon", steps=1,
                             unet_config=dict(unet.config), output_name="lcm-lora-tiny")
    export.write_formats(export.lora_modules(unet), tmp_path, ["kohya", "diffusers", "peft"], torch.float32, info)
    return tmp_path / "lcm-lora-tiny.safetensors", unet.eval(), len(export.lora_modules(unet))


def _unet_out(unet):
    gen = torch.Generator().manual_seed(1)
    z, c = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 64, generator=gen)
    with torch.no_grad():
        return unet(z, torch.tensor([999, 259]), c).sample


def test_merge_changes_only_the_targeted_tensors_and_equals_the_fused_lora(single_file, tmp_path):
    lora, student, n_modules = _lora(tmp_path)
    merged = tmp_path / "merged.safetensors"
    merge_main(["--checkpoint", str(single_file), "--lora", str(lora), "--output", str(merged),
                "--single_file_config", str(TEACHER)])
    before, after = load_file(str(single_file)), load_file(str(merged))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    names = unet_ldm_names(dict(student.config))
    assert changed == {UNET_PREFIX + names[p] + ".weight" for p in export.lora_modules(student)}
    assert len(changed) == n_modules
    assert all(before[k].dtype == after[k].dtype for k in before)
    meta = export.read_metadata(merged)
    assert meta["modelspec.title"] == "tiny community model"  # kept
    assert meta["modelspec.merged_from"] == "tiny community model, lcm-lora-tiny"

    pipe = load_single_file_pipeline(merged, TEACHER)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(student), atol=1e-5, rtol=0)
    fused = load_single_file_pipeline(single_file, TEACHER)
    fused.load_lora_weights(str(lora))
    fused.fuse_lora()
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(fused.unet), atol=1e-5, rtol=0)

    # The same LoRA's diffusers file and PEFT file (their folders) merge to the same model.
    for folder in (tmp_path, tmp_path / "peft"):
        merge_main(["--checkpoint", str(single_file), "--lora", str(folder), "--output",
                    str(tmp_path / "m2.safetensors"), "--single_file_config", str(TEACHER), "--overwrite"])
        again = load_file(str(tmp_path / "m2.safetensors"))
        assert all(torch.allclose(again[k], after[k], rtol=0, atol=1e-6) for k in after)
        assert "sshs_model_hash" not in export.read_metadata(tmp_path / "m2.safetensors")


def test_merge_keeps_an_fp16_checkpoint_fp16_and_refuses_overwriting(single_file, tmp_path):
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(str(single_file)).items()}, str(half))
    lora, _, n_modules = _lora(tmp_path)
    merge_main(["--checkpoint", str(half), "--lora", str(lora), "--output", str(tmp_path / "m.safetensors"),
                "--single_file_config", str(TEACHER)])
    before, after = load_file(str(half)), load_file(str(tmp_path / "m.safetensors"))
    assert all(v.dtype == torch.float16 for v in after.values())
    assert sum(not torch.equal(before[k], after[k]) for k in before) == n_modules
    with pytest.raises(SystemExit, match="is an input of this command"):
        merge_main(["--checkpoint", str(half), "--lora", str(lora), "--output", str(half),
                    "--single_file_config", str(TEACHER)])


def test_a_single_file_teacher_trains_the_same_lora_and_generates(single_file, tmp_path):
    data = write_imagefolder(tmp_path / "world", 8)
    from_folder = train(tiny_config(data, tmp_path / "folder"))
    from_file = train(tiny_config(data, tmp_path / "file", pretrained_teacher_model=str(single_file),
                                  single_file_config=str(TEACHER)))
    a = load_file(from_folder / export.DIFFUSERS_WEIGHT_NAME)
    b = load_file(from_file / export.DIFFUSERS_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same teacher, bit for bit

    generate_main(["--pretrained_model", str(single_file), "--single_file_config", str(TEACHER), "--lora",
                   str(from_file), "--prompt", "a red circle", "--num_inference_steps", "2",
                   "--output_dir", str(tmp_path / "gen"), "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["grid.png", "p000-s0000000000.png"]


def test_a_single_file_without_its_config_folder_is_refused_by_flag(single_file, tmp_path):
    model = tiny_config(tmp_path, tmp_path, pretrained_teacher_model=str(single_file)).model
    [problem] = teacher_problems(model, 64, 20)
    assert "--single_file_config" in problem and str(single_file) in problem
    model.single_file_config = str(tmp_path)
    assert "no model_index.json" in teacher_problems(model, 64, 20)[0]
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    model = tiny_config(tmp_path, tmp_path, pretrained_teacher_model=str(ckpt), single_file_config=str(TEACHER)).model
    assert "pickle" in teacher_problems(model, 64, 20)[0]


def test_the_bundled_community_checkpoint_loads_offline_as_a_fine_tune_of_teacher_eps(tmp_path):
    community = load_single_file_pipeline(resolve_teacher("community-dusk"), "teacher-eps")
    teacher = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    te_a, te_b = community.text_encoder.state_dict(), teacher.text_encoder.state_dict()
    assert all(torch.equal(te_a[k], te_b[k]) for k in te_b)  # the fine-tune left the text encoder alone
    assert not torch.allclose(_unet_out(community.unet), _unet_out(teacher.unet), atol=1e-3)  # and changed the UNet
    generate_main(["--pretrained_model", "community-dusk", "--single_file_config", "teacher-eps", "--lora",
                   "style-dusk", "--prompt", "a red circle", "--num_inference_steps", "1",
                   "--output_dir", str(tmp_path), "--device", "cpu"])
    assert (tmp_path / "grid.png").is_file()
