"""Every exported format loads with diffusers' own loader and reproduces the in-memory student."""

import hashlib
import logging
import re
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save

from lcm_lora import export, formats
from lcm_lora.config import DEFAULT_TARGETS, LoraArgs
from lcm_lora.models import attach_lora, resolve_teacher, unet_module_paths
from lora_helpers import randomize_lora

TEACHER = resolve_teacher("teacher-eps")
KOHYA_KEY = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _pipe():
    return StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)


def _student(rank: int, alpha: float):
    return randomize_lora(attach_lora(_pipe().unet, LoraArgs(lora_rank=rank, lora_alpha=alpha)))


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([999, 259]), torch.randn(2, 77, 64, generator=gen)


def _info(unet, **overrides) -> export.ExportInfo:
    values = dict(config_flat={"lora_rank": 4, "lora_alpha": 4.0, "num_ddim_timesteps": 20, "resolution": 64},
                  teacher="teacher-eps", prediction_type="epsilon", steps=7, unet_config=dict(unet.config),
                  output_name="lcm-lora-test")
    return export.ExportInfo(**{**values, **overrides})


class _Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_quietly(pipe, path):
    """load_lora_weights, returning every warning diffusers or PEFT gave."""
    handler, logger = _Captured(), logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        logger.removeHandler(handler)
    return handler.messages + [str(w.message) for w in caught]


@pytest.mark.parametrize("rank, alpha", [(4, 4.0), (4, 16.0), (8, 2.0)])
def test_every_format_loads_fuses_and_unfuses_like_the_student(tmp_path, rank, alpha):
    student = _student(rank, alpha)
    z, t, c = _inputs()
    with torch.no_grad():
        expected = student(z, t, c).sample
        student.disable_adapters()
        base = student(z, t, c).sample
        student.enable_adapters()
    files = export.write_formats(export.lora_modules(student), tmp_path, list(export.FORMAT_FILES), torch.float32,
                                 _info(student))
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "pytorch_lora_weights.safetensors", "lcm-lora-test.safetensors", "peft/pytorch_lora_weights.safetensors"]
    assert (expected - base).abs().max() > 1e-2  # the LoRA changes the output
    # The folder (diffusers picks its pytorch_lora_weights.safetensors), the kohya file, and the peft folder.
    for path in [tmp_path, files[1], tmp_path / "peft"]:
        pipe = _pipe()
        base_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        messages = _load_quietly(pipe, path)
        # The only message is the one about the (deliberately absent) text-encoder LoRA; seeing it also shows
        # the capture works, so "no other message" is not vacuous.
        assert [m for m in messages if "No LoRA keys associated to CLIPTextModel" in m], (path, messages)
        assert not [m for m in messages if "CLIPTextModel" not in m], (path, messages)
        with torch.no_grad():
            torch.testing.assert_close(pipe.unet(z, t, c).sample, expected, atol=1e-5, rtol=0)
            pipe.fuse_lora()
            torch.testing.assert_close(pipe.unet(z, t, c).sample, expected, atol=1e-5, rtol=0)
            pipe.unfuse_lora()
        pipe.unload_lora_weights()
        restored = pipe.unet.state_dict()
        assert restored.keys() == base_weights.keys()
        for key, value in base_weights.items():
            torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("export_format", ["diffusers", "kohya"])
def test_kohya_file_layout_dtype_and_metadata(tmp_path, export_format):
    """The kohya file and the default pytorch_lora_weights.safetensors: kohya keys and the tools' metadata."""
    student = _student(4, 8.0)
    info = _info(student, config_flat={"lora_rank": 4, "lora_alpha": 8.0, "resolution": 64, "w_min": 1.0,
                                       "w_max": 2.0, "num_ddim_timesteps": 20, "timestep_scaling_factor": 10.0})
    [path] = export.write_formats(export.lora_modules(student), tmp_path, [export_format], torch.float16, info)
    assert path.relative_to(tmp_path).as_posix() == {"diffusers": export.DIFFUSERS_WEIGHT_NAME,
                                                     "kohya": "lcm-lora-test.safetensors"}[export_format]
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert all(KOHYA_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_KEY.match(k)]
    stems = {k.split(".", 1)[0] for k in keys}
    lora_modules = {n for n, m in student.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert stems == {formats.kohya_stem(p) for p in lora_modules} and len(keys) == 3 * len(stems)
    for stem in stems:
        assert tensors[f"{stem}.alpha"].dtype == torch.float32 and tensors[f"{stem}.alpha"].dim() == 0
        assert tensors[f"{stem}.lora_down.weight"].dtype == torch.float16
    assert tensors["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].dim() == 4  # 1x1 conv stays 4-D
    assert tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].dim() == 2
    # The metadata the tools read, all strings.
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "8" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.title"] == "lcm-lora-test"
    assert meta["lcm_lora.num_ddim_timesteps"] == "20" and "4-8 steps" in meta["modelspec.usage_hint"]
    assert "lcm_lora.alpha_baked_into_lora_B" not in meta  # the alphas are in the file
    assert _a1111_version(meta) == "SD1"
    # Hashes as sd-scripts computes them: the file re-serialised with only the ss_* metadata.
    data = save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header_end:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    raw = path.read_bytes()
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def _a1111_version(meta: dict) -> str:
    """A1111's NetworkOnDisk.detect_version, which decides which base models list the LoRA."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def test_rslora_and_per_module_ranks_and_alphas_keep_every_update(tmp_path):
    unet = _pipe().unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=list(DEFAULT_TARGETS),
                                rank_pattern={"to_q": 8}, alpha_pattern={"proj_in": 3}, init_lora_weights="gaussian"))
    randomize_lora(unet)
    modules = export.lora_modules(unet)
    assert len({m.rank for m in modules.values()}) == 2 and len({m.alpha for m in modules.values()}) >= 2
    tensors = formats.to_kohya_keys(modules)
    parsed = formats.parse_lora(tensors, unet_module_paths(dict(unet.config)))
    for path, layer in unet.named_modules():
        if path in modules:
            trained = layer.get_delta_weight("default")
            exported = formats.delta_weight(parsed[path])
            assert ((exported - trained).norm() / trained.norm()) <= 1e-6, path
    z, t, c = _inputs()
    with torch.no_grad():
        expected = unet(z, t, c).sample
    export.write_formats(modules, tmp_path, ["diffusers", "kohya", "peft"], torch.float32, _info(unet))
    for path in (tmp_path, tmp_path / "lcm-lora-test.safetensors", tmp_path / "peft"):
        pipe = _pipe()
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            torch.testing.assert_close(pipe.unet(z, t, c).sample, expected, atol=1e-5, rtol=0)


def test_read_lora_is_strict_and_round_trips_files(tmp_path):
    student = _student(4, 8.0)
    files = export.write_formats(export.lora_modules(student), tmp_path, ["diffusers", "kohya", "peft"],
                                 torch.float16, _info(student))
    config = dict(student.config)
    for path in files:
        tensors, meta = export.read_safetensors(path)
        modules, _ = export.read_lora(path, config)
        again = formats.to_kohya_keys(modules) if "lora_unet_" in next(iter(tensors)) else \
            formats.to_peft_keys(modules)
        assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)
    tensors, meta = export.read_safetensors(files[1])
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(1, 1)
    export.save_safetensors_atomic(tensors, tmp_path / "bad.safetensors", meta)
    with pytest.raises(formats.LoraFormatError, match=r"bad.safetensors: 1 kohya modules match no UNet module: "
                                                      r"lora_unet_down_blocks_7_attentions_0_proj_in"):
        export.read_lora(tmp_path / "bad.safetensors", config)


def test_generation_reads_the_training_grid_from_the_lora_metadata(tmp_path):
    from lcm_lora.export import lcm_scheduler_settings, metadata
    from lcm_lora.inference import load_lcm_pipeline

    flat = {"lora_rank": 4, "lora_alpha": 4.0, "w_min": 2.0, "w_max": 6.0, "num_ddim_timesteps": 20,
            "timestep_scaling_factor": 5.0}
    student = _student(4, 4.0)
    export.write_formats(export.lora_modules(student), tmp_path, ["diffusers"], torch.float32,
                         _info(student, config_flat=flat))
    assert metadata(flat, "teacher-eps", "epsilon", 7)["lcm_lora.w_range"] == "2.0,6.0"
    assert lcm_scheduler_settings(tmp_path) == {"original_inference_steps": 20, "timestep_scaling": 5.0}
    pipe = load_lcm_pipeline("teacher-eps", tmp_path)
    assert (pipe.scheduler.config.original_inference_steps, pipe.scheduler.config.timestep_scaling) == (20, 5.0)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # the 20-point training grid
    explicit = load_lcm_pipeline("teacher-eps", tmp_path, original_inference_steps=50)
    assert explicit.scheduler.config.original_inference_steps == 50  # an explicit value wins
    assert lcm_scheduler_settings(tmp_path / "missing.safetensors") == {}


def test_stacking_with_a_style_lora_through_set_adapters(tmp_path):
    """LCM-LoRA plus another LoRA, as diffusers users stack them: each update weighted by its adapter weight."""
    lcm = _student(4, 8.0)
    export.write_formats(export.lora_modules(lcm), tmp_path / "lcm", ["diffusers"], torch.float32, _info(lcm))
    style = _pipe().unet
    style.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v", "proj_out"],
                                 init_lora_weights="gaussian"))
    randomize_lora(style, seed=5)
    export.write_formats(export.lora_modules(style), tmp_path / "style", ["peft"], torch.float32, _info(style))

    pipe = _pipe()
    pipe.load_lora_weights(str(tmp_path / "lcm"), adapter_name="lcm")  # kohya keys
    pipe.load_lora_weights(str(tmp_path / "style" / "peft"), adapter_name="style")  # PEFT keys
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.6])
    expected = _pipe().unet  # the base with both updates added by hand, each times its weight
    with torch.no_grad():
        for modules, weight in ((export.lora_modules(lcm), 1.0), (export.lora_modules(style), 0.6)):
            for path, module in modules.items():
                expected.get_submodule(path).weight += formats.delta_weight(module, weight)
    z, t, c = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(z, t, c).sample, expected(z, t, c).sample, atol=1e-5, rtol=0)
        pipe.set_adapters(["lcm"])  # the style switched off: the LCM-LoRA alone
        torch.testing.assert_close(pipe.unet(z, t, c).sample, lcm(z, t, c).sample, atol=1e-5, rtol=0)


def test_export_command_converts_a_lora_from_elsewhere(tmp_path):
    from lcm_lora.cli import export_main

    student = _student(4, 8.0)
    tensors = formats.to_kohya_keys(export.lora_modules(student))
    export.save_safetensors_atomic(tensors, tmp_path / "foreign.safetensors", {"format": "pt"})  # no lcm_lora.* keys
    args = ["--checkpoint", str(tmp_path / "foreign.safetensors"), "--output_dir", str(tmp_path / "out"),
            "--formats", "diffusers", "--dtype", "fp32"]
    with pytest.raises(SystemExit, match="pass --pretrained_teacher_model"):
        export_main(args)
    export_main(args + ["--pretrained_teacher_model", "teacher-eps"])
    pipe = _pipe()
    pipe.load_lora_weights(str(tmp_path / "out"))
    z, t, c = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(z, t, c).sample, student(z, t, c).sample, atol=1e-5, rtol=0)


def test_generation_finds_the_sampling_grid_in_a_kohya_only_run(tmp_path):
    """A run with --export_formats kohya: diffusers loads the folder's one LoRA file, and so do the settings."""
    from lcm_lora.export import lcm_scheduler_settings

    student = _student(4, 4.0)
    flat = {"lora_rank": 4, "lora_alpha": 4.0, "num_ddim_timesteps": 20, "timestep_scaling_factor": 5.0}
    export.write_formats(export.lora_modules(student), tmp_path, ["kohya"], torch.float32, _info(student, config_flat=flat))
    assert export.lora_file(tmp_path).name == "lcm-lora-test.safetensors"
    assert lcm_scheduler_settings(tmp_path) == {"original_inference_steps": 20, "timestep_scaling": 5.0}


def test_the_default_file_is_the_kohya_file_and_hub_is_its_former_name(tmp_path):
    """pytorch_lora_weights.safetensors holds the kohya file's tensors and metadata (the layout of the official
    LCM-LoRA repos); the PEFT layout is the peft format; "hub", in old presets and commands, writes the default file
    with a FutureWarning."""
    from lcm_lora.config import EXPORT_FORMATS, TrainConfig

    assert set(EXPORT_FORMATS) == set(export.FORMAT_FILES) | set(export.FORMAT_ALIASES)
    assert TrainConfig().run.export_formats == ("diffusers", "kohya")
    student = _student(4, 8.0)
    default, kohya, peft = export.write_formats(export.lora_modules(student), tmp_path, ["diffusers", "kohya", "peft"],
                                                torch.float16, _info(student))
    (tensors, meta), (kohya_tensors, kohya_meta) = export.read_safetensors(default), export.read_safetensors(kohya)
    assert all(KOHYA_KEY.match(k) for k in tensors) and tensors.keys() == kohya_tensors.keys()
    assert all(torch.equal(tensors[k], kohya_tensors[k]) for k in tensors)
    assert meta == kohya_meta and meta["ss_network_alpha"] == "8" and "modelspec.hash_sha256" in meta
    peft_tensors, peft_meta = export.read_safetensors(peft)
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in peft_tensors)
    assert peft_meta["lcm_lora.alpha_baked_into_lora_B"] == "true" and "ss_network_dim" not in peft_meta

    with pytest.warns(FutureWarning, match="'hub' is now 'diffusers'"):
        files = export.write_formats(export.lora_modules(student), tmp_path / "old", ["hub", "kohya"], torch.float16,
                                     _info(student))
    assert [p.relative_to(tmp_path / "old").as_posix() for p in files] == [export.DIFFUSERS_WEIGHT_NAME,
                                                                          "lcm-lora-test.safetensors"]
    # Our readers find the PEFT file in a folder exported only as peft (diffusers: `load_lora_weights(dir/peft)`).
    [only_peft] = export.write_formats(export.lora_modules(student), tmp_path / "run", ["peft"], torch.float16,
                                       _info(student))
    assert export.lora_file(tmp_path / "run") == only_peft == tmp_path / "run" / export.PEFT_WEIGHT_NAME
    old_preset = TrainConfig.from_flat_dict({"pretrained_teacher_model": "teacher-eps", "export_formats": ["hub"]})
    assert not [p for p in old_preset.validate() if "export_formats" in p]
