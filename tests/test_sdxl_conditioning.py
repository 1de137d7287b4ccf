"""SDXL conditioning (lcm_lora.conditioning) against StableDiffusionXLPipeline's own, on a tiny offline pipeline."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
from sdxl_tiny import WORLD_TEACHER, save_tiny_sdxl

from lcm_lora.conditioning import encode_text, fixed_time_ids, time_ids, uncond_for
from lcm_lora.data.loader import tokenize
from lcm_lora.models import is_sdxl
from tiny_world.architecture import SDXL_SCALING_FACTOR, make_unet, with_scaling_factor
from lcm_lora.world.scene import all_scenes, sample

CAPTIONS = [scene.caption for scene in all_scenes()[:2]]
TOO_LONG = " ".join(scene.caption for scene in all_scenes()[:3])  # over 77 tokens: encoders see it truncated


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def pipe(sdxl_folder):
    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)


def encoders(pipe):
    return (pipe.text_encoder, pipe.text_encoder_2), (pipe.tokenizer, pipe.tokenizer_2)


def encode_prompts(text_encoders, tokenizers, captions):
    """(context, pooled) as the trainer makes them: ids tokenized in the data loader, encoded in the step."""
    c = encode_text(text_encoders, tuple(tokenize(t, captions) for t in tokenizers))
    return c["context"], c["pooled"]


def uncond_embeddings(text_encoders, tokenizers, force_zeros):
    """The teacher's uncond branch for one prompt, as the trainer builds it."""
    context, pooled = encode_prompts(text_encoders, tokenizers, CAPTIONS[:1])
    empty = None if force_zeros else dict(zip(("context", "pooled"), encode_prompts(text_encoders, tokenizers, [""])))
    u = uncond_for({"context": context, "pooled": pooled}, empty)
    return u["context"], u["pooled"]


def test_tiny_pipeline_saves_sdxl_layout_and_reloads_offline(sdxl_folder, pipe):
    index = json.loads((sdxl_folder / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    assert {"text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler"} <= index.keys()
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size) == (32, 64)
    assert pipe.text_encoder_2.config.projection_dim == 48
    unet = pipe.unet.config
    assert unet.cross_attention_dim == 32 + 64
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + 48
    assert pipe.unet.add_embedding.linear_1.in_features == 6 * 8 + 48
    assert pipe.vae.config.scaling_factor == SDXL_SCALING_FACTOR


def test_tokenizer_2_pads_with_exclamation_mark_as_openclip(pipe):
    assert pipe.tokenizer_2.convert_ids_to_tokens(0) == "!" and pipe.tokenizer_2.pad_token_id == 0
    ids_1 = pipe.tokenizer(CAPTIONS[0], padding="max_length", max_length=77).input_ids
    ids_2 = pipe.tokenizer_2(CAPTIONS[0], padding="max_length", max_length=77).input_ids
    length = ids_1.index(pipe.tokenizer.eos_token_id) + 1
    assert ids_1[:length] == ids_2[:length]
    assert set(ids_1[length:]) == {pipe.tokenizer.eos_token_id} and set(ids_2[length:]) == {0}


def test_scheduler_carries_sdxl_keys_that_ddim_would_otherwise_default(pipe):
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.set_alpha_to_one is False
    assert DDIMScheduler.from_config(pipe.scheduler.config).config.clip_sample is False


def test_is_sdxl_tells_text_time_unets_apart(pipe):
    assert is_sdxl(pipe.unet.config)
    assert not is_sdxl(make_unet("epsilon").config)
    assert not is_sdxl({})


def test_encode_prompts_equals_pipeline_encode_prompt(pipe):
    captions = CAPTIONS + [TOO_LONG]
    context, pooled = encode_prompts(*encoders(pipe), captions)
    expected_context, _, expected_pooled, _ = pipe.encode_prompt(
        captions, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert context.shape == (3, 77, 96) and pooled.shape == (3, 48)
    assert torch.equal(context, expected_context)
    assert torch.equal(pooled, expected_pooled)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_uncond_embeddings_equal_pipeline_negatives_without_negative_prompt(sdxl_folder, force_zeros):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True,
                                                     force_zeros_for_empty_prompt=force_zeros)
    context, pooled = uncond_embeddings(*encoders(pipe), force_zeros)
    _, expected_context, _, expected_pooled = pipe.encode_prompt(
        CAPTIONS[:1], device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert context.shape == (1, 77, 96) and pooled.shape == (1, 48)
    assert torch.equal(context, expected_context) and torch.equal(pooled, expected_pooled)
    assert (context.abs().sum() == 0) == force_zeros and (pooled.abs().sum() == 0) == force_zeros


def test_time_ids_equal_pipeline_get_add_time_ids_height_first(pipe):
    originals, crops, target = [(96, 64), (64, 128)], [(4, 10), (0, 32)], (64, 48)
    ids = time_ids(torch.tensor(originals), torch.tensor(crops), target)
    expected = torch.cat([pipe._get_add_time_ids(original, crop, target, dtype=torch.float32,
                                                 text_encoder_projection_dim=48)
                          for original, crop in zip(originals, crops)])
    assert ids.dtype == torch.float32 and torch.equal(ids, expected)
    assert ids[0].tolist() == [96, 64, 4, 10, 64, 48]


def test_fixed_time_ids_equal_pipeline_defaults(pipe):
    expected = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                      text_encoder_projection_dim=48)
    assert torch.equal(fixed_time_ids(64, 3), expected.repeat(3, 1))


def test_pipeline_call_runs_offline_and_unet_sees_our_conditioning(pipe):
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        images = pipe(CAPTIONS[0], num_inference_steps=2, guidance_scale=2.0, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    finally:
        hook.remove()
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert len(seen) == 2
    context, pooled = encode_prompts(*encoders(pipe), CAPTIONS[:1])
    uncond_context, uncond_pooled = uncond_embeddings(*encoders(pipe), force_zeros=True)
    # Classifier-free guidance batches [uncond, cond]; both halves get the same time_ids.
    assert torch.equal(seen[0]["encoder_hidden_states"], torch.cat([uncond_context, context]))
    assert torch.equal(seen[0]["added_cond_kwargs"]["text_embeds"], torch.cat([uncond_pooled, pooled]))
    assert torch.equal(seen[0]["added_cond_kwargs"]["time_ids"], fixed_time_ids(64, 2))


def test_with_scaling_factor_keeps_what_the_vae_encodes_and_decodes():
    vae = AutoencoderKL.from_pretrained(WORLD_TEACHER / "vae")
    old_factor = vae.config.scaling_factor
    rescaled = with_scaling_factor(vae)
    assert rescaled.config.scaling_factor == 0.13025 and vae.config.scaling_factor == old_factor
    pixels = torch.stack([torch.from_numpy(sample(seed)[1]) for seed in range(4)]).permute(0, 3, 1, 2)
    pixels = pixels.float() / 127.5 - 1
    with torch.no_grad():
        before, after = vae.encode(pixels).latent_dist, rescaled.encode(pixels).latent_dist
        decoded_before, decoded_after = vae.decode(before.mean).sample, rescaled.decode(after.mean).sample
    # The diffusion model sees latents * scaling_factor: same mean and spread per element as before.
    torch.testing.assert_close(after.mean * 0.13025, before.mean * old_factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after.std * 0.13025, before.std * old_factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoded_after, decoded_before, rtol=1e-5, atol=1e-5)
