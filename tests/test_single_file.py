"""Single-file (original SD / LDM layout) checkpoints: our name tables, checked against diffusers' own converters.

Every check writes with our tables and reads with diffusers (`convert_ldm_*_checkpoint`, or the whole
`StableDiffusionPipeline.from_single_file`), so a wrong name cannot pass by agreeing with itself.
Weights are randomised first: freshly initialised norms are all ones / zeros, and a swap between two
of them would otherwise go unseen.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lcm_lora.config import ConfigError, LoraArgs
from lcm_lora.models import attach_lora, resolve_teacher
from lcm_lora.ldm_keys import UNET_PREFIX, text_encoder_ldm_key, unet_ldm_key, unet_ldm_names, vae_ldm_names
from lcm_lora.single_file import load_single_file_pipeline
from single_file_writer import pipeline_to_ldm_state_dict, save_single_file, unet_to_ldm, vae_to_ldm

from unet_shapes import (
    SD15_UNET,
    SD21_UNET,
    SD_VAE,
    SDXL_UNET,
    SSD1B_UNET,
    TINY_SD15_UNET,
    TINY_SDXL_UNET,
    TINY_SSD1B_UNET,
    TINY_VAE,
    TINY_VEGA_UNET,
    VEGA_UNET,
)

TEACHER = resolve_teacher("teacher-eps")


def _randomise(model: torch.nn.Module, scale: float = 1.0, add: bool = False, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.add_(noise) if add else p.copy_(noise)
    return model.eval()


def _param_modules(model: torch.nn.Module) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in model.state_dict()}


def _assert_same_tensors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, different[:5]


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}  # not _name_or_path


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with init_empty_weights():  # full-size structure, no memory
        return UNet2DConditionModel.from_config(config)


# --- UNet table ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, n_params", [(SD15_UNET, 686), (SD21_UNET, 686), (SDXL_UNET, 1680), (SSD1B_UNET, 944),
                                              (VEGA_UNET, 564)], ids=["sd15", "sd21", "sdxl", "ssd-1b", "vega"])
def test_full_size_unet_tables_cover_every_parameter_and_convert_back(config, n_params):
    unet = _meta_unet(config)
    state = unet.state_dict()
    names = unet_ldm_names(dict(unet.config))
    assert len(state) == n_params  # the key counts of the real checkpoints
    assert set(names) == _param_modules(unet)  # every leaf with parameters, and nothing else
    assert len(set(names.values())) == len(names)
    ldm = {unet_ldm_key(k, names): v for k, v in state.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert sorted(back) == sorted(state)
    assert all(back[k] is state[k] for k in state)  # each name went back to the very same tensor


def test_full_size_names_match_known_original_keys():
    sd15 = unet_ldm_names(dict(_meta_unet(SD15_UNET).config))
    assert sd15["down_blocks.0.resnets.0.conv1"] == "input_blocks.1.0.in_layers.2"
    assert sd15["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sd15["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert sd15["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert sd15["up_blocks.3.resnets.2.conv_shortcut"] == "output_blocks.11.0.skip_connection"  # diffusers' "v1" probe
    assert sd15["mid_block.attentions.0.proj_in"] == "middle_block.1.proj_in"
    assert sd15["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    assert sd15["time_embedding.linear_1"] == "time_embed.0"
    assert sd15["conv_in"] == "input_blocks.0.0"
    assert sd15["conv_norm_out"] == "out.0"
    assert sd15["conv_out"] == "out.2"
    assert "down_blocks.0.resnets.0.conv_shortcut" not in sd15  # 320 -> 320: no shortcut
    assert sd15["down_blocks.1.resnets.0.conv_shortcut"] == "input_blocks.4.0.skip_connection"

    sdxl = unet_ldm_names(dict(_meta_unet(SDXL_UNET).config))
    assert sdxl["add_embedding.linear_1"] == "label_emb.0.0"
    assert sdxl["add_embedding.linear_2"] == "label_emb.0.2"
    assert sdxl["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert sdxl["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert sdxl["down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"] == \
        "input_blocks.8.1.transformer_blocks.9.ff.net.2"
    assert sdxl["mid_block.attentions.0.transformer_blocks.9.attn2.to_k"] == \
        "middle_block.1.transformer_blocks.9.attn2.to_k"
    assert "down_blocks.0.attentions.0.proj_in" not in sdxl  # SDXL's first block has no attention

    ssd1b = unet_ldm_names(dict(_meta_unet(SSD1B_UNET).config))
    assert ssd1b["mid_block.resnets.0.conv1"] == "middle_block.0.in_layers.2"  # the middle is one resnet
    assert not [name for name in ssd1b.values() if name.startswith(("middle_block.1", "middle_block.2"))]
    assert ssd1b["up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_q"] == \
        "output_blocks.2.1.transformer_blocks.9.attn1.to_q"  # up depths [4, 4, 10], not the down path's 4
    assert "up_blocks.0.attentions.1.transformer_blocks.4.attn1.to_q" not in ssd1b
    assert "up_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q" not in ssd1b  # [2, 1, 1]

    key = unet_ldm_key("down_blocks.0.resnets.0.conv1.weight", sd15)
    assert key == "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


@pytest.mark.parametrize("config", [TINY_SD15_UNET, TINY_SDXL_UNET, TINY_SSD1B_UNET, TINY_VEGA_UNET],
                         ids=["sd15", "sdxl", "ssd-1b", "vega"])
def test_tiny_unet_converts_back_to_the_same_tensors(config):
    unet = _randomise(UNet2DConditionModel.from_config(config))
    names = unet_ldm_names(dict(unet.config))
    assert set(names) == _param_modules(unet)
    assert len(set(names.values())) == len(names)
    ldm = unet_to_ldm(unet)
    assert all(k.startswith(UNET_PREFIX) for k in ldm)
    _assert_same_tensors(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict())


def test_a_unet_with_a_lora_attached_is_refused_with_how_to_fuse():
    unet = UNet2DConditionModel.from_pretrained(TEACHER, subfolder="unet")
    attach_lora(unet, LoraArgs(lora_rank=4, lora_alpha=4.0))
    with pytest.raises(KeyError, match="fuse_lora"):
        unet_to_ldm(unet)


def test_unet_features_without_an_ldm_layout_are_refused():
    with pytest.raises(NotImplementedError, match="time_cond_proj_dim"):
        unet_ldm_names(dict(TINY_SD15_UNET, time_cond_proj_dim=256))  # a full LCM UNet
    with pytest.raises(NotImplementedError, match="SimpleCrossAttn"):
        unet_ldm_names(dict(TINY_SD15_UNET, mid_block_type="UNetMidBlock2DSimpleCrossAttn"))


# --- VAE and text encoder --------------------------------------------------------------------------


def test_full_size_sd_vae_table_covers_every_parameter():
    with init_empty_weights():
        vae = AutoencoderKL.from_config(SD_VAE)
    names = vae_ldm_names(dict(vae.config))
    assert set(names) == _param_modules(vae)
    assert len(set(names.values())) == len(names)
    assert len(vae.state_dict()) == 248  # first_stage_model.* keys of an SD1 checkpoint
    assert names["decoder.up_blocks.0.upsamplers.0.conv"] == "decoder.up.3.upsample.conv"
    assert names["decoder.up_blocks.3.resnets.0.conv_shortcut"] == "decoder.up.0.block.0.nin_shortcut"
    assert names["encoder.mid_block.attentions.0.to_out.0"] == "encoder.mid.attn_1.proj_out"
    assert names["encoder.conv_norm_out"] == "encoder.norm_out"


def test_tiny_vae_with_mid_attention_converts_back_to_the_same_tensors():
    vae = _randomise(AutoencoderKL.from_config(TINY_VAE))
    ldm = vae_to_ldm(vae)
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)  # 1x1 conv, as in LDM
    assert ldm["first_stage_model.decoder.mid.attn_1.q.bias"].shape == (16,)
    _assert_same_tensors(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict())


def test_text_encoder_keys_carry_text_model_whatever_transformers_calls_them():
    original = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
    assert text_encoder_ldm_key("embeddings.position_embedding.weight") == original  # transformers >= 5.6
    assert text_encoder_ldm_key("text_model.embeddings.position_embedding.weight") == original  # older


def test_sd2_text_encoders_and_sdxl_unets_with_one_encoder_are_refused_clearly():
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    openclip_like = CLIPTextModel(CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"}))
    with pytest.raises(NotImplementedError, match="OpenCLIP"):
        pipeline_to_ldm_state_dict(pipe.unet, pipe.vae, openclip_like)
    sdxl_unet = UNet2DConditionModel.from_config(TINY_SDXL_UNET)  # SDXL pipelines: tests/test_sdxl_files.py
    with pytest.raises(ValueError, match="an SDXL UNet comes with two text encoders"):
        pipeline_to_ldm_state_dict(sdxl_unet, pipe.vae, pipe.text_encoder)


# --- whole pipeline through diffusers' from_single_file --------------------------------------------


@pytest.fixture
def configs_only(tmp_path):
    """The teacher's folder without its weights: whatever loads must come from the single file."""
    folder = tmp_path / "configs"
    shutil.copytree(TEACHER, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


@pytest.fixture
def one_thread():
    """Tiny tensors: with 2 threads on shared cores, thread sync made 2 DDIM steps take 7 s instead of 0.1 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ddim_image(pipe: StableDiffusionPipeline) -> torch.Tensor:
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe("a red circle", num_inference_steps=2, generator=gen, output_type="pt").images


def test_teacher_round_trips_through_from_single_file(tmp_path, configs_only, one_thread):
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        _randomise(part, scale=1e-3, add=True)  # make every tensor distinct, keep the model working
    path = save_single_file(pipe, tmp_path / "teacher.safetensors", {"lcm_lora.source": "teacher-eps"})

    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["lcm_lora.source"] == "teacher-eps"
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary name was renamed away

    loaded = load_single_file_pipeline(path, config=configs_only)
    _assert_same_tensors(loaded.unet.state_dict(), pipe.unet.state_dict())
    _assert_same_tensors(loaded.vae.state_dict(), pipe.vae.state_dict())
    _assert_same_tensors(loaded.text_encoder.state_dict(), pipe.text_encoder.state_dict())

    # The parts are built from the folder's configs, not from a guessed SD1.5 config.
    assert _public(loaded.unet.config) == _public(pipe.unet.config)
    assert _public(loaded.vae.config) == _public(pipe.vae.config)
    assert loaded.vae.config.scaling_factor == pipe.vae.config.scaling_factor != 0.18215
    assert loaded.text_encoder.config.hidden_size == 64
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)

    torch.testing.assert_close(_ddim_image(loaded), _ddim_image(pipe), atol=1e-6, rtol=0)


def test_load_without_a_usable_config_folder_says_what_to_pass(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    (tmp_path / "empty").mkdir()
    for config in (None, tmp_path / "empty", tmp_path / "nowhere", "nobody/not-in-the-cache"):
        with pytest.raises(ConfigError, match=r"--single_file_config \(config= in Python\): a local diffusers pipeline "
                                              "folder") as err:
            load_single_file_pipeline(path, config=config)
        assert str(path) in str(err.value)


def test_load_refuses_legacy_kwargs_pickles_and_files_missing_a_part(tmp_path, configs_only):
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    full = save_single_file(pipe, tmp_path / "full.safetensors")
    with pytest.raises(ConfigError, match="prediction_type"):
        load_single_file_pipeline(full, config=configs_only, prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="pickle"):
        load_single_file_pipeline(tmp_path / "model.ckpt", config=configs_only)
    with pytest.raises(ConfigError, match="model.ckpt: no such file"):  # allowed, but it must exist
        load_single_file_pipeline(tmp_path / "model.ckpt", config=configs_only, allow_pickle_weights=True)
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v.contiguous() for k, v in unet_to_ldm(pipe.unet).items()}, str(unet_only))
    with pytest.raises(ConfigError, match="no vae, text_encoder weights"):
        load_single_file_pipeline(unet_only, config=configs_only)
