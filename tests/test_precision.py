"""Precision is what the user asked for: every network call's compute dtype, pinned per mode."""

import pytest
import torch

from lcm_lora.config import TrainConfig
from lcm_lora.distill import lcd_loss
from lcm_lora.models import load_teacher
from lcm_lora.schedule import ddim_timesteps
from lcm_lora.trainer import WEIGHT_DTYPES, encode_batch, make_accelerator, prepare_models, unet_fns

MODES = ["no", "bf16", pytest.param("fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="fp16 autocast needs a GPU"))]


def _record(module: torch.nn.Module, name: str, seen: list):
    module.register_forward_hook(lambda m, inputs, output: seen.append((name, output.dtype)))


@pytest.mark.parametrize("mode", MODES)
def test_every_network_call_runs_in_the_requested_dtype(mode, tmp_path):
    config = TrainConfig.from_flat_dict({"pretrained_teacher_model": "teacher-eps", "mixed_precision": mode,
                                         "lora_rank": 4, "lora_alpha": 4, "report_to": "none",
                                         "output_dir": str(tmp_path)})
    accelerator = make_accelerator(config)
    teacher = load_teacher(config.model)
    unet = prepare_models(config, teacher, accelerator)
    seen: list = []
    _record(teacher.vae.encoder.conv_in, "vae", seen)
    q_proj = next(m for n, m in teacher.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    _record(q_proj, "text_encoder", seen)  # found by name: transformers 4 and 5 nest CLIP differently
    _record(unet.conv_in, "unet", seen)
    lora_layer = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    _record(lora_layer.lora_B["default"], "lora", seen)
    unet = accelerator.prepare(unet)
    dtype = WEIGHT_DTYPES[mode]
    student, teacher_fn, target = unet_fns(unet, accelerator.unwrap_model(unet), dtype)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
             "input_ids": teacher.tokenizer(["a red circle"] * 2, padding="max_length", return_tensors="pt").input_ids}
    with accelerator.autocast():
        x0, c = encode_batch(teacher, batch, accelerator.device, teacher.vae.config.scaling_factor, config.data)
        loss = lcd_loss(student, teacher_fn, target, x0, c, c, teacher.noise_scheduler.alphas_cumprod.to(x0.device),
                        ddim_timesteps().to(x0.device), config.distill, teacher.prediction_type)
    accelerator.backward(loss.mean())

    calls = {name: {d for n, d in seen if n == name} for name, _ in seen}
    assert calls == {"vae": {dtype}, "text_encoder": {dtype}, "unet": {dtype}, "lora": {dtype}}, calls
    assert len([n for n, _ in seen if n == "unet"]) == 3  # student, teacher (2B in one call), target
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.grad is not None for p in trainable)
    frozen = {p.dtype for p in unet.parameters() if not p.requires_grad}
    assert frozen == {dtype}
    assert loss.dtype == torch.float32
