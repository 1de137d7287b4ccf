"""Our kohya-keyed files (the kohya file and the default pytorch_lora_weights.safetensors) through the key rules of
ComfyUI, A1111 and InvokeAI, re-implemented here as small tables from their public loaders, and through diffusers'
SDXL loader.

The rules must hit real LDM layers. Those come from the checkpoint that diffusers' converter reads back exactly
(tests/test_single_file.py), and the diffusers <-> LDM pairing ComfyUI uses is read from that converter by
tagging tensors, not from our exporter's table, so a naming bug in the exporter cannot pass here."""

import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file

from lcm_lora import export, formats
from lcm_lora.config import LoraArgs
from lcm_lora.families import SDXL_FAMILY
from lcm_lora.models import attach_lora, lora_config, resolve_teacher, unet_module_paths
from lcm_lora.ldm_keys import UNET_PREFIX, unet_ldm_names
from single_file_writer import unet_to_ldm
from lora_helpers import randomize_lora
from unet_shapes import SD15_UNET, SDXL_UNET, TINY_SD15_UNET, TINY_SDXL_UNET, TINY_SSD1B_UNET, TINY_VEGA_UNET

TINY_TEACHER_UNET = dict(UNet2DConditionModel.load_config(resolve_teacher("teacher-eps"), subfolder="unet"))
# SSD-1B and Vega: SDXL's blocks with one resnet in the middle, and (SSD-1B) an up path deeper than the down path.
CONFIGS = {"sd15": TINY_SD15_UNET, "sdxl": TINY_SDXL_UNET, "ssd-1b": TINY_SSD1B_UNET, "vega": TINY_VEGA_UNET,
           "tiny-teacher": TINY_TEACHER_UNET}


def _unets(config: dict) -> tuple[UNet2DConditionModel, UNet2DConditionModel]:
    """(base, student): the same random UNet, the student with a random rank-4, alpha-8 LoRA."""
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(config).eval()
    torch.manual_seed(0)
    student = attach_lora(UNet2DConditionModel.from_config(config), LoraArgs(lora_rank=4, lora_alpha=8.0))
    return base, randomize_lora(student, seed=1, scale=0.1)


def _kohya_file(student, tmp_path, export_format: str = "kohya") -> dict[str, torch.Tensor]:
    """An exported file's tensors as a UI reads them: written to disk by the exporter, read back in file order."""
    info = export.ExportInfo(config_flat={}, teacher="t", prediction_type="epsilon", steps=1,
                             unet_config=dict(student.config), output_name="lora")
    [path] = export.write_formats(export.lora_modules(student), tmp_path, [export_format], torch.float32, info)
    return load_file(str(path))


def _forward(unet, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    config = unet.config
    z = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=gen)
    c = torch.randn(2, 7, config.cross_attention_dim, generator=gen)
    extra = {}
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, text_dim, generator=gen),
                                       "time_ids": torch.randn(2, 6, generator=gen)}}
    with torch.no_grad():
        return unet(z, torch.tensor([999, 259]), c, **extra).sample


def converter_names(base: UNet2DConditionModel) -> dict[str, str]:
    """diffusers module -> LDM module as diffusers' own converter pairs them: each LDM tensor carries its index."""
    ldm = unet_to_ldm(base)
    ldm_keys = list(ldm)
    tagged = {key: torch.full(ldm[key].shape, float(i)) for i, key in enumerate(ldm_keys)}
    back = convert_ldm_unet_checkpoint(tagged, dict(base.config))
    assert sorted(back) == sorted(base.state_dict())  # every LDM tensor found a diffusers home
    pairs = {key: ldm_keys[int(value.flatten()[0])] for key, value in back.items()}
    return {key.rsplit(".", 1)[0]: ldm_key.removeprefix(UNET_PREFIX).rsplit(".", 1)[0]
            for key, ldm_key in pairs.items() if key.endswith(".weight")}


# -- ComfyUI: comfy/lora.py model_lora_keys_unet + comfy/weight_adapter/lora.py LoRAAdapter ----------------

def comfy_key_map(ldm_state: dict, names: dict[str, str]) -> dict[str, str]:
    """lora key stem -> model weight: lora_unet_ + the LDM name, lora_unet_ + the diffusers name (unet_to_diffusers),
    and "" or "unet." + the diffusers name with attention projections under ".processor." (to_out.0 as to_out)."""
    key_map = {}
    for key in ldm_state:
        if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
            key_map["lora_unet_" + key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")] = key
    for diffusers_name, ldm_name in names.items():
        key_map["lora_unet_" + diffusers_name.replace(".", "_")] = UNET_PREFIX + ldm_name + ".weight"
        processor_name = diffusers_name.replace(".to_", ".processor.to_")
        if processor_name.endswith(".to_out.0"):
            processor_name = processor_name[:-len(".0")]
        for prefix in ("", "unet."):
            key_map[prefix + processor_name] = UNET_PREFIX + ldm_name + ".weight"
    return key_map


COMFY_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"))  # LoRAAdapter.load


def comfy_load(lora: dict, key_map: dict[str, str]) -> tuple[dict, list[str]]:
    """(patches per model weight, keys left over: each one a "lora key not loaded" warning)."""
    patches, loaded = {}, set()
    for stem, weight in key_map.items():
        for up_suffix, down_suffix in COMFY_PAIRS:
            up, down, alpha = stem + up_suffix, stem + down_suffix, f"{stem}.alpha"
            if up in lora:
                patches[weight] = (lora[up], lora[down], lora.get(alpha))
                loaded |= {up, down} | ({alpha} if alpha in lora else set())
    return patches, [k for k in lora if k not in loaded]


def comfy_apply(ldm_state: dict, patches: dict) -> dict:
    """W += (alpha / rank) · up @ down, rank = lora_down.shape[0] (LoRAAdapter.calculate_weight)."""
    patched = dict(ldm_state)
    for key, (up, down, alpha) in patches.items():
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        delta = up.flatten(1).float() @ down.flatten(1).float()
        patched[key] = ldm_state[key] + scale * delta.reshape(ldm_state[key].shape)
    return patched


@pytest.mark.parametrize("export_format", ["diffusers", "kohya"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_comfyui_loads_every_key_and_computes_the_students_weights(family, export_format, tmp_path):
    base, student = _unets(CONFIGS[family])
    lora = _kohya_file(student, tmp_path, export_format)
    ldm_state = unet_to_ldm(base)
    patches, not_loaded = comfy_load(lora, comfy_key_map(ldm_state, converter_names(base)))
    assert not_loaded == []
    assert len(patches) == len(export.lora_modules(student))  # one patched weight per LoRA module
    if family in SDXL_FAMILY:
        assert all(k.startswith("lora_unet_input_blocks_") or k.startswith(("lora_unet_middle_block_",
                   "lora_unet_output_blocks_")) for k in lora)  # sgm names
    # The patched checkpoint, read back by diffusers' converter, is the student.
    patched = UNet2DConditionModel.from_config(base.config).eval()
    patched.load_state_dict(convert_ldm_unet_checkpoint(comfy_apply(ldm_state, patches), dict(base.config)))
    torch.testing.assert_close(_forward(patched), _forward(student), atol=1e-5, rtol=0)


def test_comfyui_skips_the_attention_projections_of_the_peft_file(tmp_path):
    """Why the default file has kohya keys: ComfyUI looks PEFT-named attention projections up under a ".processor."
    infix that diffusers' names lack, so it loads the rest and warns "lora key not loaded" for each of these."""
    base, student = _unets(TINY_SD15_UNET)
    lora = _kohya_file(student, tmp_path, "peft")
    patches, not_loaded = comfy_load(lora, comfy_key_map(unet_to_ldm(base), converter_names(base)))
    attention = [k for k in lora if re.search(r"\.attn[12]\.to_(q|k|v|out\.0)\.", k)]
    assert attention and sorted(not_loaded) == sorted(attention)
    assert len(patches) == len(export.lora_modules(student)) - len(attention) // 2


# -- A1111: extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis ---------------------------

A1111_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                       "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _suffix(kind: str, rest: str) -> str:
    return A1111_RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest


A1111_RULES = [
    (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_"
               f"{_suffix(m[1], m[3])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_{_suffix(m[0], m[2])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_output_blocks_{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_"
               f"{_suffix(m[1], m[3])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda m: f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
]


def a1111_compvis_name(stem: str) -> str:
    for pattern, build in A1111_RULES:
        match = re.fullmatch(pattern, stem)
        if match:
            return build(match.groups())
    return stem.replace("lora_unet", "diffusion_model")  # "SDXL loras seem to already have correct compvis keys"


@pytest.mark.parametrize("export_format", ["diffusers", "kohya"])
@pytest.mark.parametrize("family", ["sd15", *SDXL_FAMILY])  # A1111's index rules are SD1.5's; SDXL uses sgm names
def test_a1111_maps_every_module_to_a_real_layer(family, export_format, tmp_path):
    base, student = _unets(CONFIGS[family])
    layers = {"diffusion_model_" + name.replace(".", "_") for name in converter_names(base).values()}
    stems = {k.split(".", 1)[0] for k in _kohya_file(student, tmp_path, export_format)}
    unmatched = sorted(s for s in stems if a1111_compvis_name(s) not in layers)
    assert not unmatched and len(stems) == len(export.lora_modules(student))


# -- InvokeAI: util/model_util.lora_token_vector_length, and A1111's detect_version ------------------------

def invokeai_token_vector_length(lora: dict) -> int | None:
    for key, tensor in lora.items():
        if re.match(r"lora_unet_.*(attn2_to_k|attn2_to_v|time_emb_proj)\.lora_down\.weight$", key):
            return tensor.shape[1]
    return None


@pytest.mark.parametrize("family, config, length, version", [
    ("sd15", TINY_SD15_UNET, 768, "SD1"),
    *[(family, dict(CONFIGS[family], cross_attention_dim=2048), 2048, "SDXL") for family in SDXL_FAMILY],
])
def test_invokeai_and_a1111_recognise_the_base_model(family, config, length, version, tmp_path):
    _, student = _unets(config)
    info = export.ExportInfo(config_flat={}, teacher="t", prediction_type="epsilon", steps=1,
                             unet_config=dict(student.config), output_name="lora")
    [path] = export.write_formats(export.lora_modules(student), tmp_path, ["kohya"], torch.float16, info)
    assert invokeai_token_vector_length(load_file(str(path))) == length
    meta = export.read_metadata(path)
    detected = "SDXL" if meta["ss_base_model_version"].startswith("sdxl_") else "SD2" if meta["ss_v2"] == "True" else "SD1"
    assert detected == version


# -- diffusers' SDXL loader reads the sgm names ---------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", *SDXL_FAMILY])
def test_diffusers_loaders_map_every_key_and_reproduce_the_student(family, tmp_path):
    """On the real block layouts: each family's own diffusers loader (SDXL's maps the sgm names)."""
    base, student = _unets(CONFIGS[family])
    lora = _kohya_file(student, tmp_path)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    if family in SDXL_FAMILY:
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "lora.safetensors"),
                                                                       unet_config=base.config)
    else:
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "lora.safetensors"))
    base.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet")
    torch.testing.assert_close(_forward(base), _forward(student), atol=1e-5, rtol=0)
    # And our own reader maps the same file back onto exactly the trained modules.
    config = CONFIGS[family]
    modules = formats.parse_lora(lora, unet_module_paths(config), other_names=unet_ldm_names(config))
    assert modules.keys() == export.lora_modules(student).keys()


@pytest.mark.parametrize("config, hub_megabytes", [(SD15_UNET, 135), (SDXL_UNET, 394)], ids=["sd15", "sdxl"])
def test_default_targets_at_rank_64_give_the_size_of_the_hub_lcm_loras(config, hub_megabytes):
    """A sanity check: the latent-consistency/lcm-lora-sdv1-5 and -sdxl files are about 135 and 394 MB in fp16,
    so the default target set is theirs. Counted on the real configs built on the meta device (no memory)."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        unet.add_adapter(lora_config(LoraArgs(lora_rank=64, lora_alpha=64)))
    fp16_bytes = sum(p.numel() * 2 for name, p in unet.named_parameters() if "lora_" in name)
    assert abs(fp16_bytes / 1e6 - hub_megabytes) <= 0.05 * hub_megabytes
