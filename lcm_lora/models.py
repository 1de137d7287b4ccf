"""Load a Stable Diffusion teacher and put a PEFT LoRA on its UNet.

One UNet serves as student (adapter on), teacher (adapter off) and target (adapter on, no grad),
so a run holds one UNet in memory, not two. Weights load from safetensors only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

from .config import PREDICTION_TYPES, LoraArgs, ModelArgs
from .world import assets


@dataclass
class Teacher:
    tokenizer: CLIPTokenizer | None  # None (with text_encoder and vae) when training from cached encodings
    text_encoder: CLIPTextModel | None
    vae: AutoencoderKL | None
    unet: UNet2DConditionModel | None  # None when only the encoders are needed (writing a cache)
    noise_scheduler: DDPMScheduler  # only its alphas_cumprod table is used
    prediction_type: str
    source: str


def resolve_teacher(name_or_path: str) -> str:
    """A bundled tiny teacher's name, a local folder, or a hub id (returned unchanged)."""
    if name_or_path in assets.BUNDLED:
        return str(assets.resolve(name_or_path))
    return name_or_path


def load_teacher(args: ModelArgs, encoders: bool = True, unet: bool = True) -> Teacher:
    """The teacher's parts from a hub id or folder; `encoders` / `unet` False leave those out."""
    source = resolve_teacher(args.pretrained_teacher_model)
    if Path(source).exists() and not (Path(source) / "unet").is_dir():
        raise FileNotFoundError(
            f"--pretrained_teacher_model {source}: no 'unet' subfolder. Give a diffusers pipeline folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    common = dict(revision=args.revision, use_safetensors=True)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=args.revision)
    prediction_type = args.prediction_type or noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{source}: prediction type {prediction_type!r} is not one of {PREDICTION_TYPES}; "
                         "set --prediction_type.")
    tokenizer = text_encoder = vae = None
    if encoders:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=args.revision)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=args.variant, **common)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=args.variant, **common)
    return Teacher(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=args.variant, **common)
        if unet else None,
        noise_scheduler=noise_scheduler,
        prediction_type=prediction_type,
        source=args.pretrained_teacher_model,
    )


def lora_config(args: LoraArgs) -> LoraConfig:
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        init_lora_weights="gaussian",  # B = 0: the student starts exactly at the teacher
    )


def attach_lora(unet: UNet2DConditionModel, args: LoraArgs) -> UNet2DConditionModel:
    """Freeze the UNet and add one trainable LoRA adapter, kept in fp32 whatever the UNet's dtype."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(args))
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return unet


@contextlib.contextmanager
def adapter_disabled(unet: UNet2DConditionModel):
    """The teacher: the same UNet with its LoRA switched off, switched back on however we leave."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class TargetEMA:
    """The target network theta- <- mu theta- + (1 - mu) theta over the LoRA tensors (LCM, Algorithm 1).

    A copy of the LoRA only (MBs), never of the UNet. `swapped_in` runs the UNet with theta- in place of
    theta and restores theta bit for bit; Accelerate saves it in checkpoints through state_dict.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.names, self.params, self.decay = list(named_params), list(named_params.values()), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for p, s in zip(self.params, self.shadow):
            s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        live = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.data.copy_(s)
        try:
            yield
        finally:
            for p, v in zip(self.params, live):
                p.data.copy_(v)

    def state_dict(self) -> dict:
        return {"shadow": {n: s.clone() for n, s in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        for n, s in zip(self.names, self.shadow):
            s.copy_(state["shadow"][n])


def teacher_fingerprint(args: ModelArgs) -> dict:
    """What a cache of encodings depends on: the teacher's id or absolute folder, revision and variant,
    and a hash of its VAE and text-encoder configs (read from config files, no weights loaded)."""
    import hashlib
    import json

    from transformers import CLIPTextConfig

    source = resolve_teacher(args.pretrained_teacher_model)
    configs = {
        "vae": dict(AutoencoderKL.load_config(source, subfolder="vae", revision=args.revision)),
        "text_encoder": CLIPTextConfig.from_pretrained(source, subfolder="text_encoder",
                                                       revision=args.revision).to_diff_dict(),
    }
    for config in configs.values():  # bookkeeping that changes with library versions, not the model
        for key in [k for k in config if k.startswith("_") or k == "transformers_version"]:
            config.pop(key)
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = args.pretrained_teacher_model
    teacher = name if name in assets.BUNDLED or not Path(source).exists() else str(Path(source).resolve())
    return {"teacher": teacher, "revision": args.revision, "variant": args.variant, "encoder_configs": digest}
