"""The SDXL family (SDXL base 1.0, SSD-1B, Segmind Vega) in files: which family a model is, its LoRA in the diffusers
and kohya formats loaded back by diffusers' own SDXL loader, and single-file checkpoints in the original SGM layout.

Every layout is a tiny random UNet of the real shape (SSD-1B and Vega keep their real transformer depths); the
full-size layouts are built on the meta device to check them against the published parameter counts.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from lcm_lora import export, formats
from lcm_lora.cli import merge_main
from lcm_lora.config import ConfigError, LoraArgs
from lcm_lora.families import model_family, refiner_problem, single_file_family
from lcm_lora.models import attach_lora
from lcm_lora.ldm_keys import SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, UNET_PREFIX, unet_ldm_names
from lcm_lora.single_file import load_single_file_pipeline, single_file_problems
from single_file_writer import save_single_file
from lora_helpers import randomize_lora
from sdxl_tiny import tiny_sdxl_pipeline
from test_export import _a1111_version, _load_quietly
from test_ui_keys import _forward
from unet_shapes import (
    SD15_UNET,
    SD21_UNET,
    SDXL_REFINER_UNET,
    SDXL_UNET,
    SSD1B_UNET,
    TINY_SD15_UNET,
    TINY_SDXL_REFINER_UNET,
    TINY_SDXL_UNET,
    TINY_SSD1B_UNET,
    TINY_VEGA_UNET,
    VEGA_UNET,
)

TINY = {"sdxl": TINY_SDXL_UNET, "ssd-1b": TINY_SSD1B_UNET, "vega": TINY_VEGA_UNET}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: thread sync on 2 shared cores costs more than the maths."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- which family --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, family", [
    (SD15_UNET, "sd1"), (SD21_UNET, "sd2"), (TINY_SD15_UNET, "sd1"),
    (SDXL_UNET, "sdxl"), (SSD1B_UNET, "ssd-1b"), (VEGA_UNET, "vega"),
    (TINY_SDXL_UNET, "sdxl"), (TINY_SSD1B_UNET, "ssd-1b"), (TINY_VEGA_UNET, "vega"),
])
def test_family_from_the_unet_config_and_from_single_file_keys(config, family):
    """The config and a checkpoint's key names (the UNet's LDM names, plus the text encoders the family ships) agree
    on the family, at full size and tiny alike: decided by structure, not channel counts."""
    assert model_family(config) == family
    unet_keys = [f"{UNET_PREFIX}{name}.weight" for name in unet_ldm_names(config).values()]
    encoder_keys = {"sd1": ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
                    "sd2": ["cond_stage_model.model.ln_final.weight"]}.get(
        family, [SDXL_CLIP_PREFIX + "text_model.final_layer_norm.weight", SDXL_OPEN_CLIP_PREFIX + "ln_final.weight"])
    assert single_file_family(unet_keys + encoder_keys) == family
    if family not in ("sd1", "sd2"):
        assert single_file_family(unet_keys) == family  # a UNet-only file: label_emb marks SDXL
        assert refiner_problem(config, "base") is None


def test_the_refiner_is_refused_in_one_line(tmp_path):
    for config in (SDXL_REFINER_UNET, TINY_SDXL_REFINER_UNET):
        with pytest.raises(ConfigError, match="is the SDXL refiner .* out of scope: distil the SDXL base model"):
            model_family(config)
    # A refiner folder says so in its model_index.json too, whatever its UNet config looks like.
    folder = tmp_path / "refiner"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"text_encoder": [null, null], "text_encoder_2": '
                                             '["transformers", "CLIPTextModelWithProjection"], '
                                             '"requires_aesthetics_score": true}')
    message = refiner_problem(TINY_SDXL_UNET, folder)
    assert message.startswith(f"{folder} is the SDXL refiner") and "\n" not in message
    with pytest.raises(ConfigError, match="the checkpoint is the SDXL refiner"):
        single_file_family([SDXL_OPEN_CLIP_PREFIX.replace(".1.", ".0.") + "text_projection", UNET_PREFIX + "x"])


@pytest.mark.parametrize("config, unet_millions, lora_millions, lora_modules", [
    (SDXL_UNET, 2567.5, 196.75, 788), (SSD1B_UNET, 1331.3, 104.90, 423), (VEGA_UNET, 745.2, 59.78, 233),
], ids=["sdxl", "ssd-1b", "vega"])
def test_real_layouts_have_the_published_parameter_counts(config, unet_millions, lora_millions, lora_modules):
    """SDXL paper / Segmind (arXiv 2401.02677, Vega's 745M) UNet sizes, and the LCM-LoRA report's Table 1 LoRA sizes
    (197M SDXL, 105M SSD-1B) at rank 64 on the default targets: built on the meta device, no memory."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        n_unet = sum(p.numel() for p in unet.parameters())
        attach_lora(unet, LoraArgs(lora_rank=64, lora_alpha=64))
    n_lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert round(n_unet / 1e6, 1) == unet_millions
    assert round(n_lora / 1e6, 2) == lora_millions
    assert sum(hasattr(m, "lora_A") for m in unet.modules()) == lora_modules


# -- LoRA files, loaded back by StableDiffusionXLPipeline.load_lora_weights ----------------------------------------

def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded noise on every parameter: freshly built norms are all ones or zeros, and a swap of two would not show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
    return model.eval()


def _pipeline(config: dict) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline (tests/sdxl_tiny.py) with a random UNet of this layout."""
    pipe = tiny_sdxl_pipeline(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config)
    return StableDiffusionXLPipeline(**{**pipe.components, "unet": _perturbed(unet)})


def _student(pipe: StableDiffusionXLPipeline) -> UNet2DConditionModel:
    """The pipeline's UNet with a random rank-4, alpha-8 LoRA (alpha != rank, so a lost alpha shows)."""
    student = attach_lora(copy.deepcopy(pipe.unet), LoraArgs(lora_rank=4, lora_alpha=8.0))
    return randomize_lora(student, seed=1, scale=0.1)


def _info(student, name: str = "lcm-lora-xl") -> export.ExportInfo:
    return export.ExportInfo(config_flat={"resolution": 64}, teacher="tiny-sdxl", prediction_type="epsilon", steps=3,
                             unet_config=dict(student.config), output_name=name)


@pytest.mark.parametrize("family", TINY)
def test_both_formats_load_into_the_sdxl_pipeline_and_reproduce_the_student(family, tmp_path):
    pipe = _pipeline(TINY[family])
    student = _student(pipe)
    modules = export.lora_modules(student)
    diffusers_file, kohya_file, _ = export.write_formats(modules, tmp_path, ["diffusers", "kohya", "peft"],
                                                         torch.float32, _info(student))
    expected = _forward(student)
    assert (expected - _forward(pipe.unet)).abs().max() > 1e-2  # the LoRA changes the output

    kohya = load_file(str(kohya_file))
    stems = {k.split(".", 1)[0] for k in kohya}
    assert len(stems) == len(modules) and len(kohya) == 3 * len(modules)
    assert all(s.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for s in stems)  # sgm names (kohya library/sdxl_original_unet.py)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in stems
    assert "lora_unet_output_blocks_2_2_conv" in stems  # SDXL's first upsampler
    middle = {s.split("_")[4] for s in stems if s.startswith("lora_unet_middle_block_")}
    assert middle == ({"0", "1", "2"} if family == "sdxl" else {"0"})  # SSD-1B / Vega: one resnet in the middle
    meta = export.read_metadata(kohya_file)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and _a1111_version(meta) == "SDXL"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["lcm_lora.base_family"] == family
    # The default file is the kohya file under diffusers' name (the layout of latent-consistency/lcm-lora-sdxl).
    assert load_file(str(diffusers_file)).keys() == kohya.keys() and export.read_metadata(diffusers_file) == meta

    for path in (tmp_path, kohya_file, tmp_path / "peft"):
        loaded = StableDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
        messages = _load_quietly(loaded, path)
        # Only the two text encoders' "No LoRA keys associated to CLIPTextModel(WithProjection)": no UNet key unmatched.
        assert messages and all("No LoRA keys associated to CLIPTextModel" in m for m in messages), (path, messages)
        torch.testing.assert_close(_forward(loaded.unet), expected, atol=1e-5, rtol=0)


# -- single-file checkpoints (original SGM layout) ---------------------------------------------------------------

def _configs_only(pipe: StableDiffusionXLPipeline, folder):
    """The pipeline's folder without weights: whatever loads must come from the single file."""
    pipe.save_pretrained(folder / "full")
    shutil.copytree(folder / "full", folder / "configs", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder / "configs"


def _assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("family", TINY)
def test_sdxl_single_file_round_trips_through_from_single_file(family, tmp_path):
    pipe = _pipeline(TINY[family])
    _perturbed(pipe.text_encoder, seed=1)
    _perturbed(pipe.text_encoder_2, seed=2)
    configs = _configs_only(pipe, tmp_path)
    path = save_single_file(pipe, tmp_path / "community.safetensors", {"modelspec.title": "tiny xl"})

    tensors = load_file(str(path))
    width, pooled = pipe.text_encoder_2.config.hidden_size, pipe.text_encoder_2.config.projection_dim
    bigg = SDXL_OPEN_CLIP_PREFIX
    assert tensors[f"{bigg}transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)  # fused q, k, v
    assert tensors[f"{bigg}text_projection"].shape == (width, pooled)  # open_clip's x @ P: HF's weight transposed
    assert torch.equal(tensors[f"{bigg}text_projection"], pipe.text_encoder_2.text_projection.weight.T)
    assert tensors[f"{bigg}positional_embedding"].shape == (77, width)
    assert f"{SDXL_CLIP_PREFIX}text_model.embeddings.position_embedding.weight" in tensors
    assert any(k.startswith(UNET_PREFIX + "middle_block.1.") for k in tensors) == (family == "sdxl")
    assert single_file_family(tensors) == family

    # Community files also carry OpenCLIP's logit_scale and CLIP-L's position_ids (kohya sdxl_model_util.py).
    tensors[f"{bigg}logit_scale"] = torch.tensor(4.6052)
    tensors[f"{SDXL_CLIP_PREFIX}text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(tensors, str(path))

    loaded = load_single_file_pipeline(path, configs)
    assert type(loaded) is StableDiffusionXLPipeline
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_tensors(getattr(loaded, part).state_dict(), getattr(pipe, part).state_dict())
    with torch.no_grad():
        for prompts in ({"prompt": "a red circle"}, {"prompt": "a red circle", "negative_prompt": "a blue square"}):
            got = loaded.encode_prompt(**prompts, device="cpu", do_classifier_free_guidance=True)
            want = pipe.encode_prompt(**prompts, device="cpu", do_classifier_free_guidance=True)
            for a, b in zip(got, want):
                assert torch.equal(a, b)


def test_single_files_of_another_family_than_their_config_folder_or_the_refiner_are_refused(tmp_path):
    ssd = _pipeline(TINY_SSD1B_UNET)
    path = save_single_file(ssd, tmp_path / "ssd.safetensors")
    sdxl_configs = _configs_only(_pipeline(TINY_SDXL_UNET), tmp_path)
    [problem] = single_file_problems(path, sdxl_configs)
    assert problem == (f"{path} is SSD-1B, but the config folder {sdxl_configs} describes SDXL: give the folder of "
                       "the model it was fine-tuned from.")
    with pytest.raises(ConfigError, match="is SSD-1B, but the config folder"):
        load_single_file_pipeline(path, sdxl_configs)
    tensors = load_file(str(path))
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in tensors.items()
               if not k.startswith(SDXL_CLIP_PREFIX)}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    [problem] = single_file_problems(tmp_path / "refiner.safetensors", sdxl_configs)
    assert problem.startswith("the checkpoint is the SDXL refiner")


@pytest.mark.parametrize("family", ["ssd-1b", "vega"])
def test_merge_into_an_sdxl_single_file_changes_only_the_lora_targets(family, tmp_path):
    pipe = _pipeline(TINY[family])
    configs = _configs_only(pipe, tmp_path)
    checkpoint = save_single_file(pipe, tmp_path / "model.safetensors", {"modelspec.title": "tiny xl"})
    student = _student(pipe)
    modules = export.lora_modules(student)
    [lora] = export.write_formats(modules, tmp_path / "lora", ["kohya"], torch.float32, _info(student))
    merged = tmp_path / "merged.safetensors"
    merge_main(["--checkpoint", str(checkpoint), "--lora", str(lora), "--output", str(merged),
                "--single_file_config", str(configs)])

    before, after = load_file(str(checkpoint)), load_file(str(merged))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    names = unet_ldm_names(dict(student.config))
    assert changed == {f"{UNET_PREFIX}{names[path]}.weight" for path in modules} and len(changed) == len(modules)
    assert all(before[k].dtype == after[k].dtype for k in before)
    meta = export.read_metadata(merged)
    assert meta["modelspec.title"] == "tiny xl" and "lcm-lora-xl" in meta["modelspec.merged_from"]
    merged_pipe = load_single_file_pipeline(merged, configs)
    torch.testing.assert_close(_forward(merged_pipe.unet), _forward(student), atol=1e-5, rtol=0)


def test_stacking_with_a_style_lora_in_the_sdxl_pipeline(tmp_path):
    """The LCM-LoRA (kohya file) and a style LoRA (diffusers file) stacked with set_adapters, as SDXL users combine
    them: the UNet equals the base with each update added times its adapter weight, and the style switched off
    leaves the LCM-LoRA alone."""
    pipe = _pipeline(TINY_SDXL_UNET)
    lcm = _student(pipe)
    [lcm_file] = export.write_formats(export.lora_modules(lcm), tmp_path / "lcm", ["kohya"], torch.float32, _info(lcm))
    style = attach_lora(copy.deepcopy(pipe.unet), LoraArgs(lora_rank=2, lora_alpha=2.0,
                                                           lora_target_modules=("to_k", "to_v", "proj_out")))
    randomize_lora(style, seed=5, scale=0.1)
    export.write_formats(export.lora_modules(style), tmp_path / "style", ["diffusers"], torch.float32,
                         _info(style, "style"))

    loaded = StableDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    loaded.load_lora_weights(str(lcm_file), adapter_name="lcm")
    loaded.load_lora_weights(str(tmp_path / "style"), adapter_name="style")
    loaded.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.6])
    expected = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for modules, weight in ((export.lora_modules(lcm), 1.0), (export.lora_modules(style), 0.6)):
            for path, module in modules.items():
                expected.get_submodule(path).weight += formats.delta_weight(module, weight)
    torch.testing.assert_close(_forward(loaded.unet), _forward(expected), atol=1e-5, rtol=0)
    loaded.set_adapters(["lcm"])
    torch.testing.assert_close(_forward(loaded.unet), _forward(lcm), atol=1e-5, rtol=0)
