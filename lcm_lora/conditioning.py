"""What every UNet call of a distillation step takes besides z_t and t: the conditioning c.

    SD1.x / SD2.x  {"context": [B, 77, D]}: the text encoder's last hidden state.
    SDXL family    {"context": [B, 77, D1 + D2], "pooled": [B, P], "time_ids": [B, 6]}: both text encoders'
                   penultimate hidden states concatenated, the second one's pooled (projected) embedding, and the
                   micro-conditioning (original size, crop top-left, target size, each (h, w); SDXL paper,
                   arXiv 2307.01952, sections 2.1-2.3), as diffusers' StableDiffusionXLPipeline.encode_prompt and
                   _get_add_time_ids make them. The UNet takes the last two as `added_cond_kwargs`.

The same c goes to the student, the teacher (cond and uncond as one batch of 2B) and the target.
"""

from __future__ import annotations

import torch

Cond = dict[str, torch.Tensor]


def cat_cond(a: Cond | torch.Tensor, b: Cond | torch.Tensor) -> Cond | torch.Tensor:
    """Two conditionings as one batch (the teacher's cond and uncond halves); a bare tensor is a context."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return {key: torch.cat([a[key], b[key]]) for key in a}


def unet_kwargs(c: Cond, dtype: torch.dtype) -> dict:
    """The UNet's keyword arguments for c, in the frozen weights' dtype."""
    kwargs = {"encoder_hidden_states": c["context"].to(dtype)}
    if "pooled" in c:
        kwargs["added_cond_kwargs"] = {"text_embeds": c["pooled"].to(dtype), "time_ids": c["time_ids"].to(dtype)}
    return kwargs


@torch.no_grad()
def encode_text(text_encoders: tuple, input_ids: tuple[torch.Tensor, ...]) -> Cond:
    """text_conditioning without gradients: the frozen teacher's encoders, as distillation uses them."""
    return text_conditioning(text_encoders, input_ids)


def text_conditioning(text_encoders: tuple, input_ids: tuple[torch.Tensor, ...]) -> Cond:
    """{"context"} from one text encoder (SD1.x/SD2.x: its last hidden state), or {"context", "pooled"} from
    SDXL's two: the penultimate hidden states without the final LayerNorm, concatenated with the first encoder's
    first, and the pooled embedding, the first 2-D output, which only the second (projection) encoder has
    (StableDiffusionXLPipeline.encode_prompt with clip_skip None). Differentiable: the world's SDXL teacher trains
    its encoders through it (tiny_world.build)."""
    if len(text_encoders) == 1:
        return {"context": text_encoders[0](input_ids[0])[0]}
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:
            pooled = out[0]
    return {"context": torch.cat(hidden, dim=-1), "pooled": pooled}


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """[B, 6] = (original h, w, crop top, left, target h, w): SDXL's size and crop conditioning, height first as
    StableDiffusionXLPipeline._get_add_time_ids orders it."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(len(original_size), 2)
    return torch.cat([original_size.float(), crop_top_left.float(), target], dim=1)


def fixed_time_ids(resolution: int, batch: int) -> torch.Tensor:
    """(res, res, 0, 0, res, res) for every sample: what the pipeline passes at inference by default, so the
    distilled LoRA is trained on the conditioning it is sampled with."""
    square = torch.tensor([[resolution, resolution]]).expand(batch, 2)
    return time_ids(square, torch.zeros(batch, 2), (resolution, resolution))


def uncond_for(c: Cond, empty: Cond | None) -> Cond:
    """The teacher's unconditional branch for a batch conditioned on c, as the pipeline builds it at inference
    without a negative prompt: the empty prompt's encoding `empty` ([1, ...], broadcast), or zeros when `empty`
    is None (SDXL's force_zeros_for_empty_prompt); SDXL's time ids are c's (the pipeline reuses them)."""
    batch = len(c["context"])
    if empty is None:
        uncond = {key: torch.zeros_like(value) for key, value in c.items() if key != "time_ids"}
    else:
        uncond = {key: value.to(c["context"].device).expand(batch, *value.shape[1:]) for key, value in empty.items()}
    if "time_ids" in c:
        uncond["time_ids"] = c["time_ids"]
    return uncond
