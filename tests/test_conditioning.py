"""The conditioning every UNet call of a step gets: one text context (SD), or SDXL's context, pooled embedding and
time ids, with the teacher's uncond branch built as the SDXL pipeline builds it. Model-free, milliseconds."""

import torch

from lcm_lora.conditioning import cat_cond, fixed_time_ids, time_ids, uncond_for, unet_kwargs


def _sdxl_cond(b: int = 3) -> dict:
    return {"context": torch.randn(b, 77, 96), "pooled": torch.randn(b, 48),
            "time_ids": torch.tensor([[512.0, 768.0, 10.0, 20.0, 256.0, 256.0]]).repeat(b, 1)}


def test_sdxl_uncond_is_zeros_with_the_conds_time_ids_when_the_pipeline_forces_zeros():
    c = _sdxl_cond()
    u = uncond_for(c, None)
    assert set(u) == {"context", "pooled", "time_ids"}
    assert not u["context"].any() and not u["pooled"].any() and u["context"].shape == c["context"].shape
    assert torch.equal(u["time_ids"], c["time_ids"])  # the pipeline reuses the positive time ids


def test_the_empty_prompts_encoding_is_broadcast_to_the_batch():
    c = _sdxl_cond(4)
    empty = {"context": torch.randn(1, 77, 96), "pooled": torch.randn(1, 48)}
    u = uncond_for(c, empty)
    assert torch.equal(u["context"], empty["context"].expand(4, 77, 96))
    assert torch.equal(u["pooled"], empty["pooled"].expand(4, 48)) and torch.equal(u["time_ids"], c["time_ids"])
    sd = uncond_for({"context": torch.randn(2, 77, 64)}, {"context": torch.ones(1, 77, 64)})
    assert set(sd) == {"context"} and torch.equal(sd["context"], torch.ones(2, 77, 64))


def test_cond_and_uncond_become_one_batch_of_2b_key_by_key():
    c = _sdxl_cond(2)
    both = cat_cond(c, uncond_for(c, None))
    assert {k: v.shape[0] for k, v in both.items()} == {"context": 4, "pooled": 4, "time_ids": 4}
    assert torch.equal(both["pooled"][:2], c["pooled"]) and not both["pooled"][2:].any()
    assert torch.equal(cat_cond(torch.ones(1, 2), torch.zeros(1, 2)), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_unet_kwargs_pass_pooled_and_time_ids_as_added_cond_kwargs_in_the_weights_dtype():
    kwargs = unet_kwargs(_sdxl_cond(), torch.bfloat16)
    assert kwargs["encoder_hidden_states"].dtype == torch.bfloat16
    added = kwargs["added_cond_kwargs"]
    assert set(added) == {"text_embeds", "time_ids"} and added["time_ids"].dtype == torch.bfloat16
    assert set(unet_kwargs({"context": torch.randn(1, 77, 8)}, torch.float32)) == {"encoder_hidden_states"}


def test_time_ids_are_height_first_and_the_fixed_ones_match_inference_defaults():
    ids = time_ids(torch.tensor([[480, 640]]), torch.tensor([[12, 34]]), (512, 256))
    assert ids.tolist() == [[480.0, 640.0, 12.0, 34.0, 512.0, 256.0]]  # (orig h, w, top, left, target h, w)
    assert fixed_time_ids(1024, 2).tolist() == [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2
