"""LoRA key formats as pure functions: the update rule, writers, and the strict reader (milliseconds, no model)."""

import json

import pytest
import torch

from lcm_lora import formats
from lcm_lora.formats import LoraFormatError, LoraModule

SHAPES = {"down_blocks.0.attentions.0.proj_in": (8, 8, 1, 1), "down_blocks.0.resnets.0.conv1": (16, 8, 3, 3),
          "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8)}  # the base weights' shapes
PATHS = set(SHAPES)


def _modules(dtype=torch.float32) -> dict[str, LoraModule]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return {
        "down_blocks.0.attentions.0.proj_in": LoraModule(randn(4, 8, 1, 1), randn(8, 4, 1, 1), 8.0),
        "down_blocks.0.resnets.0.conv1": LoraModule(randn(2, 8, 3, 3), randn(16, 2, 1, 1), 1.0),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(randn(4, 8), randn(8, 4), 4.0),
    }


def test_delta_weight_is_alpha_over_rank_up_at_down_for_linear_and_conv():
    m = _modules()
    linear = m["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    torch.testing.assert_close(formats.delta_weight(linear), linear.up @ linear.down * (4.0 / 4), rtol=0, atol=0)
    conv = m["down_blocks.0.resnets.0.conv1"]
    expected = torch.einsum("or,rikl->oikl", conv.up[:, :, 0, 0], conv.down) * (1.0 / 2)
    torch.testing.assert_close(formats.delta_weight(conv, strength=1.0), expected, rtol=1e-6, atol=1e-6)
    assert formats.delta_weight(conv).shape == (16, 8, 3, 3)
    torch.testing.assert_close(formats.delta_weight(conv, strength=0.5), expected * 0.5, rtol=1e-6, atol=1e-6)


def test_kohya_keys_are_sd_scripts_names_with_one_fp32_alpha_each():
    out = formats.to_kohya_keys(_modules(), torch.float16)
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert {k for k in out if k.startswith(stem + ".")} == {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight",
                                                            f"{stem}.alpha"}
    assert out[f"{stem}.alpha"].dtype == torch.float32 and out[f"{stem}.alpha"].dim() == 0
    # One alpha per file (the most common; here each differs, so the first): the module's own scale moves into lora_up.
    assert {float(v) for k, v in out.items() if k.endswith(".alpha")} == {8.0}
    m = _modules()["down_blocks.0.resnets.0.conv1"]
    torch.testing.assert_close(out[f"{stem}.lora_up.weight"].float(), (m.up * (1.0 / 8.0)).half().float())
    assert out[f"{stem}.lora_down.weight"].dtype == torch.float16 and out[f"{stem}.lora_down.weight"].shape == (2, 8, 3, 3)
    assert out[f"{stem}.lora_up.weight"].shape == (16, 2, 1, 1)  # conv LoRA stays 4-D
    assert len(out) == 3 * len(PATHS)


def test_peft_keys_bake_the_scale_into_lora_b():
    m = _modules()
    out = formats.to_peft_keys(m)
    path = "down_blocks.0.attentions.0.proj_in"  # alpha 8, rank 4: scale 2
    assert torch.equal(out[f"unet.{path}.lora_A.weight"], m[path].down)
    torch.testing.assert_close(out[f"unet.{path}.lora_B.weight"], m[path].up * 2.0, rtol=0, atol=0)
    assert not any(k.endswith("alpha") for k in out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trips_are_bit_exact(dtype):
    m = _modules(dtype)
    kohya = formats.to_kohya_keys(m)
    again = formats.to_kohya_keys(formats.parse_lora(kohya, SHAPES))
    assert kohya.keys() == again.keys()
    assert all(torch.equal(kohya[k], again[k]) and kohya[k].dtype == again[k].dtype for k in kohya)

    peft = formats.to_peft_keys(m)
    parsed = formats.parse_lora(peft, SHAPES)
    assert all(p.scale == 1.0 for p in parsed.values())  # baked: the file's own scale is 1
    again = formats.to_peft_keys(parsed)
    assert peft.keys() == again.keys()
    assert all(torch.equal(peft[k], again[k]) and peft[k].dtype == again[k].dtype for k in peft)


def test_every_format_gives_the_same_update():
    m = _modules()
    for sd in (formats.to_kohya_keys(m), formats.to_peft_keys(m)):
        parsed = formats.parse_lora(sd, SHAPES)
        for path in PATHS:
            torch.testing.assert_close(formats.delta_weight(parsed[path]), formats.delta_weight(m[path]),
                                       rtol=1e-6, atol=1e-7)


def test_a_kohya_file_without_alpha_has_scale_one():
    sd = {k: v for k, v in formats.to_kohya_keys(_modules()).items() if not k.endswith(".alpha")}
    assert all(p.scale == 1.0 for p in formats.parse_lora(sd, SHAPES).values())


def test_diffusers_adapter_metadata_sets_the_scale_and_patterns_are_refused():
    sd = formats.to_peft_keys({p: LoraModule(m.down, m.up, m.rank) for p, m in _modules().items()})
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 16})}
    assert {p.scale for p in formats.parse_lora(sd, SHAPES, meta).values()} == {4.0}
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": {"to_q": 8}})}
    with pytest.raises(LoraFormatError, match="different scales"):
        formats.parse_lora(sd, SHAPES, meta)


def test_sgm_names_are_read_when_the_whole_file_uses_them():
    names = {p: f"input_blocks.{i}.0.layer" for i, p in enumerate(sorted(PATHS))}
    sd = formats.to_kohya_keys(_modules(), names=names)
    assert all(k.startswith("lora_unet_input_blocks_") for k in sd)
    assert formats.parse_lora(sd, SHAPES, other_names=names).keys() == PATHS


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight": torch.zeros(1, 1)}),
     "match no UNet module: lora_unet_down_blocks_9_resnets_0_conv1"),
    (lambda sd: sd.pop("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"),
     "lora_unet_down_blocks_0_resnets_0_conv1: missing lora_up.weight"),
    (lambda sd: sd.update({"lora_unet_down_blocks_0_resnets_0_conv1.lora_A.weight": torch.zeros(1, 1)}),
     r"unexpected keys lora_unet_down_blocks_0_resnets_0_conv1.lora_A.weight"),
    (lambda sd: sd.update({"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.zeros(1, 1)}),
     "mixed key schemes"),
    (lambda sd: sd.update({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1)}),
     "text-encoder keys"),
    (lambda sd: sd.update({"model.diffusion_model.out.2.weight": torch.zeros(1)}), "neither kohya"),
    # Shapes are checked against the UNet's weights: a LoRA for another base model does not fit.
    (lambda sd: sd.clear(), "no LoRA keys"),
    (lambda sd: sd.update({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 7, 3, 3)}),
     r"down_blocks.0.resnets.0.conv1: down \(2, 7, 3, 3\) and up \(16, 2, 1, 1\) do not fit its weight"),
    (lambda sd: sd.update({"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(16, 3, 1, 1)}),
     "do not fit"),
    (lambda sd: sd.update({"lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.ones(2)}), "an alpha is one number"),
])
def test_the_strict_reader_names_what_it_cannot_place(change, message):
    sd = formats.to_kohya_keys(_modules())
    change(sd)
    with pytest.raises(LoraFormatError, match=message):
        formats.parse_lora(sd, SHAPES)


def test_the_strict_reader_refuses_unknown_diffusers_keys_and_half_pairs():
    sd = formats.to_peft_keys(_modules())
    sd["unet.down_blocks.0.resnets.0.conv1.alpha"] = torch.tensor(1.0)
    with pytest.raises(LoraFormatError, match="down_blocks.0.resnets.0.conv1.alpha"):
        formats.parse_lora(sd, SHAPES)
    sd = formats.to_peft_keys(_modules())
    sd.pop("unet.down_blocks.0.resnets.0.conv1.lora_B.weight")
    with pytest.raises(LoraFormatError, match="missing lora_B.weight"):
        formats.parse_lora(sd, SHAPES)


def test_base_model_family_from_the_unet_config():
    sd15 = formats.base_model({"cross_attention_dim": 768}, "epsilon")
    assert (sd15.ss_base_model_version, sd15.architecture, sd15.implementation) == (
        "sd_v1", "stable-diffusion-v1", "diffusers")
    sd21 = formats.base_model({"cross_attention_dim": 1024}, "v_prediction")
    assert (sd21.ss_base_model_version, sd21.v2, sd21.architecture) == ("sd_v2_v", True, "stable-diffusion-v2-768-v")
    sdxl = formats.base_model({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, "epsilon")
    assert sdxl.ss_base_model_version.startswith("sdxl_") and sdxl.sgm_names
    assert sdxl.implementation == "https://github.com/Stability-AI/generative-models"


def test_kohya_metadata_is_all_strings_with_the_most_common_dim_and_alpha():
    m = _modules()
    m["x"] = LoraModule(torch.zeros(4, 3), torch.zeros(3, 4), 8.0)
    meta = formats.kohya_metadata(m, formats.base_model({}, "epsilon"), "lcm-lora-x", 512, "epsilon",
                                  "2026-11-23T00:00:00+00:00")
    assert all(isinstance(v, str) for v in meta.values())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.resolution"] == "512x512"
    assert "LCM" in meta["modelspec.tags"] and "4-8 steps" in meta["modelspec.usage_hint"]
    assert "ot_branch" not in meta
    json.loads(meta["ss_network_args"])


def test_our_adapter_metadata_keeps_mixed_ranks_at_scale_one():
    m = _modules()  # ranks 4, 2, 4
    meta = formats.diffusers_adapter_metadata(m)
    config = json.loads(meta["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 4)
    assert list(config["unet.rank_pattern"].values()) == [2] and config["unet.alpha_pattern"] == config["unet.rank_pattern"]
    assert sorted(config["unet.target_modules"]) == sorted(PATHS)
    assert {p.scale for p in formats.parse_lora(formats.to_peft_keys(m), SHAPES, meta).values()} == {1.0}


def test_a_file_mixing_diffusers_and_sgm_names_is_named_as_such():
    names = {p: f"input_blocks.{i}.0.layer" for i, p in enumerate(sorted(PATHS))}
    sd = formats.to_kohya_keys(_modules(), names=names)
    sd.update({k: v for k, v in formats.to_kohya_keys(_modules()).items() if "conv1" in k})
    with pytest.raises(LoraFormatError, match="mixes diffusers block names .* with sgm names"):
        formats.parse_lora(sd, SHAPES, other_names=names)
